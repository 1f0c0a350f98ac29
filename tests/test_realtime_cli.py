"""The Realtime family from the command line: a plain request runs the offline path (docs/cli.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from realtime_cases import REALTIME_DIR, golden, golden_json

from mossserve.cli import main


def request_file(tmp_path: Path, b: int) -> Path:
    """Request b of the reference's offline batch (its text; its voice codes as a .npy when it has one)."""
    text = golden_json("generation")["runs"]["offline_batch"]["texts"][b]
    request = {"input": text}
    if b == 0:
        np.save(tmp_path / "voice.npy", golden("prompts")["codes.voice"].numpy())
        request["voice"] = "voice.npy"
    path = tmp_path / f"request{b}.json"
    path.write_text(json.dumps(request, ensure_ascii=False))
    return path


def test_say_writes_the_reference_codes(tmp_path: Path) -> None:
    for b in (0, 1):
        out = tmp_path / f"codes{b}.npy"
        assert main(["say", "--model", str(REALTIME_DIR), "--request", str(request_file(tmp_path, b)),
                     "--greedy", "--codes-out", str(out)]) == 0
        codes = np.load(out)
        assert codes.shape[1] == 16
        assert np.array_equal(codes, golden("generation")[f"offline_batch.{b}.tokens"].numpy())


def test_prompt_writes_the_reference_prefill(tmp_path: Path) -> None:
    out = tmp_path / "prompt.npy"
    assert main(["prompt", "--model", str(REALTIME_DIR), "--request", str(request_file(tmp_path, 1)), "-o", str(out)]) == 0
    prefill = golden("generation")["offline_batch.prefill_input_ids"].numpy()[1]
    rows = np.load(out)
    assert np.array_equal(rows, prefill[len(prefill) - len(rows):])  # the reference's batch left-pads row 1
    assert rows[0, 0] != 151643  # no padding of ours
