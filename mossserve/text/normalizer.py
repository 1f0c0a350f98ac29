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
from collections.abc import Callable
from typing import NamedTuple

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
_MARKDOWN_LINK = re.compile(r"\[([^\[\]]+?)\]\((https?://[^)\s]+)(\))?")  # see _sub_complete
_LINE_PREFIXES = [re.compile(p) for p in (r"^#{1,6}\s+", r"^>\s+", r"^[-*+]\s+", r"^\d+[.)]\s+")]


class _FirstStart(NamedTuple):
    """A rule of the reference tried only at the first place in each run of `run` where `start` (the
    rule's lookbehind and first character) holds. Tried from every such place, it rescanned the rest of
    the run each time: quadratic (40,000 dots took 20 s)."""

    rule: re.Pattern[str]
    run: re.Pattern[str]
    start: re.Pattern[str]

    def sub(self, repl: Callable[[re.Match[str]], str], text: str) -> str:
        """`self.rule.sub(repl, text)`, with one try per run."""
        pieces, done = [], 0
        for run in self.run.finditer(text):
            start = self.start.search(text, max(run.start(), done), run.end())
            match = self.rule.match(text, start.start()) if start else None
            if match:
                pieces += (text[done:match.start()], repl(match))
                done = match.end()
        return "".join(pieces) + text[done:]


# Spans that must reach the model verbatim, in the order they are protected. A `_FirstStart` rule is
# tried once per run of its characters yet matches what the reference's does: after its start it asks
# only for characters later in the run (so a later start fails where the first does) or for what lies
# past the run (the same for every start), and a match leaves no later start in the run that could match:
# - e-mail: the local part runs to the run's end, which must be '@' and a domain; the match goes past it;
# - .env: an alphanumeric later in the run; the match takes the run to its end;
# - file-like: a letter, a separator and an alphanumeric it may end after (one followed by '.', '/', '+',
#   ':', '-' or the run's end) later in the run; the match ends after the last such one.
_PROTECTED: list[re.Pattern[str] | _FirstStart] = [
    re.compile(r"https?://[^\s\u3000，。！？；、）】》〉」』]+"),  # URL
    _FirstStart(  # e-mail
        re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}(?![\w.-])"),
        re.compile(r"[A-Za-z0-9._%+-]+"), re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]")),
    re.compile(r"(?<![A-Za-z0-9_])@[A-Za-z0-9_]{1,32}"),  # @mention
    re.compile(r"(?<![A-Za-z0-9_])[ur]/[A-Za-z0-9_]+"),  # u/name, r/name
    re.compile(r"(?<![A-Za-z0-9_])#(?!\s)[^\s#]+"),  # #hashtag
    _FirstStart(  # .env, .map
        re.compile(r"(?<![A-Za-z0-9_])\.(?=[A-Za-z0-9._-]*[A-Za-z0-9])[A-Za-z0-9._-]+"),
        re.compile(r"[A-Za-z0-9._-]+"), re.compile(r"(?<![A-Za-z0-9_])\.")),
    _FirstStart(  # file-like tokens: app.js.map, v2.3.1, 3.0.0-rc.1 (a letter and a separator required)
        re.compile(r"(?<![A-Za-z0-9_])(?=[A-Za-z0-9])(?=[A-Za-z0-9._/+:-]*[A-Za-z])(?=[A-Za-z0-9._/+:-]*[._/+:-])"
                   r"[A-Za-z0-9](?:[A-Za-z0-9._/+:-]*[A-Za-z0-9])?(?![A-Za-z0-9_])"),
        re.compile(r"[A-Za-z0-9._/+:-]+"), re.compile(r"(?<![A-Za-z0-9_])[A-Za-z0-9]")),
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
    (re.compile(r"(?<!\s)\s+([，。！？；：、”’」』】）》])"), r"\1"),  # see _SPACE_RUN
    (re.compile(r"([（【「『《“‘])\s+"), r"\1"),
    (re.compile(r"([，。！？；：、])\s*"), r"\1"),
    (re.compile(r"(?<!\s)\s+([,.;!?])"), r"\1"),
    (re.compile(r" {2,}"), " "),
]

_SENTENCE_START = r"(^|[。！？!?；;]\s*)"
# These two and _MARKDOWN_LINK end in an optional group for the end the reference requires: see _sub_complete.
_BRACKETED_HEADING = re.compile(_SENTENCE_START + r"[【〖『「]([^】〗』」]+)([】〗』」]\s*)?")
_STANDALONE_TITLE = re.compile(
    _SENTENCE_START + rf"《([^》]+)(》(?=\s*(?:{_PLACEHOLDER}|[—–―-]{{2,}}|$|[。！？!?；;，,])))?"
)
# Leading whitespace taken only from the start of its run (so too the spacing rules' (?<!\s)\s+): from
# inside a run these rules need what they need from its start, past the run, and no match ends inside a
# run, so its start is tried first and a later place matches only where the start did. Retrying from each
# place rescanned the run: quadratic on spaces the first spacing rule leaves (no-break spaces: 10,000 took 11 s).
_SPACE_RUN = r"(?:(?<!\s)\s+)?"
# `[-=]+>` tried only where a run of - and = starts: whether it ends in > is the run's, so a later
# start in it matches nothing the first did not (trying each rescanned the run: quadratic).
_ARROW = re.compile(_SPACE_RUN + r"(?:<[-=]+>|(?<![-=])[-=]+>|<[-=]+|[→←↔⇒⇐⇔⟶⟵⟷⟹⟸⟺↦↤↪↩])\s*")
_DASHES = re.compile(_SPACE_RUN + r"(?:—|–|―|-){2,}\s*")

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
    return _restore(text, tag, spans).strip()


def _restore(text: str, tag: str, spans: list[str]) -> str:
    """The protected spans put back, as the reference's in-order `replace` per span does, in one pass
    where that is the same (a replace per span was quadratic: 40,000 characters of "中a." took 1.4 s).
    It is the same unless '___' is left outside whole stand-ins, in the text or in a span: only then
    can two stand-ins overlap or a restored span complete another (the @mention rule, at most 32
    characters, can stop inside one), and the in-order replaces' result, quirks included, is kept."""
    stand_in = re.compile(f"___{tag}(\\d+)___")
    if any("___" in stand_in.sub("", piece) for piece in (text, *spans)):
        for i, span in enumerate(spans):
            text = text.replace(f"___{tag}{i}___", span)
        return text
    return stand_in.sub(lambda match: spans[int(match.group(1))], text)


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
    text = _sub_complete(_MARKDOWN_LINK, r"\1 \2", text)
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
        text = _sub_complete(_BRACKETED_HEADING, r"\1\2。", text)
    text = _sub_complete(_STANDALONE_TITLE, r"\1\2", text)
    text = _ARROW.sub("，", text)
    return _DASHES.sub("。", text)


def _sub_complete(pattern: re.Pattern[str], template: str, text: str) -> str:
    """`pattern.sub(template, text)` for a reference rule whose required end is the pattern's last
    group, made optional: a match without it is left as it is. The rule's middle runs up to the first
    character it excludes, where the end must be, so every later start it passes over stops there too
    and fails with it; the reference's rule retried each one, rescanning up to there (quadratic:
    10,000 characters of "。【" took 1 s)."""

    def expand(match: re.Match[str]) -> str:
        return match.group(0) if match.group(pattern.groups) is None else match.expand(template)

    return pattern.sub(expand, text)


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
