"""Property-based tests of the corpus readers (issue 15): whatever the bytes, reading a corpus or a
translate/evaluate input either succeeds or raises a :class:`KnnmtError` naming the file; well-formed
input reads back exactly as written; and a bad corpus appended to a datastore changes nothing in it."""

from __future__ import annotations

import codecs
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knnmt.core.errors import CorpusError, KnnmtError
from knnmt.pipeline.build import build_datastore
from knnmt.store.corpus import CorpusSpec, inspect_corpus, iter_pairs, read_lines
from knnmt.store.datastore import MANIFEST

# small and quick: each example writes a few tiny files; no model except in the last test
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ENCODINGS = ("utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be")
LINE_ENDS = ("\n", "\r\n", "\r")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus-properties")


# ---- strategies -------------------------------------------------------------------------------------

#: a sentence as a text file can hold it: any characters but the line ends, NUL and the BOM character
#: (U+FEFF first on a line 1 *is* a byte order mark), and for TSV no tab
sentence = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs",), blacklist_characters="\n\r\x00\ufeff"
    ),  # Cs: lone surrogates are not text
    max_size=12,
)
tsv_field = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\t\x00\ufeff"), max_size=12
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["src", "tgt", "x"]), inner),
    max_leaves=6,
)


@st.composite
def messy_line(draw: st.DrawFn) -> str:
    """One line of text a user might feed us: sentences with tabs, JSON records good and bad."""
    kind = draw(st.sampled_from(["columns", "json", "json-garbage", "text"]))
    if kind == "columns":
        return "\t".join(draw(st.lists(st.text(max_size=6), min_size=0, max_size=4)))
    if kind == "json":
        return json.dumps(draw(json_value), ensure_ascii=draw(st.booleans()))
    if kind == "json-garbage":
        text = json.dumps({"src": draw(st.text(max_size=6)), "tgt": draw(st.text(max_size=6))})
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.sampled_from(["", "\\u0000", "\\ud800", "]", "{", "\x00", "\\"]))
    return draw(st.text(max_size=10))


@st.composite
def messy_file(draw: st.DrawFn) -> bytes:
    """Bytes of a file: random bytes, or lines in a random encoding with random (mixed) line ends."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    lines = draw(st.lists(messy_line(), max_size=5))
    ends = [draw(st.sampled_from(LINE_ENDS)) for _ in lines]
    text = "".join(line + end for line, end in zip(lines, ends, strict=True))
    if draw(st.booleans()):
        text = "\ufeff" + text
    encoding = draw(st.sampled_from(ENCODINGS))
    data = text.encode(encoding, errors="replace" if encoding in ("latin-1", "cp1252") else "surrogatepass")
    if draw(st.booleans()) and data:  # truncated, e.g. mid-character
        data = data[: draw(st.integers(0, len(data)))]
    return data


def _write_lines(path: Path, lines: Sequence[str], ends: Sequence[str], bom: bool, final_eol: bool) -> None:
    """``lines`` joined with ``ends`` (one per line), the last one's end left off unless ``final_eol``
    (only when that line is not empty: a missing last line end must not drop a line)."""
    parts = [line + end for line, end in zip(lines, ends, strict=True)]
    if parts and not final_eol and lines[-1]:
        parts[-1] = lines[-1]
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + "".join(parts).encode("utf-8"))


def _must_name_file(exc: KnnmtError, *paths: Path) -> None:
    assert isinstance(exc, KnnmtError), f"{type(exc).__name__} escaped: {exc}"
    assert any(str(p) in str(exc) for p in paths), f"the message names no file: {exc}"


def _read_all(spec: CorpusSpec) -> None:
    """Validate and then read ``spec`` as a build would: inspect (may raise) then every pair (must not)."""
    info = inspect_corpus(spec)
    pairs = list(iter_pairs(spec))  # once validated, reading cannot fail
    assert len(pairs) == info.lines
    assert any(p.source.strip() and p.target.strip() for p in pairs)


# ---- whatever the bytes: a KnnmtError naming the file, or success -----------------------------------


@FAST
@given(data=messy_file(), fmt=st.sampled_from(["tsv", "jsonl"]))
def test_single_file_corpus_fails_only_with_a_named_corpus_error(work: Path, data: bytes, fmt: str) -> None:
    path = work / f"messy.{fmt}"
    path.write_bytes(data)
    spec = CorpusSpec((str(path),), fmt)
    try:
        _read_all(spec)
    except KnnmtError as exc:
        assert isinstance(exc, CorpusError)
        _must_name_file(exc, path)


@FAST
@given(source=messy_file(), target=messy_file())
def test_text_corpus_fails_only_with_a_named_corpus_error(work: Path, source: bytes, target: bytes) -> None:
    src, tgt = work / "messy.src", work / "messy.tgt"
    src.write_bytes(source)
    tgt.write_bytes(target)
    try:
        _read_all(CorpusSpec((str(src), str(tgt)), "text"))
    except KnnmtError as exc:
        assert isinstance(exc, CorpusError)
        _must_name_file(exc, src, tgt)


@FAST
@given(data=messy_file())
def test_read_lines_fails_only_with_a_named_corpus_error(work: Path, data: bytes) -> None:
    path = work / "messy.txt"
    path.write_bytes(data)
    try:
        lines = read_lines(str(path))
    except KnnmtError as exc:
        _must_name_file(exc, path)
        return
    assert all("\x00" not in line and "\r" not in line and "\n" not in line for line in lines)


# ---- well-formed input reads back as written ----------------------------------------------------------


@FAST
@given(
    pairs=st.lists(st.tuples(sentence, sentence), max_size=6),
    ends=st.lists(st.sampled_from(["\n", "\r\n"]), min_size=6, max_size=6),
    bom=st.booleans(),
    final_eol=st.booleans(),
)
def test_text_corpus_round_trip(
    work: Path, pairs: list[tuple[str, str]], ends: list[str], bom: bool, final_eol: bool
) -> None:
    src, tgt = work / "good.src", work / "good.tgt"
    _write_lines(src, [s for s, _ in pairs], ends[: len(pairs)], bom, final_eol)
    _write_lines(tgt, [t for _, t in pairs], ends[: len(pairs)][::-1], not bom, final_eol)
    spec = CorpusSpec((str(src), str(tgt)), "text")
    assert [(p.line, p.source, p.target) for p in iter_pairs(spec)] == [
        (i, s, t) for i, (s, t) in enumerate(pairs, start=1)
    ]
    assert read_lines(str(src)) == [s for s, _ in pairs]
    if any(s.strip() and t.strip() for s, t in pairs):
        assert inspect_corpus(spec).lines == len(pairs)
    else:  # nothing to store: refused, naming both files
        with pytest.raises(CorpusError, match="no sentence pair to store") as err:
            inspect_corpus(spec)
        assert str(src) in str(err.value) and str(tgt) in str(err.value)


@FAST
@given(
    pairs=st.lists(st.tuples(tsv_field, tsv_field), max_size=6),
    ends=st.lists(st.sampled_from(["\n", "\r\n"]), min_size=6, max_size=6),
    bom=st.booleans(),
    final_eol=st.booleans(),
)
def test_tsv_corpus_round_trip(
    work: Path, pairs: list[tuple[str, str]], ends: list[str], bom: bool, final_eol: bool
) -> None:
    path = work / "good.tsv"
    _write_lines(path, [f"{s}\t{t}" for s, t in pairs], ends[: len(pairs)], bom, final_eol)
    spec = CorpusSpec((str(path),), "tsv")
    expected = [("", "") if not f"{s}\t{t}".strip() else (s, t) for s, t in pairs]  # blank line: empty pair
    assert [(p.source, p.target) for p in iter_pairs(spec)] == expected
    if any(s.strip() and t.strip() for s, t in pairs):
        assert inspect_corpus(spec).lines == len(pairs)
    else:
        with pytest.raises(CorpusError, match=r"no sentence pair to store"):
            inspect_corpus(spec)


@FAST
@given(
    pairs=st.lists(
        st.tuples(st.text(max_size=12).filter(lambda t: "\x00" not in t), st.text(max_size=12)).filter(
            lambda p: "\x00" not in p[1]
        ),
        max_size=6,
    ),
    keys=st.sampled_from([("src", "tgt"), ("source", "target")]),
    ascii_only=st.booleans(),
    bom=st.booleans(),
    blank_lines=st.booleans(),
)
def test_jsonl_corpus_round_trip(
    work: Path,
    pairs: list[tuple[str, str]],
    keys: tuple[str, str],
    ascii_only: bool,
    bom: bool,
    blank_lines: bool,
) -> None:
    path = work / "good.jsonl"
    lines = []
    for s, t in pairs:  # JSON escapes carry \n, \r, \t and every other character
        lines.append(json.dumps({keys[0]: s, keys[1]: t, "id": 1}, ensure_ascii=ascii_only))
        if blank_lines:
            lines.append("")
    _write_lines(path, lines, ["\n"] * len(lines), bom, True)
    spec = CorpusSpec((str(path),), "jsonl")
    got = [(p.source, p.target) for p in iter_pairs(spec) if (p.source, p.target) != ("", "")]
    assert got == [(s, t) for s, t in pairs if (s, t) != ("", "")]


# ---- the rules each defect is refused by --------------------------------------------------------------

DEFECTS = {
    "nul": (b"Open\x00 the file.\tDatei.\n", r"NUL byte"),
    "cr-only": (b"Open.\tOffnen.\rClose.\tSchliessen.\r", r"carriage returns only .*tr '\\r' '\\n'"),
    "stray-cr": (b"Open.\rx\tOffnen.\n", r"carriage return \(\\r\) inside the line"),
    "latin-1": ("Größe\tSize\n".encode("latin-1"), r"invalid UTF-8"),
    "utf-16": ("Open.\tÖffnen.\n".encode("utf-16"), r"UTF-16 little-endian .*iconv -f UTF-16"),
    "columns": (b"Open.\tOffnen.\tthird\n", r"expected 2 tab-separated fields"),
}


@FAST
@given(
    good=st.lists(st.tuples(tsv_field, tsv_field), min_size=1, max_size=4),
    defect=st.sampled_from(sorted(DEFECTS)),
    where=st.integers(0, 4),
)
def test_each_defect_is_reported_at_its_line(
    work: Path, good: list[tuple[str, str]], defect: str, where: int
) -> None:
    lines = [f"{s}\t{t}\n".encode() for s, t in good]
    where = min(where, len(lines)) if defect != "utf-16" else 0  # a byte order mark comes first
    bad, pattern = DEFECTS[defect]
    lines.insert(where, bad)
    path = work / "defect.tsv"
    path.write_bytes(b"".join(lines))
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:{where + 1}: .*{pattern}"):
        inspect_corpus(CorpusSpec((str(path),), "tsv"))


# ---- a failing append loses nothing ------------------------------------------------------------------


@st.composite
def bad_corpus(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    """A corpus that must be refused: ``(format, first file, second file or b"")``."""
    good = "".join(
        f"{s}\t{t}\n" for s, t in [("Open the file.", "Datei öffnen."), ("Close it.", "Schließen.")]
    )
    defect = draw(st.sampled_from(["defect", "empty", "misaligned", "garbage-json"]))
    if defect == "defect":
        bad, _ = DEFECTS[draw(st.sampled_from(sorted(DEFECTS)))]
        return "tsv", good.encode() + bad, b""
    if defect == "empty":
        return "tsv", draw(st.sampled_from([b"", b"\n\n", b" \t \n", b"x\t\n\t y\n"])), b""
    if defect == "misaligned":
        n = draw(st.integers(1, 3))
        return "text", b"a\n" * n, b"b\n" * (n + draw(st.sampled_from([-1, 1])))
    cut = draw(st.integers(1, 20))
    return (
        "jsonl",
        b'{"src": "Open.", "tgt": "Offnen."}\n' + b'{"src": "Close.", "tgt": "x"}'[:cut] + b"\n",
        b"",
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus=bad_corpus())
def test_failing_append_leaves_the_datastore_unchanged(
    marian, datastore, tmp_path_factory: pytest.TempPathFactory, corpus: tuple[str, bytes, bytes]
) -> None:
    model, tokenizer = marian
    root = tmp_path_factory.mktemp("append")
    store = root / "ds"
    shutil.copytree(datastore.path, store)

    def snapshot() -> dict[str, bytes]:  # the manifest and every shard file
        files = [store / MANIFEST, *sorted((store / "shards").rglob("*"))]
        return {str(f.relative_to(store)): f.read_bytes() for f in files if f.is_file()}

    before = snapshot()
    fmt, first, second = corpus
    paths = [root / "bad.a", root / "bad.b"] if fmt == "text" else [root / f"bad.{fmt}"]
    paths[0].write_bytes(first)
    if fmt == "text":
        paths[1].write_bytes(second)
    with pytest.raises(CorpusError) as err:
        build_datastore(
            model, tokenizer, CorpusSpec(tuple(map(str, paths)), fmt), store, append=True, progress=False
        )
    assert any(str(p) in str(err.value) for p in paths)
    assert snapshot() == before
