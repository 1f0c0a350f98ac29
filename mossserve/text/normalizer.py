"""`normalize_tts_text`: the reference's robustness clean-up of TTS input text.

The Delay prompt builder applies it to the `text` field of a user message (nothing else). It is
not text normalization in the linguistic sense (no numbers, dates or units are expanded): it
removes invisible characters, flattens Markdown and line breaks into sentence breaks, tidies
spaces between scripts and folds noisy punctuation, while leaving URLs, e-mail addresses,
handles, file names and version strings untouched. The rules and their order are those of the
reference (fixtures/moss_tokenizer/README.md section 5); `normalizer_goldens.json` pins them.
"""
from __future__ import annotations

import functools
import itertools
import re
import string
import unicodedata

# Scripts written without spaces between words: CJK ideographs (+ extension A) and kana.
_CJK = "[\u3400-\u4dbf\u4e00-\u9fff\u3040-\u30ff]"
# A protected span's stand-in, `___PROT0___`: made of characters the later rules treat as a word (as
# the reference's is), with letters after PROT where typed text spells one (`_unused_tag`: a typed
# "___PROT0___" was restored to another span, and two fields joined could then spell a special token).
_PLACEHOLDER = r"___PROT[A-Z]*\d+___"
# A latin-ish token: a protected span, or a run of ASCII word/path characters with a letter.
_LATINISH = rf"(?:{_PLACEHOLDER}|(?=[A-Za-z0-9._/+:-]*[A-Za-z])[A-Za-z0-9][A-Za-z0-9._/+:-]*)"
# The same before a CJK character, tried only where a run of those characters starts (its leading
# separators kept in the match): a CJK character can follow only a run's end, so a later start in
# the run matches nothing the first did not, and trying each scanned the run again (quadratic: 4,096
# digits took 0.1 s, 40,000 took 10 s).
# (Plain quantifiers, not possessive ones, which Python 3.10 lacks: a failed try backtracks through
# its own run once, each step checked at once by the lookaheads' first character.)
_LATINISH_BEFORE_CJK = (rf"(?:{_PLACEHOLDER}|(?<![A-Za-z0-9._/+:-])[._/+:-]*"
                        rf"(?=[A-Za-z0-9])(?=[A-Za-z0-9._/+:-]*[A-Za-z])[A-Za-z0-9][A-Za-z0-9._/+:-]*)(?={_CJK})")

_INVISIBLE = re.compile("[\u200b-\u200d\ufeff]")
_MARKDOWN_LINK = re.compile(r"\[([^\[\]]+?)\]\((https?://[^)\s]+)\)")
_LINE_PREFIXES = [re.compile(p) for p in (r"^#{1,6}\s+", r"^>\s+", r"^[-*+]\s+", r"^\d+[.)]\s+")]

# Spans that must reach the model verbatim, in the order they are protected.
_PROTECTED = [
    re.compile(p)
    for p in (
        r"https?://[^\s\u3000，。！？；、）】》〉」』]+",  # URL
        r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}(?![\w.-])",  # e-mail
        r"(?<![A-Za-z0-9_])@[A-Za-z0-9_]{1,32}",  # @mention
        r"(?<![A-Za-z0-9_])[ur]/[A-Za-z0-9_]+",  # u/name, r/name
        r"(?<![A-Za-z0-9_])#(?!\s)[^\s#]+",  # #hashtag
        r"(?<![A-Za-z0-9_])\.(?=[A-Za-z0-9._-]*[A-Za-z0-9])[A-Za-z0-9._-]+",  # .env, .map
        # file-like tokens: app.js.map, v2.3.1, 3.0.0-rc.1 (a letter and a separator required)
        r"(?<![A-Za-z0-9_])(?=[A-Za-z0-9])(?=[A-Za-z0-9._/+:-]*[A-Za-z])(?=[A-Za-z0-9._/+:-]*[._/+:-])"
        r"[A-Za-z0-9](?:[A-Za-z0-9._/+:-]*[A-Za-z0-9])?(?![A-Za-z0-9_])",
    )
]

# (pattern, replacement) pairs of the spacing pass, applied in order.
_SPACING = [
    (re.compile(r"[ \t\r\f\v]+"), " "),
    (re.compile(rf"({_CJK})\s+(?={_CJK})"), r"\1"),
    (re.compile(rf"({_CJK})\s+(?=\d)"), r"\1"),
    (re.compile(rf"(\d)\s+(?={_CJK})"), r"\1"),
    (re.compile(rf"({_CJK})(?={_LATINISH})"), r"\1 "),
    (re.compile(rf"({_LATINISH_BEFORE_CJK})"), r"\1 "),
    (re.compile(r" {2,}"), " "),
    (re.compile(r"\s+([，。！？；：、”’」』】）》])"), r"\1"),
    (re.compile(r"([（【「『《“‘])\s+"), r"\1"),
    (re.compile(r"([，。！？；：、])\s*"), r"\1"),
    (re.compile(r"\s+([,.;!?])"), r"\1"),
    (re.compile(r" {2,}"), " "),
]

_SENTENCE_START = r"(^|[。！？!?；;]\s*)"
_BRACKETED_HEADING = re.compile(_SENTENCE_START + r"[【〖『「]([^】〗』」]+)[】〗』」]\s*")
_STANDALONE_TITLE = re.compile(
    _SENTENCE_START + rf"《([^》]+)》(?=\s*(?:{_PLACEHOLDER}|[—–―-]{{2,}}|$|[。！？!?；;，,]))"
)
# `[-=]+>` tried only where a run of - and = starts: whether it ends in > is the run's, so a later
# start in it matches nothing the first did not (trying each rescanned the run: quadratic).
_ARROW = re.compile(r"\s*(?:<[-=]+>|(?<![-=])[-=]+>|<[-=]+|[→←↔⇒⇐⇔⟶⟵⟷⟹⟸⟺↦↤↪↩])\s*")
_DASHES = re.compile(r"\s*(?:—|–|―|-){2,}\s*")

_REPEATS = [
    (re.compile(r"(?:\.{3,}|…{2,}|……+)"), "。"),
    (re.compile(r"[。．]{2,}"), "。"),
    (re.compile(r"[，,]{2,}"), "，"),
    (re.compile(r"[!！]{2,}"), "！"),
    (re.compile(r"[?？]{2,}"), "？"),
]
_MIXED_QE = re.compile(r"[!?！？]{2,}")


@functools.lru_cache(maxsize=32)  # a request's text is normalized by its check, its pauses and its prompt
def normalize_tts_text(text: str) -> str:
    text = _clean_characters(text)
    text = _flatten_lines(text)
    tag = _unused_tag(text)
    text, spans = _protect(text, tag)
    text = _fix_spacing(text)
    text = _fix_structure(text)
    text = _fold_repeats(text)
    text = _fix_spacing(text)
    for i, span in enumerate(spans):
        text = text.replace(f"___{tag}{i}___", span)
    return text.strip()


def _unused_tag(text: str) -> str:
    """The shortest of PROT, PROTA..PROTZ, PROTAA.. that the text does not spell after '___'. Short
    whatever the text holds (each ruled-out tag costs it 8+ characters): a long tag in every
    placeholder made the spacing rules' backtracking quadratic in it."""
    for length in itertools.count():
        for letters in itertools.product(string.ascii_uppercase, repeat=length):
            tag = "PROT" + "".join(letters)
            if f"___{tag}" not in text:
                return tag


def _clean_characters(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u3000", " ")
    text = _INVISIBLE.sub("", text)
    return "".join(c for c in text if c in "\n\t " or not unicodedata.category(c).startswith("C"))


def _flatten_lines(text: str) -> str:
    """Markdown links become 'label url'; each non-empty line loses its list/quote/heading marker."""
    text = _MARKDOWN_LINK.sub(r"\1 \2", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        for prefix in _LINE_PREFIXES:
            line = prefix.sub("", line, count=1)
        lines.append(line)
    return "。".join(lines)


def _protect(text: str, tag: str) -> tuple[str, list[str]]:
    spans: list[str] = []

    def stash(match: re.Match) -> str:
        spans.append(match.group(0))
        return f"___{tag}{len(spans) - 1}___"

    for pattern in _PROTECTED:
        text = pattern.sub(stash, text)
    return text, spans


def _fix_spacing(text: str) -> str:
    for pattern, replacement in _SPACING:
        text = pattern.sub(replacement, text)
    return text.strip()


def _fix_structure(text: str) -> str:
    """Headings in brackets and standalone titles become sentences; arrows and dash runs become breaks."""
    for _ in range(2):  # a second pass unwraps a heading that the first one exposed
        text = _BRACKETED_HEADING.sub(r"\1\2。", text)
    text = _STANDALONE_TITLE.sub(r"\1\2", text)
    text = _ARROW.sub("，", text)
    return _DASHES.sub("。", text)


def _fold_repeats(text: str) -> str:
    for pattern, replacement in _REPEATS:
        text = pattern.sub(replacement, text)
    return _MIXED_QE.sub(_fold_question_exclamation, text)


def _fold_question_exclamation(match: re.Match) -> str:
    run = match.group(0)
    question = any(c in "?？" for c in run)
    exclamation = any(c in "!！" for c in run)
    if question and exclamation:
        return "？！"
    return "？" if question else "！"
