"""Align LibreOffice help pages (English vs German) by help file and element id.

The Debian packages ``libreoffice-help-en-us`` and ``libreoffice-help-de`` ship the same help
pages as HTML under ``usr/share/libreoffice/help/<lang>/text/...``; the HTML is generated from the
same XHP sources for every language, so each paragraph or heading carries the same ``id`` (e.g.
``par_id3145669``, ``hd_id3154788``) in both languages. A pair is the text of the same element id,
in the same file, at the same occurrence (ids can repeat when a page embeds a section of another).

Inside an element, text of hidden switch variants is dropped (``<span hidden="true" class="MAC">``
and the like), except the default variant (``id="default..."``), which is what a reader on
Linux/Windows sees. Both languages are processed identically, so the choice never misaligns.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from .clean import DEFAULT_FILTER, FilterConfig, collapse_whitespace, filter_reason

log = logging.getLogger(__name__)

#: Elements whose ``id`` marks one translatable unit.
BLOCK_TAGS: frozenset[str] = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6"})
#: Ids of page chrome (search box, module menu, debug info) rather than help text.
_CHROME_ID_PREFIXES: tuple[str, ...] = ("bm_", "DEBUG", "TopLeftHeader", "modules", "search")
_VOID_TAGS: frozenset[str] = frozenset(
    {"br", "img", "input", "meta", "link", "hr", "area", "base", "col", "embed", "source", "wbr"}
)
#: Tags whose content is never help text.
_SKIP_TAGS: frozenset[str] = frozenset({"script", "style", "head", "noscript"})
_BREAK_TAGS: frozenset[str] = frozenset({"br", "p", "div", "li", "td", "th", "tr"})


class _HelpParser(HTMLParser):
    """Collect ``(id, text)`` for each id-carrying block element of one help page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.units: list[tuple[str, str]] = []
        self._cur_id: str | None = None
        self._cur_tag = ""
        self._cur_depth = 0
        self._buf: list[str] = []
        self._hidden_tag: str | None = None
        self._hidden_depth = 0
        self._skip_tag: str | None = None
        self._skip_depth = 0

    def _finish(self) -> None:
        if self._cur_id is not None:
            self.units.append((self._cur_id, collapse_whitespace("".join(self._buf))))
        self._cur_id = None
        self._buf = []
        self._hidden_tag = None
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth += 1
            return
        if tag in _SKIP_TAGS:
            self._skip_tag, self._skip_depth = tag, 1
            return
        a = dict(attrs)
        el_id = a.get("id") or ""
        if tag in BLOCK_TAGS and el_id and not el_id.startswith(_CHROME_ID_PREFIXES):
            # A new unit starts; HTML does not nest <p>, so any open unit ends here.
            self._finish()
            self._cur_id, self._cur_tag, self._cur_depth = el_id, tag, 1
            return
        if self._cur_id is None:
            return
        if tag in _BREAK_TAGS:
            self._buf.append(" ")
        if tag in _VOID_TAGS:
            return
        if self._hidden_tag is not None:
            if tag == self._hidden_tag:
                self._hidden_depth += 1
            return
        if "hidden" in a and not el_id.startswith("default"):
            self._hidden_tag, self._hidden_depth = tag, 1
            return
        if tag == self._cur_tag:
            self._cur_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._cur_id is not None and self._skip_tag is None and tag in _BREAK_TAGS:
            self._buf.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if self._cur_id is None:
            return
        if self._hidden_tag is not None:
            if tag == self._hidden_tag:
                self._hidden_depth -= 1
                if self._hidden_depth == 0:
                    self._hidden_tag = None
            return
        if tag == self._cur_tag:
            self._cur_depth -= 1
            if self._cur_depth == 0:
                self._finish()
        elif tag in ("div", "td", "body", "html") and tag != self._cur_tag:
            # A container closed around an unclosed unit: the unit ends too.
            self._finish()

    def handle_data(self, data: str) -> None:
        if self._cur_id is not None and self._hidden_tag is None and self._skip_tag is None:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._finish()


def parse_help_html(text: str) -> list[tuple[str, str]]:
    """``(element id, plain text)`` for every id-carrying paragraph/heading of one help page.

    Order follows the document; an id can occur more than once. Text is whitespace-collapsed,
    entities decoded, inline markup removed, hidden non-default switch variants dropped.
    """
    parser = _HelpParser()
    parser.feed(text)
    parser.close()
    return parser.units


def keyed_units(units: list[tuple[str, str]]) -> dict[tuple[str, int], str]:
    """Key units by ``(id, occurrence)`` so repeated ids (embedded sections) stay distinct."""
    seen: Counter[str] = Counter()
    out: dict[tuple[str, int], str] = {}
    for el_id, text in units:
        out[(el_id, seen[el_id])] = text
        seen[el_id] += 1
    return out


@dataclasses.dataclass(frozen=True)
class HelpPair:
    """One aligned help unit: help file (relative to the language dir), element id, texts."""

    file: str
    element_id: str
    src: str
    tgt: str


def align_help_files(en_html: str, de_html: str, file: str) -> list[HelpPair]:
    """Align one English page with its German counterpart by ``(id, occurrence)``.

    Ids whose occurrence count differs between the languages are skipped entirely, since the
    occurrence index would not identify the same element on both sides.
    """
    en_units = parse_help_html(en_html)
    de_units = parse_help_html(de_html)
    en_counts = Counter(i for i, _ in en_units)
    de_counts = Counter(i for i, _ in de_units)
    de_keyed = keyed_units(de_units)
    pairs = []
    for (el_id, occ), src in keyed_units(en_units).items():
        if en_counts[el_id] != de_counts.get(el_id, 0):
            continue
        tgt = de_keyed.get((el_id, occ))
        if tgt is not None:
            pairs.append(HelpPair(file, el_id if occ == 0 else f"{el_id}#{occ}", src, tgt))
    return pairs


def help_root(tree: Path, lang: str) -> Path:
    """The help directory of language ``lang`` inside an unpacked package tree."""
    return tree / "usr" / "share" / "libreoffice" / "help" / lang


def iter_help_files(root: Path) -> Iterator[str]:
    """Relative paths (``text/...html``) of the help pages under a language root, sorted."""
    for path in sorted(root.glob("text/**/*.html")):
        yield path.relative_to(root).as_posix()


@dataclasses.dataclass
class HelpCorpus:
    """Aligned, filtered help pairs and the statistics of the alignment."""

    pairs: list[HelpPair]
    stats: Counter[str]


def align_help_trees(en_root: Path, de_root: Path, config: FilterConfig = DEFAULT_FILTER) -> HelpCorpus:
    """Align every help page present in both language roots and filter the pairs.

    Filters are those of :func:`~corpora.clean.filter_reason` (identical, no-content, length,
    ratio). Duplicates are *not* removed here: the split decides per file.
    """
    stats: Counter[str] = Counter()
    out: list[HelpPair] = []
    de_files = set(iter_help_files(de_root))
    for rel in iter_help_files(en_root):
        if rel not in de_files:
            stats["file-missing-de"] += 1
            continue
        stats["files"] += 1
        en_html = (en_root / rel).read_text(encoding="utf-8", errors="replace")
        de_html = (de_root / rel).read_text(encoding="utf-8", errors="replace")
        for pair in align_help_files(en_html, de_html, rel):
            reason = filter_reason(pair.src, pair.tgt, config)
            if reason is not None:
                stats[reason] += 1
                continue
            stats["kept"] += 1
            out.append(pair)
    log.info("help alignment: %d files, %d pairs kept", stats["files"], stats["kept"])
    return HelpCorpus(out, stats)
