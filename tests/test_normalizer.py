import json
import random
import re
from pathlib import Path

import pytest

from mossserve.text.normalizer import _ARROW, _SPACING, _unused_tag, normalize_tts_text

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


# The reference's rule: a space between a latin-ish token and the CJK character after it.
REFERENCE_LATIN_BEFORE_CJK = re.compile(
    r"((?:___PROT[A-Z]*\d+___|(?=[A-Za-z0-9._/+:-]*[A-Za-z])[A-Za-z0-9][A-Za-z0-9._/+:-]*))"
    r"(?=[\u3400-\u4dbf\u4e00-\u9fff\u3040-\u30ff])")


def test_the_latin_before_cjk_rule_equals_the_references_on_fuzzed_text():
    """Ours is tried only where a run of word/path characters starts (the reference's scanned the run
    again from each of its characters: quadratic); what it changes must be the same."""
    ours = next(pattern for pattern, _ in _SPACING if "(?<![A-Za-z0-9._/+:-])" in pattern.pattern)
    rng = random.Random(0)
    pieces = list("aZ09._/+:-_ 中あ。") + ["___PROT0___", "___PROTA12___", "中文", "v2.3", "--a"]
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 24)))
        assert ours.sub(r"\1 ", text) == REFERENCE_LATIN_BEFORE_CJK.sub(r"\1 ", text), text


def test_the_latin_before_cjk_rule_starts_only_where_a_run_starts():
    ours = next(pattern for pattern, _ in _SPACING if "(?<![A-Za-z0-9._/+:-])" in pattern.pattern)
    text = "-ab1中"
    assert ours.search(text).span() == (0, 4)
    for inside in (1, 2):  # the reference's rule matched again from each of these (not at "1", no letter)
        assert REFERENCE_LATIN_BEFORE_CJK.search(text, inside) is not None
        assert ours.search(text, inside) is None


REFERENCE_ARROW = re.compile(r"\s*(?:<[-=]+>|[-=]+>|<[-=]+|[→←↔⇒⇐⇔⟶⟵⟷⟹⟸⟺↦↤↪↩])\s*")


def test_the_arrow_rule_equals_the_references_and_starts_only_where_a_run_starts():
    """A run of dashes with no > after it was rescanned from each dash (quadratic: 40,000 took 10 s)."""
    rng = random.Random(0)
    pieces = list("-=<> a中→") + ["-->", "<==", "<->", "==", "\t"]
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 24)))
        assert _ARROW.sub(" ", text) == REFERENCE_ARROW.sub(" ", text), text
    text = "a----"
    for inside in (2, 3):
        assert REFERENCE_ARROW.match(text + ">", inside) is not None  # the reference matches again from inside
        assert _ARROW.match(text + ">", inside) is None
