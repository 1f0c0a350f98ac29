"""`mossserve prompt` and `mossserve say` on a Local checkpoint: goldens through the CLI, `--depth`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from local_cases import CODEC_DIR, LOCAL_DIR, TOKENIZER_DIR, get_run, goldens, make_model_dir

from mossserve.cli import main
from mossserve.text.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("local_cli") / "model")


def run(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def write_refs(tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("clone", "clone2_a", "clone2_b", "cont"):
        np.save(tmp_path / f"{name}.npy", goldens("prompts")[f"ref.{name}"])


def golden_matrix(case: str) -> np.ndarray:
    g = goldens("prompts")
    return g[f"{case}.input_ids"][0][g[f"{case}.attention_mask"][0].astype(bool)]


def two_speaker_conversation(tmp_path: Path) -> Path:
    """The `clone_two_speakers_fields` case (the depth-8 golden's prompt) as a conversation file."""
    write_refs(tmp_path)
    conversation = [{"role": "user", "text": "两位说话人轮流朗读这句话。", "reference": ["clone2_a.npy", None, "clone2_b.npy"],
                     "instruction": "Speak slowly and warmly.", "tokens": 40, "quality": "high", "language": "Chinese"}]
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(conversation, ensure_ascii=False), encoding="utf-8")
    return path


def clone_request(tmp_path: Path, **extra) -> Path:
    write_refs(tmp_path)
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"input": "Please read this sentence in the reference voice.", "voice": "clone.npy",
                                **extra}), encoding="utf-8")
    return path


def test_prompt_writes_the_processor_matrix(model: Path, tmp_path: Path, capsys) -> None:
    code, err = run(["prompt", "--model", model, "--conversation", two_speaker_conversation(tmp_path),
                     "-o", tmp_path / "p.npy"], capsys)
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "p.npy"), golden_matrix("clone_two_speakers_fields"))
    for extra in ({}, {"depth": 8}):  # depth does not change the processor's matrix
        code, err = run(["prompt", "--model", model, "--request", clone_request(tmp_path, **extra),
                         "-o", tmp_path / "q.npy"], capsys)
        assert code == 0, err
        assert np.array_equal(np.load(tmp_path / "q.npy"), golden_matrix("clone"))


def test_prompt_conversation_keeps_the_text_as_given(model: Path, tmp_path: Path, capsys) -> None:
    """The Local processor does not normalize (a line break stays one, not `。`)."""
    text = "亲爱的你，\n你好呀。 Hello -- world..."
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps([{"role": "user", "text": text}], ensure_ascii=False), encoding="utf-8")
    code, err = run(["prompt", "--model", model, "--conversation", path, "-o", tmp_path / "p.npy"], capsys)
    assert code == 0, err
    decoded = TextTokenizer.from_dir(TOKENIZER_DIR).decode(np.load(tmp_path / "p.npy")[:, 0].tolist())
    assert f"- Text:\n{text}\n</user_inst>" in decoded


@pytest.mark.parametrize("source", ["conversation", "prompt_matrix"])
def test_say_depth_8_matches_the_golden(model: Path, tmp_path: Path, capsys, source: str) -> None:
    golden = get_run("greedy_clone_depth8").frames[0, :, 1:9]
    if source == "conversation":
        given = ["--conversation", two_speaker_conversation(tmp_path)]
    else:
        np.save(tmp_path / "p.npy", golden_matrix("clone_two_speakers_fields"))
        given = ["--prompt-matrix", tmp_path / "p.npy"]
    code, err = run(["say", *given, "--model", model, "--codec", CODEC_DIR, "--greedy", "--depth", "8",
                     "--codes-out", tmp_path / "c.npy", "-o", tmp_path / "a.wav"], capsys)
    assert code == 0, err
    codes = np.load(tmp_path / "c.npy")
    assert codes.dtype == np.int64 and codes.shape == (6, 8) and np.array_equal(codes, golden)
    code, err = run(["codec", "decode", tmp_path / "c.npy", "--codec", CODEC_DIR, "-o", tmp_path / "b.npy"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "b.npy").shape[-1] == 6 * 1920


def test_say_request_greedy_and_depth(model: Path, tmp_path: Path, capsys) -> None:
    code, err = run(["say", "--request", clone_request(tmp_path), "--model", model, "--greedy",
                     "--codes-out", tmp_path / "full.npy"], capsys)
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "full.npy"), get_run("greedy_clone").frames[0, :, 1:])
    np.save(tmp_path / "p.npy", golden_matrix("clone"))
    plain = clone_request(tmp_path / "plain")
    with_depth = clone_request(tmp_path / "deep", depth=8)
    ways = {"flag": ["--request", plain, "--depth", "8"], "matrix": ["--prompt-matrix", tmp_path / "p.npy", "--depth", "8"],
            "field": ["--request", with_depth]}
    outs = []
    for name, given in ways.items():
        code, err = run(["say", *given, "--model", model, "--greedy", "--codes-out", tmp_path / f"{name}.npy"], capsys)
        assert code == 0, err
        outs.append(np.load(tmp_path / f"{name}.npy"))
    assert outs[0].shape[1] == 8 and all(np.array_equal(o, outs[0]) for o in outs)
    assert not np.array_equal(outs[0][:3], get_run("greedy_clone").frames[0, :3, 1:9])  # depth changes the model's input


def test_say_seed_replays_the_sampled_golden(model: Path, tmp_path: Path, capsys) -> None:
    run_ = get_run("sampled_tts_en_defaults")
    request = tmp_path / "r.json"
    request.write_text(json.dumps({"input": "Hello there! This is a tiny test of the MOSS local transformer."}))
    code, err = run(["say", "--request", request, "--model", model, "--seed", run_.sampling.seed,
                     "--max-frames", run_.max_new_frames, "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "c.npy"), run_.frames[0, :, 1:])


@pytest.mark.parametrize("depth", ["0", "33"])
def test_depth_out_of_range_is_a_clear_error(model: Path, tmp_path: Path, capsys, depth: str) -> None:
    code, err = run(["say", "Hello.", "--model", model, "--depth", depth, "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 2 and "depth must be an integer in 1..32" in err


def test_a_repetition_penalty_with_greedy_is_refused_on_local(model: Path, tmp_path: Path, capsys) -> None:
    """Local's greedy decoding applies no penalty (as the reference's): the flag ran and was ignored."""
    code, err = run(["say", "Hello.", "--model", model, "--greedy", "--repetition-penalty", "3.0",
                     "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 2 and "--repetition-penalty has no effect with --greedy on a local model" in err, err
    code, err = run(["say", "Hello.", "--model", model, "--repetition-penalty", "3.0", "--max-frames", "2",
                     "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 0, err  # sampled, the penalty applies


def test_depth_on_a_delay_model_is_refused(delay_model_dirs, tmp_path: Path, capsys) -> None:
    code, err = run(["say", "Hello.", "--model", delay_model_dirs["tiny_nvq16"], "--depth", "4",
                     "--codes-out", tmp_path / "c.npy"], capsys)
    assert code == 2 and "--depth is for the Local model" in err


def test_fixture_copy_is_complete() -> None:
    """The tests read only this copy of the fixture, never the project-external original."""
    for name in ("config.json", "model.safetensors", "prompts.safetensors", "generation.safetensors",
                 "teacher_forced.safetensors", "sampling_ops.safetensors", "README.md"):
        assert (LOCAL_DIR / name).is_file()
