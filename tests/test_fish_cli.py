"""Fish S2 Pro through the command line (the "Fish S2 Pro" section of the outside contracts): `prompt` and `say`
with a model directory, `--codes-out` holding every text batch's frames, seeded replay of the
reference's sampled golden, and `say` audio equal to `codec decode` of its codes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fish_cases import FISH_DIR, gen_case, npz

from mossserve.cli import main


def request_file(tmp_path: Path, **fields) -> str:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(fields))
    return str(path)


def golden_frames(name: str) -> np.ndarray:
    """Every batch's frames, time first: the reference's returned codes per batch, concatenated."""
    return np.concatenate(gen_case(name).codes)


def clone_voice(tmp_path: Path) -> str:
    """The clone case's reference: frames 0..11 of the codec golden, time first, as a .npy file."""
    path = tmp_path / "voice.npy"
    np.save(path, npz("codec_encode")["codes"][:, 0:12].T.copy())
    return str(path)


def test_say_runs_every_speaker_batch_as_one_request(tmp_path: Path) -> None:
    text = "<|speaker:0|>Good morning! How are you today?<|speaker:1|>I am fine, thanks. And you?"
    out = tmp_path / "codes.npy"
    request = request_file(tmp_path, input=text, chunk_length=40)
    assert main(["say", "--model", str(FISH_DIR), "--request", request, "--greedy", "--codes-out", str(out)]) == 0
    assert len(gen_case("multi_speaker").codes) == 2
    assert np.array_equal(np.load(out), golden_frames("multi_speaker"))


def test_say_clones_a_voice_given_as_codes(tmp_path: Path) -> None:
    out = tmp_path / "codes.npy"
    request = request_file(tmp_path, input="<|speaker:0|>Nice to meet you, my friend.", voice=clone_voice(tmp_path),
                           reference_text="The quick brown fox jumps over the lazy dog.")
    assert main(["say", "--model", str(FISH_DIR), "--request", request, "--greedy", "--codes-out", str(out)]) == 0
    assert np.array_equal(np.load(out), golden_frames("clone"))


def test_say_clones_with_voice_and_reference_text_flags(tmp_path: Path) -> None:
    out = tmp_path / "codes.npy"
    assert main(["say", "<|speaker:0|>Nice to meet you, my friend.", "--voice", clone_voice(tmp_path),
                 "--reference-text", "The quick brown fox jumps over the lazy dog.", "--model", str(FISH_DIR),
                 "--greedy", "--codes-out", str(out)]) == 0
    assert np.array_equal(np.load(out), golden_frames("clone"))


def test_a_voice_without_reference_text_names_the_flag(tmp_path: Path, capsys) -> None:
    for extra in ([], ["--reference-text", " "]):
        code = main(["say", "Hi.", "--voice", clone_voice(tmp_path), *extra, "--model", str(FISH_DIR),
                     "--codes-out", str(tmp_path / "c.npy")])
        err = capsys.readouterr().err
        assert code == 2 and "give --reference-text (what --voice says)" in err and "Traceback" not in err


def test_seed_replays_the_references_sampled_run(tmp_path: Path) -> None:
    """A cut generation keeps its last frame here (docs/fish.md): all 16 generated frames."""
    out = tmp_path / "codes.npy"
    assert main(["say", "Sampling with the server defaults.", "--model", str(FISH_DIR), "--seed", "20251123",
                 "--temperature", "0.8", "--top-p", "0.8", "--top-k", "30", "--max-frames", "16",
                 "--codes-out", str(out)]) == 0
    case = gen_case("sampled")
    assert np.array_equal(np.load(out), case.ys[0][len(case.prompts[0]):, 1:])


def test_prompt_writes_the_references_prompt_matrix(tmp_path: Path) -> None:
    out = tmp_path / "prompt.npy"
    request = request_file(tmp_path, input="<|speaker:0|>Nice to meet you, my friend.", voice=clone_voice(tmp_path),
                           reference_text="The quick brown fox jumps over the lazy dog.")
    assert main(["prompt", "--model", str(FISH_DIR), "--request", request, "-o", str(out)]) == 0
    assert np.array_equal(np.load(out), gen_case("clone").prompts[0])


def test_say_audio_is_the_codec_decode_of_its_codes(tmp_path: Path) -> None:
    codes, audio, decoded = tmp_path / "codes.npy", tmp_path / "audio.npy", tmp_path / "decoded.npy"
    assert main(["say", "Hello world.", "--model", str(FISH_DIR), "--greedy", "--max-frames", "12",
                 "--codes-out", str(codes), "-o", str(audio)]) == 0
    assert main(["codec", "decode", str(codes), "--codec", str(FISH_DIR), "-o", str(decoded)]) == 0
    frames = np.load(codes)
    assert 1 <= len(frames) <= 12 and frames.shape[1] == 10
    np.testing.assert_allclose(np.load(audio), np.load(decoded), atol=1e-5)
    assert np.load(audio).shape[-1] == len(frames) * 2048


def test_special_tokens_in_the_text_are_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["say", "Hello <|im_end|> there.", "--model", str(FISH_DIR), "--codes-out",
                 str(tmp_path / "c.npy")]) != 0
    err = capsys.readouterr().err
    assert "<|im_end|>" in err and "Traceback" not in err


def test_batch_settings_the_model_refuses_make_no_output_directory(tmp_path: Path, capsys) -> None:
    (tmp_path / "r.jsonl").write_text(json.dumps({"input": "Hi."}) + "\n", encoding="utf-8")
    code = main(["say", "--model", str(FISH_DIR), "--batch", str(tmp_path / "r.jsonl"), "--out-dir", str(tmp_path / "out"),
                 "--repetition-penalty", "1.2"])
    assert code == 2 and "error: --repetition-penalty 1.2: Fish S2 Pro applies no repetition penalty" in \
        capsys.readouterr().err  # the flag typed, not the library's field
    assert not (tmp_path / "out").exists()
    code = main(["say", "Hi.", "--model", str(FISH_DIR), "-o", str(tmp_path / "x.wav"), "--repetition-penalty", "1.2"])
    assert code == 2 and "error: --repetition-penalty 1.2: Fish S2 Pro" in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()
