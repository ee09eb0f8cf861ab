"""Reading parallel corpora: two aligned text files, one TSV, or one JSONL file.

A corpus is validated in one cheap streaming pass before anything is written
(:func:`inspect_corpus`: UTF-8, line counts, checksum, field layout, at least one pair to store) and
then read lazily (:func:`iter_pairs`) so that memory stays bounded whatever its size.

Every text input, corpus files as well as translate/evaluate inputs (:func:`read_lines`) and stdin,
is read by one rule, :func:`decode_lines`: UTF-8, lines ended by ``\\n`` or ``\\r\\n``, a leading
byte order mark dropped; NUL bytes, UTF-16 and CR-only line ends are refused with file and line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from ..core.errors import CorpusError, UsageError

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


_CR_TO_LF = "tr '\\r' '\\n'"
_UTF16_BOMS = {b"\xff\xfe": "UTF-16 little-endian", b"\xfe\xff": "UTF-16 big-endian"}


def check_input_file(path: str, *, regular: bool = True) -> None:
    """Raise :class:`CorpusError` unless ``path`` can be read as a text input.

    A directory is always refused. With ``regular`` (corpora, which are read twice: validated, then
    built) so is anything but a regular file, such as a pipe or a device like ``/dev/null``; without
    it (translate/evaluate inputs, read once) those are read like stdin, ``/dev/null`` as an empty input.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise CorpusError("file not found", path) from None
    except OSError as exc:  # permission denied on a parent, a name too long, a loop of links...
        raise CorpusError(f"cannot read the file: {exc.strerror}", path) from None
    if stat.S_ISDIR(mode):
        raise CorpusError("is a directory, expected a text file", path)
    if regular and not stat.S_ISREG(mode):
        raise CorpusError(
            f"is not a regular file ({_file_kind(mode)}): a corpus is read twice (validated, then built); "
            "save it to a file first",
            path,
        )
    if not os.access(p, os.R_OK):
        raise CorpusError("permission denied: the file is not readable", path)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def decode_lines(name: str, lines: Iterable[bytes], digest: Any = None) -> Iterator[tuple[int, str]]:
    """The one rule for every text input (corpus files, translate/evaluate inputs, stdin): yield
    ``(line number, text)`` per line, line ends (``\\n`` or ``\\r\\n``) removed.

    A UTF-8 byte order mark at the start is dropped. Raises :class:`CorpusError` naming ``name`` and the
    line for invalid UTF-8, a UTF-16 byte order mark, a NUL byte, and a carriage return that ends no
    line (CR-only "old Mac" line ends, or a stray one). ``digest`` (a hashlib object) is fed the raw bytes.
    """
    for number, raw in enumerate(lines, start=1):
        if digest is not None:
            digest.update(raw)
        if number == 1:  # byte order marks: UTF-8's is dropped, UTF-16's refused
            if raw[:2] in _UTF16_BOMS:
                raise CorpusError(
                    f"the file is {_UTF16_BOMS[raw[:2]]} (byte order mark {raw[:2].hex(' ').upper()}), "
                    f"expected UTF-8; convert it: {_filter(name, 'iconv -f UTF-16 -t UTF-8', 'utf8')}",
                    name,
                    1,
                )
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                if not raw:  # nothing but the mark: an empty file
                    return
        body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
        nul = body.find(b"\x00")
        if nul >= 0:
            raise CorpusError(
                f"NUL byte at byte {nul} of the line: expected UTF-8 text (is it a binary file, or "
                "UTF-16 without a byte order mark?)",
                name,
                number,
            )
        cr = body.find(b"\r")
        if cr >= 0:
            if not raw.endswith(b"\n") or body.count(b"\r") > 1:  # lines ended by CR alone
                raise CorpusError(
                    "line ends here are carriage returns only (\\r, old Mac style), expected \\n or "
                    f"\\r\\n; convert them: {_filter(name, _CR_TO_LF, 'unix')}",
                    name,
                    number,
                )
            raise CorpusError(
                f"carriage return (\\r) inside the line at byte {cr}; line ends must be \\n or \\r\\n. "
                "Remove stray ones (tr -d '\\r'), or if the file mixes in CR-only line ends, convert "
                "those (tr '\\r' '\\n')",
                name,
                number,
            )
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(
                f"invalid UTF-8 at byte {exc.start} of the line "
                f"({body[max(0, exc.start - 10) : exc.start + 10]!r}); "
                "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                name,
                number,
            ) from None
        yield number, text


def _filter(name: str, command: str, suffix: str) -> str:
    """How to fix input ``name`` with a filter ``command``: a shell line for a file, the filter for stdin."""
    return command if name.startswith("<") else f"{command} < {name} > {name}.{suffix}"


@contextlib.contextmanager
def _open_lines(path: str) -> Iterator[Iterator[tuple[int, str]]]:
    """``decode_lines`` over the file ``path``, closed on exit."""
    with open(path, "rb") as handle:
        yield decode_lines(path, handle)


def _scan_file(path: str) -> tuple[int, str]:
    """Count lines, validate them (:func:`decode_lines`) and hash one corpus file; raises
    :class:`CorpusError` on the first bad line."""
    check_input_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        lines = sum(1 for _ in decode_lines(path, handle, digest))
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
    kept = 0
    for pair in iter_pairs(spec):  # parses every record; cheap next to teacher forcing
        if not skip_empty:
            check_not_empty(spec, pair)
        kept += not is_empty(pair)
    lines = scans[0][0]
    if kept == 0:  # refused here, before a datastore of 0 entries is written
        found = (
            ("the files are empty" if len(spec.paths) > 1 else "the file is empty")
            if lines == 0
            else f"all {lines} line(s) have an empty side"
        )
        raise CorpusError(
            f"no sentence pair to store: {found}; a corpus needs at least one pair with two non-empty sides",
            " and ".join(spec.paths),
        )
    digest = hashlib.sha256("".join(s[1] for s in scans).encode()).hexdigest()
    return CorpusInfo(spec=spec, lines=lines, sha256=digest)


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


def _parse_tsv(path: str, number: int, line: str) -> tuple[str, str]:
    fields = line.split("\t")
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
    except (ValueError, RecursionError) as exc:  # e.g. a huge integer, or arrays nested thousands deep
        raise CorpusError(f"invalid JSON ({exc})", path, number) from None
    if isinstance(record, dict):
        for src_key, tgt_key in _JSON_KEYS:
            if src_key in record and tgt_key in record:
                src, tgt = record[src_key], record[tgt_key]
                if not isinstance(src, str) or not isinstance(tgt, str):
                    raise CorpusError(f"'{src_key}' and '{tgt_key}' must be strings", path, number)
                for key, text in ((src_key, src), (tgt_key, tgt)):
                    _check_json_text(path, number, key, text)
                return src, tgt
    raise CorpusError(
        f"expected an object with keys 'src' and 'tgt' (or 'source' and 'target'), found {stripped[:80]!r}",
        path,
        number,
    )


def _check_json_text(path: str, number: int, key: str, text: str) -> None:
    """JSON escapes can spell what a UTF-8 text file cannot hold: refuse them with the same rules."""
    if "\x00" in text:
        raise CorpusError(f"'{key}' contains a NUL character (\\u0000)", path, number)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CorpusError(
            f"'{key}' contains a lone surrogate ({text[exc.start]!r}), which is not text; "
            "escape each character outside the BMP as a surrogate pair",
            path,
            number,
        ) from None


def iter_pairs(spec: CorpusSpec) -> Iterator[Pair]:
    """Yield every line's pair lazily (empty sides included: the caller decides what to do).

    Lines are read by :func:`decode_lines`, the rules shared with every text input."""
    if spec.format == "text":
        with _open_lines(spec.paths[0]) as src, _open_lines(spec.paths[1]) as tgt:
            for (number, s), (_, t) in zip(src, tgt, strict=False):
                yield Pair(number, s, t)
        return
    path = spec.paths[0]
    with _open_lines(path) as lines:
        for number, line in lines:
            if not line.strip():
                yield Pair(number, "", "")
                continue
            parse = _parse_tsv if spec.format == "tsv" else _parse_jsonl
            source, target = parse(path, number, line)
            yield Pair(number, source, target)


def read_lines(path: str) -> list[str]:
    """All lines of a UTF-8 text input for translate/evaluate, ``-`` for stdin, read once under the
    rules of :func:`decode_lines` (BOM dropped; NUL, CR-only line ends, invalid UTF-8 refused with
    file:line). A directory is refused; a pipe or device is read like stdin (``/dev/null``: no lines).
    """
    if path == "-":
        buffer = getattr(sys.stdin, "buffer", None)
        raw: Iterable[bytes] = (
            buffer if buffer is not None else (line.encode("utf-8", "surrogateescape") for line in sys.stdin)
        )
        return [text for _, text in decode_lines("<stdin>", raw)]
    check_input_file(path, regular=False)
    with _open_lines(path) as lines:
        return [text for _, text in lines]
