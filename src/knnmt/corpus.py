"""Reading parallel corpora: two aligned text files, one TSV, or one JSONL file.

A corpus is validated in one cheap streaming pass before anything is written
(:func:`inspect_corpus`: UTF-8, line counts, checksum, field layout) and then read lazily
(:func:`iter_pairs`) so that memory stays bounded whatever its size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from .errors import CorpusError, UsageError

CorpusFormat = Literal["text", "tsv", "jsonl"]
_JSON_KEYS: tuple[tuple[str, str], ...] = (("src", "tgt"), ("source", "target"))


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where a parallel corpus lives. ``text`` needs two paths (source, target); others one."""

    paths: tuple[str, ...]
    format: CorpusFormat

    def __post_init__(self) -> None:
        want = 2 if self.format == "text" else 1
        if len(self.paths) != want:
            raise UsageError(
                f"a {self.format} corpus needs {want} file(s), got {len(self.paths)}: {self.paths}"
            )

    @classmethod
    def from_args(
        cls,
        source: str | None = None,
        target: str | None = None,
        corpus: str | None = None,
        format: str | None = None,
    ) -> CorpusSpec:
        """Two files (``source`` + ``target``) or one TSV/JSONL ``corpus`` (format from the suffix)."""
        if corpus is not None:
            if source or target:
                raise UsageError("give either --corpus FILE or --source FILE --target FILE, not both")
            fmt = format or ("jsonl" if corpus.endswith((".jsonl", ".json")) else "tsv")
            if fmt not in ("tsv", "jsonl"):
                raise UsageError(f"--format for a single corpus file must be tsv or jsonl, got {fmt!r}")
            return cls((corpus,), fmt)  # type: ignore[arg-type]
        if not (source and target):
            raise UsageError("a corpus needs --source and --target files (or one --corpus TSV/JSONL file)")
        return cls((source, target), "text")


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """Result of the validation pass."""

    spec: CorpusSpec
    lines: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Pair:
    """One sentence pair and the 1-based line it came from."""

    line: int
    source: str
    target: str


def _scan_file(path: str) -> tuple[int, str]:
    """Count lines, verify UTF-8 and hash one file; raises :class:`CorpusError` on the first bad line."""
    p = Path(path)
    if not p.is_file():
        raise CorpusError("file not found", path)
    digest = hashlib.sha256()
    lines = 0
    with p.open("rb") as handle:
        for lines, raw in enumerate(handle, start=1):
            digest.update(raw)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(
                    f"invalid UTF-8 at byte {exc.start} of the line "
                    f"({raw[max(0, exc.start - 10) : exc.start + 10]!r}); "
                    "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                    path,
                    lines,
                ) from None
    return lines, digest.hexdigest()


def inspect_corpus(spec: CorpusSpec, skip_empty: bool = True) -> CorpusInfo:
    """Validate the whole corpus without keeping it: existence, UTF-8, aligned line counts, every
    TSV/JSONL record, and (unless ``skip_empty``) that no pair has an empty side.

    Raises:
        CorpusError: naming the file and line (or both line counts for a mismatch).
    """
    scans = [_scan_file(p) for p in spec.paths]
    if spec.format == "text" and scans[0][0] != scans[1][0]:
        raise CorpusError(
            f"source and target have different line counts: {spec.paths[0]} has {scans[0][0]} lines, "
            f"{spec.paths[1]} has {scans[1][0]} lines; they must be aligned line by line"
        )
    for pair in iter_pairs(spec):  # parses every record; cheap next to teacher forcing
        if not skip_empty:
            check_not_empty(spec, pair)
    digest = hashlib.sha256("".join(s[1] for s in scans).encode()).hexdigest()
    return CorpusInfo(spec=spec, lines=scans[0][0], sha256=digest)


def is_empty(pair: Pair) -> bool:
    """True when either side of ``pair`` is empty or whitespace."""
    return not pair.source.strip() or not pair.target.strip()


def check_not_empty(spec: CorpusSpec, pair: Pair) -> None:
    """Raise :class:`CorpusError` naming the file and line if a side of ``pair`` is empty."""
    if is_empty(pair):
        side = "source" if not pair.source.strip() else "target"
        path = spec.paths[1] if side == "target" and spec.format == "text" else spec.paths[0]
        raise CorpusError(f"empty {side} sentence (drop --no-skip-empty to skip such pairs)", path, pair.line)


def target_path(spec: CorpusSpec) -> str:
    """The file that holds the target side (the second of two text files, else the only file)."""
    return spec.paths[1] if spec.format == "text" else spec.paths[0]


def _strip_eol(line: str) -> str:
    return line.rstrip("\r\n")


def _parse_tsv(path: str, number: int, line: str) -> tuple[str, str]:
    fields = _strip_eol(line).split("\t")
    if len(fields) != 2:
        raise CorpusError(
            f"expected 2 tab-separated fields (source<TAB>target), found {len(fields)}", path, number
        )
    return fields[0], fields[1]


def _parse_jsonl(path: str, number: int, line: str) -> tuple[str, str]:
    stripped = line.strip()
    if not stripped:
        return "", ""
    try:
        record = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"invalid JSON ({exc.msg} at column {exc.colno})", path, number) from None
    if isinstance(record, dict):
        for src_key, tgt_key in _JSON_KEYS:
            if src_key in record and tgt_key in record:
                src, tgt = record[src_key], record[tgt_key]
                if not isinstance(src, str) or not isinstance(tgt, str):
                    raise CorpusError(f"'{src_key}' and '{tgt_key}' must be strings", path, number)
                return src, tgt
    raise CorpusError(
        f"expected an object with keys 'src' and 'tgt' (or 'source' and 'target'), found {stripped[:80]!r}",
        path,
        number,
    )


def iter_pairs(spec: CorpusSpec) -> Iterator[Pair]:
    """Yield every line's pair lazily (empty sides included: the caller decides what to do)."""
    if spec.format == "text":
        with open(spec.paths[0], encoding="utf-8") as src, open(spec.paths[1], encoding="utf-8") as tgt:
            for number, (s, t) in enumerate(zip(src, tgt, strict=False), start=1):
                yield Pair(number, _strip_eol(s), _strip_eol(t))
        return
    parse = _parse_tsv if spec.format == "tsv" else _parse_jsonl
    path = spec.paths[0]
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if spec.format == "tsv" and not line.strip():
                yield Pair(number, "", "")
                continue
            source, target = parse(path, number, line)
            yield Pair(number, source, target)


def read_lines(path: str) -> list[str]:
    """All lines of a UTF-8 text file (for translate/evaluate inputs), with file:line errors."""
    _scan_file(path)
    with open(path, encoding="utf-8") as handle:
        return [_strip_eol(line) for line in handle]
