"""`mossserve`: prompt | say | codec | bench | serve (docs/cli.md: the forms outside scripts rely on)."""
from __future__ import annotations

import argparse
import errno
import io
import os
import re
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .audio.formats import EXTENSIONS
from .errors import InvalidRequestError, MossServeError, PromptTooLongError
from .models.presets import PRESETS
from .progress import Progress

if TYPE_CHECKING:
    import numpy as np

    from .speech_request import SpeechRequest

AUDIO_EXTENSIONS = tuple(e for e in EXTENSIONS if e != ".npy")  # -o's audio names
# `bench` options of one mode only, with their defaults: one given to another mode is refused, not
# dropped (`bench --compare-upstream DIR --family local` would run the directory's Delay model).
BENCH_ENGINE_OPTIONS = {"family": "delay", "model": None, "frames": 40, "requests": 16, "ttfa_runs": 5}
BENCH_CODEC_OPTIONS = {"streams": 32, "seconds": 4.0}
SHUTDOWN_TIMEOUT_S = 30.0  # `serve`: a TTS request may run tens of seconds; Kubernetes waits 30 s by default
STDIO = Path("-")  # TEXT and --text-file: read stdin; -o: write stdout
# The library's field names in its refusals, as the flags that set them (flags_named)
SAMPLING_FLAGS = {"audio_temperature": "--temperature", "audio_top_p": "--top-p", "audio_top_k": "--top-k",
                  "audio_repetition_penalty": "--repetition-penalty", "seed": "--seed"}
CODEC_FLAGS = {"n_quantizers": "--n-quantizers"}
REQUEST_FLAGS = {"voice": "--voice", "instructions": "--instructions",  # TEXT's, not --request's
                 "reference_text": "--reference-text"}
SERVE_FLAGS = {"port": "--port", "max_input_chars": "--max-input-chars", "max_voice_seconds": "--max-voice-seconds",
               "request_timeout_s": "--request-timeout", "max_running": "--max-running", "max_queued": "--max-queued",
               "max_len": "--max-len", "max_sessions": "--max-sessions"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        refuse_extra(parser, args, extra)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        default_device(args)
        return args.run(args) or 0
    except MossServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # -o -: the reader (a player) quit; as a pipe's writer, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141
    except OSError as e:  # a file the run reads or writes: not there, a directory, no permission, full disk
        print(f"error: {os_error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def os_error_text(e: OSError) -> str:
    """`Is a directory: out.wav`, not Python's `[Errno 21] Is a directory: 'out.wav'`."""
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def refuse_extra(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Arguments no option took: argparse's own error, but for `say` in its usage, and words after
    TEXT (`say Hello world`, the shell split an unquoted text) with the quoting to use. The words are
    not joined into TEXT: the shell has already changed such text (spaces, quotes, `?` and `*`)."""
    parser = getattr(args, "command_parser", parser)
    message = f"unrecognized arguments: {' '.join(extra)}"
    if getattr(args, "text", None) is not None and not any(word.startswith("-") for word in extra):
        # bare words only: after an unknown option they would be its value, not text
        message += f"; quote a text of several words: mossserve say {shlex.quote(' '.join([args.text, *extra]))} ..."
    parser.error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mossserve", description="Speech synthesis with the MOSS-TTS family.")
    commands = parser.add_subparsers(metavar="COMMAND")

    prompt = commands.add_parser("prompt", help="write a request's prompt matrix (T, 1 + codebooks) as .npy")
    add_model_args(prompt)
    source = prompt.add_mutually_exclusive_group(required=True)
    source.add_argument("--request", type=Path, help="a SpeechRequest as JSON")
    source.add_argument("--conversation", type=Path, help="a conversation as JSON (the reference processor's messages)")
    prompt.add_argument("--mode", choices=["generation", "continuation"], help="conversation mode (default: by the conversation; docs/cli.md)")
    prompt.add_argument("-o", "--output", type=Path, required=True, help="the prompt matrix .npy to write")
    prompt.set_defaults(run=run_prompt)

    say = commands.add_parser("say", help="synthesize speech (or codes) from text or a request")
    add_model_args(say)
    say.add_argument("text", nargs="?", help="the text to speak, quoted if it has several words ('-': read stdin)")
    say.add_argument("--text-file", type=Path, help="read the text to speak from a file ('-': stdin)")
    say.add_argument("--batch", type=Path, help="a JSONL file, one SpeechRequest per line, all run together")
    say.add_argument("--out-dir", type=Path, help="with --batch: writes NNNN.<format> audio and NNNN.npy codes")
    say.add_argument("--format", help="with --batch or -o -: audio format (wav, the default, flac, mp3, opus, ogg, "
                                      "aac, pcm, raw)")
    say.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")
    say.add_argument("--max-running", type=int, help="requests decoded at once (default 16)")
    say.add_argument("--max-len", type=int, help="positions per request, prompt and audio together (default 8192, "
                                                 "at most the model's; the KV cache holds max-running of them)")
    say.add_argument("--request", type=Path, help="a SpeechRequest as JSON")
    say.add_argument("--conversation", type=Path, help="a conversation as JSON")
    say.add_argument("--mode", choices=["generation", "continuation"], help="conversation mode (default: by the conversation; docs/cli.md)")
    say.add_argument("--prompt-matrix", type=Path, help="a prompt matrix .npy (T, 1 + codebooks)")
    say.add_argument("--voice", help="reference voice: an audio file or a .npy of codes (frames, codebooks)")
    say.add_argument("--reference-text", help="what --voice says: Fish S2 Pro clones with it; for MOSS-TTS it "
                                              "means continuation (the speech goes on from the reference)")
    say.add_argument("--instructions", help="the voice to design, in words (MOSS-VoiceGenerator); the template's "
                                            "Instruction field (MOSS-TTS-Local)")
    say.add_argument("--greedy", action="store_true", help="argmax decoding (the model's other rules kept)")
    say.add_argument("--seed", type=int, help="seed for reproducible sampling")
    say.add_argument("--max-frames", type=int, help="cap on generated steps")
    say.add_argument("--speed", type=float, default=1.0,
                     help="play the written audio this many times as fast, pitch kept (0.25 to 4; default 1)")
    say.add_argument("--temperature", type=float, help="audio temperature, every codebook")
    say.add_argument("--top-p", type=float, help="audio top-p, every codebook")
    say.add_argument("--top-k", type=int, help="audio top-k, every codebook")
    say.add_argument("--repetition-penalty", type=float, help="audio repetition penalty, every codebook")
    say.add_argument("--depth", type=int, help="Local model: codebooks generated per frame, 1..n_vq (default all); "
                                              "codes-out then holds that many columns")
    say.add_argument("--codes-out", type=Path, help="write the generated codes (frames, codebooks) as int64 .npy")
    say.add_argument("-o", "--output", type=Path,
                     help="write audio; the extension picks the format (wav, flac, mp3, opus, ogg, aac, pcm, raw, npy); "
                          "'-': stdout, as it is generated, in --format")
    say.set_defaults(run=run_say, command_parser=say)

    codec = commands.add_parser("codec", help="encode audio to codes or decode codes to audio")
    codec_commands = codec.add_subparsers(metavar="ACTION", required=True)
    encode = codec_commands.add_parser("encode", help="audio file -> codes (frames, n_q) int64 .npy")
    encode.add_argument("audio", type=Path, help="an audio file (any readable format and rate)")
    decode = codec_commands.add_parser("decode", help="codes (frames, n_q) .npy -> audio file")
    decode.add_argument("codes", type=Path, help="codes .npy (frames, n_q), int64")
    for action, run in ((encode, run_codec_encode), (decode, run_codec_decode)):
        action.add_argument("--codec", help="codec checkpoint directory or hub id (default: the bundled demo's codec)")
        action.add_argument("-o", "--output", type=Path, required=True,
                            help="codes .npy (encode); audio, the extension picks the format (decode)")
        action.add_argument("--n-quantizers", type=int, help="use the first K quantizers")
        add_device_arg(action)
        action.set_defaults(run=run)
    bench = commands.add_parser("bench", help="benchmarks (figures for docs and issues, not tests)")
    bench.add_argument("target", nargs="?", choices=["codec"],
                       help="none: the engine (throughput at concurrency 1/4/16, streaming TTFA); "
                            "codec: streaming decode, many streams batched vs one at a time")
    bench.add_argument("--codec", help="codec checkpoint (default: a bench-size random one; engine: the model's own)")
    bench.add_argument("--streams", type=int, default=BENCH_CODEC_OPTIONS["streams"],
                       help="codec: streams (default %(default)s)")
    bench.add_argument("--seconds", type=float, default=BENCH_CODEC_OPTIONS["seconds"],
                       help="codec: audio seconds per stream (default %(default)s)")
    bench.add_argument("--family", default=BENCH_ENGINE_OPTIONS["family"],
                       help="engine: model family of the bench checkpoint or --model (delay, local, realtime, fish; "
                            "default %(default)s)")
    bench.add_argument("--model", help="engine: checkpoint directory or hub id (default: a bench-size random one)")
    bench.add_argument("--frames", type=int, default=BENCH_ENGINE_OPTIONS["frames"],
                       help="engine: frames generated per request (default %(default)s)")
    bench.add_argument("--requests", type=int, default=BENCH_ENGINE_OPTIONS["requests"],
                       help="engine: requests per run (default %(default)s)")
    bench.add_argument("--ttfa-runs", type=int, default=BENCH_ENGINE_OPTIONS["ttfa_runs"],
                       help="engine: TTFA measurements, their median reported (default %(default)s)")
    add_device_arg(bench)
    add_dtype_arg(bench)
    bench.add_argument("--compare-upstream", metavar="DIR", type=Path,
                       help="engine: run the requests of a directory written by upstream_delay.py, side by side "
                            "with the reference's figures, and check the generated rows")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(run=run_bench)

    serve = commands.add_parser("serve", help="the HTTP server: OpenAI's speech API, voices, metrics")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default %(default)s: this machine only; 0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default %(default)s)")
    serve.add_argument("--api-key", default=os.environ.get("MOSSSERVE_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $MOSSSERVE_API_KEY unless empty; "
                            "none: open)")
    serve.add_argument("--data-dir", type=Path, help="voices and their database (default: $MOSSSERVE_DATA_DIR, "
                                                      "else ~/.local/share/mossserve)")
    serve.add_argument("--model-name", help="the model id clients send and /v1/models lists")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser calls from ORIGIN (repeatable; '*' for any; default: none)")
    serve.add_argument("--max-running", type=int, default=16,
                       help="requests decoded together (batch slots; default %(default)s)")
    serve.add_argument("--max-len", type=int, help="positions per request, prompt and audio together (default 8192, "
                                                   "at most the model's)")
    serve.add_argument("--max-queued", type=int, default=256,
                       help="requests that may wait for a slot (503 past --max-running plus this; default %(default)s)")
    serve.add_argument("--max-sessions", type=int, default=64,
                       help="realtime sessions (websocket contexts) held at once (default %(default)s)")
    serve.add_argument("--max-input-chars", type=int, default=4096,
                       help="longest text per request field, in characters (default %(default)s)")
    serve.add_argument("--max-voice-seconds", type=float, default=60.0,
                       help="longest reference audio, in seconds (default %(default)s)")
    serve.add_argument("--max-body-mb", type=float, default=25.0,
                       help="largest request body, uploads included, in MB (default %(default)s)")
    serve.add_argument("--request-timeout", type=float, default=300.0,
                       help="seconds before a request is stopped (default %(default)s)")
    serve.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S,
                       help="seconds open requests may take to finish after a stop signal (default %(default)s)")
    serve.add_argument("--ray", action="store_true", help="replicas on Ray Serve, one address (docs/deployment.md)")
    scale = serve.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="with --ray: engine replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="with --ray: replicas scaled by load between MIN and MAX")
    serve.add_argument("--ray-address", help="with --ray: an existing cluster (default: start a local one)")
    serve.add_argument("--voice-service", action="store_true",
                       help="with --ray: one replica on the head node owns --data-dir and every replica reaches "
                            "it through Ray (replicas on several machines)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="the server's log detail (default %(default)s)")
    serve.add_argument("--no-playground", dest="playground", action="store_false",
                       help="do not serve the web playground at / (by default it is served)")
    serve.set_defaults(run=run_serve)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the bundled demo checkpoint)")
    parser.add_argument("--codec", help="codec directory or hub id (default: the model's own)")
    add_device_arg(parser)
    add_dtype_arg(parser)
    parser.add_argument("--task", choices=list(PRESETS),
                        help="which MOSS-TTS Delay model the checkpoint is, when its name does not say (MOSS-TTSD: "
                             "dialogue, -VoiceGenerator: voice_design, -SoundEffect: sound_effect; default tts)")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")


def default_device(args: argparse.Namespace) -> None:
    """No --device: the CPU (`note_gpu_unused` says so where a model loads and a GPU is visible)."""
    if getattr(args, "device", "") is None:
        args.device, args.device_defaulted = "cpu", True


def note_gpu_unused(args: argparse.Namespace) -> None:
    """A model loading on the CPU by default while a CUDA GPU is visible: said, since a user who
    forgot --device would only see a run many times slower."""
    import torch

    if getattr(args, "device_defaulted", False) and torch.cuda.is_available():
        print("note: running on the CPU (no --device given), though a CUDA GPU is visible: --device cuda "
              "--dtype bfloat16 runs there", file=sys.stderr)


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                        help="weights' precision (default %(default)s; auto: bfloat16 where the device runs it natively, else float32)")


def load_tts(args: argparse.Namespace):
    from .api import TTS
    from .config import EngineConfig

    config = EngineConfig(max_running=getattr(args, "max_running", None) or EngineConfig.max_running,
                          max_len=getattr(args, "max_len", None) or EngineConfig.max_len)
    note_gpu_unused(args)
    tts = TTS.from_pretrained(args.model, codec=args.codec, device=args.device, dtype=args.dtype, engine_config=config,
                              task=args.task)
    if tts.is_demo:
        print("note: no --model given; using the bundled tiny random-weight demo checkpoint "
              "(it produces noise, not speech)", file=sys.stderr)
    return tts


def body_bytes(megabytes: float) -> int:
    """--max-body-mb in bytes; a positive, finite number of megabytes."""
    if not 0 < megabytes < 1024 * 1024:
        raise InvalidRequestError(f"--max-body-mb: the body limit must be positive and finite, in MB, got {megabytes}")
    return int(megabytes * 1024 * 1024)


def build_prompts(tts, args: argparse.Namespace, request: SpeechRequest | None) -> list:
    """The prompt(s) a command's input describes; `request`: read_request's."""
    from .speech_request import read_npy

    if getattr(args, "prompt_matrix", None) is not None:
        rows = read_npy(args.prompt_matrix, "prompt matrix: ")
        return [tts.talker.prompt_from_rows(rows)]
    if args.conversation is not None:
        return tts.conversation_prompts(args.conversation, args.mode)
    if args.request is not None and _is_session_script(args.request):
        return [session_first_turn(tts, args.request)]
    if request is None:
        raise InvalidRequestError("give TEXT, --request, --conversation or --prompt-matrix")
    if (args.request is None and tts.talker.voice_needs_transcript and request.voice is not None
            and not (request.reference_text or "").strip()):
        raise InvalidRequestError("this model clones a voice from its audio and what it says, together: give "
                                  "--reference-text (what --voice says)")
    with flags_named(REQUEST_FLAGS if args.request is None else {}):
        return [tts.prompt(request)]


def read_request(args: argparse.Namespace) -> SpeechRequest | None:
    """The request of --request (not a session script) or of TEXT, parsed and checked before a model
    loads for it (bad JSON, an unknown field, a missing --voice, a blank TEXT cost the whole model
    load, minutes for a large one); None for the other inputs."""
    from .speech_request import SpeechRequest

    if getattr(args, "conversation", None) is not None:
        check_one_conversation(args.conversation)
    if args.request is not None:
        if _is_session_script(args.request):
            return None
        request = SpeechRequest.from_json(args.request)
        check_request_depth(request, getattr(args, "depth", None), str(args.request))
        return request
    text = getattr(args, "text", None)
    if text is None:
        return None
    if not text.strip():
        raise InvalidRequestError("input is empty: there is nothing to say")
    return SpeechRequest(input=text, voice=args.voice, reference_text=args.reference_text,
                         instructions=args.instructions)


def check_one_conversation(path: str) -> None:
    """`prompt` and `say` write one prompt's output: a file holding a batch of several conversations
    is refused before the model loads (and its voices are encoded)."""
    from .json_files import read_json_file
    from .text.conversation import is_batch
    from .text.conversation_record import is_record_batch

    data = read_json_file(path, "conversation file")
    if isinstance(data, list) and len(data) > 1 and (is_batch(data) or is_record_batch(data)):
        raise InvalidRequestError(f"{path} holds {len(data)} conversations; prompt and say take one")


def check_inputs_exist(args: argparse.Namespace) -> None:
    """An input file that does not exist, reported before a model loads for it."""
    for flag in ("--request", "--conversation", "--prompt-matrix", "--batch"):
        path = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if path is not None and not Path(path).exists():
            raise InvalidRequestError(f"{flag}: file not found: {path}")


def run_prompt(args: argparse.Namespace) -> None:
    check_mode(args)
    check_inputs_exist(args)
    check_output(args.output)
    request = read_request(args)
    tts = load_tts(args)
    try:
        prompts = build_prompts(tts, args, request)
    finally:
        tts.close()
    rows = prompts[0].info.get("matrix", prompts[0].rows)  # the processor's matrix (a family may run a variant)
    save_npy(args.output, rows)
    print(f"wrote {args.output}: prompt matrix {rows.shape}", file=sys.stderr)


def run_say(args: argparse.Namespace) -> int:
    sources = (args.text, args.text_file, args.request, args.conversation, args.prompt_matrix, args.batch)
    if sum(x is not None for x in sources) != 1:
        raise InvalidRequestError("give exactly one of TEXT, --text-file, --request, --conversation, "
                                  "--prompt-matrix, --batch")
    given = [f"--{flag}" for flag in ("voice", "reference-text", "instructions")
             if getattr(args, flag.replace("-", "_")) is not None]
    if given and args.text is None and args.text_file is None:
        go, them = ("go", "them") if len(given) > 1 else ("goes", "it")
        raise InvalidRequestError(f"{' and '.join(given)} {go} with TEXT or --text-file; put {them} inside the request")
    if args.batch is None and (args.out_dir is not None or args.format is not None and args.output != STDIO):
        raise InvalidRequestError("--out-dir and --format go with --batch (-o's extension picks its format; "
                                  "-o - takes --format)")
    check_mode(args)
    check_inputs_exist(args)
    if args.greedy and args.temperature not in (None, 0):
        raise InvalidRequestError("--greedy is temperature 0; give one of --greedy and --temperature")
    check_sampling(args)
    if args.batch is not None:
        if args.out_dir is None or args.output is not None or args.codes_out is not None:
            raise InvalidRequestError("--batch writes into --out-dir (not -o / --codes-out)")
        check_out_dir(args.out_dir)
        args.format = batch_format(args.format or "wav")
    elif args.output is None and args.codes_out is None:
        raise InvalidRequestError("give -o OUT (audio) and/or --codes-out CODES.npy")
    if args.output == STDIO:
        if sys.stdout is None:
            raise InvalidRequestError("-o -: stdout is closed")
        args.format = EXTENSIONS[f".{audio_format(args.format or 'wav')}"]
    else:
        check_output(args.output, audio=True)
    check_output(args.codes_out)
    if args.output is not None and args.codes_out is not None and args.output.resolve() == args.codes_out.resolve():
        raise InvalidRequestError(f"-o and --codes-out both name {args.output}: the audio would overwrite the codes")
    if args.max_frames is not None and args.max_frames < 1:
        raise InvalidRequestError("--max-frames must be at least 1")
    check_speed(args)
    if args.max_running is not None and args.max_running < 1:
        raise InvalidRequestError("--max-running must be at least 1")
    check_max_len(args)
    read_text(args)
    from .speech_request import load_requests_jsonl

    requests = load_requests_jsonl(args.batch) if args.batch is not None else None
    request = read_request(args)
    tts = load_tts(args)
    try:
        return say_batch(tts, args, requests) if requests is not None else say_one(tts, args, request)
    finally:
        tts.close()


def read_text(args: argparse.Namespace) -> None:
    """--text-file, or TEXT `-`: the text to speak read (stdin for `-`) as UTF-8, a BOM and the ends'
    white space dropped, into args.text."""
    source = args.text_file if args.text_file is not None else STDIO if args.text == str(STDIO) else None
    if source is None:
        return
    name = "stdin" if source == STDIO else source
    if source == STDIO and sys.stdin is None:
        raise InvalidRequestError("cannot read stdin: it is closed")
    try:
        if source == STDIO:
            args.text = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig").read().strip()
        else:
            args.text = source.read_text(encoding="utf-8-sig").strip()  # a BOM is no text to speak
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"cannot read {name}: {e}") from None
    if not args.text:
        raise InvalidRequestError(f"{name} is empty")


@contextmanager
def flags_named(flags: dict[str, str]) -> Iterator[None]:
    """A refusal that begins with a library field of `flags` (`audio_top_p must be ...`,
    `EngineConfig.max_queued ...`) names the flag the user typed instead."""
    try:
        yield
    except InvalidRequestError as e:
        match = re.match(r"(?:EngineConfig\.)?([a-z_]+)\b", str(e))
        if match is None or match.group(1) not in flags:
            raise
        raise InvalidRequestError(flags[match.group(1)] + str(e)[match.end():]) from None


def sampling_overrides(args: argparse.Namespace) -> dict:
    return {"audio_temperature": args.temperature, "audio_top_p": args.top_p, "audio_top_k": args.top_k,
            "audio_repetition_penalty": args.repetition_penalty, "seed": args.seed}


def check_sampling(args: argparse.Namespace) -> None:
    """The sampling flags' ranges (SamplingParams' own rules) before a model loads for them."""
    from .sampling import SamplingParams

    with flags_named(SAMPLING_FLAGS):
        SamplingParams().with_overrides(**sampling_overrides(args)).validate()


def check_max_len(args: argparse.Namespace) -> None:
    if args.max_len is not None and args.max_len < 2:
        raise InvalidRequestError("--max-len must be at least 2 (positions)")


def check_speed(args: argparse.Namespace) -> None:
    from .audio.tempo import SPEEDS

    if not SPEEDS[0] <= args.speed <= SPEEDS[1]:
        raise InvalidRequestError(f"--speed must lie in {SPEEDS[0]:g}..{SPEEDS[1]:g}, got {args.speed:g}")
    if args.speed != 1.0 and args.output is None and args.batch is None:
        raise InvalidRequestError("--speed changes the written audio: give -o OUT (codes are the same at any speed)")


def write_speech(path: Path, samples: np.ndarray, rate: int, speed: float) -> float:
    """The audio at --speed (time-stretched, pitch kept) written to `path`; its length in seconds."""
    from .audio import write_audio
    from .audio.tempo import change_tempo

    samples = change_tempo(samples, rate, speed)
    write_audio(path, samples, rate)
    return samples.shape[-1] / rate


def with_depth(tts, prompts: list, depth: int | None) -> list:
    """`--depth K` (Local family): every prompt generates K codebooks per frame."""
    if depth is None:
        return prompts
    check_depth(tts, depth)
    return [tts.talker.with_depth(p, depth) for p in prompts]


def check_depth(tts, depth: int) -> None:
    """`--depth` names a Local model's codebooks per frame: no other model takes it."""
    if not hasattr(tts.talker, "check_depth"):
        raise InvalidRequestError("--depth is for the Local model (MOSS-TTS-Local-Transformer); "
                                  "this model always generates all its codebooks")
    with flags_named({"depth": "--depth"}):
        tts.talker.check_depth(depth)


def check_request_depth(request, depth: int | None, where: str) -> None:
    """A request that says its own depth and a different --depth: refused, not overridden."""
    if depth is not None and request.depth is not None and request.depth != depth:
        raise InvalidRequestError(f"{where} asks for depth {request.depth} and --depth for {depth}; give one")


def check_mode(args: argparse.Namespace) -> None:
    if args.mode is not None and args.conversation is None:
        raise InvalidRequestError("--mode goes with --conversation (a request says its own mode)")


def say_one(tts, args: argparse.Namespace, request: SpeechRequest | None) -> int:
    if args.request is not None and _is_session_script(args.request):
        return say_session(tts, args)
    prompts = with_depth(tts, build_prompts(tts, args, request), args.depth)
    progress = Progress(1, args.progress)
    stdout = StdoutAudio(tts.codec, args.format, args.speed) if args.output == STDIO else None

    def on_chunk(_, chunk) -> None:
        progress.update(_chunk_seconds(chunk), chunk.final)
        if stdout is not None:
            stdout.write(chunk.audio, chunk.final)

    try:
        generation, audio = tts.run(prompts, sampling_from_args(tts, args), args.max_frames,
                                    decode_audio=args.output is not None, on_chunk=on_chunk)[0]
    except PromptTooLongError as e:  # with what the user can do about it
        voiced = request is not None and (request.voice is not None or request.speakers is not None)
        if getattr(args, "conversation", None) is not None:
            shorten = "shorten the conversation or its voice references"
        else:
            shorten = ("split the text (--batch takes one request per line, e.g. one per paragraph)"
                       + (", use a shorter voice reference" if voiced else ""))
        raise PromptTooLongError(f"{e}; {shorten} or raise --max-len (up to the model's own limit)") from None
    progress.close()
    frames = generation.frames
    ended = ending(generation)
    if args.codes_out is not None:
        save_npy(args.codes_out, frames)
        print(f"wrote {args.codes_out}: codes {frames.shape} ({ended})", file=sys.stderr)
    if args.output is not None:
        if len(frames) == 0 or audio.samples.shape[-1] == 0:
            raise InvalidRequestError(no_audio(generation))
        if stdout is None:
            seconds = write_speech(args.output, audio.samples, audio.sample_rate, args.speed)
            print(f"wrote {args.output}: {seconds:.2f} s at {written_rate(args.output, audio.sample_rate)} Hz "
                  f"({ended})", file=sys.stderr)
        else:
            print(f"wrote stdout: {stdout.seconds:.2f} s of {stdout.encoder.format} at {stdout.encoder.sample_rate} Hz "
                  f"({ended})", file=sys.stderr)
    return 0


class StdoutAudio:
    """-o -: the audio (at --speed) encoded in --format and written to stdout chunk by chunk as it is
    generated, so a player reading the pipe starts before the text is all spoken."""

    def __init__(self, codec, format: str, speed: float):
        from .audio import StreamEncoder
        from .audio.tempo import TempoChange

        self.encoder = StreamEncoder(format, codec.sample_rate, codec.channels)
        self.tempo = TempoChange(speed, codec.sample_rate, codec.channels) if speed != 1.0 else None
        self.channels, self.rate, self.seconds = codec.channels, codec.sample_rate, 0.0

    def write(self, samples: np.ndarray | None, final: bool) -> None:
        """`samples` (channels, n) float32, or None; `final`: the file ends after them. Nothing is
        written before the first samples: a run that gives no audio (an error) leaves stdout empty,
        not a header of an empty file."""
        import numpy as np

        if samples is None:
            samples = np.zeros((self.channels, 0), np.float32)
        if self.tempo is not None:
            samples = self.tempo.write(samples)
            if final:
                samples = np.concatenate([samples, self.tempo.close()], axis=-1)
        if not samples.shape[-1] and not self.seconds:
            return
        self.seconds += samples.shape[-1] / self.rate
        data = self.encoder.write(samples) + (self.encoder.close() if final else b"")
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def say_session(tts, args: argparse.Namespace) -> int:
    """A Realtime session script: every turn in one session; codes and audio of all turns, in order."""
    import numpy as np

    from .text.realtime_session import SessionScript

    if args.depth is not None:
        check_depth(tts, args.depth)  # refuses it: a session's model always generates all its codebooks
    script = SessionScript.from_json(args.request)
    results = tts.run_session(script, sampling_from_args(tts, args), args.max_frames,
                              decode_audio=args.output is not None)
    frames = np.concatenate([g.frames for g, _ in results])
    ended = ", ".join(f"turn {i}: {ending(g)}"
                      for i, (g, _) in enumerate(results))
    if args.codes_out is not None:
        save_npy(args.codes_out, frames)
        print(f"wrote {args.codes_out}: codes {frames.shape} ({ended})", file=sys.stderr)
    if args.output is not None:
        if len(frames) == 0:
            raise InvalidRequestError(f"the model produced no audio frames ({ended})")
        samples = np.concatenate([audio.samples for _, audio in results], axis=-1)
        if args.output == STDIO:  # whole, once every turn has run
            stdout = StdoutAudio(tts.codec, args.format, args.speed)
            stdout.write(samples, final=True)
            seconds = stdout.seconds
        else:
            seconds = write_speech(args.output, samples, results[0][1].sample_rate, args.speed)
        print(f"wrote {'stdout' if args.output == STDIO else args.output}: {seconds:.2f} s ({ended})", file=sys.stderr)
    return 0


def session_first_turn(tts, path: Path):
    """A session script's first turn as a prompt (its input and prefill rows): what `prompt` writes for a
    script, since later turns' contexts hold audio that only generation produces."""
    from .text.realtime_session import SessionScript

    if not tts.talker.supports_sessions:
        raise InvalidRequestError(f"{path} is a session script; this model does not run sessions")
    script = SessionScript.from_json(path)
    return tts.talker.turn_prompt(script.turns[0], True, script.voice)


def _is_session_script(path: Path) -> bool:
    import json

    from .text.realtime_session import is_session_script

    try:
        return is_session_script(json.loads(Path(path).read_text(encoding="utf-8-sig")))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False  # SpeechRequest.from_json reports what is wrong with it


_ENDINGS = {"stop": "stopped", "length": "hit the step cap", "runaway": "cut by the runaway guard"}


def no_audio(generation) -> str:
    """Why a generation gave no audio to write: no frames, or (a continuation prefix as long as
    every frame) none that is new."""
    if len(generation.frames):
        return (f"the model produced no new audio: its {len(generation.frames)} frames are all the prompt's "
                f"continuation prefix ({ending(generation)})")
    return f"the model produced no audio frames ({ending(generation)})"


def ending(generation) -> str:
    """How a generation ended, in words for stderr."""
    if generation.length_limit is not None:
        how = (f"reached the engine's length limit ({generation.length_limit} positions of prompt and audio; "
               "--max-len sets it, up to the model's own)")
    else:
        how = _ENDINGS[generation.finish_reason]
    return f"{how} after {len(generation.rows)} steps"


def _chunk_seconds(chunk) -> float:
    return 0.0 if chunk.audio is None else chunk.audio.shape[-1] / chunk.sample_rate


def sampling_from_args(tts, args: argparse.Namespace):
    if args.greedy and args.repetition_penalty is not None and not tts.talker.greedy_penalty:
        raise InvalidRequestError(f"--repetition-penalty has no effect with --greedy on a {tts.talker.name} model "
                                  "(its greedy decoding applies no penalty, as the reference's)")
    with flags_named(SAMPLING_FLAGS):
        sampling = tts.sampling(args.greedy, **sampling_overrides(args))
        tts.talker.check_sampling(sampling)  # the model's own rules (Fish: no repetition penalty), as flags
        return sampling


def say_batch(tts, args: argparse.Namespace, requests: list) -> int:
    """Every line of --batch through continuous batching; NNNN.<format> and NNNN.npy per request, in
    the file's order. A request the model cannot run, or that fails, is reported (by its line) and
    skipped; the others are written."""
    if args.depth is not None:
        check_depth(tts, args.depth)
    refused, runnable = [], []  # (index, line, error), (index, line, prompt)
    for index, (line, request) in enumerate(requests):
        try:
            check_request_depth(request, args.depth, "the line")
            runnable.append((index, line, with_depth(tts, [tts.prompt(request)], args.depth)[0]))
        except InvalidRequestError as e:
            refused.append((index, line, str(e)))
    sampling = sampling_from_args(tts, args)
    tts.engine.check_settings(sampling, args.max_frames)  # settings the model refuses: before the directory is made
    tts.codec  # noqa: B018 - loaded (and checked against the model) before the output directory is made
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = [(line, error + stale_outputs_removed(args, index)) for index, line, error in refused]
    progress = Progress(len(runnable), args.progress)
    total, cut = 0.0, []

    def write(i: int, generation, audio) -> None:
        """Each request's files as it ends: an interrupted run keeps what had finished."""
        nonlocal total
        index, line, _ = runnable[i]
        if generation.finish_reason == "error" or len(generation.frames) == 0 or audio.samples.shape[-1] == 0:
            failed.append((line, (generation.error or no_audio(generation)) + stale_outputs_removed(args, index)))
            return
        codes, saved = args.out_dir / f"{index:04d}.npy", False
        try:
            save_npy(codes, generation.frames)
            saved = True
            total += write_speech(args.out_dir / f"{index:04d}.{args.format}", audio.samples, audio.sample_rate,
                                  args.speed)
        except (OSError, MossServeError) as e:  # this request's files only (a name taken by a directory)
            if saved:
                codes.unlink()  # codes without their audio would pass for a request written
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # a full disk: every request after it would fail too
            failed.append((line, f"cannot write its files: {os_error_text(e) if isinstance(e, OSError) else e}"
                                 + stale_outputs_removed(args, index)))
            return
        if generation.finish_reason != "stop":  # the step cap, the engine's length or the runaway guard
            cut.append((line, ending(generation)))

    try:
        tts.run([prompt for _, _, prompt in runnable], sampling, args.max_frames, raise_errors=False,
                on_chunk=lambda _, c: progress.update(_chunk_seconds(c), c.final), on_result=write)
    finally:
        progress.close()  # a failure's message then starts on its own line, not after the bar
    for line, how in sorted(cut):
        print(f"{args.batch}:{line}: written, but it {how}", file=sys.stderr)
    for line, error in sorted(failed):
        print(f"{args.batch}:{line}: skipped: {error}", file=sys.stderr)
    print(f"wrote {len(requests) - len(failed)} of {len(requests)} requests to {args.out_dir} ({total:.1f} s of audio)",
          file=sys.stderr)
    later = sorted(path.name for path in args.out_dir.glob("[0-9][0-9][0-9][0-9].*")
                   if path.stem.isdigit() and int(path.stem) >= len(requests))
    if later:
        print(f"note: {args.out_dir} also holds {', '.join(later[:4])}{', ...' if len(later) > 4 else ''} from an "
              f"earlier run: this batch has {len(requests)} requests (0000 to {len(requests) - 1:04d})", file=sys.stderr)
    return 1 if failed else 0


def stale_outputs_removed(args: argparse.Namespace, index: int) -> str:
    """A skipped request's number may hold an earlier run's files, which would pass for this run's
    output (a script joining NNNN.wav would join old audio): they are removed; said in the skip line."""
    removed, kept = [], []
    for path in (args.out_dir / f"{index:04d}.npy", args.out_dir / f"{index:04d}.{args.format}"):
        if path.is_file():
            try:
                path.unlink()
                removed.append(path.name)
            except OSError as e:  # this line's note, not the batch's end
                kept.append(f"could not remove an earlier run's {path.name}: {os_error_text(e)}")
    return "".join(f" ({note})" for note in ([f"removed an earlier run's {' and '.join(removed)}"] if removed else [])
                   + kept)


def batch_format(name: str) -> str:
    """--batch's audio format as an extension (`-o`'s names: wav, flac, mp3, opus, ogg, aac, pcm, raw)."""
    if name.lower().lstrip(".") == "npy":
        names = ", ".join(e.lstrip(".") for e in AUDIO_EXTENSIONS)
        raise InvalidRequestError(f"--batch writes each request's codes as NNNN.npy; give an audio --format ({names})")
    return audio_format(name)


def audio_format(name: str) -> str:
    """--format as an extension of -o's audio names (wav, flac, mp3, opus, ogg, aac, pcm, raw)."""
    extension = name.lower().lstrip(".")
    if f".{extension}" not in AUDIO_EXTENSIONS:
        names = ", ".join(e.lstrip(".") for e in AUDIO_EXTENSIONS)
        raise InvalidRequestError(f"--format {name}: not an audio format; use one of {names}")
    return extension


def check_output(path: Path | None, audio: bool = False) -> None:
    """Refuse an output the run could not write before any model work: an audio name's extension
    must give a format; the file's directory must exist, and the name must not be a directory."""
    if path is None:
        return
    if path == STDIO:
        raise InvalidRequestError("'-' (stdout) is for say's -o audio only; give this output a file name")
    if path.is_dir():
        raise InvalidRequestError(f"{path} is a directory; give a file name")
    if not audio and path.suffix.lower() in AUDIO_EXTENSIONS:
        raise InvalidRequestError(f"{path} names an audio file, but this output is a .npy array (codes or a prompt)")
    if audio:
        from .audio.formats import format_from_path

        format_from_path(path)
    try:
        target = path.resolve() if path.is_symlink() else path  # a link is written through, to its target
    except (RuntimeError, OSError):  # a link that leads back to itself
        raise InvalidRequestError(f"cannot write {path}: its symlinks form a loop") from None
    if not target.parent.is_dir():
        raise InvalidRequestError(f"cannot write {path}: no directory {target.parent}")
    if not os.access(target, os.W_OK) if target.exists() else not os.access(target.parent, os.W_OK | os.X_OK):
        raise InvalidRequestError(f"cannot write {path}: permission denied (or a read-only file system)")


def check_out_dir(path: Path, flag: str = "--out-dir") -> None:
    """--out-dir (`serve --data-dir`): a directory the run can write into, or one it can make there,
    checked before any model work (a run that found out at its first file lost every request in
    flight; a server, after its model had loaded)."""
    existing = path
    while not existing.exists():  # the nearest part of the path there is; "." and "/" always are
        if existing.is_symlink():
            raise InvalidRequestError(f"{flag} {path}: {existing} is a link to nothing ({os.readlink(existing)})")
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f": {existing}"
        raise InvalidRequestError(f"{flag} {path}{where} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidRequestError(f"cannot write into {flag} {path}: permission denied on {existing} "
                                  f"(or a read-only file system)")


def save_npy(path: Path, array: np.ndarray) -> None:
    """Codes (or a prompt matrix) as int64, under exactly the name given (np.save itself adds .npy to
    any other name)."""
    import numpy as np

    from .whole_file import whole_file

    with whole_file(path) as f:
        np.save(f, array.astype(np.int64))


def load_codec_arg(args: argparse.Namespace):
    from .models.registry import load_codec

    if args.n_quantizers is not None and args.n_quantizers < 1:
        raise InvalidRequestError(f"--n-quantizers must be at least 1 (leave it out for all), got {args.n_quantizers}")
    if args.codec is None:
        from .api import DEMO_MODEL

        print("note: no --codec given; using the bundled demo checkpoint's codec (tiny random weights: its "
              "audio is noise)", file=sys.stderr)
        return load_codec(DEMO_MODEL / "codec", device=args.device)
    return load_codec(args.codec, device=args.device)


def written_rate(path: Path, rate: int) -> int:
    """The rate of the samples written to `path`: mp3, opus and aac take only some rates
    (formats.RATES). Opus decoders play every file at 48 kHz; this is the rate it was encoded from."""
    from .audio.formats import format_from_path, output_rate

    kind = format_from_path(path)
    return rate if kind == "npy" else output_rate(kind, rate)


def run_codec_encode(args: argparse.Namespace) -> None:
    import torch

    from .audio import load_audio
    from .errors import AudioError

    check_output(args.output)
    codec = load_codec_arg(args)
    try:  # any audio, quiet or silent: a codec is not a voice
        samples = load_audio(args.audio, codec.sample_rate, channels=codec.channels, min_peak=None)
    except AudioError as e:
        raise AudioError(f"{args.audio}: {e}") from None
    with torch.inference_mode(), flags_named(CODEC_FLAGS):
        codes = codec.encode(torch.from_numpy(samples).to(codec.device), n_quantizers=args.n_quantizers)
    out = codes.T.cpu().numpy()
    if len(out) == 0:
        raise InvalidRequestError(f"{args.audio} is shorter than one codec frame "
                                  f"({codec.samples_per_frame / codec.sample_rate * 1000:g} ms): no codes")
    save_npy(args.output, out)
    print(f"wrote {args.output}: codes {out.shape}", file=sys.stderr)


def run_codec_decode(args: argparse.Namespace) -> None:
    import torch

    from .audio import write_audio
    from .speech_request import load_codes

    check_output(args.output, audio=True)
    codec = load_codec_arg(args)
    codes = load_codes(args.codes, "codes")
    if codes.shape[0] == codec.num_quantizers and codes.shape[1] < codes.shape[0]:
        # (n_q, frames), the codec's own layout, reads as n_q frames of fewer codebooks: not an
        # error (a short clip of a few codebooks has this shape too), but worth a word.
        print(f"note: {args.codes} has shape {codes.shape}, which looks transposed (expected (frames, "
              f"{codec.num_quantizers}) for this codec); decoding it as {codes.shape[0]} frames of "
              f"{codes.shape[1]} codebooks", file=sys.stderr)
    if codes.shape[1] > codec.num_quantizers:
        raise InvalidRequestError(f"{args.codes} has {codes.shape[1]} codebooks; the codec has {codec.num_quantizers}")
    if codes.min() < 0 or codes.max() >= codec.codebook_size:
        raise InvalidRequestError(f"{args.codes}: codes must lie in 0..{codec.codebook_size - 1}")
    with torch.inference_mode(), flags_named(CODEC_FLAGS):
        wave = codec.decode(torch.from_numpy(codes.T.copy()).to(codec.device), n_quantizers=args.n_quantizers)
    samples = wave.float().cpu().numpy()
    write_audio(args.output, samples, codec.sample_rate)
    print(f"wrote {args.output}: {samples.shape[-1] / codec.sample_rate:.2f} s at "
          f"{written_rate(args.output, codec.sample_rate)} Hz", file=sys.stderr)


def run_bench(args: argparse.Namespace) -> None:
    import json

    log = None if args.json else (lambda message: print(f"bench: {message}", file=sys.stderr, flush=True))
    if args.compare_upstream is not None:
        from .bench.compare import run_compare_upstream

        if args.target is not None:
            raise InvalidRequestError("--compare-upstream is an engine bench; drop the 'codec' target")
        _refuse_bench_options(args, "--compare-upstream",
                              {**BENCH_ENGINE_OPTIONS, **BENCH_CODEC_OPTIONS, "codec": None})
        result = run_compare_upstream(args.compare_upstream, device=args.device, dtype=args.dtype, log=log)
        print(json.dumps(result, indent=None if args.json else 1))
        return
    if args.target is None:  # the engine bench
        from .bench.engine import format_table, run_engine_bench

        _refuse_bench_options(args, "the engine bench", BENCH_CODEC_OPTIONS)
        if args.frames < 1 or args.requests < 1 or args.ttfa_runs < 1:
            raise InvalidRequestError("--frames, --requests and --ttfa-runs must be >= 1")
        result = run_engine_bench(family=args.family, model=args.model, codec=args.codec, device=args.device,
                                  dtype=args.dtype, frames=args.frames, requests=args.requests,
                                  ttfa_runs=args.ttfa_runs, log=log)
        print(json.dumps(result) if args.json else format_table(result))
        return
    from .bench.codec import run_codec_bench
    from .loader import parse_device, parse_dtype

    _refuse_bench_options(args, "bench codec", BENCH_ENGINE_OPTIONS)
    if args.streams < 1 or not 0 < args.seconds <= 3600:
        raise InvalidRequestError("--streams must be >= 1 and --seconds in (0, 3600]")
    result = run_codec_bench(streams=args.streams, seconds=args.seconds, checkpoint=args.codec,
                             device=args.device, dtype=parse_dtype(args.dtype, parse_device(args.device)))
    if args.json:
        print(json.dumps(result))
        return
    print(f"codec streaming decode, {result['streams']} streams x {result['audio_seconds_per_stream']:.1f} s "
          f"({result['parameters'] / 1e6:.1f} M parameters, {result['device']}, {result['dtype']})")
    print(f"  batched      {result['batched_audio_s_per_s']:8.1f} audio s / s")
    print(f"  one at a time {result['sequential_audio_s_per_s']:7.1f} audio s / s")
    print(f"  speedup      {result['speedup']:8.2f}x")


def _refuse_bench_options(args: argparse.Namespace, mode: str, options: dict) -> None:
    """Refuse those of `options` given values other than their defaults: `mode` would not use them."""
    given = ["--" + name.replace("_", "-") for name, default in options.items() if getattr(args, name) != default]
    if given:
        raise InvalidRequestError(f"{', '.join(given)}: not used by {mode}")


def run_serve(args: argparse.Namespace) -> None:
    try:
        from .serve.run import serve
        from .serve.settings import ServerSettings, default_data_dir
    except ImportError as e:
        raise MossServeError(f"the server needs the serve extra ({e.name} is missing): "
                             "pip install 'mossserve[serve]'") from None
    from .config import EngineConfig

    check_max_len(args)
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise InvalidRequestError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    if args.ray and args.shutdown_timeout != SHUTDOWN_TIMEOUT_S:
        raise InvalidRequestError("--shutdown-timeout is the single-process server's; on Ray, Serve drains replicas")
    engine = EngineConfig(max_running=args.max_running, max_queued=args.max_queued,
                          max_len=args.max_len or EngineConfig.max_len, max_sessions=args.max_sessions)
    settings = ServerSettings(
        model=args.model, codec=args.codec, device=args.device, dtype=args.dtype, task=args.task,
        model_name=args.model_name,
        host=args.host, port=args.port, api_key=args.api_key, data_dir=args.data_dir or default_data_dir(),
        cors_origins=tuple(args.cors_origin), max_input_chars=args.max_input_chars,
        max_body_bytes=body_bytes(args.max_body_mb), max_voice_seconds=args.max_voice_seconds,
        request_timeout_s=args.request_timeout, playground=args.playground, engine=engine)
    with flags_named(SERVE_FLAGS):
        settings.validate()
    if args.model is None:
        print("note: no --model given; serving the bundled tiny random-weight demo checkpoint "
              "(it produces noise, not speech)", file=sys.stderr)
    note_gpu_unused(args)
    if args.api_key is None and os.environ.get("MOSSSERVE_API_KEY") == "":
        print("note: $MOSSSERVE_API_KEY is set but empty; /v1 is served without an API key", file=sys.stderr)
    if not args.ray_address:  # a cluster's path may name its nodes' disks, not this machine's
        check_out_dir(Path(settings.data_dir), "--data-dir")
    if args.ray:
        return run_ray(args, settings)
    if args.replicas is not None or args.autoscale or args.ray_address or args.voice_service:
        raise MossServeError("--replicas, --autoscale, --ray-address and --voice-service go with --ray")
    serve(settings, log_level=args.log_level, shutdown_timeout_s=args.shutdown_timeout)


def run_ray(args: argparse.Namespace, settings) -> None:
    try:
        from .distributed.builder import parse_autoscale
        from .distributed.deployment import RayOptions
        from .distributed.run import serve_on_ray
    except ImportError as e:
        raise MossServeError(f"--ray needs the ray extra ({e.name} is missing): pip install 'mossserve[ray]'") from None
    try:
        autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
        options = RayOptions(replicas=1 if args.replicas is None else args.replicas, autoscale=autoscale,
                             voice_service=args.voice_service)
        options.validate()
    except ValueError as e:
        raise MossServeError(str(e)) from None
    serve_on_ray(settings, options, address=args.ray_address)


if __name__ == "__main__":
    sys.exit(main())
