"""Read compiled gettext catalogs (``.mo``) and turn them into clean English→German pairs.

The binary format (GNU gettext manual, "The Format of GNU MO Files") is parsed with :mod:`struct`:
a little- or big-endian header ``magic, revision, N, O, T, S, H`` followed by two tables of
``(length, offset)`` records for the original and translated strings. Contexts are stored as
``context + "\\x04" + msgid``; plural forms as NUL-separated strings.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import struct
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .clean import (
    CREDIT_MSGIDS,
    DEFAULT_FILTER,
    FilterConfig,
    detect_accelerator_markers,
    filter_reason,
    normalise,
    remove_invisible,
    strip_accelerators,
)

log = logging.getLogger(__name__)

MO_MAGIC_LE = 0x950412DE
MO_MAGIC_BE = 0xDE120495
_CONTEXT_SEP = "\x04"
_CHARSET_RE = re.compile(r"charset\s*=\s*([A-Za-z0-9_.:-]+)", re.I)
#: KDE "scripted translations": ``plain|/|$[script ...]``; only the part before ``|/|`` is text.
_KDE_SCRIPT_SEP = "|/|"


class MoFormatError(ValueError):
    """The bytes are not a readable ``.mo`` catalog."""


@dataclasses.dataclass(frozen=True)
class MoEntry:
    """One catalog message: optional context, msgid (+ plural msgid) and its msgstr forms."""

    msgid: str
    msgstrs: tuple[str, ...]
    context: str | None = None
    msgid_plural: str | None = None

    @property
    def msgstr(self) -> str:
        """The singular translation (first plural form)."""
        return self.msgstrs[0] if self.msgstrs else ""


def _decode(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset)
    except (LookupError, UnicodeDecodeError):
        return raw.decode("utf-8", errors="replace")


def parse_mo(data: bytes) -> tuple[dict[str, str], list[MoEntry]]:
    """Parse ``.mo`` bytes into ``(header, entries)``.

    ``header`` is the metadata block (the translation of the empty msgid) as a dict of its
    ``Key: value`` lines; it is *not* included in ``entries``. Strings are decoded with the
    header's charset (UTF-8 when absent or unknown).

    Raises:
        MoFormatError: on a bad magic number or truncated tables.
    """
    if len(data) < 28:
        raise MoFormatError("file too short for a .mo header")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic == MO_MAGIC_LE:
        endian = "<"
    elif magic == MO_MAGIC_BE:
        endian = ">"
    else:
        raise MoFormatError(f"bad .mo magic number 0x{magic:08x}")
    _rev, count, orig_off, trans_off = struct.unpack_from(endian + "4I", data, 4)
    if orig_off + 8 * count > len(data) or trans_off + 8 * count > len(data):
        raise MoFormatError("string tables run past the end of the file")

    raw: list[tuple[bytes, bytes]] = []
    for i in range(count):
        olen, ooff = struct.unpack_from(endian + "2I", data, orig_off + 8 * i)
        tlen, toff = struct.unpack_from(endian + "2I", data, trans_off + 8 * i)
        if ooff + olen > len(data) or toff + tlen > len(data):
            raise MoFormatError(f"string {i} runs past the end of the file")
        raw.append((data[ooff : ooff + olen], data[toff : toff + tlen]))

    header: dict[str, str] = {}
    charset = "utf-8"
    for orig, trans in raw:
        if orig == b"":
            text = trans.decode("ascii", errors="replace")
            for line in text.splitlines():
                key, sep, value = line.partition(":")
                if sep:
                    header[key.strip()] = value.strip()
            m = _CHARSET_RE.search(header.get("Content-Type", ""))
            if m and m.group(1).upper() != "CHARSET":
                charset = m.group(1)
            break

    entries: list[MoEntry] = []
    for orig, trans in raw:
        if orig == b"":
            continue
        msgid_full = _decode(orig, charset)
        context: str | None = None
        if _CONTEXT_SEP in msgid_full:
            context, msgid_full = msgid_full.split(_CONTEXT_SEP, 1)
        msgid, _, plural = msgid_full.partition("\x00")
        forms = tuple(_decode(trans, charset).split("\x00"))
        entries.append(MoEntry(msgid=msgid, msgstrs=forms, context=context, msgid_plural=plural or None))
    return header, entries


def read_mo(path: str | Path) -> tuple[dict[str, str], list[MoEntry]]:
    """Read and parse a ``.mo`` file from disk (see :func:`parse_mo`)."""
    return parse_mo(Path(path).read_bytes())


def raw_pairs(entries: Iterable[MoEntry]) -> list[tuple[str, str]]:
    """Singular ``(msgid, msgstr)`` pairs, before any cleaning; untranslated entries are skipped."""
    out = []
    for e in entries:
        tgt = e.msgstr
        if _KDE_SCRIPT_SEP in tgt:
            tgt = tgt.split(_KDE_SCRIPT_SEP, 1)[0]
        if e.msgid and tgt:
            out.append((e.msgid, tgt))
    return out


@dataclasses.dataclass
class CatalogPairs:
    """Clean pairs from one catalog plus a tally of why the others were dropped."""

    pairs: list[tuple[str, str]]
    stats: Counter[str]
    accelerators: str


def extract_pairs(
    entries: Iterable[MoEntry],
    config: FilterConfig = DEFAULT_FILTER,
    markers: str | None = None,
    extra_markers: str = "",
) -> CatalogPairs:
    """Turn catalog entries into clean, deduplicated English→German pairs.

    Steps: skip the header (already removed by :func:`parse_mo`), untranslated entries and
    translator-credit entries; take the singular of plural entries; remove accelerator markers
    (``markers``, detected from the catalog itself when ``None``, plus ``extra_markers``, e.g. those
    detected over the whole package; see :func:`~corpora.clean.strip_accelerators`); strip markup
    and decode entities; collapse whitespace; then drop pairs rejected by
    :func:`~corpora.clean.filter_reason` (identical, markup/number/placeholder-only, length,
    ratio) and exact duplicates.
    """
    entries = list(entries)
    stats: Counter[str] = Counter()
    n_untranslated = sum(1 for e in entries if e.msgid and not e.msgstr)
    stats["untranslated"] += n_untranslated
    pairs = raw_pairs(entries)
    if markers is None:
        markers = detect_accelerator_markers(pairs)
    markers = "".join(m for m in "&_~" if m in markers or m in extra_markers)
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for msgid, msgstr in pairs:
        if msgid.strip().casefold() in CREDIT_MSGIDS:
            stats["credits"] += 1
            continue
        src, tgt = strip_accelerators(remove_invisible(msgid), remove_invisible(msgstr), markers)
        src, tgt = normalise(src), normalise(tgt)
        reason = filter_reason(src, tgt, config)
        if reason is not None:
            stats[reason] += 1
            continue
        if (src, tgt) in seen:
            stats["duplicate"] += 1
            continue
        seen.add((src, tgt))
        stats["kept"] += 1
        out.append((src, tgt))
    return CatalogPairs(out, stats, markers)


def catalog_pairs(path: str | Path, config: FilterConfig = DEFAULT_FILTER) -> CatalogPairs:
    """Read one ``.mo`` file and extract its clean pairs (see :func:`extract_pairs`)."""
    _header, entries = read_mo(path)
    result = extract_pairs(entries, config)
    log.debug(
        "%s: %d entries -> %d pairs (accelerators %r)",
        path,
        len(entries),
        len(result.pairs),
        result.accelerators,
    )
    return result
