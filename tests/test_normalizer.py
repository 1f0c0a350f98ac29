import json
from pathlib import Path

import pytest

from mossserve.text.normalizer import normalize_tts_text

GOLDENS = json.loads(
    (Path(__file__).parent / "fixtures" / "moss_tokenizer" / "normalizer_goldens.json").read_text(encoding="utf-8")
)["items"]


@pytest.mark.parametrize("item", GOLDENS, ids=[f"{i}:{g['input'][:24]!r}" for i, g in enumerate(GOLDENS)])
def test_golden(item):
    assert normalize_tts_text(item["input"]) == item["output"]


def test_goldens_are_many_and_nontrivial():
    assert len(GOLDENS) >= 60
    assert sum(g["input"] != g["output"] for g in GOLDENS) >= 25
