"""`bench --compare-upstream`: mossserve on a directory laid out as upstream_delay.py writes it.

The directory is assembled from the Delay fixture: its checkpoint, greedy cases' prompts as
`requests/NN.prompt.npy`, and the reference's generated rows (the fixture goldens) as
`upstream_generation.npz`; the timing figures in `upstream_bench.json` are inputs (only ratios
are computed from them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DELAY_DIR, TOKENIZER_DIR
from delay_cases import generation_cases

from mossserve.bench.compare import run_compare_upstream
from mossserve.errors import InvalidRequestError

CASES = ("continuation", "tts", "clone", "duration_language")


def upstream_dir(root: Path) -> Path:
    checkpoint = DELAY_DIR / "tiny_nvq32"
    for name in ("config.json", "model.safetensors"):
        (root / name).symlink_to(checkpoint / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / name).symlink_to(TOKENIZER_DIR / name)
    (root / "requests").mkdir()
    cases = {c.name: c for c in generation_cases(checkpoint)}
    rows = {}
    for i, name in enumerate(CASES):
        case = cases[name]
        assert len(case.prompts) == 1 and case.sampling.audio_temperature == 0
        np.save(root / "requests" / f"{i:02d}.prompt.npy", case.prompts[0])
        rows[f"{i:02d}"] = case.golden["new_rows"][0]
    np.savez(root / "upstream_generation.npz", **rows)
    steps = max(r.shape[0] for r in rows.values())
    (root / "upstream_bench.json").write_text(json.dumps({
        "steps_per_request": steps, "upstream_sequential_audio_s_per_s": 2.0, "upstream_batch16_audio_s_per_s": 4.0}))
    return root


def test_rows_equal_the_reference_and_figures_are_reported(tmp_path: Path) -> None:
    result = run_compare_upstream(upstream_dir(tmp_path))
    assert result["rows_equal"] is True and result["first_divergence"] is None
    assert result["requests"] == len(CASES)
    for key in ("mossserve_1_audio_s_per_s", "mossserve_16_audio_s_per_s", "ratio_1", "ratio_16"):
        assert result[key] > 0
    assert result["ratio_1"] == pytest.approx(result["mossserve_1_audio_s_per_s"] / 2.0, rel=1e-2)
    assert result["ratio_16"] == pytest.approx(result["mossserve_16_audio_s_per_s"] / 4.0, rel=1e-2)


def test_the_first_divergence_is_reported(tmp_path: Path) -> None:
    root = upstream_dir(tmp_path)
    with np.load(root / "upstream_generation.npz") as data:
        rows = {k: data[k].copy() for k in data.files}
    rows["02"][3, 5] += 1
    np.savez(root / "upstream_generation.npz", **rows)
    result = run_compare_upstream(root)
    assert result["rows_equal"] is False
    assert result["first_divergence"]["request"] == 2
    assert (result["first_divergence"]["step"], result["first_divergence"]["column"]) == (3, 5)
    assert result["first_divergence"]["reference"] == result["first_divergence"]["mossserve"] + 1


def test_rows_of_another_length_report_the_step_where_they_part(tmp_path: Path) -> None:
    """CONTRACTS.md: first_divergence is (request, step); rows of another shape gave no step."""
    root = upstream_dir(tmp_path)
    with np.load(root / "upstream_generation.npz") as data:
        rows = {k: data[k].copy() for k in data.files}
    rows["01"] = rows["01"][:2]  # the reference stopped after two steps; mossserve runs all of them
    np.savez(root / "upstream_generation.npz", **rows)
    divergence = run_compare_upstream(root)["first_divergence"]
    assert (divergence["request"], divergence["step"], divergence["column"]) == (1, 2, None)
    assert divergence["reference_shape"][0] == 2 and divergence["shape"][0] > 2


def test_a_directory_without_the_reference_files_is_refused(tmp_path: Path) -> None:
    root = upstream_dir(tmp_path)
    (root / "upstream_generation.npz").unlink()
    with pytest.raises(InvalidRequestError, match="upstream_generation.npz is missing"):
        run_compare_upstream(root)


def test_the_command_prints_one_json_object(tmp_path: Path, capsys) -> None:
    from mossserve.cli import main

    assert main(["bench", "--compare-upstream", str(upstream_dir(tmp_path)), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows_equal"] is True and result["ratio_16"] > 0


GOOD_FIGURES = {"steps_per_request": 4, "upstream_sequential_audio_s_per_s": 2.0, "upstream_batch16_audio_s_per_s": 4.0}


def figures(**changes) -> bytes:
    """upstream_bench.json with `changes` made; a key changed to None is left out."""
    return json.dumps({k: v for k, v in {**GOOD_FIGURES, **changes}.items() if v is not None}).encode()


@pytest.mark.parametrize("content, message", [
    (b'{"steps_per_request": 4', "not valid JSON"),
    (b"\xff", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b"{}", "steps_per_request must be a whole number >= 1, got None"),
    (figures(steps_per_request=0), "steps_per_request must be"),
    (figures(steps_per_request=2.5), "steps_per_request must be"),
    (figures(steps_per_request=True), "steps_per_request must be"),
    (figures(upstream_batch16_audio_s_per_s=None),
     "upstream_batch16_audio_s_per_s must be a positive number, got None"),
    (figures(upstream_sequential_audio_s_per_s="fast"), "upstream_sequential_audio_s_per_s must be"),
    (figures(upstream_sequential_audio_s_per_s=0), "upstream_sequential_audio_s_per_s must be"),
    (figures(upstream_batch16_audio_s_per_s=float("nan")), "upstream_batch16_audio_s_per_s must be"),
])
def test_a_damaged_upstream_bench_json_is_refused_by_name(tmp_path: Path, content: bytes, message: str) -> None:
    root = upstream_dir(tmp_path)
    (root / "upstream_bench.json").write_bytes(content)
    with pytest.raises(InvalidRequestError, match=f"upstream_bench.json: {message}"):
        run_compare_upstream(root)


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"not numpy")


@pytest.mark.parametrize("name", ["upstream_generation.npz", "requests/01.prompt.npy"])
@pytest.mark.parametrize("damage", [truncated, garbage])
def test_a_damaged_numpy_file_is_refused_by_name(tmp_path: Path, name: str, damage) -> None:
    root = upstream_dir(tmp_path)
    damage(root / name)
    with pytest.raises(InvalidRequestError, match=f"{name}: not a readable numpy file"):
        run_compare_upstream(root)


def test_the_command_reports_a_damaged_directory_without_a_traceback(tmp_path: Path, capsys) -> None:
    from mossserve.cli import main

    root = upstream_dir(tmp_path)
    (root / "upstream_bench.json").write_text("{}")
    assert main(["bench", "--compare-upstream", str(root), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "upstream_bench.json" in err and "Traceback" not in err


def test_the_warm_up_leaves_no_prefix_of_a_timed_prompt_kept(tmp_path: Path, monkeypatch) -> None:
    """The warm-up request's rows stay in its free slot; were they a timed prompt's (prompt 0, say), that
    request would start from them and skip the prefill that every reference request runs."""
    import mossserve.bench.compare as compare
    from mossserve.engine.prefixes import common_prefix

    calls = []
    real = compare._generate

    def generate(engine, prompts, *args):
        calls.append(prompts)
        return real(engine, prompts, *args)

    monkeypatch.setattr(compare, "_generate", generate)
    result = run_compare_upstream(upstream_dir(tmp_path))
    assert result["rows_equal"] is True and len(calls) == 4  # warm-up and timed run, at 1 and 16 slots
    for (warm_up,), timed in (calls[:2], calls[2:]):
        assert len(timed) == len(CASES) and all(common_prefix(warm_up.rows, p.rows) == 0 for p in timed)

