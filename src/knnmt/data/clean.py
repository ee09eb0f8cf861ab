"""Text normalisation and pair filters shared by the gettext and LibreOffice-help extractors.

Everything here is pure string processing (no I/O), so it is cheap to unit-test. The filters are
deliberately conservative: a pair is dropped rather than repaired when in doubt.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections import Counter
from collections.abc import Iterable, Iterator

# --- markup -------------------------------------------------------------------------------------

#: An XML/HTML start, end or empty tag (``<b>``, ``</p>``, ``<br/>``, ``<a href="x">``,
#: KDE's ``<filename>``), but not a bare ``<`` as in ``a < b`` or ``<name>``-style placeholders
#: that start with a digit or space.
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9_:.-]*(?:\s+[^<>]*)?/?>")
_COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
#: Block-level tags whose removal should leave a word break behind.
_BREAK_TAG_RE = re.compile(r"</?(?:p|br|div|li|ul|ol|tr|td|th|h[1-6]|table|html|body|head|title|nl)\b[^<>]*>",
                           re.I)
_ENTITY_RE = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6});")
_WS_RE = re.compile(r"\s+")

# --- placeholders ---------------------------------------------------------------------------------

#: printf (``%s``, ``%1$d``, ``%.2f``, ``%(name)s``, ``%Id``), Qt/KDE (``%1``), gcc (``%qs``, ``%<``),
#: Python/C# (``{0}``, ``{name}``, ``{}``), shell/LibreOffice (``$(VAR)``, ``$VAR``, ``%PRODUCTNAME``),
#: and ``@KEY@``-style substitutions.
_PLACEHOLDER_RE = re.compile(
    r"%(?:\([A-Za-z0-9_]+\))?[-+ #0']*(?:\d+\$)?\d*(?:\.\d+)?(?:hh|h|ll|l|L|q|j|z|t|I)*[diouxXeEfgGcspn%]"
    r"|%[<>']"
    r"|%\d+"
    r"|%[A-Z][A-Z0-9_]{2,}%?"
    r"|\{[A-Za-z0-9_.:\-]*\}"
    r"|\$\([A-Za-z0-9_]+\)"
    r"|\$[A-Za-z_][A-Za-z0-9_]*"
    r"|@[A-Z][A-Z0-9_]*@"
)

_HAS_LETTER_RE = re.compile(r"[^\W\d_]")

#: Strings that gettext catalogs use for translator credits rather than for UI text.
CREDIT_MSGIDS: frozenset[str] = frozenset(
    {
        "translator-credits",
        "translator_credits",
        "translator credits",
        "translators",
        "your names",
        "your emails",
        "name of translators",
        "email of translators",
        "_: name of translators\nyour names",
        "_: email of translators\nyour emails",
    }
)


def strip_markup(text: str) -> str:
    """Remove XML/HTML tags and comments and decode character entities.

    Block-level tags become spaces so that ``<p>One</p><p>Two</p>`` does not glue words together.
    Entities are decoded *after* tag removal, so an escaped ``&lt;b&gt;`` survives as the literal
    text ``<b>`` rather than being mistaken for markup.
    """
    text = _COMMENT_RE.sub(" ", text)
    text = _BREAK_TAG_RE.sub(" ", text)
    text = _TAG_RE.sub("", text)
    return html.unescape(text) if "&" in text else text


def collapse_whitespace(text: str) -> str:
    """Collapse every run of whitespace (including newlines, tabs, NBSP) to one space and strip."""
    return _WS_RE.sub(" ", text.replace("\u00a0", " ").replace("\u200b", "")).strip()


def remove_placeholders(text: str) -> str:
    """Return ``text`` with printf/Qt/Python/shell placeholders removed (for content tests only)."""
    return _PLACEHOLDER_RE.sub(" ", text)


def has_content(text: str) -> bool:
    """True when ``text`` still has a letter once markup and placeholders are taken out.

    This rejects markup-only (``<br/>``), number-only (``1.5``, ``10 %``), punctuation-only and
    placeholder-only (``%s: %d``, ``{0}``) strings.
    """
    return bool(_HAS_LETTER_RE.search(remove_placeholders(strip_markup(text))))


# --- accelerators -----------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\S+")
#: ``(&F)``-style accelerators that some translations append (CJK convention; harmless elsewhere).
_PAREN_ACCEL_RE = re.compile(r"\s*\(&[^\W_]\)")


def _accel_positions(text: str, marker: str) -> list[int]:
    """Indices of ``marker`` characters in ``text`` that could be keyboard-accelerator markers.

    A candidate marker is followed by a letter or digit. ``&`` that starts a character entity
    (``&amp;``) is never a candidate, nor is a doubled marker (``&&`` is an escaped literal).
    """
    out: list[int] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c != marker:
            i += 1
            continue
        if i + 1 < n and text[i + 1] == marker:  # escaped literal, e.g. "&&" or "__"
            i += 2
            continue
        nxt = text[i + 1] if i + 1 < n else ""
        if marker == "&" and _ENTITY_RE.match(text, i):
            i += 1
            continue
        if nxt and (nxt.isalnum()):
            out.append(i)
        i += 1
    return out


def _token_at(text: str, pos: int) -> str:
    """The whitespace-delimited token of ``text`` that contains index ``pos``."""
    for m in _TOKEN_RE.finditer(text):
        if m.start() <= pos < m.end():
            return m.group(0)
    return ""


def _looks_like_identifier(token: str, marker: str) -> bool:
    """True for tokens such as ``snake_case``, ``MY_VAR``, ``--foo_bar`` or ``R&D``-style literals.

    Only called for tokens that also occur verbatim in the other side of the pair, or that hold
    more than one marker; those are names, not accelerators.
    """
    return token.count(marker) >= 2 or bool(re.search(r"[\w]" + re.escape(marker) + r"[\w]", token))


def strip_accelerators(src: str, tgt: str, markers: str = "&_~") -> tuple[str, str]:
    """Remove keyboard-accelerator markers (``_``, ``&``, ``~``) from a source/target pair.

    GTK uses ``_File``, Qt/KDE ``&File`` (``&&`` = a literal ampersand), LibreOffice ``~File``.
    Markers are ambiguous with ordinary text (``snake_case``, ``R&D``, ``~/path``), so a marker is
    removed only where it precedes a letter/digit and

    * the token holding it does **not** occur unchanged on the other side of the pair (identifiers
      are copied, accelerated words are translated), and
    * the token does not hold the marker more than once (``MAX_PATH_LEN``), and
    * for ``~``, the marker is not a home-directory path (``~/``, ``~user/``).

    Character entities (``&amp;``) are never treated as markers; ``&&`` becomes ``&`` (Qt's escape)
    when ``&`` is one of ``markers``. Pass only the markers a catalog really uses (see
    :func:`detect_accelerator_markers`) so that, say, ``R&D`` in a GTK catalog is left alone.
    """
    for marker in markers:
        src, tgt = _strip_marker(src, tgt, marker)
    src = _PAREN_ACCEL_RE.sub("", src)
    tgt = _PAREN_ACCEL_RE.sub("", tgt)
    return src, tgt


def _strip_marker(src: str, tgt: str, marker: str) -> tuple[str, str]:
    if marker not in src and marker not in tgt:
        return src, tgt
    src_tokens = set(_TOKEN_RE.findall(src))
    tgt_tokens = set(_TOKEN_RE.findall(tgt))
    result: list[str] = []
    for text, other_tokens in ((src, tgt_tokens), (tgt, src_tokens)):
        drop: set[int] = set()
        for pos in _accel_positions(text, marker):
            token = _token_at(text, pos)
            if token in other_tokens and _looks_like_identifier(token, marker):
                continue
            if token.count(marker) >= 2 and marker != "&":
                continue
            if marker == "~" and re.match(r"~[\w.-]*/", text[pos:]):
                continue
            drop.add(pos)
        chars = [c for i, c in enumerate(text) if i not in drop]
        text = "".join(chars)
        if marker == "&":
            text = text.replace("&&", "&")
        result.append(text)
    return result[0], result[1]


def detect_accelerator_markers(pairs: Iterable[tuple[str, str]], min_share: float = 0.01,
                               min_count: int = 3) -> str:
    """Guess which accelerator markers (``&``, ``_``, ``~``) a catalog uses.

    A pair is evidence for a marker when both sides hold a candidate marker (before a letter) and
    the tokens holding them differ, i.e. the marked word was translated. Identifiers such as
    ``snake_case`` are copied unchanged and so give no evidence. A marker counts as used when at
    least ``min_count`` pairs and ``min_share`` of all pairs are evidence for it.
    """
    total = 0
    hits: Counter[str] = Counter()
    for src, tgt in pairs:
        total += 1
        for marker in "&_~":
            if marker not in src or marker not in tgt:
                continue
            ps, pt = _accel_positions(src, marker), _accel_positions(tgt, marker)
            if ps and pt and _token_at(src, ps[0]) != _token_at(tgt, pt[0]):
                hits[marker] += 1
    return "".join(m for m in "&_~" if hits[m] >= min_count and hits[m] >= min_share * total)


# --- pair filters -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Length and ratio limits applied to cleaned pairs.

    ``max_ratio`` bounds ``(len(longer) + ratio_smoothing) / (len(shorter) + ratio_smoothing)`` in
    characters; the smoothing keeps legitimate short pairs such as ``Up`` / ``Nach oben``.
    """

    min_words: int = 1
    max_words: int = 80
    max_ratio: float = 3.0
    ratio_smoothing: int = 10


DEFAULT_FILTER = FilterConfig()


def normalise(text: str) -> str:
    """Strip markup, decode entities, collapse whitespace; the last step before filtering."""
    return collapse_whitespace(strip_markup(text))


def filter_reason(src: str, tgt: str, config: FilterConfig = DEFAULT_FILTER) -> str | None:
    """Why a *normalised* pair should be dropped, or ``None`` to keep it.

    Reasons: ``empty``, ``identical`` (case-insensitive), ``no-content`` (markup-, number- or
    placeholder-only on either side), ``length`` (word count outside the limits) and ``ratio``.
    """
    if not src or not tgt:
        return "empty"
    if src.casefold() == tgt.casefold():
        return "identical"
    if not has_content(src) or not has_content(tgt):
        return "no-content"
    ns, nt = len(src.split()), len(tgt.split())
    if not (config.min_words <= ns <= config.max_words and config.min_words <= nt <= config.max_words):
        return "length"
    short, long_ = sorted((len(src), len(tgt)))
    if (long_ + config.ratio_smoothing) / (short + config.ratio_smoothing) > config.max_ratio:
        return "ratio"
    return None


def dedupe(pairs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Yield each ``(src, tgt)`` pair the first time it is seen (order preserved)."""
    seen: set[tuple[str, str]] = set()
    for pair in pairs:
        if pair not in seen:
            seen.add(pair)
            yield pair


def count_reasons(reasons: Iterable[str | None]) -> Counter[str]:
    """Tally filter reasons, counting kept pairs as ``kept``."""
    return Counter(r or "kept" for r in reasons)
