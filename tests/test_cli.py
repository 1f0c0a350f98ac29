"""The command line as docs/cli.md writes it: prompt, say and codec, and errors without tracebacks."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import AUDIO_DIR, CODEC_DIR, DELAY_DIR, STREAMED_VS_WHOLE_ATOL, TOKENIZER_DIR
from mossserve.cli import main
from mossserve.text.tokenizer import TextTokenizer

PROMPTS16 = np.load(TOKENIZER_DIR / "prompts_nvq16.npz")
GEN16 = np.load(DELAY_DIR / "tiny_nvq16" / "goldens_gen.npz")
GEN32 = np.load(DELAY_DIR / "tiny_nvq32" / "goldens_gen.npz")


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_prompt_from_request_matches_processor_golden(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """clone_zh: a request with a voice as a .npy of codes gives the processor's matrix."""
    case = json.loads((TOKENIZER_DIR / "prompts_nvq16.json").read_text())
    clone = next(c for c in case["cases"] if c["id"] == "clone_zh")
    message = clone["conversations"][0][0]
    codes = PROMPTS16[f"clone_zh/{message['reference'][0]}"]
    np.save(tmp_path / "voice.npy", codes)
    (tmp_path / "req.json").write_text(json.dumps({"input": message["fields"]["text"], "voice": "voice.npy"}))
    code, err = run(["prompt", "--model", delay_model_dirs["tiny_nvq16"], "--request", tmp_path / "req.json",
                     "-o", tmp_path / "p.npy"], capsys)
    assert code == 0, err
    prompt = np.load(tmp_path / "p.npy")
    assert prompt.dtype == np.int64
    assert np.array_equal(prompt, PROMPTS16["clone_zh/input_ids"][0])


def test_task_names_the_model_a_directory_holds(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """A MOSS-VoiceGenerator saved as ./voicegen: without --task it is read as MOSS-TTS, which takes no
    instructions; with --task voice_design the instructions make the prompt."""
    (tmp_path / "req.json").write_text(json.dumps({"input": "Hi.", "instructions": "A deep, calm voice."}))
    args = ["prompt", "--model", delay_model_dirs["tiny_nvq16"], "--request", tmp_path / "req.json", "-o", tmp_path / "p.npy"]
    code, err = run(args, capsys)
    assert code == 2 and "instructions" in err and "Traceback" not in err
    code, err = run([*args, "--task", "voice_design"], capsys)
    assert code == 0, err
    text = TextTokenizer.from_dir(TOKENIZER_DIR).decode(np.load(tmp_path / "p.npy")[:, 0].tolist())
    assert "A deep, calm voice." in text
    # say takes the instructions as a flag too (a request file was the only way)
    code, err = run(["say", "Hi.", "--instructions", "A deep, calm voice.", "--model", delay_model_dirs["tiny_nvq16"],
                     "--codec", CODEC_DIR / "tiny", "--task", "voice_design", "--greedy", "--max-frames", "20",
                     "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 0, err


def test_prompt_from_conversation(delay_model_dirs, tmp_path: Path, capsys) -> None:
    conv = [{"role": "user", "text": "Hello."}]
    (tmp_path / "conv.json").write_text(json.dumps(conv))
    code, err = run(["prompt", "--model", delay_model_dirs["tiny_nvq16"], "--conversation", tmp_path / "conv.json",
                     "-o", tmp_path / "p.npy"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "p.npy").shape[1] == 17


@pytest.mark.parametrize("name,golden", [("tiny_nvq16", GEN16), ("tiny_nvq32", GEN32)])
def test_say_prompt_matrix_greedy_matches_reference(delay_model_dirs, tmp_path: Path, capsys, name, golden) -> None:
    np.save(tmp_path / "p.npy", golden["tts/prompt_input_ids"][0])
    code, err = run(["say", "--model", delay_model_dirs[name], "--prompt-matrix", tmp_path / "p.npy", "--greedy",
                     "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 0, err
    codes = np.load(tmp_path / "c.npy")
    assert codes.dtype == np.int64
    assert np.array_equal(codes, golden["tts/segments_0"])


def test_say_seed_replays_reference_sampled_golden(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """The `sampled` golden: torch.manual_seed(1234), text 1.5/top-k 50, audio 1.7/0.8/25, penalty 1.3."""
    np.save(tmp_path / "p.npy", GEN32["sampled/prompt_input_ids"][0])
    code, err = run(["say", "--model", delay_model_dirs["tiny_nvq32"], "--prompt-matrix", tmp_path / "p.npy",
                     "--seed", 1234, "--temperature", 1.7, "--top-p", 0.8, "--top-k", 25,
                     "--repetition-penalty", 1.3, "--max-frames", 77, "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "c.npy"), GEN32["sampled/segments_0"])


def test_say_max_frames_caps_steps(delay_model_dirs, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "p.npy", GEN32["max_new_tokens_in_delay_tail/prompt_input_ids"][0])
    code, err = run(["say", "--model", delay_model_dirs["tiny_nvq32"], "--prompt-matrix", tmp_path / "p.npy",
                     "--greedy", "--max-frames", 33, "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 0, err
    assert "hit the step cap after 33 steps" in err
    assert np.array_equal(np.load(tmp_path / "c.npy"), GEN32["max_new_tokens_in_delay_tail/segments_0"])


def test_say_codes_then_codec_decode(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """`say --codes-out c.npy` then `codec decode c.npy -o out.wav` just works (time first)."""
    code, err = run(["say", "Hello.", "--model", delay_model_dirs["tiny_nvq32"], "--codec", CODEC_DIR / "tiny",
                     "--greedy", "--codes-out", tmp_path / "c.npy", "-o", tmp_path / "say.npy"], capsys)
    assert code == 0, err
    codes = np.load(tmp_path / "c.npy")
    code, err = run(["codec", "decode", tmp_path / "c.npy", "--codec", CODEC_DIR / "tiny", "-o", tmp_path / "out.npy"], capsys)
    assert code == 0, err
    decoded = np.load(tmp_path / "out.npy")
    assert decoded.shape == (len(codes) * 1920,)
    np.testing.assert_allclose(decoded, np.load(tmp_path / "say.npy"), atol=STREAMED_VS_WHOLE_ATOL)
    code, err = run(["codec", "decode", tmp_path / "c.npy", "--codec", CODEC_DIR / "tiny", "-o", tmp_path / "out.wav"], capsys)
    assert code == 0 and (tmp_path / "out.wav").stat().st_size > 44


def test_codec_decode_without_codec_uses_the_demos(tmp_path: Path, capsys) -> None:
    """What `say` without --model made decodes without --codec (it was required: after a pip install the
    demo's codec is deep in site-packages)."""
    code, err = run(["say", "Hello.", "--greedy", "--max-frames", "38", "--codes-out", tmp_path / "c.npy",
                     "-o", tmp_path / "say.npy"], capsys)
    assert code == 0, err
    code, err = run(["codec", "decode", tmp_path / "c.npy", "-o", tmp_path / "out.npy"], capsys)
    assert code == 0 and "no --codec given; using the bundled demo checkpoint's codec" in err
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), np.load(tmp_path / "say.npy"), atol=STREAMED_VS_WHOLE_ATOL)
    code, err = run(["codec", "decode", tmp_path / "c.npy", "-o", tmp_path / "out.wav"], capsys)
    assert code == 0, err
    code, err = run(["codec", "encode", tmp_path / "out.wav", "-o", tmp_path / "e.npy"], capsys)
    assert code == 0 and np.load(tmp_path / "e.npy").shape[1] == 32


@pytest.mark.parametrize("args,message", [
    (["say", "Hi.", "--model", "/nonexistent/model", "--codes-out", "c.npy"], "checkpoint directory not found"),
    (["say", "   ", "--codes-out", "c.npy"], "input"),
    (["say", "Hi."], "give -o OUT"),
    (["say", "Hi.", "--max-frames", "0", "--codes-out", "c.npy"], "--max-frames"),
    (["say", "Hi.", "--top-p", "1.5", "--codes-out", "c.npy"], "--top-p must be in (0, 1]"),
    # the flag typed, not the library's field (audio_temperature, request_timeout_s, EngineConfig.max_queued)
    (["say", "Hi.", "--temperature", "0.0001", "--codes-out", "c.npy"], "--temperature must be 0 (greedy) or in"),
    (["say", "Hi.", "--top-k", "-1", "--codes-out", "c.npy"], "--top-k must be a non-negative integer"),
    (["serve", "--request-timeout", "0"], "--request-timeout must be a positive number of seconds, got 0.0"),
    (["serve", "--max-queued", "-1"], "--max-queued must be an integer >= 0, got -1"),
    (["say", "--request", "missing.json", "--codes-out", "c.npy"], "--request: file not found: missing.json"),
    (["say", "--batch", "missing.jsonl", "--out-dir", "o"], "--batch: file not found: missing.jsonl"),
    (["say", "Hi.", "--voice", "", "--codes-out", "c.npy"], "voice is an empty path"),
    (["say", "Hi.", "--device", "tpu", "--codes-out", "c.npy"], "unknown device 'tpu'"),
    (["say", "Hi.", "--device", "mps", "--codes-out", "c.npy"], "runs on cpu and cuda"),
    (["say", "Hi.", "--device", "cpu:1", "--codes-out", "c.npy"], "the CPU has no numbered devices; use cpu"),
    # outputs that could not be written are refused before the model loads (a missing model shows it)
    (["say", "Hi.", "--model", "/nonexistent/model", "-o", "no/such/dir/x.wav"], "no directory no/such/dir"),
    (["say", "Hi.", "--model", "/nonexistent/model", "-o", "."], "is a directory"),
    (["say", "Hi.", "--model", "/nonexistent/model", "-o", "x.m4a"], "cannot tell the audio format"),
    (["say", "Hi.", "--model", "/nonexistent/model", "--codes-out", "no/dir/c.npy"], "no directory no/dir"),
    (["prompt", "--request", "latin1.json", "--model", "/nonexistent/model", "-o", "."], "is a directory"),
    # the audio overwrote the codes, and both were reported written
    (["say", "Hi.", "--model", "/nonexistent/model", "--codes-out", "same.npy", "-o", "./same.npy"],
     "-o and --codes-out both name same.npy"),
    (["say", "--batch", "x.jsonl", "--model", "/nonexistent/model", "--out-dir", "x.jsonl/out"],
     "--out-dir x.jsonl/out: x.jsonl is a file, not a directory"),
    # inputs that are not what they claim
    (["say", "--request", ".", "--codes-out", "c.npy"], "cannot read ."),
    (["say", "--request", "latin1.json", "--codes-out", "c.npy"], "latin1.json is not valid JSON"),
    (["say", "Hi.", "--voice", "x" * 300 + ".wav", "--codes-out", "c.npy"], "voice: not a usable path"),
    (["say", "Hi.", "--voice", ".", "--codes-out", "c.npy"], "voice: audio file is not a regular file (a directory"),
    (["say", "Hi.", "--voice", "fake.npy", "--codes-out", "c.npy"], "fake.npy is not a .npy file of integer codes"),
    (["say", "Hi.", "--seed", str(2**64), "--codes-out", "c.npy"], "seed must be an integer in 0..2**63-1"),
    (["say", "a\udcffb", "--codes-out", "c.npy"], "input is not valid UTF-8"),
    (["say", "--reference-text", "Hi.", "--request", "r.json", "--codes-out", "c.npy"], "--reference-text goes with TEXT"),
    (["say", "--voice", "v.wav", "--instructions", "Calm.", "--request", "r.json", "--codes-out", "c.npy"],
     "--voice and --instructions go with TEXT or --text-file; put them inside the request"),
    (["bench", "codec", "--seconds", "nan"], "--seconds in (0, 3600]"),
    (["serve", "--port", "70000"], "port must lie in 0..65535"),
    (["serve", "--request-timeout", "-1"], "--request-timeout must be a positive number"),
    (["serve", "--max-input-chars", "0"], "--max-input-chars must be at least 1"),
    (["serve", "--max-body-mb", "0"], "body limit must be positive"),
    (["serve", "--api-key", ""], "the API key (--api-key, else $MOSSSERVE_API_KEY) must be non-empty"),
    (["prompt", "--request", "latin1.json", "-o", "p.wav"], "p.wav names an audio file, but this output is a .npy array"),
    (["prompt", "--request", "missing.json", "-o", "p.npy"], "--request: file not found: missing.json"),
    (["serve", "--api-key", " key"], "without spaces around it"),
    (["serve", "--api-key", "clé"], "must be printable ASCII"),  # no client could send it: every request was a 401
    (["serve", "--api-key", "a\x7fb"], "must be printable ASCII"),
    (["say", "Hi.", "--codes-out", "c.wav"], "c.wav names an audio file, but this output is a .npy array"),
    (["say", "--batch", "x.jsonl", "--out-dir", "o", "--format", "xyz"], "--format xyz: not an audio format"),
    (["say", "--request", "script.json", "--codes-out", "c.npy"], "turns[1].new_context must be true or false"),
    (["serve", "--max-body-mb", "nan"], "body limit must be positive and finite"),
    (["serve", "--max-body-mb", "inf"], "body limit must be positive and finite"),
    (["bench", "codec", "--seconds", "1e308"], "--seconds in (0, 3600]"),
    (["say", "Hi.", "--max-running", "100000000", "--codes-out", "c.npy"], "could not be allocated; lower max_running"),
    # files that are not what their names say, or whose headers lie
    (["codec", "decode", "empty.npy", "--codec", CODEC_DIR / "tiny", "-o", "o.wav"], "empty.npy is not a .npy file"),
    (["say", "Hi.", "--voice", "empty.npy", "--codes-out", "c.npy"], "voice: empty.npy is not a .npy file"),
    (["codec", "decode", "zip.npy", "--codec", CODEC_DIR / "tiny", "-o", "o.wav"], "zip.npy is not a .npy file"),
    (["say", "--prompt-matrix", "zip.npy", "--codes-out", "c.npy"], "prompt matrix: zip.npy is not a .npy file"),
    (["codec", "decode", "lying.npy", "--codec", CODEC_DIR / "tiny", "-o", "o.wav"],
     "lying.npy is cut short: its header says (1000000000000, 32)"),
    (["say", "--prompt-matrix", "lying.npy", "--codes-out", "c.npy"], "lying.npy is cut short"),
    (["prompt", "--request", "deep.json", "-o", "p.npy"], "deep.json is nested too deeply"),
    (["say", "--conversation", "deep.json", "--codes-out", "c.npy"], "deep.json is nested too deeply"),
    (["say", "--batch", "deep.json", "--out-dir", "out"], "deep.json:1 is nested too deeply"),
])
def test_errors_are_clear(args, message, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.json").write_bytes('{"input": "caf\u00e9"}'.encode("latin-1"))
    (tmp_path / "fake.npy").write_bytes(b"RIFF....WAVEfmt ")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "zip.npz", codes=np.zeros((2, 32), np.int64))
    (tmp_path / "zip.npz").rename(tmp_path / "zip.npy")
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 32), np.int64)) | {"shape": (10**12, 32)}
    with open(tmp_path / "lying.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros((1, 32), np.int64).tobytes())
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "x.jsonl").write_text('{"input": "Hi."}\n')
    (tmp_path / "script.json").write_text('{"turns": [{"input": "a"}, {"input": "b", "new_context": "no"}]}')
    code, err = run(args, capsys)
    assert code == 2
    assert "error: " in err and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["prompt", "-o", "p.npy"], ["say", "--codes-out", "c.npy"]])
def test_a_file_of_several_conversations_is_refused_before_the_model_loads(command, capsys, tmp_path,
                                                                          monkeypatch) -> None:
    """prompt and say write one prompt's output; the refusal came after the model loaded and every
    conversation's voices were encoded (a model that cannot load shows which comes first)."""
    monkeypatch.chdir(tmp_path)
    conversation = [{"role": "user", "text": "Hi."}]
    (tmp_path / "two.json").write_text(json.dumps([conversation, conversation]))
    code, err = run([*command, "--conversation", "two.json", "--model", "/nonexistent/model"], capsys)
    assert code == 2 and "two.json holds 2 conversations; prompt and say take one" in err, err


def test_an_out_dir_that_cannot_be_written_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch) -> None:
    """It was found at the first request's files, after every request had been generated."""
    import mossserve.cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"input": "Hi."}\n')
    (tmp_path / "locked").mkdir()
    access = os.access
    monkeypatch.setattr(mossserve.cli.os, "access", lambda path, mode: Path(path).name != "locked" and access(path, mode))
    for out_dir in ("locked", "locked/new/deeper"):
        code, err = run(["say", "--batch", "x.jsonl", "--model", "/nonexistent/model", "--out-dir", out_dir], capsys)
        assert code == 2 and f"cannot write into --out-dir {out_dir}: permission denied on locked" in err, err
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # mkdir then failed with "File exists"
    for out_dir in ("dangling", "dangling/deeper"):
        code, err = run(["say", "--batch", "x.jsonl", "--model", "/nonexistent/model", "--out-dir", out_dir], capsys)
        assert code == 2 and "dangling is a link to nothing" in err, err


def test_a_batch_that_fails_ends_its_progress_line_first(delay_model_dirs, capsys, tmp_path, monkeypatch) -> None:
    """The error was written on the progress bar's line ("... real timeerror: ...")."""
    import mossserve.cli

    def full_disk(path, array) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mossserve.cli, "save_npy", full_disk)
    (tmp_path / "b.jsonl").write_text('{"input": "Hi."}\n')
    code, err = run(["say", "--batch", tmp_path / "b.jsonl", "--model", delay_model_dirs["tiny_nvq32"], "--codec",
                     CODEC_DIR / "tiny", "--greedy", "--max-frames", "40", "--out-dir", tmp_path / "out", "--progress"],
                    capsys)
    assert code == 2 and "\nerror: " in err and "No space left on device" in err, err


def test_codes_past_int64_are_refused_without_a_numpy_warning(capsys, tmp_path) -> None:
    np.save(tmp_path / "huge.npy", np.full((3, 32), 1e20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, err = run(["codec", "decode", tmp_path / "huge.npy", "--codec", CODEC_DIR / "tiny", "-o",
                         tmp_path / "x.wav"], capsys)
    assert code == 2 and "a code of 1e+20 lies far outside any codebook" in err and "Warning" not in err


def test_a_cuda_device_this_machine_lacks_is_a_clear_error(capsys, monkeypatch) -> None:
    """Checked before anything loads (a talker, a codec, a bench checkpoint), by every command."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["say", "Hi.", "--device", "cuda", "--codes-out", "c.npy"],
                 ["codec", "encode", AUDIO_DIR / "reference_zh.wav", "--codec", CODEC_DIR / "tiny", "-o", "c.npy",
                  "--device", "cuda:0"],
                 ["bench", "--device", "cuda"]):
        code, err = run(args, capsys)
        assert code == 2 and "device 'cuda" in err and "use cpu" in err and "Traceback" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = run(["say", "Hi.", "--device", "cuda:1", "--codes-out", "c.npy"], capsys)
    assert code == 2 and "1 CUDA device(s) visible" in err


def test_outputs_get_exactly_the_names_given(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """np.save adds .npy to any other name; the file a user named is the file written."""
    code, err = run(["say", "Hi.", "--model", delay_model_dirs["tiny_nvq16"], "--greedy", "--max-frames", "20",
                     "--codes-out", tmp_path / "c.codes"], capsys)
    assert code == 0, err
    assert (tmp_path / "c.codes").is_file() and not (tmp_path / "c.codes.npy").exists()
    assert np.load(tmp_path / "c.codes").ndim == 2


def test_codec_encode_of_audio_under_one_frame_is_an_error(tmp_path: Path, capsys) -> None:
    import soundfile

    tone = 0.3 * np.sin(np.arange(1000) / 24000 * 2 * np.pi * 440).astype(np.float32)
    soundfile.write(tmp_path / "short.wav", tone, 24000)  # 42 ms; a frame is 80 ms
    code, err = run(["codec", "encode", tmp_path / "short.wav", "--codec", CODEC_DIR / "tiny", "-o",
                     tmp_path / "c.npy"], capsys)
    assert code == 2 and "shorter than one codec frame (80 ms)" in err and not (tmp_path / "c.npy").exists()


def test_codec_encode_takes_quiet_and_silent_audio(tmp_path: Path, capsys) -> None:
    """A codec is not a voice: audio under -60 dBFS, or all zeros, was refused as "silent" (a voice's
    check), and an empty file's error did not name it."""
    import soundfile

    quiet = 0.0008 * np.sin(np.arange(24000) / 24000 * 2 * np.pi * 220).astype(np.float32)
    for name, samples in (("quiet.wav", quiet), ("zeros.wav", np.zeros(24000, np.float32))):
        soundfile.write(tmp_path / name, samples, 24000)
        code, err = run(["codec", "encode", tmp_path / name, "--codec", CODEC_DIR / "tiny", "-o", tmp_path / "c.npy"],
                        capsys)
        assert code == 0, err
        assert np.load(tmp_path / "c.npy").shape == (12, 32)  # 1 s: 12.5 frames, the whole ones
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 24000)
    code, err = run(["codec", "encode", tmp_path / "empty.wav", "--codec", CODEC_DIR / "tiny", "-o",
                     tmp_path / "e.npy"], capsys)
    assert code == 2 and f"{tmp_path / 'empty.wav'}: audio contains no samples" in err


@pytest.mark.parametrize("action", ["encode", "decode"])
def test_codec_n_quantizers_zero_is_refused(tmp_path: Path, capsys, action: str) -> None:
    """(The codec's own 0 means all of them; on the command line it was taken silently.)"""
    np.save(tmp_path / "c.npy", np.zeros((4, 8), dtype=np.int64))
    source = AUDIO_DIR / "reference_zh.wav" if action == "encode" else tmp_path / "c.npy"
    code, err = run(["codec", action, source, "--codec", CODEC_DIR / "tiny", "--n-quantizers", "0",
                     "-o", tmp_path / ("out.npy" if action == "encode" else "out.wav")], capsys)
    assert code == 2 and "--n-quantizers must be at least 1" in err


def test_say_tells_the_rate_the_file_holds() -> None:
    """Opus has no 44.1 kHz (Fish S2 Pro's rate): such audio is stored at 48 kHz, which `say` now reports."""
    from mossserve.cli import written_rate

    assert written_rate(Path("x.opus"), 44100) == 48000 and written_rate(Path("x.opus"), 24000) == 24000
    assert written_rate(Path("x.wav"), 44100) == written_rate(Path("x.npy"), 44100) == 44100


def test_prompt_closes_its_model_before_it_exits(delay_model_dirs, tmp_path: Path, capsys, monkeypatch) -> None:
    """`prompt` left its TTS (the speaker cache's thread) to the exit handler, and about one run in
    fifteen then aborted at exit (status 134, "terminate called without an active exception")
    after writing its file; `say` closes it itself."""
    import mossserve.cli as cli

    opened = []
    load = cli.load_tts
    monkeypatch.setattr(cli, "load_tts", lambda args: opened.append(load(args)) or opened[-1])
    (tmp_path / "req.json").write_text(json.dumps({"input": "Hello.", "voice": str(AUDIO_DIR / "reference_zh.wav")}))
    code, err = run(["prompt", "--model", delay_model_dirs["tiny_nvq16"], "--codec", CODEC_DIR / "tiny",
                     "--request", tmp_path / "req.json", "-o", tmp_path / "p.npy"], capsys)
    assert code == 0, err
    assert len(opened) == 1 and opened[0].closed


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "mossserve", "say", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--reference-text" in proc.stdout


def test_say_script_takes_paths_from_the_callers_directory(tmp_path: Path) -> None:
    """README's first command: it set up in the checkout and then ran there, so `--voice ref.wav`
    and `-o out.wav` were looked up and written in the checkout instead of where the user stood."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "say.sh"
    (tmp_path / "ref.wav").write_bytes((AUDIO_DIR / "reference_zh.wav").read_bytes())
    proc = subprocess.run([str(script), "Hi.", "--voice", "ref.wav", "--max-frames", "40", "-o", "out.wav"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.wav").stat().st_size > 44


def test_parser_and_package_names_load_without_torch() -> None:
    """--help and argument errors answer before torch, PyAV or numpy import (seconds on a small
    machine, and a Ctrl-C in them was a traceback); the package's public names still resolve."""
    heavy = "('torch', 'numpy', 'av', 'soxr', 'soundfile')"
    script = ("import sys, mossserve, mossserve.audio, mossserve.cli\n"
              "mossserve.cli.build_parser().parse_args(['say', 'Hi', '-o', 'x.wav'])\n"
              "assert mossserve.errors.AudioError is mossserve.AudioError  # a submodule, as an attribute\n"
              f"print(sorted(m for m in {heavy} if m in sys.modules))\n"
              "print(mossserve.TTS.__module__, mossserve.SpeechRequest.__module__, mossserve.audio.write_audio.__module__)\n"
              "assert sorted(dir(mossserve)) == sorted(set(dir(mossserve)))  # names once each\n"
              "assert all(name in dir(mossserve) for name in mossserve.__all__)\n"
              "try:\n    mossserve.NotAName\nexcept AttributeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "mossserve.api mossserve.speech_request mossserve.audio.write",
                                        "module 'mossserve' has no attribute 'NotAName'"]


def test_no_public_name_is_shadowed_by_a_submodule() -> None:
    """Importing a submodule sets it as its package's attribute: a public name that is also a
    submodule's name (mossserve.audio.resample was both) then reads as the module once anything has
    imported it."""
    import pkgutil

    import mossserve
    import mossserve.audio

    for package in (mossserve, mossserve.audio):
        submodules = {module.name for module in pkgutil.iter_modules(package.__path__)}
        assert not submodules & set(package.__all__), package.__name__
        assert sorted(package.__all__) == sorted(package._HOMES), package.__name__  # every name has a home


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "req.json").write_text(json.dumps({"input": "Hi", "duration_seconds": 1e308}))
    proc = subprocess.run([sys.executable, "-m", "mossserve.cli", "say", "--request", str(tmp_path / "req.json"),
                           "--codes-out", str(tmp_path / "c.npy")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "duration_seconds must lie in (0, 3600]" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_codec_json(capsys) -> None:
    code = main(["bench", "codec", "--streams", "3", "--seconds", "0.5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["streams"] == 3 and out["speedup"] > 0
    assert out["max_abs_diff_batched_vs_sequential"] < 1e-3


@functools.cache
def codec_goldens() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(CODEC_DIR / "tiny" / "goldens.safetensors")


def codec_golden(name: str) -> np.ndarray:
    return codec_goldens()[name]


@pytest.mark.parametrize("n_q", [None, 8])
def test_codec_encode_writes_time_first_golden_codes(tmp_path: Path, capsys, n_q) -> None:
    import soundfile

    soundfile.write(tmp_path / "zh.wav", codec_golden("clip/zh"), 24000, subtype="FLOAT")
    args = ["codec", "encode", tmp_path / "zh.wav", "--codec", CODEC_DIR / "tiny", "-o", tmp_path / "c.npy"]
    code, err = run(args + (["--n-quantizers", n_q] if n_q else []), capsys)
    assert code == 0, err
    codes = np.load(tmp_path / "c.npy")
    expected = codec_golden("encode/zh/audio_codes")[:, 0, :31].T
    assert codes.dtype == np.int64 and np.array_equal(codes, expected[:, : n_q or 32])


def test_codec_stereo_files_in_and_out(tmp_path: Path, capsys) -> None:
    """A stereo (v2-style) codec reads a stereo file and writes stereo audio, time-first codes between."""
    import soundfile

    from test_codec_v2 import v2_config, write_checkpoint

    codec_dir = write_checkpoint(tmp_path / "v2", v2_config())
    mono = codec_golden("clip/en")  # 61440 samples: read as interleaved stereo at 12 kHz
    soundfile.write(tmp_path / "st.wav", np.stack([mono[0::2], mono[1::2]], axis=1), 12000, subtype="FLOAT")
    code, err = run(["codec", "encode", tmp_path / "st.wav", "--codec", codec_dir, "-o", tmp_path / "c.npy"], capsys)
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "c.npy"), codec_golden("encode/en/audio_codes")[:, 0, :32].T)
    code, err = run(["codec", "decode", tmp_path / "c.npy", "--codec", codec_dir, "-o", tmp_path / "out.npy"], capsys)
    assert code == 0, err
    audio = np.load(tmp_path / "out.npy")
    golden = codec_golden("decode/en/k32/audio")[0, 0]
    assert audio.shape == (2, golden.size // 2)
    np.testing.assert_allclose(audio, np.stack([golden[0::2], golden[1::2]]), atol=1e-3)
    code, err = run(["codec", "decode", tmp_path / "c.npy", "--codec", codec_dir, "-o", tmp_path / "out.flac"], capsys)
    assert code == 0 and soundfile.info(tmp_path / "out.flac").channels == 2


def test_codec_decode_rejects_codes_that_do_not_fit(tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "wide.npy", np.zeros((3, 40), dtype=np.int64))
    np.save(tmp_path / "big.npy", np.full((3, 32), 5000, dtype=np.int64))
    np.save(tmp_path / "none.npy", np.zeros((3, 0), dtype=np.int64))
    for name, message in (("wide.npy", "40 codebooks"), ("big.npy", "0..1023"), ("none.npy", "zero codebooks")):
        code, err = run(["codec", "decode", tmp_path / name, "--codec", CODEC_DIR / "tiny", "-o", tmp_path / "o.wav"], capsys)
        assert code == 2 and message in err and "Traceback" not in err


def test_codec_decode_notes_codes_that_look_transposed(tmp_path: Path, capsys) -> None:
    """(n_q, frames), the codec's own layout, is also a valid (frames, n_q) file of fewer
    codebooks: it decodes, with a note; the time-first layout gets none."""
    codes = np.arange(320, dtype=np.int64).reshape(32, 10)
    np.save(tmp_path / "t.npy", codes)
    np.save(tmp_path / "ok.npy", codes.T.copy())
    code, err = run(["codec", "decode", tmp_path / "t.npy", "--codec", CODEC_DIR / "tiny", "-o", tmp_path / "t.wav"], capsys)
    assert code == 0, err
    assert "has shape (32, 10), which looks transposed (expected (frames, 32) for this codec)" in err
    assert "decoding it as 32 frames of 10 codebooks" in err
    code, err = run(["codec", "decode", tmp_path / "ok.npy", "--codec", CODEC_DIR / "tiny", "-o", tmp_path / "o.wav"], capsys)
    assert code == 0 and "transposed" not in err


REALTIME = Path(__file__).parent / "fixtures" / "moss_tts_realtime"


@pytest.mark.parametrize("extra, needle", [
    (["--conversation", "{conv}"], "a conversation ends with the assistant's message"),
    (["--request", "{script}", "--depth", "4"], "--depth is for the Local model"),
    (["Hi.", "--mode", "continuation"], "--mode goes with --conversation"),
    (["Hi.", "--format", "flac"], "--out-dir and --format go with --batch"),
    (["Hi.", "--greedy", "--temperature", "0.7"], "give one of --greedy and --temperature"),
    (["Hi.", "--temperature", "-1"], "--temperature must be 0 (greedy) or in"),
    (["Hi.", "--codec", "{fish}"], "does not fit the realtime model"),
])
def test_options_that_would_be_ignored_or_fail_late_are_refused(tmp_path: Path, capsys, extra, needle) -> None:
    """Each was silently ignored, took a traceback, or failed only after the talker ran."""
    (tmp_path / "conv.json").write_text(json.dumps([{"role": "user", "text": "Hello."}]))
    (tmp_path / "script.json").write_text(json.dumps({"turns": [{"input": "Hello there, how are you today?"}]}))
    paths = {"conv": tmp_path / "conv.json", "script": tmp_path / "script.json",
             "fish": Path(__file__).parent / "fixtures" / "fish_s2_pro"}
    args = [a.format(**paths) for a in extra]
    code, err = run(["say", "--model", REALTIME, *args, "-o", tmp_path / "x.wav"], capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "x.wav").exists()


def test_a_request_depth_and_another_depth_option_are_refused(tmp_path: Path, capsys) -> None:
    from local_cases import make_model_dir

    (tmp_path / "req.json").write_text(json.dumps({"input": "Hi.", "depth": 2}))
    local = make_model_dir(tmp_path / "local")
    code, err = run(["say", "--model", local, "--request", tmp_path / "req.json", "--depth", "5",
                     "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 2 and "asks for depth 2 and --depth for 5" in err



def test_an_empty_api_key_in_the_environment_means_none(monkeypatch) -> None:
    """MOSSSERVE_API_KEY= (exported empty, as compose files unset it) leaves the server open, as
    before; an empty --api-key given on the command line is refused (test_errors_are_clear)."""
    from mossserve.cli import build_parser

    monkeypatch.setenv("MOSSSERVE_API_KEY", "")
    assert build_parser().parse_args(["serve"]).api_key is None
    monkeypatch.setenv("MOSSSERVE_API_KEY", "sekret")
    assert build_parser().parse_args(["serve"]).api_key == "sekret"


def test_serve_says_when_an_empty_api_key_in_the_environment_leaves_it_open(monkeypatch, capsys) -> None:
    import mossserve.serve.run

    started = []
    monkeypatch.setattr(mossserve.serve.run, "serve", lambda settings, log_level, shutdown_timeout_s: started.append(settings.api_key))
    monkeypatch.setenv("MOSSSERVE_API_KEY", "")
    code, err = run(["serve", "--port", "0"], capsys)
    assert code == 0 and started == [None]
    assert "$MOSSSERVE_API_KEY is set but empty; /v1 is served without an API key" in err
    monkeypatch.setenv("MOSSSERVE_API_KEY", "sekret")
    code, err = run(["serve", "--port", "0"], capsys)
    assert code == 0 and started[-1] == "sekret" and "API key" not in err


def test_greedy_with_temperature_0_is_greedy(tmp_path: Path, capsys) -> None:
    """As the API and the server take it (temperature 0 is greedy); only another temperature is refused."""
    outputs = []
    for extra in ([], ["--temperature", "0"]):
        out = tmp_path / f"codes{len(extra)}.npy"
        code, err = run(["say", "Hello there.", "--greedy", *extra, "--max-frames", "8", "--codes-out", out], capsys)
        assert code == 0, err
        outputs.append(np.load(out))
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("args,message", [
    (["say", "   ", "-o", "x.wav"], "input is empty: there is nothing to say"),
    (["say", "Hi.", "--voice", "missing.wav", "-o", "x.wav"], "voice: audio file not found: missing.wav"),
    (["say", "Hi.", "--voice", ".", "-o", "x.wav"], "voice: audio file is not a regular file (a directory"),
    (["say", "--request", "bad.json", "-o", "x.wav"], "bad.json is not valid JSON"),
    (["say", "--request", "unknown.json", "-o", "x.wav"], "unknown request field(s): speed"),
    (["prompt", "--request", "unknown.json", "-o", "p.npy"], "unknown request field(s): speed"),
    (["say", "--batch", "bad.jsonl", "--out-dir", "out"], "bad.jsonl:2 is not valid JSON"),
    (["say", "Hi.", "--top-p", "0", "-o", "x.wav"], "--top-p must be in (0, 1], got 0.0"),
    (["serve", "--data-dir", "bad.json"], "--data-dir bad.json is a file, not a directory"),
])
def test_errors_that_need_no_model_come_before_it_loads(args, message, capsys, tmp_path: Path, monkeypatch) -> None:
    """A missing checkpoint shows the order: each of these was reported only after the model had
    loaded (minutes for an 8B one)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text('{"input": "x",}')
    (tmp_path / "unknown.json").write_text('{"input": "x", "speed": 1.2}')
    (tmp_path / "bad.jsonl").write_text('{"input": "one"}\nnot json\n')
    code, err = run([*args, "--model", "/nonexistent/model"], capsys)
    assert code == 2 and message in err, err


def test_serve_refuses_a_taken_port_before_the_model_loads(capsys, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(["serve", "--port", str(port), "--model", "/nonexistent/model", "--data-dir", tmp_path],
                        capsys)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in err, err


def test_unquoted_words_after_say_text_ask_for_quotes(capsys) -> None:
    """The shell split the text: argparse's own error showed the top-level usage, without a hint."""
    with pytest.raises(SystemExit) as exit:
        main(["say", "Hello", "big", "world", "-o", "x.wav"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "usage: mossserve say" in err
    assert "unrecognized arguments: big world; quote a text of several words: mossserve say 'Hello big world'" in err


@pytest.mark.parametrize("args", [["--sped", "1.5"], ["--voise", "ref.wav"]])
def test_a_mistyped_option_with_its_value_is_no_text_to_quote(args: list[str], capsys) -> None:
    """The option's value was taken for a word of the text: `quote ... say "Hello. 1.5"`."""
    with pytest.raises(SystemExit):
        main(["say", "Hello.", *args, "-o", "x.wav"])
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {' '.join(args)}" in err and "quote" not in err


@pytest.mark.parametrize("args", [["prompt", "--request", "r.json", "-o", "-"],
                                  ["say", "Hi.", "--codes-out", "-"]])
def test_stdout_is_refused_for_npy_outputs(args: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    """`-` means stdout for say's audio; here it silently wrote (and overwrote) a file named '-'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text('{"input": "Hi."}')
    code, err = run(args, capsys)
    assert code == 2 and "'-' (stdout) is for say's -o audio only" in err and not (tmp_path / "-").exists()


def test_a_closed_stdin_is_an_error_not_a_traceback(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", None)
    code, err = run(["say", "-", "-o", "x.wav"], capsys)
    assert code == 2 and "cannot read stdin: it is closed" in err


def test_every_option_has_help_and_states_its_default() -> None:
    import argparse

    from mossserve.cli import build_parser

    def options(parser: argparse.ArgumentParser, name: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    yield from options(sub, f"{name} {command}")
            elif action.dest != "help":
                yield name, action

    missing = [f"{name}: {action.option_strings or action.dest}" for name, action in options(build_parser(), "mossserve")
               if not action.help or action.default not in (None, False) and "default" not in action.help]
    assert missing == []


def test_a_session_script_to_stdout_says_stdout(tmp_path: Path, capsysbinary) -> None:
    """Its note read `wrote -: ...` where one request's reads `wrote stdout: ...`."""
    (tmp_path / "script.json").write_text(json.dumps({"turns": [{"input": "Hello there."}, {"input": "And again."}]}))
    code = main(["say", "--model", str(REALTIME), "--codec", str(CODEC_DIR / "tiny"), "--request",
                 str(tmp_path / "script.json"), "--greedy", "--max-frames", "6", "-o", "-"])
    out, err = capsysbinary.readouterr()
    assert code == 0 and out[:4] == b"RIFF" and b"wrote stdout: " in err, err


def test_a_model_on_the_cpu_by_default_says_so_where_a_gpu_is_visible(tmp_path: Path, capsys, monkeypatch) -> None:
    """A user who forgot --device on a GPU machine only saw a run many times slower."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    note = "note: running on the CPU (no --device given), though a CUDA GPU is visible"
    code, err = run(["say", "Hi.", "--greedy", "--max-frames", "34", "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 0 and note in err, err
    code, err = run(["say", "Hi.", "--device", "cpu", "--greedy", "--max-frames", "34", "--codes-out",
                     tmp_path / "c.npy"], capsys)
    assert code == 0 and note not in err, err
