import json
import random
import re
from pathlib import Path

import pytest

from mossserve.text.normalizer import (
    _ARROW,
    _BRACKETED_HEADING,
    _DASHES,
    _MARKDOWN_LINK,
    _PROTECTED,
    _SPACING,
    _STANDALONE_TITLE,
    _FirstStart,
    _protect,
    _restore,
    _sub_complete,
    _unused_tag,
    normalize_tts_text,
)

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


# The reference's protected-span rules that ours tries once per run of their characters.
REFERENCE_RUN_RULES = [re.compile(p) for p in (
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}(?![\w.-])",  # e-mail
    r"(?<![A-Za-z0-9_])\.(?=[A-Za-z0-9._-]*[A-Za-z0-9])[A-Za-z0-9._-]+",  # .env
    r"(?<![A-Za-z0-9_])(?=[A-Za-z0-9])(?=[A-Za-z0-9._/+:-]*[A-Za-z])(?=[A-Za-z0-9._/+:-]*[._/+:-])"
    r"[A-Za-z0-9](?:[A-Za-z0-9._/+:-]*[A-Za-z0-9])?(?![A-Za-z0-9_])",  # file-like
)]
OUR_RUN_RULES = {rule.rule.pattern: rule for rule in _PROTECTED if isinstance(rule, _FirstStart)}
RUN_RULE_PAIRS = [(reference, OUR_RUN_RULES[reference.pattern]) for reference in REFERENCE_RUN_RULES]


def _bracket_spans(match: re.Match) -> str:
    return f"<{match.group(0)}>"


def _fuzzed(alphabet: list[str], count: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(count)]


@pytest.mark.parametrize("reference, ours", RUN_RULE_PAIRS, ids=["e-mail", ".env", "file-like"])
def test_the_run_rules_equal_the_references_on_fuzzed_text(reference, ours):
    alphabet = list("aZ09._-/+:@#% 中，é") + ["___PROT0___", "x@a.bc"]
    for text in _fuzzed(alphabet, 5000):
        assert ours.sub(_bracket_spans, text) == reference.sub(_bracket_spans, text), text


@pytest.mark.parametrize("text", [
    ".", "..", ".a", "..a", "a.", "a..b", "-.x", "_.x", "x_.env", "a .env.local", ". .x", "..._", "x.#a",
    "%a@b.cc", "%%a@b.cc", "中%a@b.cc", "é%a%b@c.de", "a@b.cc%x@y.zz", "a@b.cc_", "a@b.c", "+a@b.cc",
    "1.1.1.1", "1.1.a", "a.b_", "a_.b", "x_a.b", "_a.b", "a.b/", "v2.3.1-rc.1", "1:2:x", "a/b.c:d-", "a-",
])
def test_the_run_rules_equal_the_references_at_run_boundaries(text):
    for reference, ours in RUN_RULE_PAIRS:
        assert ours.sub(_bracket_spans, text) == reference.sub(_bracket_spans, text)


class _CountingRule:
    """The rule, counting the places it is tried from."""

    def __init__(self, rule: re.Pattern) -> None:
        self.rule, self.tries = rule, 0

    def match(self, text: str, pos: int) -> re.Match | None:
        self.tries += 1
        return self.rule.match(text, pos)


@pytest.mark.parametrize("text", ["%" * 50, "." * 50, "1." * 50], ids=["e-mail", ".env", "file-like"])
def test_the_run_rules_are_tried_once_per_run(text):
    """The reference's rules failed from each of these places, each time after scanning the rest of the
    run (quadratic: 40,000 dots took 20 s)."""
    for reference, ours in RUN_RULE_PAIRS:
        counting = _CountingRule(ours.rule)
        assert ours._replace(rule=counting).sub(_bracket_spans, text) == text
        assert counting.tries <= 1


REFERENCE_SPACE_RULES = [re.compile(p) for p in (
    r"\s+([，。！？；：、”’」』】）》])",
    r"\s+([,.;!?])",
    r"\s*(?:<[-=]+>|(?<![-=])[-=]+>|<[-=]+|[→←↔⇒⇐⇔⟶⟵⟷⟹⟸⟺↦↤↪↩])\s*",
    r"\s*(?:—|–|―|-){2,}\s*",
)]
OUR_SPACE_RULES = [pattern for pattern, _ in _SPACING if pattern.pattern.startswith(r"(?<!\s)")] + [_ARROW, _DASHES]
# (ours, the reference's, the replacement) for the rules whose required end ours makes optional.
COMPLETE_RULES = [
    (_MARKDOWN_LINK, re.compile(r"\[([^\[\]]+?)\]\((https?://[^)\s]+)\)"), r"\1 \2"),
    (_BRACKETED_HEADING, re.compile(r"(^|[。！？!?；;]\s*)[【〖『「]([^】〗』」]+)[】〗』」]\s*"), r"\1\2。"),
    (_STANDALONE_TITLE,
     re.compile(r"(^|[。！？!?；;]\s*)《([^》]+)》(?=\s*(?:___PROT[A-Z]*\d+___|[—–―-]{2,}|$|[。！？!?；;，,]))"), r"\1\2"),
]
STRUCTURE_ALPHABET = list(" \xa0\t\u2003a1.,;!?。！，【】「」《》[]()<>=-—–→_中") + ["http://", "___PROT0___"]


def test_the_space_rules_equal_the_references_on_fuzzed_text():
    assert len(OUR_SPACE_RULES) == len(REFERENCE_SPACE_RULES)
    for text in _fuzzed(STRUCTURE_ALPHABET, 5000):
        for reference, ours in zip(REFERENCE_SPACE_RULES, OUR_SPACE_RULES):
            assert ours.sub("|", text) == reference.sub("|", text), (ours.pattern, text)


def test_the_space_rules_start_only_where_a_run_of_spaces_starts():
    """Spaces the first spacing rule leaves (no-break spaces) were rescanned from each of them when no
    punctuation, arrow or dash followed (quadratic: 10,000 took 11 s)."""
    for reference, ours, end in zip(REFERENCE_SPACE_RULES, OUR_SPACE_RULES, ["。", ".", "->", "--"]):
        text = "a\xa0\xa0" + end
        assert reference.match(text, 2) is not None and ours.match(text, 2) is None
        assert ours.sub("|", text) == reference.sub("|", text) == "a|"


def test_the_rules_with_a_required_end_equal_the_references_on_fuzzed_text():
    for text in _fuzzed(STRUCTURE_ALPHABET, 5000):
        for ours, reference, template in COMPLETE_RULES:
            assert _sub_complete(ours, template, text) == reference.sub(template, text), (ours.pattern, text)


@pytest.mark.parametrize("index, text, later_start", [
    (0, "[a](http://x[b](http://y z", 12),
    (1, "。【a。【b", 3),
    (2, "。《a。《b》x", 3),
])
def test_a_start_without_its_end_is_passed_over_once(index, text, later_start):
    """The reference's rule failed from each start up to the missing end, each time after scanning there
    (quadratic: 10,000 characters of "。【" took 1 s); ours passes over the later starts in one match."""
    ours, reference, template = COMPLETE_RULES[index]
    assert reference.match(text) is None and reference.match(text, later_start) is None
    assert ours.match(text).end() > later_start
    assert _sub_complete(ours, template, text) == text


def _restore_in_order(text: str, tag: str, spans: list[str]) -> str:
    """The reference's restore: one `replace` per span, in the order the spans were protected."""
    for i, span in enumerate(spans):
        text = text.replace(f"___{tag}{i}___", span)
    return text


def test_restoring_spans_equals_the_references_in_order_replaces_on_fuzzed_text():
    # Long @mentions (at most 32 characters) stop inside a URL's stand-in: the case where one pass
    # and the in-order replaces differ, e.g. "___PROT1___PROT0___" left by "@" + 29 letters + a URL.
    pieces = list("a1_.@#-中。 ") + ["http://x", "___PROT", "PROT0___", ".env", "a@b.cc", "0___"]
    rng = random.Random(5)
    cut = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.5:
            text = "@" + "a" * rng.randint(24, 34) + "http://x" + text
        tag = _unused_tag(text)
        protected, spans = _protect(text, tag)
        cut += "___" in re.sub(f"___{tag}\\d+___", "", protected)
        assert _restore(protected, tag, spans) == _restore_in_order(protected, tag, spans), text
    assert cut > 100  # the differing case is exercised, not only the one-pass one
