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
_BREAK_TAG_RE = re.compile(
    r"</?(?:p|br|div|li|ul|ol|tr|td|th|h[1-6]|table|html|body|head|title|nl)\b[^<>]*>", re.I
)
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
    text ``<b>`` rather than being mistaken for markup. Only complete entities (with ``;``) are
    decoded: ``Filter&regeln`` must not turn into ``Filter®eln``.
    """
    text = _COMMENT_RE.sub(" ", text)
    text = _BREAK_TAG_RE.sub(" ", text)
    text = _TAG_RE.sub("", text)
    return _ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), text) if "&" in text else text


_INVISIBLE_RE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")


def remove_invisible(text: str) -> str:
    """Remove zero-width characters and soft hyphens (they hide accelerators and split words)."""
    return _INVISIBLE_RE.sub("", text)


def collapse_whitespace(text: str) -> str:
    """Collapse every run of whitespace (including newlines, tabs, NBSP) to one space and strip."""
    return _WS_RE.sub(" ", remove_invisible(text).replace("\u00a0", " ")).strip()


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
#: Lisp/Scheme ``format`` directives (``~a``, ``~s``) used by e.g. GnuCash and Audacity's Nyquist.
_TILDE_DIRECTIVE_RE = re.compile(r"~[A-Za-z](?![^\W\d_])")
_TILDE_PATH_RE = re.compile(r"~(?:[a-z][a-z0-9._-]*)?/")
_TOKEN_PUNCT = "\"'„“”«»‚‘’()[]{}<>.,:;!?"
#: The closing half of ``_emphasis_`` / ``~strike~`` markup: the marker right after a word, at the
#: end of the token (before trailing punctuation).
_EMPHASIS_END_RE = re.compile(r"(?<=\w)[_~][^\w\s]*$")


def _accel_positions(text: str, marker: str) -> list[int]:
    """Indices of ``marker`` characters in ``text`` that could be keyboard-accelerator markers.

    A candidate marker is followed by a letter or digit. ``&`` that starts a character entity
    (``&amp;``) is never a candidate, nor is a doubled marker (``&&`` is an escaped literal).
    """
    out: list[int] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] != marker:
            i += 1
            continue
        if i + 1 < n and text[i + 1] == marker:  # escaped literal, e.g. "&&" or "__"
            i += 2
            continue
        if marker == "&" and _ENTITY_RE.match(text, i):
            i += 1
            continue
        if i + 1 < n and text[i + 1].isalnum():
            out.append(i)
        i += 1
    return out


def _token_span(text: str, pos: int) -> tuple[int, int]:
    """Start and end of the whitespace-delimited token of ``text`` that contains index ``pos``."""
    start = pos
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    end = pos
    while end < len(text) and not text[end].isspace():
        end += 1
    return start, end


def _marker_word(text: str, pos: int) -> str:
    """The run of letters/digits around the marker at ``pos``, marker removed (``Sa_ve`` → ``Save``)."""
    start = pos
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    end = pos + 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return text[start:pos] + text[pos + 1 : end]


def _marked_word(text: str, pos: int) -> str:
    """The word around the marker at ``pos`` including the marker (``AT&T``, ``max_size``)."""
    start = pos
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == text[pos]):
        start -= 1
    end = pos + 1
    while end < len(text) and (text[end].isalnum() or text[end] == text[pos]):
        end += 1
    return text[start:end]


def _evidence(src: str, tgt: str, marker: str) -> bool:
    """True when both sides hold a candidate ``marker`` on *different* words (``&Delete``/``&Löschen``).

    Literal uses of a marker (``AT&T``, ``snake_case``, ``~a``) are copied unchanged by translators
    and so are not evidence.
    """
    if marker not in src or marker not in tgt:
        return False
    src_words = {_marker_word(src, p).casefold() for p in _accel_positions(src, marker)}
    tgt_words = {_marker_word(tgt, p).casefold() for p in _accel_positions(tgt, marker)}
    return bool(src_words) and bool(tgt_words) and not src_words & tgt_words


def strip_accelerators(src: str, tgt: str, markers: str = "&_~") -> tuple[str, str]:
    """Remove keyboard-accelerator markers (``_``, ``&``, ``~``) from a source/target pair.

    GTK uses ``_File``, Qt/KDE ``&File`` (``&&`` = a literal ampersand), LibreOffice ``~File``.
    ``markers`` are the markers the catalog is known to use (see :func:`detect_accelerator_markers`).
    A candidate marker (before a letter/digit, not a ``&amp;``-style entity) is **kept** when

    * it sits inside a word whose token holds the marker twice or more (``MAX_PATH_LEN``; not ``&``),
    * it opens ``_emphasis_``-style markup (the token ends with the same marker),
    * it is a ``~/`` path, or a ``~a``-style Lisp format directive in a catalog not using ``~``,
    * it sits inside a word that is copied unchanged to the other side (``snake_case``, ``R&D``,
      ``AT&T-style``/``AT&T-Stil``), or starts a token copied unchanged while the catalog does not
      use that marker (``_private`` in a compiler catalog);

    otherwise it is **removed** when the catalog uses the marker, when the pair itself shows it is
    an accelerator (both sides marked, on different words: ``prefi&x``/``Präfi&x``), or when it
    starts a word (``_View``/``Ansicht``). ``&&`` becomes ``&`` where ``&`` is a catalog marker.
    """
    if "&" in markers:
        src, tgt = _PAREN_ACCEL_RE.sub("", src), _PAREN_ACCEL_RE.sub("", tgt)
    for marker in "&_~":
        if marker in src or marker in tgt:
            src, tgt = _strip_marker(src, tgt, marker, marker in markers)
    return src, tgt


def _strip_marker(src: str, tgt: str, marker: str, catalog_uses: bool) -> tuple[str, str]:
    src_tokens = {t.strip(_TOKEN_PUNCT) for t in _TOKEN_RE.findall(src)}
    tgt_tokens = {t.strip(_TOKEN_PUNCT) for t in _TOKEN_RE.findall(tgt)}
    pair_evidence = _evidence(src, tgt, marker)
    result: list[str] = []
    for text, other_text, other_tokens in ((src, tgt, tgt_tokens), (tgt, src, src_tokens)):
        drop: set[int] = set()
        for pos in _accel_positions(text, marker):
            start, end = _token_span(text, pos)
            token = text[start:end]
            mid_word = pos > 0 and text[pos - 1].isalnum()
            word_start = not mid_word
            if marker != "&" and mid_word and token.count(marker) >= 2:
                continue  # MAX_PATH_LEN
            if marker != "&" and word_start and _EMPHASIS_END_RE.search(text, pos + 1, end):
                continue  # _emphasis_
            if marker == "~" and _TILDE_PATH_RE.match(text, pos):
                continue
            if marker == "~" and not catalog_uses and _TILDE_DIRECTIVE_RE.match(text, pos):
                continue
            if mid_word and _marked_word(text, pos) in other_text:
                continue  # snake_case, AT&T: the marked word is copied unchanged
            if word_start and not catalog_uses and token.strip(_TOKEN_PUNCT) in other_tokens:
                continue  # _private identifier copied unchanged

            if catalog_uses or pair_evidence or word_start:
                drop.add(pos)
        text = "".join(c for i, c in enumerate(text) if i not in drop)
        if marker == "&" and catalog_uses:
            text = text.replace("&&", "&")
        result.append(text)
    return result[0], result[1]


def detect_accelerator_markers(
    pairs: Iterable[tuple[str, str]], min_share: float = 0.002, min_count: int = 2
) -> str:
    """Guess which accelerator markers (``&``, ``_``, ``~``) a catalog uses.

    A pair is evidence for a marker when both sides mark a *different* word with it (the marked
    word was translated; see :func:`strip_accelerators`). A marker counts as used when at least
    ``min_count`` pairs and ``min_share`` of all pairs are evidence for it.
    """
    total = 0
    hits: Counter[str] = Counter()
    for src, tgt in pairs:
        total += 1
        for marker in "&_~":
            if _evidence(src, tgt, marker):
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
