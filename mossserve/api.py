"""`TTS`: the offline Python entry point, over the same engine the server uses.

    tts = TTS.from_pretrained("OpenMOSS-Team/MOSS-TTS", device="cuda", dtype="bfloat16")
    codes = tts.generate_codes(SpeechRequest(input="Hello."))      # (frames, n_vq)
    audio = tts.synthesize(SpeechRequest(input="Hello.", voice="me.wav"))
    for chunk in tts.stream(SpeechRequest(input="Hello.")): ...    # audio while the talker runs
    audios = tts.synthesize_batch([SpeechRequest(input=t) for t in texts])
    with TTS.from_pretrained(...) as tts: ...                       # closed on leaving the block

One request and many take one code path: every call submits to the engine (continuous
batching, streaming decode), which starts on first use. The codec loads lazily: generating
codes from codes-only prompts never needs it.
"""
from __future__ import annotations

import atexit
import numbers
import queue
import threading
import uuid
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .config import ChunkSchedule, EngineConfig
from .engine.engine import Engine
from .engine.request import AudioChunk, Generation
from .errors import (CheckpointError, EngineClosedError, EngineFullError, InvalidRequestError, MossServeError,
                     RequestAborted, SessionLimitError)
from .json_files import read_json_file
from .loader import parse_device, parse_dtype
from .models.config_utils import read_json
from .models.family import Prompt, TalkerFamily
from .models.registry import load_codec, load_talker
from .sampling import SamplingParams
from .speech_request import SpeechRequest
from .text.realtime_session import SessionScript

DEMO_MODEL = Path(__file__).parent / "demo" / "moss_tts_tiny"
DEFAULT_MOSS_CODEC = "OpenMOSS-Team/MOSS-Audio-Tokenizer"


@dataclass
class Audio:
    samples: np.ndarray  # float32 (channels, samples)
    sample_rate: int
    # (frames, codebooks): `generation.frames`. In continuation the prompt's audio prefix comes first
    # (`generation.start_length` frames), decoded as context but cut from `samples`; then the generated frames.
    codes: np.ndarray
    generation: Generation | None = None

    @property
    def duration(self) -> float:
        return self.samples.shape[-1] / self.sample_rate


_OPEN: "weakref.WeakSet[TTS]" = weakref.WeakSet()  # closed at exit (TTS.close)


@atexit.register
def _close_open() -> None:
    for tts in list(_OPEN):
        tts.close()


class TTS:
    def __init__(self, talker: TalkerFamily, codec: str | Path | None = None, device: str = "cpu",
                 dtype: str = "float32", engine_config: EngineConfig | None = None) -> None:
        self.talker = talker
        self.device = device
        self.dtype = dtype
        self.engine_config = checked_engine_config(engine_config)  # now, not at the first call
        self._codec_source = codec
        self._codec = None
        self._speakers = None
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._stepping = threading.Lock()  # an unthreaded engine is stepped by its callers
        self.closed = False
        _OPEN.add(self)

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, codec: str | Path | None = None,
                        device: str = "cpu", dtype: str = "float32",
                        engine_config: EngineConfig | None = None, task: str | None = None) -> "TTS":
        """`model`: a checkpoint directory or hub id, `org/name[@revision]` (None: the bundled demo
        checkpoint, noise only). `codec`: a codec directory or hub id; by default the one bundled with
        or named by the model. `task`: which MOSS-TTS Delay model a checkpoint whose name does not
        say is (tts, dialogue, voice_design, sound_effect). `dtype` "auto" is resolved: `.dtype` names
        the one chosen."""
        engine_config = checked_engine_config(engine_config)  # before the model loads, which takes a while
        dtype = str(parse_dtype(dtype, parse_device(device))).removeprefix("torch.")
        talker = load_talker(DEMO_MODEL if model is None else model, device=device, dtype=dtype, task=task)
        return cls(talker, codec, device=device, dtype=dtype, engine_config=engine_config)

    @property
    def is_demo(self) -> bool:
        return self.talker.source == DEMO_MODEL

    @property
    def codec_source(self) -> str | Path:
        """Where the codec comes from: the one given, else `default_codec`."""
        return self._codec_source or default_codec(self.talker.source, self.talker.name)

    @property
    def codec(self):
        """The codec, loaded on first use."""
        with self._lock:
            if self._codec is None:
                codec = load_codec(self.codec_source, device=self.device)
                check_codec_fits(self.talker, codec, self.codec_source)
                self._codec = codec
            return self._codec

    @property
    def engine(self) -> Engine:
        """The engine every call runs on, started on first use; EngineClosedError after `close()`."""
        with self._lock:
            if self.closed:
                raise EngineClosedError("this TTS is closed")
            if self._engine is None:
                self._engine = Engine(self.talker, lambda: self.codec, self.engine_config)
                self._engine.start()
            return self._engine

    @property
    def speakers(self):
        """Reference voices -> codes, cached by content (engine/speakers.py)."""
        from .engine.speakers import SpeakerCache

        if self.closed:
            raise EngineClosedError("this TTS is closed")
        codec = self.codec
        with self._lock:
            if self.closed:
                raise EngineClosedError("this TTS is closed")
            if self._speakers is None:
                self._speakers = SpeakerCache(codec, n_quantizers=self.talker.codebooks,
                                              normalize_loudness=self.talker.normalizes_reference_loudness)
            return self._speakers

    def stats(self) -> dict:
        stats = self.engine.stats()
        if self._speakers is not None:
            stats["speakers"] = self._speakers.stats()
        return stats

    def wait_idle(self) -> None:
        """Block until the engine and speaker threads are between rounds with nothing to do. An
        unthreaded engine is stepped here until nothing can progress: nothing else would process
        what is queued (the abort of a stream left early, say)."""
        engine = self._engine
        if engine is not None and self.engine_config.threaded:
            engine.wait_idle()
        elif engine is not None:
            while self.step_until(lambda: False):  # never done: step while anything can progress
                pass
        if self._speakers is not None:
            self._speakers.wait_idle()

    def __enter__(self) -> "TTS":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the engine's threads (a script need not call this: every TTS still open is closed at
        interpreter exit, since a daemon thread inside torch as the interpreter finalises can abort the
        process). Requests still running end with an error chunk; later calls raise EngineClosedError."""
        with self._lock:
            self.closed = True
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
        if self._speakers is not None:
            self._speakers.close()

    # ---- prompts --------------------------------------------------------------------------
    def prompt(self, request: SpeechRequest | Prompt | str) -> Prompt:
        """The request's prompt (a plain string is `SpeechRequest(input=...)`; a Prompt is itself)."""
        if isinstance(request, Prompt):
            return request
        return self.talker.build_prompt(as_speech_request(request), encode_voice=self.encode_voice)

    def conversation_prompts(self, conversation: dict | list | str | Path, mode: str | None = None) -> list[Prompt]:
        """The prompts of a conversation in this model's form (docs/cli.md, `--conversation`): its
        JSON as a dict or list, or the path of its file (relative paths in it are tried beside it
        too); audio in it is encoded by the codec. `mode`: generation or continuation, None for
        the form's default."""
        if isinstance(conversation, (str, Path)):
            path = Path(conversation)
            data, base_dir = read_json_file(path, "conversation file"), path.parent
        elif isinstance(conversation, (dict, list)):
            data, base_dir = conversation, None
        else:
            raise InvalidRequestError(f"expected a conversation's JSON (a dict or list) or a JSON file path, "
                                      f"got {type(conversation).__name__}")
        return self.talker.conversation_prompts(data, base_dir, mode, self.encode_voice)

    def encode_voice(self, path: Path) -> np.ndarray:
        """Reference audio file -> codes (frames, codebooks), prepared as the reference prepares it."""
        return self.speakers.encode(path)

    # ---- generation -----------------------------------------------------------------------
    def run(self, prompts: list[Prompt], sampling: SamplingParams | list[SamplingParams | None] | None = None,
            max_new_frames: int | None = None, decode_audio: bool = True, schedule: ChunkSchedule | None = None,
            on_chunk: Callable[[int, AudioChunk], None] | None = None,
            raise_errors: bool = True, session: str | None = None,
            on_result: Callable[[int, Generation, Audio | None], None] | None = None,
            ) -> list[tuple[Generation, Audio | None]]:
        """Run prompts through continuous batching; per prompt its generation and (with
        `decode_audio`) its audio. `on_chunk(index, chunk)` sees every chunk as it arrives. With
        `on_result(index, generation, audio)`, each result goes there as its request ends and is not
        kept (the call returns an empty list): any number of prompts run in bounded memory.
        A request that fails (or that the engine refuses) raises, or with `raise_errors=False` comes
        back with `finish_reason == "error"`, its message in `generation.error` and no audio. More
        prompts than the engine queues at once are fed as earlier ones finish. With `session`, the
        prompts are turns of that session (one at a time: each continues the context)."""
        check_prompts(prompts)
        if session is not None and len(prompts) != 1:
            raise InvalidRequestError("a session takes one turn at a time")
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != len(prompts):
                raise InvalidRequestError(f"{len(sampling)} sampling settings for {len(prompts)} prompts; give one "
                                          "for every prompt, or one for all")
            samplings = [self.talker.default_sampling() if s is None else s for s in sampling]  # None: the model's
        else:
            samplings = [self.talker.default_sampling() if sampling is None else sampling] * len(prompts)
        outbox: queue.Queue = queue.Queue()
        engine, ids = self.engine, []
        for params in {id(s): s for s in samplings}.values():  # the call's own mistakes raise, whatever raise_errors
            engine.check_settings(params, max_new_frames, schedule, session, decode_audio)
        if decode_audio and prompts:
            self.codec  # loaded (and checked against the model) here: a codec that does not fit raises now
        chunks: list[list[AudioChunk]] = [[] for _ in prompts]
        added = in_flight = 0
        try:
            while added < len(prompts) or in_flight:
                while added < len(prompts):  # as many as the engine takes now
                    try:
                        ids.append(engine.add_request(prompts[added], samplings[added],
                                                      lambda c, i=added: outbox.put((i, c)),
                                                      max_new_frames=max_new_frames, schedule=schedule,
                                                      decode_audio=decode_audio, session=session).id)
                        in_flight += 1
                    except SessionLimitError:
                        raise  # only a closed session frees one: waiting would wait forever
                    except EngineFullError:
                        if not in_flight:  # full of others' requests (other callers'): wait for theirs to end
                            self._wait_for_room()
                            continue
                        break
                    except InvalidRequestError as e:
                        if raise_errors:
                            raise
                        outbox.put((added, self._refused(added, str(e))))
                        in_flight += 1
                    added += 1
                index, chunk = self._next(outbox)
                chunks[index].append(chunk)
                if on_chunk is not None:
                    on_chunk(index, chunk)
                in_flight -= chunk.final
                if chunk.final and on_result is not None:
                    on_result(index, *self._result(chunks[index], decode_audio, raise_errors))
                    chunks[index] = []
        except BaseException:
            for request_id in ids:
                engine.abort(request_id)
            raise
        return [] if on_result is not None else [self._result(c, decode_audio, raise_errors) for c in chunks]

    def _wait_for_room(self) -> None:
        """The engine refused a request, full of requests that are not this call's; return when the
        caller should ask again. A threaded engine is waited on. An unthreaded one is stepped (they
        may be aborted requests of an interrupted call, which a step clears), unless another caller's
        step made room since the refusal; full with nothing to step, nothing will make room, and the
        call fails."""
        if self.engine_config.threaded:
            threading.Event().wait(0.02)  # other callers' requests end on the engine's threads
            return
        engine = self.engine
        with self._stepping:
            if not engine.is_full():
                return
            if not engine.has_work():
                if self.closed:  # closed since the refusal: its stranded requests fill the scheduler
                    raise EngineClosedError("this TTS is closed")
                raise EngineFullError("the engine is full of requests that nothing runs")
            engine.step()

    def _refused(self, index: int, message: str) -> AudioChunk:
        """The final chunk of prompt `index`, which the engine refused (`run(..., raise_errors=False)`)."""
        talker = self.talker
        generation = Generation(np.zeros((0, talker.columns), np.int64), np.zeros((0, talker.codebooks), np.int64),
                                [], False, 0, "error", message)
        return AudioChunk(f"refused-{index}", None, talker.sample_rate, 0, 0, generation.frames, final=True,
                          finish_reason="error", error=message, generation=generation)

    def close_session(self, session: str) -> bool:
        """Forget a session that `run(..., session=...)` opened (its turn in flight, if any, is
        aborted); False if there is none. Sessions stay until closed: `max_sessions` bounds them."""
        with self._lock:
            engine = self._engine
        return engine is not None and engine.close_session(session)

    def run_session(self, script: SessionScript | dict | str | Path, sampling: SamplingParams | None = None,
                    max_new_frames: int | None = None, decode_audio: bool = True,
                    on_chunk: Callable[[int, AudioChunk], None] | None = None) -> list[tuple[Generation, Audio | None]]:
        """A session script's turns in order (docs/cli.md), each continuing the context of the
        turns before it, a fresh context at `new_context`; per turn its generation and audio.
        `script`: a SessionScript, its JSON as a dict, or the path of a JSON file."""
        if not self.talker.supports_sessions:
            raise InvalidRequestError("this model does not run session scripts (multi-turn contexts)")
        script = as_session_script(script)
        if decode_audio:
            self.codec  # noqa: B018 - loaded before the turns: a codec that cannot load is no turn's failure
        engine, results, session = self.engine, [], None
        try:
            for index, turn in enumerate(script.turns):
                first = session is None or turn.new_context
                if first:
                    if session is not None:
                        engine.close_session(session)
                    session = f"script-{uuid.uuid4().hex}"
                try:
                    prompt = self.talker.turn_prompt(turn, first, script.voice)
                    results += self.run([prompt], sampling, max_new_frames, decode_audio,
                                        on_chunk=on_chunk and (lambda _, chunk, i=index: on_chunk(i, chunk)),
                                        session=session)
                except MossServeError as e:  # which turn failed, after the earlier ones ran
                    raise type(e)(f"turns[{index}]: {e}") from None
        finally:
            if session is not None:
                engine.close_session(session)
        return results

    def stream(self, request: SpeechRequest | Prompt, sampling: SamplingParams | None = None,
               max_new_frames: int | None = None, schedule: ChunkSchedule | None = None) -> Iterator[AudioChunk]:
        """Audio chunks of one request as the codec produces them; the last one is `final`.
        Leaving a `for` loop over it early aborts the request; a generator kept in a variable
        aborts it when closed (`.close()`) or collected. A request aborted from elsewhere
        (`tts.engine.abort(id)` on another thread) raises RequestAborted, so that a loop collecting
        audio never takes a cut result for a whole one; an AsyncEngine stream ends with an "aborted"
        final chunk instead (docs/engine.md, "A request's life")."""
        prompt = self.prompt(request)
        outbox: queue.Queue = queue.Queue()
        engine = self.engine
        self.codec  # loaded (and checked against the model) here: a codec that does not fit raises now
        if sampling is None:
            sampling = self.talker.default_sampling()
        while True:  # a full engine is waited on, as `run` waits
            try:
                handle = engine.add_request(prompt, sampling, outbox.put, max_new_frames=max_new_frames,
                                            schedule=schedule)
                break
            except EngineFullError:
                self._wait_for_room()
        done = False
        try:
            while not done:
                chunk = self._next(outbox)
                done = chunk.final
                if chunk.final and chunk.error is not None:
                    raise chunk.failure()
                if chunk.final and chunk.finish_reason == "aborted":
                    raise RequestAborted(f"request {chunk.request_id} was aborted")
                yield chunk
        finally:
            if not done:
                engine.abort(handle.id)

    def generate(self, prompts: list[Prompt], sampling: SamplingParams | list[SamplingParams | None] | None = None,
                 max_new_frames: int | None = None) -> list[Generation]:
        """Codes only (no codec), through continuous batching."""
        return [g for g, _ in self.run(prompts, sampling, max_new_frames, decode_audio=False)]

    def sampling(self, greedy: bool = False, **overrides) -> SamplingParams:
        """This model's sampling settings (its model card's, as a call without `sampling` uses) with
        `overrides` (SamplingParams fields; None keeps the model's); `greedy`: argmax on every head,
        the model's other rules (repetition penalty and window) kept, so a temperature other than 0
        beside it is refused (it would be ignored). `SamplingParams()` itself holds MOSS-TTS's card, not the loaded model's."""
        unknown = sorted(set(overrides) - {f.name for f in fields(SamplingParams)})
        if unknown:
            raise InvalidRequestError(f"unknown sampling setting(s) {', '.join(unknown)}; SamplingParams has "
                                      f"{', '.join(f.name for f in fields(SamplingParams))}")
        sampling = self.talker.default_sampling()
        if greedy:
            given = [name for name in ("text_temperature", "audio_temperature") if not _all_zero(overrides.get(name))]
            if given:
                raise InvalidRequestError(f"greedy is temperature 0; give greedy or {' and '.join(given)}, not both")
            sampling = sampling.with_overrides(text_temperature=0.0, audio_temperature=0.0)
        sampling = sampling.with_overrides(**overrides)
        sampling.validate(self.talker.codebooks)
        return sampling

    def generate_codes(self, request: SpeechRequest | Prompt | str, sampling: SamplingParams | None = None,
                       max_new_frames: int | None = None) -> np.ndarray:
        """The frames the reference hands to its codec, (frames, codebooks) int64."""
        return self.generate([self.prompt(request)], sampling, max_new_frames)[0].frames

    def synthesize(self, request: SpeechRequest | Prompt | str, sampling: SamplingParams | None = None,
                   max_new_frames: int | None = None) -> Audio:
        return self.synthesize_batch([request], sampling, max_new_frames)[0]

    def synthesize_batch(self, requests: list[SpeechRequest | Prompt],
                         sampling: SamplingParams | list[SamplingParams] | None = None,
                         max_new_frames: int | None = None) -> list[Audio]:
        """Every request through continuous batching; their audio in order."""
        if not isinstance(requests, (list, tuple)):
            raise InvalidRequestError(f"synthesize_batch takes a list of requests, got {type(requests).__name__}"
                                      + ("; for one text, call synthesize" if isinstance(requests, str) else ""))
        prompts = []
        for index, request in enumerate(requests):
            try:
                prompts.append(self.prompt(request))
            except InvalidRequestError as e:
                raise type(e)(f"requests[{index}]: {e}") from None
        return [audio for _, audio in self.run(prompts, sampling, max_new_frames)]

    def _next(self, outbox: queue.Queue):
        """The next item a request's sink put in `outbox`. An unthreaded engine
        (`EngineConfig(threaded=False)`) has no thread of its own, so it is stepped here until one exists."""
        while not self.engine_config.threaded and outbox.empty():
            if not self.step_until(lambda: not outbox.empty()):
                raise MossServeError("the engine has nothing left to run, but the request has not ended")
        return outbox.get()

    def step_until(self, done: Callable[[], bool]) -> bool:
        """Step an unthreaded engine once unless `done()` (callers on several threads: one steps at a
        time, and one whose output another's step made goes on without stepping); False if nothing
        is left to step."""
        engine = self.engine
        with self._stepping:
            if done():
                return True
            if not engine.has_work():
                return False
            engine.step()
            return True

    def _result(self, chunks: list[AudioChunk], with_audio: bool, raise_errors: bool) -> tuple[Generation, Audio | None]:
        final = chunks[-1]
        if final.error is not None and raise_errors:
            raise final.failure()
        generation = final.generation
        if not with_audio or final.error is not None:
            return generation, None
        pieces = [c.audio for c in chunks if c.audio is not None]
        samples = np.concatenate(pieces, axis=-1) if pieces else np.zeros((self.codec.channels, 0), dtype=np.float32)
        return generation, Audio(samples.astype(np.float32, copy=False), self.codec.sample_rate, generation.frames,
                                 generation)


def as_speech_request(request: SpeechRequest | str) -> SpeechRequest:
    """A plain string is `SpeechRequest(input=...)`; a SpeechRequest is checked and its voices
    normalised again (its fields may have been set after it was made)."""
    if isinstance(request, str):
        return SpeechRequest(input=request)
    if not isinstance(request, SpeechRequest):
        raise InvalidRequestError(f"expected a SpeechRequest, a Prompt or a string, got {type(request).__name__}")
    request.validate()
    return request


def _all_zero(temperature: object) -> bool:
    """None, 0, or per-codebook zeros (a list or an array): what greedy means anyway."""
    if temperature is None:
        return True
    values = np.asarray(temperature, dtype=object).ravel()
    return all(isinstance(v, numbers.Real) and v == 0 for v in values)


def checked_engine_config(config: EngineConfig | None) -> EngineConfig:
    """The config (None: the defaults), its fields checked: a mistake is reported before anything loads."""
    if config is None:
        return EngineConfig()
    if not isinstance(config, EngineConfig):
        raise InvalidRequestError(f"engine_config must be an EngineConfig, got {type(config).__name__}"
                                  + ("; write EngineConfig(**...)" if isinstance(config, dict) else ""))
    config.validate()
    return config


def as_session_script(script: SessionScript | dict | str | Path) -> SessionScript:
    """A SessionScript as is; a dict as its JSON (`SessionScript.from_dict`); a path as its JSON file."""
    if isinstance(script, SessionScript):
        return script
    if isinstance(script, dict):
        return SessionScript.from_dict(script)
    if isinstance(script, (str, Path)):
        return SessionScript.from_json(script)
    raise InvalidRequestError(f"expected a SessionScript, a dict or a JSON file path, got {type(script).__name__}")


def check_prompts(prompts: list[Prompt]) -> None:
    """`run` and `generate` take built prompts (TTS.prompt builds them), in a list."""
    if not isinstance(prompts, (list, tuple)):
        raise InvalidRequestError(f"prompts must be a list of Prompt, got {type(prompts).__name__}")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, Prompt):
            raise InvalidRequestError(f"prompts[{index}] must be a Prompt (TTS.prompt builds one from a request), "
                                      f"got {type(prompt).__name__}")


def check_codec_fits(talker, codec, source: str | Path) -> None:
    """Refuse a codec that cannot decode this model's codes (another family's codec, or too few
    quantizers): otherwise the first decode fails deep in the codec, or the audio plays at the wrong rate."""
    if codec.sample_rate != talker.sample_rate or codec.num_quantizers < talker.codebooks:
        raise CheckpointError(
            f"codec {source} ({codec.sample_rate} Hz, {codec.num_quantizers} quantizers) does not fit the "
            f"{talker.name} model ({talker.sample_rate} Hz, {talker.codebooks} codebooks); give the model's own codec")


def default_codec(model_dir: Path | None, family: str | None = None) -> str | Path:
    """A `codec/` directory inside the model, else the codec its processor_config.json names
    (`audio_tokenizer_name_or_path`, top level or under `audio_tokenizer`, as the reference
    processor reads it), else the published MOSS-Audio-Tokenizer. A Fish S2 Pro directory
    (codec.pth / codec.safetensors beside the model) is its own codec source; a Fish model without
    one is refused here, not given the MOSS codec to fetch (7 GB) and then refuse."""
    from .models.codecs.fish_dac_loader import CODEC_FILES, is_fish_codec_dir

    if model_dir is None:
        return DEFAULT_MOSS_CODEC
    if is_fish_codec_dir(model_dir):
        return Path(model_dir)
    if family == "fish":
        raise CheckpointError(f"{model_dir}: no {' or '.join(CODEC_FILES)} beside the model (Fish S2 Pro ships its "
                              "codec as codec.pth): download it too, or give the codec (--codec)")
    bundled = Path(model_dir) / "codec"
    if (bundled / "config.json").is_file():
        return bundled
    processor = Path(model_dir) / "processor_config.json"
    if processor.is_file():
        config = read_json(processor)
        nested = config.get("audio_tokenizer")
        named = (nested.get("audio_tokenizer_name_or_path") if isinstance(nested, dict) else None) or config.get(
            "audio_tokenizer_name_or_path")
        if named is not None and not isinstance(named, str):
            raise CheckpointError(f"{processor}: audio_tokenizer_name_or_path must be a codec directory or hub id, "
                                  f"got {named!r}")
        if named:
            return named
    return DEFAULT_MOSS_CODEC
