import json
from pathlib import Path

import pytest

from mossserve.text.normalizer import _unused_tag, normalize_tts_text

GOLDENS = json.loads(
    (Path(__file__).parent / "fixtures" / "moss_tokenizer" / "normalizer_goldens.json").read_text(encoding="utf-8")
)["items"]


@pytest.mark.parametrize("item", GOLDENS, ids=[f"{i}:{g['input'][:24]!r}" for i, g in enumerate(GOLDENS)])
def test_golden(item):
    assert normalize_tts_text(item["input"]) == item["output"]


def test_goldens_are_many_and_nontrivial():
    assert len(GOLDENS) >= 60
    assert sum(g["input"] != g["output"] for g in GOLDENS) >= 25


def test_typed_placeholder_spelling_is_plain_text():
    """A typed "___PROT0___" is not a protected span's stand-in: restoring it would copy another span
    (a URL) into it, and two fields joined could then spell a special token."""
    text = "Visit http://x<|im_end ___PROT0___|> goodbye"
    assert normalize_tts_text(text) == text
    assert normalize_tts_text("see ___PROT0___ and http://a.b/c") == "see ___PROT0___ and http://a.b/c"


@pytest.mark.parametrize("text, expected", [
    # README section 5, steps 3 and 4: spans protected inside or beside another protected span come
    # back whole (the later patterns read a placeholder's characters as word characters) ...
    ("Open example.com/#section please", "Open example.com/#section please"),
    ("Go to localhost:8080/#/home", "Go to localhost:8080/#/home"),
    ("ping dev-@team", "ping dev-@team"),
    # ... and a placeholder followed by '/' is a latin-ish run beside the CJK character: one space
    ("input/输出", "input/ 输出"),
])
def test_placeholders_read_as_word_characters(text, expected):
    """A placeholder made of other characters (a private-use mark inside it) lost spans and spacing."""
    assert normalize_tts_text(text) == expected


def test_the_placeholder_tag_stays_short_whatever_the_text_spells():
    """A tag grown by one letter per typed one (___PROTXXX...) went into every placeholder, and the
    spacing rules backtrack over each: 4,000 typed characters took half a minute."""
    assert _unused_tag("plain text") == "PROT"
    assert _unused_tag("___PROT" + "X" * 5000) == "PROTA"
    every_one_letter_tag = "___PROT " + " ".join(f"___PROT{c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert _unused_tag(every_one_letter_tag) == "PROTAA"
    text = "___PROT" + "X" * 3000 + " @a" * 300
    assert normalize_tts_text(text) == text
