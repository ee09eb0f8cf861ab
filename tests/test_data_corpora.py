"""Tests for the corpus pipeline (``corpora``): .mo parsing, cleaning, help and man-page
alignment, splits.

Everything runs offline: the ``.mo`` files, help pages and man pages are written by the tests.
"""

from __future__ import annotations

import gzip
import random
import struct
import zipfile
from pathlib import Path

import pytest

from corpora import build
from corpora.build import (
    BuildReport,
    Pair,
    find_catalogs,
    split_general,
    split_group,
    split_manpages,
    write_tsv,
)
from corpora.clean import (
    detect_accelerator_markers,
    filter_reason,
    has_content,
    normalise,
    strip_accelerators,
)
from corpora.debian import DebPackage, summarise_licence
from corpora.gettext_mo import MoEntry, MoFormatError, extract_pairs, parse_mo, read_mo
from corpora.lo_help import align_help_files, align_help_trees, parse_help_html
from corpora.manpages import (
    MAN_SECTIONS,
    ManPair,
    align_pages,
    align_trees,
    anchors,
    parse_man,
    roff_to_text,
    strip_translation_section,
)
from corpora.sources import exclusion_reason, general_package_names, manpages_package_names
from corpora.split import GroupSplit, split_by_group, stable_hash

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------
# A minimal .mo writer (GNU gettext binary format), so the tests need neither msgfmt nor fixtures.
# --------------------------------------------------------------------------------------------------

HEADER = (
    "Project-Id-Version: test 1.0\nLanguage: de\nMIME-Version: 1.0\nContent-Type: text/plain; charset={cs}\n"
)


def make_mo(messages: list[tuple[bytes, bytes]], big_endian: bool = False) -> bytes:
    """Build .mo bytes from raw ``(msgid, msgstr)`` byte strings (context/plural already encoded)."""
    messages = sorted(messages)
    e = ">" if big_endian else "<"
    n = len(messages)
    orig_tab = 28
    trans_tab = orig_tab + 8 * n
    data_start = trans_tab + 8 * n
    blob = b""
    orig_entries, trans_entries = [], []
    for msgid, _ in messages:
        orig_entries.append((len(msgid), data_start + len(blob)))
        blob += msgid + b"\0"
    for _, msgstr in messages:
        trans_entries.append((len(msgstr), data_start + len(blob)))
        blob += msgstr + b"\0"
    out = struct.pack(e + "7I", 0x950412DE, 0, n, orig_tab, trans_tab, 0, 0)
    out += b"".join(struct.pack(e + "2I", *x) for x in orig_entries)
    out += b"".join(struct.pack(e + "2I", *x) for x in trans_entries)
    return out + blob


def catalog(entries: list[tuple[str, str]], charset: str = "UTF-8", big_endian: bool = False) -> bytes:
    """A .mo with a header and ``(msgid, msgstr)`` string entries (``\\x04``/``\\x00`` allowed)."""
    raw = [(b"", HEADER.format(cs=charset).encode("ascii"))]
    raw += [(i.encode(charset), s.encode(charset)) for i, s in entries]
    return make_mo(raw, big_endian=big_endian)


SAMPLE = [
    ("_File", "_Datei"),
    ("Open _Recent", "_Zuletzt geöffnet"),
    ("_Edit", "_Bearbeiten"),
    ("Untranslated message", ""),
    ("OK", "OK"),
    ("One file\x00%d files", "Eine Datei\x00%d Dateien"),
    ("menu\x04Save", "Speichern"),
    ("toolbar\x04Save", "Speichern"),
    ("Line  one\n\tline two ", "Zeile eins\n  Zeile zwei"),
    ("<br/>", "<br />"),
    ("<b>Bold</b> text &amp; more", "<b>Fetter</b> Text &amp; mehr"),
    ("12.5", "12,5"),
    ("%s: %d", "%s – %d"),
    ("{0}", "({0})"),
    ("translator-credits", "Max Mustermann"),
    ("Your names", "Erika Mustermann"),
]


def pairs_of(data: bytes) -> list[tuple[str, str]]:
    _header, entries = parse_mo(data)
    return extract_pairs(entries).pairs


# --------------------------------------------------------------------------------------------------
# .mo parsing and extraction
# --------------------------------------------------------------------------------------------------


def test_parse_mo_header_contexts_plurals() -> None:
    header, entries = parse_mo(catalog(SAMPLE))
    assert header["Language"] == "de"
    assert all(e.msgid for e in entries), "the header (empty msgid) must not be an entry"
    by_id = {(e.context, e.msgid): e for e in entries}
    plural = by_id[(None, "One file")]
    assert plural.msgid_plural == "%d files"
    assert plural.msgstrs == ("Eine Datei", "%d Dateien")
    assert plural.msgstr == "Eine Datei"
    assert by_id[("menu", "Save")].msgstr == "Speichern"


def test_parse_mo_big_endian_and_latin1(tmp_path: Path) -> None:
    path = tmp_path / "x.mo"
    path.write_bytes(catalog([("Open file", "Datei öffnen")], charset="ISO-8859-1", big_endian=True))
    _header, entries = read_mo(path)
    assert [(e.msgid, e.msgstr) for e in entries] == [("Open file", "Datei öffnen")]


def test_parse_mo_rejects_garbage() -> None:
    with pytest.raises(MoFormatError):
        parse_mo(b"\x00" * 40)
    with pytest.raises(MoFormatError):
        parse_mo(b"\xde\x12\x04")
    bad = bytearray(catalog([("a", "b")]))
    struct.pack_into("<I", bad, 12, 10_000)  # original-strings table offset past the end
    with pytest.raises(MoFormatError):
        parse_mo(bytes(bad))


def test_extract_pairs_filters_and_cleans() -> None:
    _header, entries = parse_mo(catalog(SAMPLE))
    result = extract_pairs(entries)
    pairs = result.pairs
    assert "_" in result.accelerators
    assert ("File", "Datei") in pairs  # accelerator stripped on both sides
    assert ("Open Recent", "Zuletzt geöffnet") in pairs
    assert ("One file", "Eine Datei") in pairs  # singular of the plural entry
    assert ("Line one line two", "Zeile eins Zeile zwei") in pairs  # whitespace collapsed
    assert ("Bold text & more", "Fetter Text & mehr") in pairs  # markup stripped, entity decoded
    srcs = [s for s, _ in pairs]
    assert srcs.count("Save") == 1  # two contexts, one pair: deduplicated
    for dropped in (
        "Untranslated message",
        "OK",
        "<br/>",
        "12.5",
        "%s: %d",
        "{0}",
        "translator-credits",
        "Your names",
    ):
        assert dropped not in srcs and normalise(dropped) not in srcs
    assert result.stats["untranslated"] == 1
    assert result.stats["identical"] == 1
    assert result.stats["empty"] == 1  # markup-only: nothing left after stripping tags
    assert result.stats["no-content"] == 3  # number-only and two placeholder-only strings
    assert result.stats["credits"] == 2
    assert result.stats["duplicate"] == 1
    assert result.stats["kept"] == len(pairs) == 7


def test_accelerators_qt_and_libreoffice_styles() -> None:
    qt = [
        ("&Open", "Ö&ffnen"),
        ("&Save As...", "Speichern &unter ..."),
        ("Drag && Drop", "Ziehen && Ablegen"),
        ("R&D department", "R&D-Abteilung"),
        ("Use &amp; to join", "Verwenden Sie &amp; zum Verbinden"),
    ]
    pairs = pairs_of(catalog(qt))
    assert ("Open", "Öffnen") in pairs
    assert ("Save As...", "Speichern unter ...") in pairs
    assert ("Drag & Drop", "Ziehen & Ablegen") in pairs
    assert ("Use & to join", "Verwenden Sie & zum Verbinden") in pairs
    lo = [
        ("~Save", "~Speichern"),
        ("Sa~ve As", "Speichern ~unter"),
        ("Open ~/Documents", "~/Documents öffnen"),
        ("E~xit", "~Beenden"),
    ]
    pairs = pairs_of(catalog(lo))
    assert ("Save", "Speichern") in pairs
    assert ("Save As", "Speichern unter") in pairs
    assert ("Open ~/Documents", "~/Documents öffnen") in pairs


def test_accelerators_leave_identifiers_alone() -> None:
    # snake_case identifiers are copied verbatim; "_" is a real accelerator in the other entries.
    gtk = [
        ("_Quit", "_Beenden"),
        ("_Help", "_Hilfe"),
        ("_Edit", "_Bearbeiten"),
        ("Set max_size first", "Zuerst max_size setzen"),
        ("Value of MAX_PATH_LEN", "Wert von MAX_PATH_LEN"),
    ]
    pairs = pairs_of(catalog(gtk))
    assert ("Set max_size first", "Zuerst max_size setzen") in pairs
    assert ("Value of MAX_PATH_LEN", "Wert von MAX_PATH_LEN") in pairs
    assert ("Quit", "Beenden") in pairs
    # A catalog without accelerators: "&" is literal text, not a marker.
    assert detect_accelerator_markers([("Tom & Jerry", "Tom & Jerry"), ("R&D", "F&E")] * 1) == ""
    assert strip_accelerators("snake_case", "snake_case", "_") == ("snake_case", "snake_case")
    assert strip_accelerators("&File", "&Datei", "&") == ("File", "Datei")
    assert strip_accelerators("Save (&S)", "Speichern (&S)", "&") == ("Save", "Speichern")


@pytest.mark.parametrize(
    ("src", "tgt", "markers", "expected"),
    [
        # the pair itself shows an accelerator (both sides marked, different words)
        (
            'Replace prefi&x with "Re:"',
            "Präfi&x durch „Re:“ ersetzen",
            "",
            ('Replace prefix with "Re:"', "Präfix durch „Re:“ ersetzen"),
        ),
        # a marker that starts a word is an accelerator even in a catalog not known to use it
        ("_View", "Ansicht", "", ("View", "Ansicht")),
        ("/_Address/_Delete", "/_Adresse/_Löschen", "_", ("/Address/Delete", "/Adresse/Löschen")),
        # literal uses survive
        ("B&W: Fuji Acros", "S/W: Fuji Acros", "_", ("B&W: Fuji Acros", "S/W: Fuji Acros")),
        (
            "Generate AT&T-style stubs",
            "Stubs im AT&T-Stil erzeugen",
            "&",
            ("Generate AT&T-style stubs", "Stubs im AT&T-Stil erzeugen"),
        ),
        ("Balance at ~a", "Saldo am ~a", "_", ("Balance at ~a", "Saldo am ~a")),  # Lisp format directive
        (
            "not setting _NET_WM_PID.",
            "setzt _NET_WM_PID nicht",
            "&",
            ("not setting _NET_WM_PID.", "setzt _NET_WM_PID nicht"),
        ),
        (
            "Automatic _underline_",
            "Automatisch _unterstrichen_",
            "_",
            ("Automatic _underline_", "Automatisch _unterstrichen_"),
        ),
        ("Delete Page Header", "~Seitenkopf löschen", "~", ("Delete Page Header", "Seitenkopf löschen")),
        ("Filter&regeln", "Filter&regeln", "", ("Filter&regeln", "Filter&regeln")),
    ],
)
def test_accelerator_rules(src: str, tgt: str, markers: str, expected: tuple[str, str]) -> None:
    assert strip_accelerators(src, tgt, markers) == expected


def test_entities_need_semicolons_and_invisibles_go() -> None:
    assert normalise("Filter&regeln &amp; &lt;b&gt; &#228;") == "Filter&regeln & <b> ä"
    _header, entries = parse_mo(
        catalog(
            [
                ("_From which print:", "_\u200b\u200bDruckbereich:"),
                ("_Open", "Ö_ffnen"),
                ("_Close", "_Schließen"),
            ]
        )
    )
    assert ("From which print:", "Druckbereich:") in extract_pairs(entries).pairs


def test_content_and_length_filters() -> None:
    assert not has_content("<b></b>") and not has_content("42 %") and not has_content("%1 / %2")
    assert not has_content("$(ARG1)") and not has_content("%PRODUCTNAME")
    assert has_content("%1 files") and has_content("Seite %d")
    assert filter_reason("Hello", "hello") == "identical"
    assert filter_reason("", "x") == "empty"
    assert filter_reason(" ".join(["word"] * 81), " ".join(["Wort"] * 81)) == "length"
    assert filter_reason("Up", "Nach oben") is None  # short pairs survive the smoothed ratio
    long_de = "Drucken Sie hier dieses Dokument auf einem Drucker aus, bitte jetzt"
    assert filter_reason("Print", long_de) == "ratio"
    assert filter_reason("Open the file", "Datei öffnen") is None


# --------------------------------------------------------------------------------------------------
# LibreOffice help alignment
# --------------------------------------------------------------------------------------------------

EN_PAGE = """<!DOCTYPE html><html lang="en-US"><head><title>New</title>
<script>var x = "<p id='par_x'>no</p>";</script></head>
<body><header id="TopLeftHeader"><p id="bm_module">Module</p></header>
<div id="DisplayArea">
<h1 id="hd_id1">New Document</h1>
<p id="par_id2" class="paragraph"><span class="avis">Creates a   new
 document.</span></p>
<p id="par_id3" class="paragraph">Press <span class="switchinline"><span hidden="true"
 id="MACtextshared_1" class="MAC"><span class="keycode">Command</span></span><span hidden="true"
 id="defaulttextshared_1"><span class="keycode">Ctrl</span></span></span>+N.</p>
<div class="embedded"><p id="par_id4" class="paragraph">Choose
 <span class="menuitem">File - New</span>.</p></div>
<div class="embedded"><p id="par_id4" class="paragraph">Choose <span class="menuitem">File - New</span>
 again.</p></div>
<p id="par_id5" class="paragraph">Only once in English.</p>
<p id="par_id5" class="paragraph">Twice in English.</p>
<div class="note"><p id="par_id6">Unclosed note paragraph.</div>
<p id="par_id7" class="paragraph"></p>
<p id="par_id8" class="paragraph">1.5</p>
</div></body></html>
"""

DE_PAGE = """<!DOCTYPE html><html lang="de"><head><title>Neu</title></head>
<body><header id="TopLeftHeader"><p id="bm_module">Modul</p></header>
<div id="DisplayArea">
<h1 id="hd_id1">Neues Dokument</h1>
<p id="par_id3" class="paragraph">Drücken Sie <span class="switchinline"><span hidden="true"
 id="MACtextshared_1" class="MAC"><span class="keycode">Befehl</span></span><span hidden="true"
 id="defaulttextshared_1"><span class="keycode">Strg</span></span></span>+N.</p>
<p id="par_id2" class="paragraph"><span class="avis">Erstellt ein neues Dokument.</span></p>
<div class="embedded"><p id="par_id4" class="paragraph">Wählen Sie
 <span class="menuitem">Datei – Neu</span>.</p></div>
<div class="embedded"><p id="par_id4" class="paragraph">Wählen Sie
 <span class="menuitem">Datei – Neu</span> erneut.</p></div>
<p id="par_id5" class="paragraph">Nur einmal auf Deutsch.</p>
<div class="note"><p id="par_id6">Nicht geschlossener Hinweis.</div>
<p id="par_id7" class="paragraph"></p>
<p id="par_id8" class="paragraph">1,5</p>
</div></body></html>
"""


def test_parse_help_html_units() -> None:
    units = parse_help_html(EN_PAGE)
    ids = [i for i, _ in units]
    assert "bm_module" not in ids and "par_x" not in ids  # page chrome and script content skipped
    text = dict(units)
    assert text["hd_id1"] == "New Document"
    assert text["par_id2"] == "Creates a new document."
    assert text["par_id3"] == "Press Ctrl+N."  # hidden MAC variant dropped, default kept
    assert text["par_id6"] == "Unclosed note paragraph."
    assert ids.count("par_id4") == 2


def test_align_help_files_by_id_and_occurrence() -> None:
    pairs = {(p.element_id, p.src): p.tgt for p in align_help_files(EN_PAGE, DE_PAGE, "text/x.html")}
    assert pairs[("hd_id1", "New Document")] == "Neues Dokument"
    # order-independent: par_id2 comes after par_id3 in the German page
    assert pairs[("par_id2", "Creates a new document.")] == "Erstellt ein neues Dokument."
    assert pairs[("par_id3", "Press Ctrl+N.")] == "Drücken Sie Strg+N."
    assert pairs[("par_id4", "Choose File - New.")] == "Wählen Sie Datei – Neu."
    assert pairs[("par_id4#1", "Choose File - New again.")] == "Wählen Sie Datei – Neu erneut."
    assert not any(k[0].startswith("par_id5") for k in pairs)  # occurrence counts differ: skipped
    assert pairs[("par_id6", "Unclosed note paragraph.")] == "Nicht geschlossener Hinweis."


def test_align_help_trees_filters_and_missing_files(tmp_path: Path) -> None:
    en, de = tmp_path / "en-US", tmp_path / "de"
    for root, page in ((en, EN_PAGE), (de, DE_PAGE)):
        (root / "text" / "shared").mkdir(parents=True)
        (root / "text" / "shared" / "new.html").write_text(page, encoding="utf-8")
    (en / "text" / "shared" / "only_en.html").write_text(EN_PAGE, encoding="utf-8")
    corpus = align_help_trees(en, de)
    assert corpus.stats["files"] == 1 and corpus.stats["file-missing-de"] == 1
    assert corpus.stats["empty"] == 1 and corpus.stats["no-content"] == 1  # par_id7, par_id8
    assert {p.file for p in corpus.pairs} == {"text/shared/new.html"}
    assert len(corpus.pairs) == 6


# --------------------------------------------------------------------------------------------------
# Deterministic splits
# --------------------------------------------------------------------------------------------------


def _items(n_groups: int = 60, per_group: int = 25) -> list[tuple[str, str]]:
    return [(f"file{g:03d}.html", f"sentence {g}-{i}") for g in range(n_groups) for i in range(per_group)]


def test_stable_hash_is_fixed() -> None:
    assert stable_hash("text/shared/01/01010000.html") == stable_hash("text/shared/01/01010000.html")
    assert stable_hash("a") != stable_hash("a", salt="other")
    assert stable_hash("abc") == 0xD8D4EE0628974F86  # fixed forever: changing it reshuffles every split


def test_split_is_deterministic_and_groupwise() -> None:
    items = _items()

    def run(data: list[tuple[str, str]]) -> GroupSplit[tuple[str, str]]:
        return split_by_group(
            data,
            group_of=lambda x: x[0],
            sizes=[("test", 100), ("dev", 50)],
            key_of=lambda x: x[1],
            max_per_group=20,
        )

    first = run(items)
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    second = run(shuffled)
    for name in ("test", "dev"):
        assert sorted(first.splits[name]) == sorted(second.splits[name])
        assert first.groups[name] == second.groups[name]
    assert len(first.splits["test"]) == 100 and len(first.splits["dev"]) == 50
    train_files = {f for f, _ in first.splits["train"]}
    for name in ("test", "dev"):
        held = {f for f, _ in first.splits[name]}
        assert not held & train_files, "a file must not be split between train and dev/test"
        assert held == set(first.groups[name])
    assert not set(first.groups["test"]) & set(first.groups["dev"])
    # every item is in exactly one place
    total = sum(len(v) for v in first.splits.values()) + len(first.discarded)
    assert total == len(items)
    # max_per_group: at most 20 from each held-out file
    for name in ("test", "dev"):
        counts: dict[str, int] = {}
        for f, _ in first.splits[name]:
            counts[f] = counts.get(f, 0) + 1
        assert max(counts.values()) <= 20


def test_split_eligibility_and_size_limits() -> None:
    items = _items(n_groups=40, per_group=10) + [("huge", f"h{i}") for i in range(500)]
    result = split_by_group(
        items,
        group_of=lambda x: x[0],
        sizes=[("test", 30)],
        key_of=lambda x: x[1],
        max_group_size=100,
        eligible=lambda x: not x[1].endswith("-0"),
    )
    assert "huge" not in result.groups["test"]
    assert all(not s.endswith("-0") for _, s in result.splits["test"])
    with pytest.raises(ValueError):
        split_by_group(items[:20], group_of=lambda x: x[0], sizes=[("test", 1000)], key_of=lambda x: x[1])


def test_split_general_keeps_shared_strings_out_of_heldout() -> None:
    from corpora.build import BuildReport

    pairs = []
    for g in range(80):
        pairs.append(Pair("Cancel", "Abbrechen", f"pkg{g}", f"pkg{g}:x.mo"))
        pairs += [Pair(f"Message {g}-{i}", f"Meldung {g}-{i}", f"pkg{g}", f"pkg{g}:x.mo") for i in range(40)]
    import corpora.build as build

    sizes = build.GENERAL_SIZES
    build.GENERAL_SIZES = (("test", 100), ("dev", 100))
    try:
        report = BuildReport()
        result = split_general(pairs, blocked_sources={"message 0-0"}, report=report)
    finally:
        build.GENERAL_SIZES = sizes
    held = result.splits["test"] + result.splits["dev"]
    assert all(p.src != "Cancel" for p in held)
    assert all(p.src != "Message 0-0" for v in result.splits.values() for p in v)
    assert report.general_counts["removed-target-heldout-overlap"] == 1
    assert report.general_counts["unique"] == 80 * 40 + 1


# --------------------------------------------------------------------------------------------------
# Sources, packaging helpers, output
# --------------------------------------------------------------------------------------------------


def test_general_packages_exclude_games_education_science() -> None:
    names = general_package_names()
    assert len(names) > 100 and len(names) == len(set(names))
    assert [n for n in names if exclusion_reason(n)] == []
    for held_out in (
        "kstars-data",
        "marble-data",
        "stellarium",
        "kgeography-data",
        "parley-data",
        "gcompris-qt",
        "wesnoth-1.16-data",
        "sugar-write-activity",
        "kalzium-data",
        "step",
    ):
        assert exclusion_reason(held_out), held_out
    assert exclusion_reason("anything", "games")
    assert exclusion_reason("anything", "contrib/science")
    assert exclusion_reason("cantor", "math")
    assert exclusion_reason("gnumeric-common", "math") is None
    assert exclusion_reason("inkscape", "graphics") is None


def test_split_group_and_licence_summary() -> None:
    assert split_group("gcc-12") == split_group("gcc-11") == "gcc"
    assert split_group("postgresql-15") == "postgresql"
    assert split_group("kf5-messagelib") == "kf5-messagelib"
    assert split_group("kwallet-kf5") == "kwallet-kf5"
    assert split_group("wxwidgets3.2") == "wxwidgets3.2"
    dep5 = (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\n"
        "License: GPL-2+ or LGPL-3\n\nFiles: po/*\nLicense: GPL-2+\n"
    )
    assert summarise_licence(dep5) == "GPL-2+, LGPL-3"
    assert summarise_licence("This is free software under the GNU General Public License v2.") == "GPL"
    assert summarise_licence("All rights reserved.") == "unknown"
    assert summarise_licence("License: This program is free software; you can redistribute it") == "unknown"
    assert summarise_licence("released under the GPL version 2 (or any later version)") == "GPL"


def test_find_catalogs_in_tree_and_zip(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    mo = catalog([("Open", "Öffnen")])
    for rel in (
        "usr/share/locale/de/LC_MESSAGES/app.mo",
        "usr/share/locale/fr/LC_MESSAGES/app.mo",
        "usr/share/locale/de/LC_MESSAGES/iso_639.mo",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(mo)
    z = root / "usr/share/app/locales.zip"
    z.parent.mkdir(parents=True)
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("de/messages.mo", mo)
        zf.writestr("de/iso639.mo", mo)
        zf.writestr("fr/messages.mo", mo)
    pkg = DebPackage("app", "1.0", "graphics", "app", "GPL", tmp_path / "x.deb", root, "0" * 64)
    names = [n for n, _ in find_catalogs(pkg)]
    assert names == ["usr/share/locale/de/LC_MESSAGES/app.mo", "usr/share/app/locales.zip!de/messages.mo"]


def test_write_tsv_rejects_bad_fields(tmp_path: Path) -> None:
    assert write_tsv(tmp_path / "ok.tsv", [("a b", "c d")]) == 1
    assert (tmp_path / "ok.tsv").read_text(encoding="utf-8") == "a b\tc d\n"
    with pytest.raises(ValueError):
        write_tsv(tmp_path / "bad.tsv", [("a\tb", "c")])
    with pytest.raises(ValueError):
        write_tsv(tmp_path / "bad.tsv", [("a", "")])


def test_shipped_target_corpus_is_well_formed() -> None:
    target = REPO / "data" / "target"
    if not (target / "test.tsv").exists():
        pytest.skip("data/target not built")
    rows = {}
    for name in ("train", "dev", "test"):
        lines = (target / f"{name}.tsv").read_text(encoding="utf-8").splitlines()
        rows[name] = [line.split("\t") for line in lines]
        assert all(len(r) == 2 and r[0] and r[1] for r in rows[name]), name
    assert len(rows["dev"]) == 500 and len(rows["test"]) == 1000
    assert len(rows["train"]) > 20_000
    train_src = {r[0].casefold() for r in rows["train"]}
    for name in ("dev", "test"):
        leaked = {r[0].casefold() for r in rows[name]} & train_src
        assert not leaked, f"{name} source sentences leak into train"


def test_mo_entry_singular_property() -> None:
    assert MoEntry("a", ()).msgstr == ""
    assert MoEntry("a", ("x", "y"), msgid_plural="b").msgstr == "x"


# --------------------------------------------------------------------------------------------------
# Man pages (second target domain)
# --------------------------------------------------------------------------------------------------

EN_MAN = r""".\" Copyright and licence comment
.TH FOO 1 "May 2024" "foo 1.0" "User Commands"
.de XX
.  ft B
.  .
..
.SH NAME
foo \- frobnicate files
.SH SYNOPSIS
.B foo
[\fIOPTION\fR]... \fIFILE\fR
.SH DESCRIPTION
.B foo
frobnicates each
.IR FILE .
It never deletes anything.
.PP
Mandatory arguments to long options are mandatory for short options too.
.TP
\fB\-a\fR, \fB\-\-all\fR
also frobnicate hidden files
.TP
.BR \-n ", " \-\-count =\fIN\fR
stop after N files, 10 by default
.IP \(bu 2
The output is sorted\(emalways.
.nf
foo \-a /tmp
.fi
prints nothing.
.SH "SEE ALSO"
.BR bar (1)
"""

DE_MAN = r""".\" -*- coding: UTF-8 -*-
.\" This file was generated with po4a. Translate the source file.
.TH FOO 1 "Mai 2024" "foo 1.0" "Dienstprogramme für Benutzer"
.SH BEZEICHNUNG
foo \- Dateien frobnizieren
.SH ÜBERSICHT
\fBfoo\fP [\fIOPTION\fP]… \fIDATEI\fP
.SH BESCHREIBUNG
\fBfoo\fP frobniziert jede \fIDATEI\fP. Es löscht
niemals etwas.
.PP
Die obligatorischen Argumente für Optionen sind für deren Kurz\- und Langform gleich.
.TP
\fB\-a\fP, \fB\-\-all\fP
auch versteckte Dateien frobnizieren
.TP
\fB\-n\fP, \fB\-\-count\fP=\fIN\fP
nach N Dateien anhalten, standardmäßig 10
.IP \(bu 2
Die Ausgabe ist sortiert\(emimmer.
.nf
foo \-a /tmp
.fi
gibt nichts aus.
.SH "SIEHE AUCH"
\fBbar\fP(1)
.SH ÜBERSETZUNG
Die deutsche Übersetzung dieser Handbuchseite wurde von
Jemand <jemand@example.org> erstellt.
"""


def test_roff_to_text_and_anchors() -> None:
    assert roff_to_text(r"\fB\-\-all\fR and \(lqquotes\(rq\(emdash \e") == "--all and “quotes”—dash \\"
    assert roff_to_text(r"a\&.b\c") == "a.b"
    assert roff_to_text(r"\[u00E4]\*(lqx\*(rq \s-1SMALL\s0") == "ä“x” SMALL"
    assert roff_to_text(r"text \" a comment") == "text "
    assert roff_to_text(r"\(Bqx\(lq \[char176]") == "„x“ °"
    assert anchors("use -n, --count=3 (see 2.1)") == sorted(["-n", "--count", "3", "2.1"])
    assert anchors("a non-option word") == []


def test_parse_man_page_strings() -> None:
    # pod2man's preamble defines strings for nroff (first) and troff (second): the first wins.
    page = (
        ".ie n \\{\\\n.    ds C` \"\"\n.    ds C' \"\"\n.\\}\n.el \\{\\\n.    ds C`\n.    ds C'\n.\\}\n"
        ".PP\nSet \\*(C`dir\\*(C' \\*(-- done.\n"
    )
    assert [(u.kind, u.text) for u in parse_man(page)] == [("PP", 'Set "dir" — done.')]


def test_parse_man_links() -> None:
    page = ".PP\nSee the\n.UR https://example.org/\nproject page\n.UE .\nThanks.\n"
    assert [u.text for u in parse_man(page)] == ["See the project page. Thanks."]


def test_parse_man_units() -> None:
    units = parse_man(EN_MAN)
    assert [(u.kind, u.text) for u in units] == [
        ("SH", "NAME"),
        ("PP", "foo - frobnicate files"),
        ("SH", "SYNOPSIS"),
        ("PP", "foo [OPTION]... FILE"),
        ("SH", "DESCRIPTION"),
        ("PP", "foo frobnicates each FILE. It never deletes anything."),
        ("PP", "Mandatory arguments to long options are mandatory for short options too."),
        ("TP-tag", "-a, --all"),
        ("TP", "also frobnicate hidden files"),
        ("TP-tag", "-n, --count=N"),
        ("TP", "stop after N files, 10 by default"),
        ("IP-tag", "•"),
        ("IP", "The output is sorted—always."),
        ("nf", "foo -a /tmp"),
        ("IP", "prints nothing."),
        ("SH", "SEE ALSO"),
        ("PP", "bar(1)"),
    ]
    de = strip_translation_section(parse_man(DE_MAN))
    assert [u.kind for u in de] == [u.kind for u in units]
    assert de[-1].text == "bar(1)"


def test_align_pages_full_and_filters() -> None:
    result = align_pages(EN_MAN, DE_MAN, "foo:man1/foo.1")
    assert result.status == "full"
    got = {(p.src, p.tgt) for p in result.pairs}
    assert (
        "foo frobnicates each FILE. It never deletes anything.",
        "foo frobniziert jede DATEI. Es löscht niemals etwas.",
    ) in got
    assert ("stop after N files, 10 by default", "nach N Dateien anhalten, standardmäßig 10") in got
    assert ("SEE ALSO", "SIEHE AUCH") in got
    assert all(p.page == "foo:man1/foo.1" for p in result.pairs)
    assert not any("foo -a /tmp" in p.src for p in result.pairs)  # verbatim block: no pair
    assert result.stats["verbatim"] == 1
    assert result.stats["fragment"] == 1  # "prints nothing." continues the sentence before the example
    # A changed number is an anchor mismatch: that pair goes, the rest stays.
    changed = DE_MAN.replace("standardmäßig 10", "standardmäßig 20")
    result = align_pages(EN_MAN, changed, "p")
    assert result.status == "full" and result.stats["anchor-mismatch"] == 1
    assert not any(p.src.startswith("stop after") for p in result.pairs)


def test_align_pages_skips_sections_and_pages_whose_structure_differs() -> None:
    # An extra German paragraph in DESCRIPTION: only that section is lost.
    extra = DE_MAN.replace(".PP\nDie", ".PP\nEin zusätzlicher Absatz.\n.PP\nDie")
    result = align_pages(EN_MAN, extra, "p")
    assert result.status == "sections"
    srcs = {p.src for p in result.pairs}
    assert "SEE ALSO" in srcs and "foo - frobnicate files" in srcs
    lost = ("Mandatory", "also frobnicate", "foo frobnicates")
    assert not any(p.src.startswith(lost) for p in result.pairs)
    assert result.stats["units-in-unaligned-sections"] == 11
    # A different number of sections (and paragraphs): the page is skipped entirely.
    more = DE_MAN.replace(".SH \"SIEHE AUCH\"", ".SH GESCHICHTE\nSeit 2024.\n.SH \"SIEHE AUCH\"")
    result = align_pages(EN_MAN, more, "p")
    assert result.status == "skipped" and result.pairs == []
    # Same shape, but a standard heading faces a different standard heading: sections are shifted.
    shifted = DE_MAN.replace('.SH "SIEHE AUCH"', ".SH DATEIEN")
    result = align_pages(EN_MAN, shifted, "p")
    assert result.status == "heading-mismatch" and result.pairs == []


def _write_page(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode("utf-8")))


def test_align_trees_pairs_pages_by_name(tmp_path: Path) -> None:
    en, de, own = tmp_path / "en", tmp_path / "de", tmp_path / "own"
    _write_page(en, "usr/share/man/man1/foo.1.gz", EN_MAN)
    _write_page(en, "usr/share/man/man6/foo.6.gz", EN_MAN)  # games section: never used
    _write_page(de, "usr/share/man/de/man1/foo.1.gz", DE_MAN)
    _write_page(de, "usr/share/man/de/man6/foo.6.gz", DE_MAN)
    _write_page(de, "usr/share/man/de/man8/halt.8.gz", ".so man8/shutdown.8\n")
    _write_page(de, "usr/share/man/de/man1/nowhere.1.gz", DE_MAN)
    (de / "usr/share/man/de/man1/foo-alias.1.gz").symlink_to("foo.1.gz")
    # A package with its own German page: its English original wins over the shared one.
    own_en = EN_MAN.replace("10 by default", "12 by default")
    _write_page(own, "usr/share/man/man1/baz.1.gz", own_en)
    _write_page(own, "usr/share/man/de/man1/baz.1.gz", DE_MAN.replace("standardmäßig 10", "standardmäßig 12"))
    _write_page(en, "usr/share/man/man1/baz.1.gz", EN_MAN)
    corpus = align_trees([("enpkg", en)], [("ownpkg", own), ("depkg", de)])
    assert corpus.page_package == {"enpkg:man1/foo.1": "enpkg", "ownpkg:man1/baz.1": "ownpkg"}
    assert corpus.page_translation == {"enpkg:man1/foo.1": "depkg", "ownpkg:man1/baz.1": "ownpkg"}
    assert corpus.stats["page-full"] == 2
    assert corpus.stats["page-redirect"] == 1 and corpus.stats["page-no-english"] == 1
    assert corpus.stats["anchor-mismatch"] == 0
    assert corpus.stats["identical"] >= 2  # "-a, --all" and "bar(1)"
    assert corpus.stats["kept"] == len(corpus.pairs)
    assert ("stop after N files, 12 by default", "nach N Dateien anhalten, standardmäßig 12") in {
        (p.src, p.tgt) for p in corpus.pairs if p.page == "ownpkg:man1/baz.1"
    }
    assert "6" not in MAN_SECTIONS


def _man_pairs(pages: int, per_page: int) -> list[ManPair]:
    pairs = []
    for g in range(pages):
        for i in range(per_page):
            pairs.append(ManPair(f"pkg:man1/p{g}.1", i, f"Sentence {g}-{i}", f"Satz {g}-{i}"))
        pairs.append(ManPair(f"pkg:man1/p{g}.1", per_page, "SEE ALSO", "SIEHE AUCH"))
    return pairs


def test_split_manpages_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "MANPAGES_SIZES", (("test", 100), ("dev", 50)))
    pairs = _man_pairs(60, 40)
    other = {"sentence 0-1", "sentence 5-5", "sentence 7-7", "see also"}
    report = BuildReport()
    result = split_manpages(pairs, other, report)
    again = split_manpages(list(reversed(pairs)), other, BuildReport())
    for name in ("test", "dev"):
        assert sorted(p.src for p in result.splits[name]) == sorted(p.src for p in again.splits[name])
    assert len(result.splits["test"]) == 100 and len(result.splits["dev"]) == 50
    pages = {name: {p.page for p in result.splits[name]} for name in result.splits}
    assert not pages["test"] & pages["train"] and not pages["dev"] & pages["train"]
    assert not pages["test"] & pages["dev"]
    for name in ("test", "dev"):
        per_page: dict[str, int] = {}
        for p in result.splits[name]:
            per_page[p.page] = per_page.get(p.page, 0) + 1
        assert max(per_page.values()) <= build.MANPAGES_MAX_PER_PAGE
        assert not {p.src.casefold() for p in result.splits[name]} & other
    assert not {p.src.casefold() for p in result.splits["train"]} & other  # "SEE ALSO" is gone
    held = {p.src.casefold() for name in ("test", "dev") for p in result.splits[name]}
    assert not held & {p.src.casefold() for p in result.splits["train"]}
    assert report.manpages_counts["train-removed-other-corpora"] > 0
    assert report.manpages_counts["unique"] == 60 * 40 + 1


def test_manpages_packages_exclude_games_education_science() -> None:
    names = manpages_package_names()
    assert len(names) > 50 and len(names) == len(set(names))
    assert "manpages-de" in names and "coreutils" in names
    assert [n for n in names if exclusion_reason(n)] == []


def test_shipped_manpages_corpus_is_well_formed() -> None:
    folder = REPO / "data" / "manpages"
    if not (folder / "test.tsv").exists():
        pytest.skip("data/manpages not built")
    rows = {}
    for name in ("train", "dev", "test"):
        lines = (folder / f"{name}.tsv").read_text(encoding="utf-8").splitlines()
        rows[name] = [line.split("\t") for line in lines]
        assert all(len(r) == 2 and r[0] and r[1] for r in rows[name]), name
    assert len(rows["dev"]) == 500 and len(rows["test"]) == 1000
    assert len(rows["train"]) > 8_000
    train_src = {r[0].casefold() for r in rows["train"]}
    target_train = REPO / "data" / "target" / "train.tsv"
    target_lines = target_train.read_text(encoding="utf-8").splitlines()
    target_src = {line.split("\t")[0].casefold() for line in target_lines}
    for name in ("dev", "test"):
        src = {r[0].casefold() for r in rows[name]}
        assert not src & train_src, f"{name} source sentences leak into train"
        assert not src & target_src, f"{name} source sentences occur in target train"
