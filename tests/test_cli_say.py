"""`mossserve say` on the engine: a text file, `--batch requests.jsonl --out-dir DIR`, the progress bar."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import AUDIO_DIR, CODEC_DIR, STREAMED_VS_WHOLE_ATOL
from mossserve.api import TTS
from mossserve.cli import main
from mossserve.sampling import SamplingParams
from mossserve.speech_request import SpeechRequest


def run(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_say_reads_text_from_a_file(delay_model_dirs, tmp_path: Path, capsys) -> None:
    model = delay_model_dirs["tiny_nvq16"]
    (tmp_path / "t.txt").write_text("Hello from a file.\n", encoding="utf-8")
    code, err = run(["say", "--text-file", tmp_path / "t.txt", "--model", model, "--codec", CODEC_DIR / "tiny",
                     "--greedy", "--codes-out", tmp_path / "a.npy"], capsys)
    assert code == 0, err
    code, err = run(["say", "Hello from a file.", "--model", model, "--codec", CODEC_DIR / "tiny", "--greedy",
                     "--codes-out", tmp_path / "b.npy"], capsys)
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_say_batch_runs_every_line_and_matches_one_at_a_time(delay_model_dirs, tmp_path: Path, capsys) -> None:
    model = delay_model_dirs["tiny_nvq16"]
    shutil.copy(AUDIO_DIR / "reference_zh.wav", tmp_path / "voice.wav")
    lines = [{"input": "First line."}, {"input": "Second, with a voice.", "voice": "voice.wav"},
             {"input": "Third.", "duration_seconds": 1.0}]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    code, err = run(["say", "--batch", tmp_path / "requests.jsonl", "--out-dir", tmp_path / "out", "--model", model,
                     "--codec", CODEC_DIR / "tiny", "--greedy", "--max-frames", "30", "--max-running", "2",
                     "--progress"], capsys)
    assert code == 0, err
    assert "3 of 3 requests" in err and "\r[" in err  # the progress bar was drawn
    tts = TTS.from_pretrained(model, codec=CODEC_DIR / "tiny")
    try:
        for index, line in enumerate(lines):
            request = SpeechRequest.from_dict(line, base_dir=tmp_path)
            expected = tts.synthesize(request, SamplingParams.greedy(), max_new_frames=30)
            assert np.array_equal(np.load(tmp_path / "out" / f"{index:04d}.npy"), expected.codes)
            samples, rate = sf.read(tmp_path / "out" / f"{index:04d}.wav", dtype="float32", always_2d=True)
            assert rate == expected.sample_rate and samples.shape[0] == expected.samples.shape[-1]
    finally:
        tts.close()


def test_say_batch_errors_name_the_line(delay_model_dirs, tmp_path: Path, capsys) -> None:
    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"input": "fine"}\n{"input": "x", "colour": "red"}\n', encoding="utf-8")
    code, err = run(["say", "--batch", batch, "--out-dir", tmp_path / "out", "--model",
                     delay_model_dirs["tiny_nvq16"]], capsys)
    assert code == 2 and "requests.jsonl:2" in err and "colour" in err
    code, err = run(["say", "--batch", batch, "-o", tmp_path / "x.wav"], capsys)
    assert code == 2 and "--out-dir" in err
    code, err = run(["say", "--text-file", tmp_path / "missing.txt", "-o", tmp_path / "x.wav"], capsys)
    assert code == 2 and "missing.txt" in err
    code, err = run(["say", "--batch", batch, "--out-dir", tmp_path / "out", "--format", "npy"], capsys)
    assert code == 2 and "NNNN.npy" in err and "(wav, pcm, raw, flac, mp3, opus, ogg, aac)" in err  # .npy audio would overwrite codes
    code, err = run(["say", "--batch", batch, "--out-dir", batch, "--format", "wav"], capsys)
    assert code == 2 and "is a file, not a directory" in err


def test_say_batch_skips_a_request_the_model_cannot_run(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """Reported by its line, the others written under their own numbers, exit status 1."""
    (tmp_path / "bad.wav").write_bytes(b"not audio" * 20)
    lines = [{"input": "One."}, {"input": "Two.", "instructions": "whisper"}, {"input": "Three.", "voice": "bad.wav"},
             {"input": "Four."}]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    code, err = run(["say", "--batch", tmp_path / "requests.jsonl", "--out-dir", tmp_path / "out", "--model",
                     delay_model_dirs["tiny_nvq16"], "--codec", CODEC_DIR / "tiny", "--max-frames", "20"], capsys)
    assert code == 1, err
    assert "requests.jsonl:2: skipped: instructions" in err and "requests.jsonl:3: skipped:" in err
    assert "wrote 2 of 4 requests" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.npy", "0000.wav", "0003.npy", "0003.wav"]


def test_a_rerun_leaves_no_earlier_files_under_a_skipped_number(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """Run again into the same --out-dir, a line that now fails (at its prompt, or with no frames) had
    its earlier run's NNNN files left there, which a script joining NNNN.wav took for this run's."""
    batch, out = tmp_path / "requests.jsonl", tmp_path / "out"
    common = ["--out-dir", out, "--model", delay_model_dirs["tiny_nvq16"], "--codec", CODEC_DIR / "tiny"]
    batch.write_text('{"input": "One."}\n{"input": "Two."}\n{"input": "Three."}\n', encoding="utf-8")
    code, err = run(["say", "--batch", batch, *common, "--max-frames", "20"], capsys)
    assert code == 0 and len(list(out.iterdir())) == 6, err
    batch.write_text('{"input": "One."}\n{"input": "Two.", "instructions": "whisper"}\n', encoding="utf-8")
    code, err = run(["say", "--batch", batch, *common, "--max-frames", "20"], capsys)
    assert code == 1 and "requests.jsonl:2: skipped: instructions" in err
    assert "(removed an earlier run's 0001.npy and 0001.wav)" in err
    assert "note: " in err and "also holds 0002.npy, 0002.wav from an earlier run" in err  # named, not removed
    assert sorted(p.name for p in out.iterdir()) == ["0000.npy", "0000.wav", "0002.npy", "0002.wav"]
    code, err = run(["say", "--batch", batch, *common, "--max-frames", "5"], capsys)  # no frames: all skipped
    assert code == 1 and "skipped: the model produced no audio frames (hit the step cap after 5 steps) " \
                         "(removed an earlier run's 0000.npy and 0000.wav)" in err
    assert sorted(p.name for p in out.iterdir()) == ["0002.npy", "0002.wav"]


def test_a_refused_rerun_leaves_the_out_dir_alone_and_a_stuck_file_skips_its_line_only(
        delay_model_dirs, tmp_path: Path, capsys, monkeypatch) -> None:
    """A run refused after its lines were read (a codec that does not fit the model) removed earlier
    files under the numbers of lines it would have skipped; a file it cannot remove ended the batch."""
    batch, out = tmp_path / "requests.jsonl", tmp_path / "out"
    model = ["--out-dir", out, "--model", delay_model_dirs["tiny_nvq16"], "--max-frames", "20"]
    common = [*model, "--codec", CODEC_DIR / "tiny"]
    batch.write_text('{"input": "One."}\n{"input": "Two."}\n', encoding="utf-8")
    assert run(["say", "--batch", batch, *common], capsys)[0] == 0
    batch.write_text('{"input": "One."}\n{"input": "Two.", "instructions": "whisper"}\n', encoding="utf-8")
    fish_codec = Path(__file__).parent / "fixtures" / "fish_s2_pro"
    code, err = run(["say", "--batch", batch, *model, "--codec", fish_codec], capsys)
    assert code == 2 and "does not fit" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["0000.npy", "0000.wav", "0001.npy", "0001.wav"]
    unlink = Path.unlink

    def refused(path: Path, *args, **kwargs) -> None:
        if path.name == "0001.wav":
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refused)
    code, err = run(["say", "--batch", batch, *common], capsys)
    assert code == 1 and "wrote 1 of 2 requests" in err, err
    assert "(removed an earlier run's 0001.npy) (could not remove an earlier run's 0001.wav: " in err


def test_say_batch_depth_is_checked_once_and_against_each_line(delay_model_dirs, tmp_path: Path, capsys) -> None:
    from local_cases import make_model_dir

    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"input": "One."}\n{"input": "Two.", "depth": 2}\n', encoding="utf-8")
    code, err = run(["say", "--batch", batch, "--out-dir", tmp_path / "delay", "--model", delay_model_dirs["tiny_nvq16"],
                     "--codec", CODEC_DIR / "tiny", "--depth", "4"], capsys)
    assert code == 2 and "--depth is for the Local model" in err and not (tmp_path / "delay").exists()
    code, err = run(["say", "--batch", batch, "--out-dir", tmp_path / "local", "--model", make_model_dir(tmp_path / "m"),
                     "--codec", CODEC_DIR / "tiny", "--depth", "4", "--max-frames", "6"], capsys)
    assert code == 1 and "requests.jsonl:2: skipped: the line asks for depth 2 and --depth for 4" in err
    assert np.load(tmp_path / "local" / "0000.npy").shape[1] == 4 and not (tmp_path / "local" / "0001.npy").exists()
    # a depth outside 1..32 is a line the model cannot run, whichever side: depth 0 refused the whole file
    batch.write_text('{"input": "One."}\n{"input": "Two.", "depth": 0}\n{"input": "Three.", "depth": 40}\n',
                     encoding="utf-8")
    code, err = run(["say", "--batch", batch, "--out-dir", tmp_path / "ranges", "--model", tmp_path / "m",
                     "--codec", CODEC_DIR / "tiny", "--max-frames", "6"], capsys)
    assert code == 1 and (tmp_path / "ranges" / "0000.npy").exists(), err
    for line, depth in ((2, 0), (3, 40)):
        assert f"requests.jsonl:{line}: skipped: depth must be an integer in 1..32 (codebooks per frame), got {depth}" in err


def test_say_batch_skips_a_request_that_gave_no_frames(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """A 16-codebook Delay model completes its first frame after 17 steps: 5 give none (say refuses that
    for one request; the batch wrote an empty file)."""
    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"input": "One."}\n', encoding="utf-8")
    code, err = run(["say", "--batch", batch, "--out-dir", tmp_path / "out", "--model", delay_model_dirs["tiny_nvq16"],
                     "--codec", CODEC_DIR / "tiny", "--max-frames", "5"], capsys)
    assert code == 1 and "skipped: the model produced no audio frames" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_say_batch_takes_the_extensions_o_takes(delay_model_dirs, tmp_path: Path, capsys) -> None:
    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"input": "One."}\n', encoding="utf-8")
    code, err = run(["say", "--batch", batch, "--out-dir", tmp_path / "out", "--format", ".OGG", "--model",
                     delay_model_dirs["tiny_nvq16"], "--codec", CODEC_DIR / "tiny", "--greedy", "--max-frames", "40"],
                    capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.npy", "0000.ogg"]
    assert (tmp_path / "out" / "0000.ogg").read_bytes()[:4] == b"OggS"


def test_say_speed_stretches_the_written_audio(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """--speed time-stretches what -o and --batch write (the codes are the model's, at any speed)."""
    model = delay_model_dirs["tiny_nvq16"]
    common = ["--model", model, "--codec", CODEC_DIR / "tiny", "--greedy"]
    code, err = run(["say", "Hello at two speeds.", *common, "-o", tmp_path / "a.wav", "--codes-out", tmp_path / "a.npy"],
                    capsys)
    assert code == 0, err
    code, err = run(["say", "Hello at two speeds.", *common, "--speed", "1.6", "-o", tmp_path / "b.wav",
                     "--codes-out", tmp_path / "b.npy"], capsys)
    assert code == 0, err
    normal, rate = sf.read(tmp_path / "a.wav", dtype="float32")
    fast, _ = sf.read(tmp_path / "b.wav", dtype="float32")
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert len(fast) == pytest.approx(len(normal) / 1.6, rel=0.05)
    assert f"wrote {tmp_path / 'b.wav'}: {len(fast) / rate:.2f} s" in err

    (tmp_path / "r.jsonl").write_text(json.dumps({"input": "Hello at two speeds."}) + "\n", encoding="utf-8")
    code, err = run(["say", "--batch", tmp_path / "r.jsonl", *common, "--speed", "1.6", "--out-dir", tmp_path / "out"],
                    capsys)
    assert code == 0, err
    assert len(sf.read(tmp_path / "out" / "0000.wav")[0]) == len(fast)

    for extra, message in [(["--speed", "5", "-o", tmp_path / "c.wav"], "--speed must lie in 0.25..4, got 5"),
                           (["--speed", "2", "--codes-out", tmp_path / "c.npy"], "--speed changes the written audio")]:
        code, err = run(["say", "Hi.", *common, *extra], capsys)
        assert code == 2 and message in err and "Traceback" not in err


def test_a_run_cut_by_the_engines_length_limit_says_so(delay_model_dirs, delay_tts, tmp_path: Path, capsys) -> None:
    """A long text whose prompt nearly filled max_len came back short, reported as "hit the step cap"
    though no --max-frames was given (in --batch, silently); --max-len now sets the limit."""
    model = delay_model_dirs["tiny_nvq16"]
    common = ["--model", model, "--codec", CODEC_DIR / "tiny", "--greedy"]
    texts = ["Hi.", "A somewhat longer line of text to speak here."]
    rows = [len(delay_tts("tiny_nvq16").prompt(SpeechRequest(input=t)).rows) for t in texts]
    limit = rows[1] + 20  # room for 20 steps after the longer prompt, more after the shorter
    code, err = run(["say", texts[1], *common, "--max-len", limit, "--codes-out", tmp_path / "a.npy"], capsys)
    assert code == 0, err
    assert (f"reached the engine's length limit ({limit} positions of prompt and audio; --max-len sets it, up to "
            "the model's own) after 20 steps") in err
    code, err = run(["say", texts[1], *common, "--max-frames", "20", "--codes-out", tmp_path / "b.npy"], capsys)
    assert code == 0 and "hit the step cap after 20 steps" in err, err
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps({"input": t}) for t in texts), encoding="utf-8")
    code, err = run(["say", "--batch", tmp_path / "requests.jsonl", "--out-dir", tmp_path / "out", *common,
                     "--max-len", limit, "--max-frames", rows[1] - rows[0] + 20], capsys)
    assert code == 0, err
    assert f"requests.jsonl:2: written, but it reached the engine's length limit ({limit} positions" in err
    assert "requests.jsonl:1:" not in err  # it ended by itself (26 steps) within its room
    code, err = run(["say", "--batch", tmp_path / "requests.jsonl", "--out-dir", tmp_path / "capped", *common,
                     "--max-frames", "20"], capsys)
    assert code == 0, err  # the step cap (or the runaway guard) went unreported in --batch
    assert "requests.jsonl:1: written, but it hit the step cap after 20 steps" in err
    assert "requests.jsonl:2: written, but it hit the step cap after 20 steps" in err
    code, err = run(["say", "Hi.", *common, "--max-len", "1", "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 2 and "--max-len must be at least 2" in err


def test_batch_results_are_handed_on_as_each_request_ends(delay_model_dirs, delay_tts, tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    """`say --batch` wrote nothing until every line was done, so an interrupted run lost all of it
    (and every request's audio was held until then)."""
    import mossserve.cli as cli

    tts = delay_tts("tiny_nvq16")
    prompts = [tts.prompt(SpeechRequest(input=t)) for t in ("One.", "Two, longer.", "Three.")]
    expected = tts.run(prompts, SamplingParams.greedy(), 30)
    got = {}
    assert tts.run(prompts, SamplingParams.greedy(), 30, on_result=lambda i, g, a: got.update({i: (g, a)})) == []
    assert sorted(got) == [0, 1, 2]
    for index, (generation, audio) in enumerate(expected):
        assert np.array_equal(got[index][0].frames, generation.frames)
        np.testing.assert_allclose(got[index][1].samples, audio.samples, atol=STREAMED_VS_WHOLE_ATOL)

    written = []
    write_speech = cli.write_speech

    def interrupted(path, *rest):  # Ctrl-C while the second file is written
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return write_speech(path, *rest)

    monkeypatch.setattr(cli, "write_speech", interrupted)
    lines = [{"input": "One."}, {"input": "Two, longer."}, {"input": "Three."}]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    code = main(["say", "--batch", str(tmp_path / "requests.jsonl"), "--out-dir", str(tmp_path / "out"), "--model",
                 str(delay_model_dirs["tiny_nvq16"]), "--codec", str(CODEC_DIR / "tiny"), "--greedy", "--max-frames", "30"])
    assert code == 130  # Ctrl-C's status
    assert len(written) == 1 and written[0].stat().st_size > 44  # the first to finish is on disk


def test_audio_that_is_all_continuation_prefix_is_an_error_not_an_empty_file(delay_model_dirs, tmp_path: Path,
                                                                            capsys) -> None:
    """The golden `text_free_run` prompt (no chat template): its start length covers every frame it
    makes, so the reference's waveform is cut whole. `say` wrote a 0 s file and exited 0."""
    from conftest import DELAY_DIR
    from delay_cases import generation_cases

    case = next(c for c in generation_cases(DELAY_DIR / "tiny_nvq16") if c.name == "text_free_run")
    np.save(tmp_path / "p.npy", case.prompts[0])
    code, err = run(["say", "--prompt-matrix", tmp_path / "p.npy", "--model", delay_model_dirs["tiny_nvq16"],
                     "--codec", CODEC_DIR / "tiny", "--greedy", "--codes-out", tmp_path / "c.npy",
                     "-o", tmp_path / "x.wav"], capsys)
    assert code == 2 and "the model produced no new audio" in err, err
    assert len(np.load(tmp_path / "c.npy")) > 0 and not (tmp_path / "x.wav").exists()


def test_batch_skips_a_line_whose_audio_is_all_continuation_prefix(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """`say -o` refused it; `--batch` wrote a 0 s file for it and counted it written."""
    voice = np.random.default_rng(0).integers(0, 1024, (10, 16))
    np.save(tmp_path / "v.npy", voice)
    lines = [{"input": "Hello there.", "voice": "v.npy", "reference_text": "Some words."}]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    code, err = run(["say", "--batch", tmp_path / "requests.jsonl", "--out-dir", tmp_path / "out", "--model",
                     delay_model_dirs["tiny_nvq16"], "--codec", CODEC_DIR / "tiny", "--greedy", "--max-frames", "16"],
                    capsys)
    assert code == 1 and "requests.jsonl:1: skipped: the model produced no new audio" in err, err
    assert not (tmp_path / "out" / "0000.wav").exists()


def test_a_text_file_with_a_byte_order_mark_is_read_without_it(tmp_path: Path, capsys) -> None:
    """Realtime (and Fish) tokenize what they are given: the BOM of a file saved by Notepad was a prompt row."""
    realtime = Path(__file__).parent / "fixtures" / "moss_tts_realtime"
    codes = []
    for name, encoding in (("bom.txt", "utf-8-sig"), ("plain.txt", "utf-8")):
        (tmp_path / name).write_text("Hello from a file.\n", encoding=encoding)
        code, err = run(["say", "--text-file", tmp_path / name, "--model", realtime, "--greedy", "--max-frames", "6",
                         "--codes-out", tmp_path / f"{name}.npy"], capsys)
        assert code == 0, err
        codes.append(np.load(tmp_path / f"{name}.npy"))
    assert (tmp_path / "bom.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    np.testing.assert_array_equal(codes[0], codes[1])


def test_request_files_with_a_byte_order_mark_are_read(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """A --batch or --request file saved by Notepad was refused whole ("Unexpected UTF-8 BOM")."""
    common = ["--model", delay_model_dirs["tiny_nvq16"], "--codec", CODEC_DIR / "tiny", "--greedy", "--max-frames", "20"]
    (tmp_path / "reqs.jsonl").write_text('{"input": "First."}\n{"input": "Second."}\n', encoding="utf-8-sig")
    (tmp_path / "req.json").write_text('{"input": "First."}', encoding="utf-8-sig")
    code, err = run(["say", "--batch", tmp_path / "reqs.jsonl", "--out-dir", tmp_path / "out", *common], capsys)
    assert code == 0 and "wrote 2 of 2 requests" in err, err
    code, err = run(["say", "--request", tmp_path / "req.json", "--codes-out", tmp_path / "one.npy", *common], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "out" / "0000.npy"))


class Stdout(io.TextIOWrapper):
    """sys.stdout whose bytes are kept, write by write."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO())
        self.writes: list[bytes] = []
        self.buffer.write = self.writes.append


def stdin_of(text: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(text.encode("utf-8")))


@pytest.mark.parametrize("source", [["-"], ["--text-file", "-"]])
def test_say_reads_stdin_and_streams_audio_to_stdout(source, tmp_path: Path, capsys, monkeypatch) -> None:
    """`echo Hello | mossserve say - -o - | player`: the text from stdin (a BOM dropped, as from a
    file), the audio on stdout chunk by chunk as it is generated, the same samples as -o x.wav."""
    stdout = Stdout()
    monkeypatch.setattr(sys, "stdin", stdin_of("\ufeffHello from stdin.\n"))
    monkeypatch.setattr(sys, "stdout", stdout)
    code, err = run(["say", *source, "--greedy", "-o", "-"], capsys)
    assert code == 0 and "wrote stdout: " in err, err
    code, err = run(["say", "Hello from stdin.", "--greedy", "-o", tmp_path / "x.wav"], capsys)
    assert code == 0, err
    streamed, rate = sf.read(io.BytesIO(b"".join(stdout.writes)), dtype="int16")
    written, written_rate = sf.read(tmp_path / "x.wav", dtype="int16")
    assert rate == written_rate and np.array_equal(streamed, written)
    assert len([w for w in stdout.writes if w]) > 1  # the first chunk went out before the last was made


def test_say_to_stdout_writes_the_format_asked(capsys, monkeypatch) -> None:
    stdout = Stdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    code, err = run(["say", "Hello.", "--greedy", "-o", "-", "--format", "flac"], capsys)
    assert code == 0, err
    assert b"".join(stdout.writes).startswith(b"fLaC")


def test_a_run_with_no_audio_writes_nothing_to_stdout(delay_model_dirs, capsys, monkeypatch) -> None:
    """No frames (a 16-codebook model's first one comes after 17 steps): the error, and an empty
    stdout; a player used to get the header of an empty wav."""
    stdout = Stdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    code, err = run(["say", "Hello.", "--model", delay_model_dirs["tiny_nvq16"], "--codec", CODEC_DIR / "tiny",
                     "--greedy", "--max-frames", "5", "-o", "-"], capsys)
    assert code == 2 and "the model produced no audio frames" in err, err
    assert b"".join(stdout.writes) == b""


def test_a_text_too_long_for_the_engine_says_what_to_do(tmp_path: Path, capsys) -> None:
    (tmp_path / "long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    code, err = run(["say", "--text-file", tmp_path / "long.txt", "--max-len", "64", "--codes-out",
                     tmp_path / "c.npy"], capsys)
    assert code == 2 and "this engine allows 64" in err, err
    assert "split the text (--batch takes one request per line" in err and "raise --max-len" in err
    assert "voice" not in err
    np.save(tmp_path / "long_voice.npy", np.zeros((80, 32), dtype=np.int64))  # the voice is what does not fit
    code, err = run(["say", "Hi.", "--voice", tmp_path / "long_voice.npy", "--max-len", "64", "--codes-out",
                     tmp_path / "c.npy"], capsys)
    assert code == 2 and "this engine allows 64" in err and "use a shorter voice reference" in err, err
    conversation = [{"role": "user", "text": "Hi.", "reference": [str(tmp_path / "long_voice.npy")]}]
    (tmp_path / "conv.json").write_text(json.dumps(conversation), encoding="utf-8")
    code, err = run(["say", "--conversation", tmp_path / "conv.json", "--max-len", "64", "--codes-out",
                     tmp_path / "c.npy"], capsys)
    assert code == 2 and "shorten the conversation or its voice references" in err and "--batch" not in err, err


def test_a_reader_that_quits_stops_the_audio_quietly() -> None:
    """`say ... -o - | head -c 10` (or a player that quits): "error: Broken pipe" and exit 2."""
    import subprocess

    process = subprocess.Popen([sys.executable, "-m", "mossserve", "say", "Hello there, a longer text to speak.",
                                "--greedy", "--max-frames", "400", "-o", "-"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(10)[:4] == b"RIFF"
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and "error" not in err and "Traceback" not in err, err


def test_say_batch_skips_a_request_whose_files_cannot_be_written(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """A name taken by a directory ended the whole run (exit 2): requests after it were never written,
    and it left its codes without their audio."""
    lines = "".join(json.dumps({"input": text}) + "\n" for text in ("One.", "Two.", "Three."))
    (tmp_path / "requests.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "out" / "0001.wav").mkdir(parents=True)
    (tmp_path / "out" / "0002.npy").mkdir()  # the codes' name: the handler's clean-up raised in turn
    code, err = run(["say", "--batch", tmp_path / "requests.jsonl", "--out-dir", tmp_path / "out", "--model",
                     delay_model_dirs["tiny_nvq16"], "--codec", CODEC_DIR / "tiny", "--max-frames", "20",
                     "--max-running", "1"], capsys)
    assert code == 1, err
    assert f"requests.jsonl:2: skipped: cannot write its files: Is a directory: {tmp_path / 'out' / '0001.wav'}" in err
    assert f"requests.jsonl:3: skipped: cannot write its files: Is a directory: {tmp_path / 'out' / '0002.npy'}" in err
    assert "wrote 1 of 3 requests" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.npy", "0000.wav", "0001.wav", "0002.npy"]


def test_flag_refusals_name_the_flag(delay_model_dirs, tmp_path: Path, capsys) -> None:
    """--depth, --n-quantizers and --instructions were refused by the library's field names."""
    from fish_cases import FISH_DIR
    from local_cases import make_model_dir

    code, err = run(["say", "Hi.", "--model", make_model_dir(tmp_path / "local"), "--codec", CODEC_DIR / "tiny",
                     "--depth", "99", "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 2 and "error: --depth must be an integer in 1..32" in err, err
    code, err = run(["say", "Hi.", "--model", FISH_DIR, "--instructions", "warm",
                     "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 2 and "error: --instructions is not used by Fish S2 Pro" in err, err
    np.save(tmp_path / "v.npy", np.zeros((3, 32), dtype=np.int64))
    code, err = run(["say", "[S1] Hi.", "--model", delay_model_dirs["tiny_nvq32"], "--task", "dialogue",
                     "--voice", tmp_path / "v.npy", "--reference-text", "Hello.", "--codes-out", tmp_path / "c.npy"],
                    capsys)
    assert code == 2 and "error: --voice is not used by the dialogue task" in err, err
    code, err = run(["codec", "encode", AUDIO_DIR / "reference_zh.wav", "--codec", CODEC_DIR / "tiny",
                     "--n-quantizers", "999", "-o", tmp_path / "e.npy"], capsys)
    assert code == 2 and "error: --n-quantizers must be in 1..32, got 999" in err, err


def test_an_output_through_a_link_to_a_missing_directory_is_refused_before_the_run(tmp_path: Path, capsys) -> None:
    """A dangling symlink passed the check (it does not exist) and failed after the whole synthesis."""
    (tmp_path / "out.wav").symlink_to(tmp_path / "missing" / "out.wav")
    code, err = run(["say", "Hi.", "--model", "/nonexistent/model", "-o", tmp_path / "out.wav"], capsys)
    assert code == 2 and f"cannot write {tmp_path / 'out.wav'}: no directory {tmp_path / 'missing'}" in err, err
    (tmp_path / "a.wav").symlink_to(tmp_path / "b.wav")
    (tmp_path / "b.wav").symlink_to(tmp_path / "a.wav")
    code, err = run(["say", "Hi.", "--model", "/nonexistent/model", "-o", tmp_path / "a.wav"], capsys)
    assert code == 2 and f"cannot write {tmp_path / 'a.wav'}: its symlinks form a loop" in err, err
