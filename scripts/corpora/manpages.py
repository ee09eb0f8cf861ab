"""Align English manual pages with their German translations (``manpages-de``) paragraph by paragraph.

The German pages of ``manpages-de`` / ``manpages-de-dev`` are made with po4a from the English
upstream pages, which Debian ships in the programs' own packages (``coreutils``, ``util-linux``,
``manpages`` …). po4a keeps the document structure: every paragraph, heading, ``.TP`` tag and
``.IP`` item stays in its place, only the text changes (and inline font macros such as ``.B word``
become ``\\fBword\\fP`` escapes). So once both pages are cut into units by the same parser, the
n-th unit of one is the n-th unit of the other, *if* both have the same structure.

That condition is checked, never assumed: every unit has a *kind* (the macro that opened it:
``SH``, ``SS``, ``TP`` tag, ``IP`` item, ``PP`` paragraph, ``nf`` block …). A page is aligned by
order only when the kind sequences of both sides are identical; otherwise each ``.SH`` section
whose kind sequence matches is aligned on its own (the rest of the page is skipped), and when the
pages do not even have the same number of sections, the page is skipped. Paired units must also
agree on their *anchors* — command-line options and numbers, which translators copy — else the
pair is dropped. The German translators' section (``ÜBERSETZUNG``) that po4a appends is removed
first. No-fill blocks (``.nf``/``.EX`` examples) and tables count as units but never give pairs, nor
does a unit right after one that starts in lower case on either side (the rest of a sentence
interrupted by an example: translators move words across the example).
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from .clean import DEFAULT_FILTER, FilterConfig, collapse_whitespace, filter_reason

log = logging.getLogger(__name__)

#: Manual sections used. Section 6 (games) is held out of every corpus, as games are.
MAN_SECTIONS: tuple[str, ...] = ("1", "2", "3", "4", "5", "7", "8")
#: Titles of the section po4a appends to German pages (translators, licence, bug address).
TRANSLATION_SECTION_TITLES: frozenset[str] = frozenset({"ÜBERSETZUNG", "UBERSETZUNG"})

#: Font macros whose arguments are joined with spaces (``.B word word``).
_FONT_MACROS: frozenset[str] = frozenset({"B", "I", "SM", "SB"})
#: Alternating-font macros whose arguments are joined without spaces (``.BR name (1)``).
_ALT_MACROS: frozenset[str] = frozenset({"BR", "RB", "BI", "IB", "IR", "RI"})
#: Requests that neither break a paragraph nor carry text (formatting state, definitions).
_IGNORED_REQUESTS: frozenset[str] = frozenset(
    {
        "TH", "ds", "nr", "nh", "hy", "ad", "na", "ft", "ne", "PD", "IX", "so", "mso", "fam",
        "ss", "cs", "tr", "cp", "ig", "rm", "rn", "als", "ch", "wh", "lf", "hw", "ev", "ps",
        "vs", "ll", "lt", "pl", "ta", "tc", "lc", "fc", "eo", "ec", "cu", "ul", "cc", "c2",
        "do", "pso", "nroff", "troff", "hlm", "hym", "hys", "kern", "lg", "tm", "ab", "cflags",
        "char", "fchar", "schar", "rchar", "shift", "blm", "lsm", "em", "OP", "DT", "AT", "UC",
    }
)  # fmt: skip
#: Requests that start a no-fill (verbatim) block, and the requests that end it.
#: The line that ends a ``.de``/``.am``/``.ig`` block: ``..``, or ``.`` + blanks + ``.`` when indented.
_DEFINITION_END_RE = re.compile(r"^(?:\.\.|[.']\s*\.\s*$)")
_NOFILL_START: dict[str, str] = {"nf": "fi", "EX": "EE", "TS": "TE", "EQ": "EN", "PS": "PE", "cW": "fi"}

#: Unit kinds of verbatim blocks (examples, tables, equations, pictures): never paired.
_VERBATIM_KINDS: frozenset[str] = frozenset({"nf", "TS", "EQ", "PS"})

_NAMED_CHARS: dict[str, str] = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”",
    "oq": "‘", "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "bu": "•", "co": "©",
    "rg": "®", "tm": "™", "de": "°", "mu": "×", "di": "÷", "+-": "±", "<=": "≤", ">=": "≥",
    "!=": "≠", "->": "→", "<-": "←", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|",
    "or": "|", "bv": "|", "at": "@", "sh": "#", "Do": "$", "sq": "'", "ga": "`", "aa": "´",
    "sc": "§", "ps": "¶", "dg": "†", "ct": "¢", "Eu": "€", "eu": "€", "Po": "£", "Ye": "¥",
    "pc": "·", "lh": "☜", "rh": "☞", "an": "-", "ul": "_", "ru": "_", "br": "|", "'a": "á",
    ":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü", "ss": "ß", "'e": "é",
    "`e": "è", "'E": "É", "oe": "œ", "ae": "æ", "ua": "↑", "da": "↓", "lA": "⇐", "rA": "⇒",
    "hA": "⇔", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩", "tno": "~",
    "Ho": "‘", "i.": "ı", "Bq": "„", "bq": "‚", "ci": "○", "is": "∫", "if": "∞", "pd": "∂",
    "mc": "µ", "S1": "¹", "S2": "²", "S3": "³", "12": "½", "14": "¼", "34": "¾", "eq": "=",
    "pl": "+", "ts": "ς", "tmu": "×", "fm": "′", "sd": "″", "dd": "‡", "==": "≡", "**": "∗",
    "^o": "ô", "^a": "â", "'o": "ó", "`a": "à", ",c": "ç", "~n": "ñ", "/l": "ł", "/O": "Ø",
    "*a": "α", "*b": "β", "*g": "γ", "*d": "δ", "*e": "ε", "*i": "ι", "*l": "λ", "*m": "μ",
    "*p": "π", "*s": "σ", "*S": "Σ", "*W": "Ω", "*w": "ω", "ell": "…",
}  # fmt: skip
#: Predefined strings (``\*(lq``, ``\*R``); a page's own ``.ds`` definitions add to these (the first
#: definition of a name wins, which for pod2man's ``.ie n``/``.el`` preamble is the terminal one).
_STRINGS: dict[str, str] = {
    "lq": "“", "rq": "”", "R": "®", "Tm": "™", "S": "", "Aq": "'", "aq": "'", "--": "—",
}  # fmt: skip

_ESCAPE_RE = re.compile(
    r"\\(?:"
    r"\((?P<c2>..)"  # \(em
    r"|\[(?P<cb>[^\]]*)\]"  # \[em], \[u00E4]
    r"|\*(?:\((?P<s2>..)|\[(?P<sb>[^\]]*)\]|(?P<s1>.))"  # \*(lq, \*[name], \*R
    r"|f(?:\(..|\[[^\]]*\]|.)"  # font: \fB, \f(CW, \f[]
    r"|[sS][+-]?(?:\d\d?|\(\d\d|\[\d+\])"  # size: \s-1, \s0
    r"|[hvwlLxoDXNbZRYVMmgkn](?:'[^']*'|\[[^\]]*\]|\(..|.)"  # \h'..', \w'..', \n(..
    r"|(?P<lit>[-e\\.'`\"~ 0|^&,/%:!c)?{}acdprtuEz#]|\n|$)"
    r")"
)


def _escape_sub(m: re.Match[str], strings: dict[str, str]) -> str:
    if m.group("c2") is not None or m.group("cb") is not None:
        name = m.group("c2") if m.group("c2") is not None else m.group("cb")
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        if re.fullmatch(r"char\d{1,5}", name):
            return chr(int(name[4:]))
        return _NAMED_CHARS.get(name, "")
    for key in ("s2", "sb", "s1"):
        if m.group(key) is not None:
            return strings.get(m.group(key), "")
    lit = m.group("lit")
    if lit is None:
        return ""
    if lit in ("-",):
        return "-"
    if lit in ("e", "\\"):
        return "\\"
    if lit in (".", "'", "`"):
        return {"'": "´", "`": "`"}.get(lit, lit)
    if lit in ("~", " ", "0"):
        return " "
    if lit == "\"":  # a comment running to the end of the line
        return "\0"
    return ""


def roff_to_text(text: str, strings: dict[str, str] | None = None) -> str:
    """Plain text of a line of roff text: escapes resolved, font changes dropped.

    ``\\-`` becomes ``-``, ``\\(em`` a dash, ``\\[u00E4]`` ``ä``, ``\\*(lq`` a quote (``strings``: the
    defined strings, default the predefined ones); font (``\\fB``), size, motion and spacing escapes
    (``\\&``, ``\\,``, ``\\/``, ``\\c``) disappear; an inline comment (``\\"``) ends the text.
    Whitespace is not collapsed here.
    """
    if "\\" not in text:
        return text
    table = _STRINGS if strings is None else strings
    out = _ESCAPE_RE.sub(lambda m: _escape_sub(m, table), text)
    return out.split("\0", 1)[0]


def split_args(line: str) -> list[str]:
    """Arguments of a request line (without the request name): blanks separate, quotes group."""
    args: list[str] = []
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in " \t":
            i += 1
        if i >= n:
            break
        if line[i] == '"':
            i += 1
            buf: list[str] = []
            while i < n:
                if line[i] == '"':
                    if i + 1 < n and line[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(line[i])
                i += 1
            args.append("".join(buf))
        else:
            j = i
            while j < n and line[j] not in " \t":
                if line[j] == "\\" and j + 1 < n:
                    j += 1
                j += 1
            args.append(line[i:j])
            i = j
    return args


@dataclasses.dataclass(frozen=True)
class ManUnit:
    """One translatable unit of a page: the macro that opened it (``kind``) and its plain text."""

    kind: str
    text: str


class _ManParser:
    """Cut a roff man page into units (headings, tags, paragraphs, verbatim blocks)."""

    def __init__(self) -> None:
        self.units: list[ManUnit] = []
        self._kind = "text"  # kind of the next unit
        self._buf: list[str] = []
        self._cur_kind: str | None = None
        self._tag_pending = False  # the next text line is a .TP tag
        self._strings = dict(_STRINGS)  # predefined strings plus the page's own .ds definitions

    def _t(self, text: str) -> str:
        return roff_to_text(text, self._strings)

    def _define(self, rest: str) -> None:
        """``.ds name value``: a leading ``"`` of the value is dropped, the rest is literal."""
        name, _, value = rest.partition(" ")
        value = value.lstrip(" ")
        if name and name not in self._strings:
            self._strings[name] = self._t(value[1:] if value.startswith('"') else value)

    def _flush(self) -> None:
        if self._cur_kind is not None:
            self.units.append(ManUnit(self._cur_kind, collapse_whitespace(" ".join(self._buf))))
        self._cur_kind = None
        self._buf = []

    def _text(self, text: str) -> None:
        if self._tag_pending:
            self._flush()
            self.units.append(ManUnit("TP-tag", collapse_whitespace(text)))
            self._tag_pending = False
            self._kind = "TP"
            return
        if self._cur_kind is None:
            self._cur_kind = self._kind
        self._buf.append(text)

    def _unit(self, kind: str, text: str) -> None:
        self._flush()
        self.units.append(ManUnit(kind, collapse_whitespace(text)))

    def feed(self, source: str) -> list[ManUnit]:
        lines = source.splitlines()
        i, n = 0, len(lines)
        while i < n:
            line = lines[i]
            i += 1
            # A trailing backslash continues the line, except after "\{" (a conditional block opens and
            # its first request follows on the next line).
            while line.endswith("\\") and not line.endswith(("\\\\", "\\{\\")) and i < n:
                line = line[:-1] + lines[i]
                i += 1
            if not line.strip():
                if self._cur_kind is not None or self._tag_pending:
                    self._flush()
                    self._kind = "blank"
                continue
            if line[0] not in ".'":
                self._text(self._t(line))
                continue
            body = line[1:].lstrip(" \t")
            if body.startswith(('\\"', "\\#")) or not body:
                continue  # comment or empty request
            name, _, rest = body.partition(" ")
            name, _, tab_rest = name.partition("\t")
            rest = (tab_rest + " " + rest).strip() if tab_rest else rest.strip()
            if name in ("de", "de1", "am", "ig"):  # macro definition or ignore block: skip to ".."
                while i < n and not _DEFINITION_END_RE.match(lines[i]):
                    i += 1
                i += 1
                continue
            if name in _NOFILL_START:
                end = _NOFILL_START[name]
                block: list[str] = []
                while i < n:
                    stripped = lines[i][1:].strip() if lines[i][:1] in ".'" else None
                    i += 1
                    if stripped is not None and stripped.split(" ")[0] == end:
                        break
                    block.append(self._t(lines[i - 1]))
                self._unit("nf" if name in ("nf", "EX", "cW") else name, " ".join(block))
                continue
            if name in ("ds", "ds1"):
                self._define(rest)
                continue
            if name in _FONT_MACROS or name in _ALT_MACROS:
                args = [self._t(a) for a in split_args(rest)]
                if not args and i < n and name in _FONT_MACROS:  # ".B" alone: the next line is bold
                    continue
                self._text((" " if name in _FONT_MACROS else "").join(args))
                continue
            if name in ("UR", "MT"):
                continue  # the address is not text; the link text follows
            if name in ("UE", "ME"):
                tail = self._t(" ".join(split_args(rest)))
                if tail and self._buf:  # punctuation right after the link text: no space
                    self._buf[-1] += tail
                elif tail:
                    self._text(tail)
                continue
            if name in _IGNORED_REQUESTS or name.startswith("\\}") or name == "\\}":
                continue
            if name in ("SH", "SS"):
                self._tag_pending = False
                text = " ".join(split_args(rest))
                self._flush()
                if text:
                    self._unit(name, self._t(text))
                    self._kind = "PP"
                else:
                    self._kind = name  # heading text on the next line
                continue
            if name in ("TP", "TQ"):
                self._flush()
                self._tag_pending = True
                continue
            if name in ("IP", "HP"):
                self._flush()
                args = split_args(rest)
                if name == "IP" and args and args[0]:
                    self._unit("IP-tag", self._t(args[0]))
                self._kind = name
                continue
            # Any other request (PP, LP, P, br, sp, RS, RE, in, ti, if, ie, el, …) ends a unit.
            self._flush()
            self._tag_pending = False
            self._kind = name
        self._flush()
        return self.units


def parse_man(source: str) -> list[ManUnit]:
    """Units of one roff man page, in document order (see the module docstring)."""
    return _ManParser().feed(source)


def strip_translation_section(units: list[ManUnit]) -> list[ManUnit]:
    """``units`` without the translators' section of German pages (``.SH ÜBERSETZUNG`` up to the
    next ``.SH`` or the end): po4a appends it, or a project's translators put it before the last
    sections."""
    out: list[ManUnit] = []
    skipping = False
    for u in units:
        if u.kind == "SH":
            skipping = u.text.upper() in TRANSLATION_SECTION_TITLES
        if not skipping:
            out.append(u)
    return out


#: Standard section headings and the German headings the translations use for them. Two standard
#: headings at the same position that do not correspond mean the sections of the page are shifted.
STANDARD_HEADINGS: dict[str, frozenset[str]] = {
    "NAME": frozenset({"BEZEICHNUNG", "NAME"}),
    "SYNOPSIS": frozenset({"ÜBERSICHT", "SYNTAX", "SYNOPSIS"}),
    "DESCRIPTION": frozenset({"BESCHREIBUNG"}),
    "OPTIONS": frozenset({"OPTIONEN"}),
    "SEE ALSO": frozenset({"SIEHE AUCH"}),
    "NOTES": frozenset({"ANMERKUNGEN", "FUßNOTEN", "BEMERKUNGEN", "HINWEISE"}),
    "AUTHOR": frozenset({"AUTOR", "AUTOREN"}),
    "AUTHORS": frozenset({"AUTOR", "AUTOREN"}),
    "RETURN VALUE": frozenset({"RÜCKGABEWERT"}),
    "FILES": frozenset({"DATEIEN"}),
    "BUGS": frozenset({"FEHLER", "PROBLEME"}),
    "ERRORS": frozenset({"FEHLER"}),
    "ENVIRONMENT": frozenset({"UMGEBUNGSVARIABLEN", "UMGEBUNG"}),
    "EXAMPLES": frozenset({"BEISPIELE", "BEISPIEL"}),
    "EXAMPLE": frozenset({"BEISPIELE", "BEISPIEL"}),
    "EXIT STATUS": frozenset({"EXIT-STATUS", "RÜCKGABEWERT"}),
    "VERSIONS": frozenset({"VERSIONEN"}),
    "REPORTING BUGS": frozenset({"FEHLER MELDEN"}),
}
_GERMAN_HEADINGS: frozenset[str] = frozenset().union(*STANDARD_HEADINGS.values())


def headings_agree(en: Sequence[ManUnit], de: Sequence[ManUnit]) -> bool:
    """False when the ``.SH`` headings at some position are two :data:`STANDARD_HEADINGS` that do
    not correspond (``NOTES`` against ``BESCHREIBUNG``): the sections are shifted."""
    en_heads = [u.text.upper() for u in en if u.kind == "SH"]
    de_heads = [u.text.upper() for u in de if u.kind == "SH"]
    for e, d in zip(en_heads, de_heads, strict=False):
        if e in STANDARD_HEADINGS and d in _GERMAN_HEADINGS and d not in STANDARD_HEADINGS[e]:
            return False
    return True


_OPTION_RE = re.compile(r"(?<![\w-])--?[A-Za-z0-9][\w-]*")
_NUMBER_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+)*")


def anchors(text: str) -> list[str]:
    """Tokens a translator copies unchanged: command-line options and numbers, sorted."""
    return sorted(_OPTION_RE.findall(text) + _NUMBER_RE.findall(text))


def _sections(units: Sequence[ManUnit]) -> list[list[ManUnit]]:
    out: list[list[ManUnit]] = [[]]
    for u in units:
        if u.kind == "SH":
            out.append([])
        out[-1].append(u)
    return out


@dataclasses.dataclass(frozen=True)
class ManPair:
    """One aligned unit: the page (``group``, e.g. ``coreutils:man1/ls.1``), unit index, texts."""

    page: str
    index: int
    src: str
    tgt: str


@dataclasses.dataclass
class PageAlignment:
    """Pairs of one page and how it was aligned (``full``, ``sections``, ``skipped`` or
    ``heading-mismatch``)."""

    pairs: list[ManPair]
    status: str
    stats: Counter[str]


def align_pages(en_source: str, de_source: str, page: str) -> PageAlignment:
    """Align one English page with its German translation by unit order (unfiltered pairs).

    ``full``: both sides have the same sequence of unit kinds. ``sections``: they do not, but
    they have the same number of ``.SH`` sections; sections with equal kind sequences are aligned.
    ``skipped``: no section could be aligned. ``heading-mismatch``: standard headings at the same
    position do not correspond (see :func:`headings_agree`), so nothing is aligned. Verbatim
    blocks and tables give no pairs; pairs whose :func:`anchors` differ are dropped (counted as
    ``anchor-mismatch``), as are sentence fragments right after a verbatim block (``fragment``).
    """
    en = parse_man(en_source)
    de = strip_translation_section(parse_man(de_source))
    stats: Counter[str] = Counter()
    matched: list[tuple[int, ManUnit, ManUnit]] = []
    if not headings_agree(en, de):
        stats["units-in-unaligned-sections"] += len(en)
        return PageAlignment([], "heading-mismatch", stats)
    if [u.kind for u in en] == [u.kind for u in de]:
        status = "full"
        matched = [(k, a, b) for k, (a, b) in enumerate(zip(en, de, strict=True))]
    else:
        status = "skipped"
        en_secs, de_secs = _sections(en), _sections(de)
        if len(en_secs) == len(de_secs):
            offset = 0
            for es, ds in zip(en_secs, de_secs, strict=True):
                if [u.kind for u in es] == [u.kind for u in ds]:
                    status = "sections"
                    matched.extend((offset + k, a, b) for k, (a, b) in enumerate(zip(es, ds, strict=True)))
                else:
                    stats["units-in-unaligned-sections"] += len(es)
                offset += len(es)
        else:
            stats["units-in-unaligned-sections"] += len(en)
    pairs: list[ManPair] = []
    for k, a, b in matched:
        if a.kind in _VERBATIM_KINDS:
            stats["verbatim"] += 1
            continue
        if k > 0 and en[k - 1].kind in _VERBATIM_KINDS and (a.text[:1].islower() or b.text[:1].islower()):
            # A sentence continued after an example: translators move words across the example.
            stats["fragment"] += 1
            continue
        if anchors(a.text) != anchors(b.text):
            stats["anchor-mismatch"] += 1
            continue
        pairs.append(ManPair(page, k, a.text, b.text))
    return PageAlignment(pairs, status, stats)


def read_page(path: Path) -> str:
    """Text of a (possibly gzip-compressed) man page; UTF-8, falling back to Latin-1."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def is_redirect(source: str) -> bool:
    """True for a page that only includes another (``.so man8/halt.8``) and has no text itself."""
    lines = [ln for ln in source.splitlines() if ln.strip() and not ln.startswith(('.\\"', "'\\\""))]
    return len(lines) <= 2 and any(ln.startswith(".so ") for ln in lines)


def page_files(tree: Path, lang: str | None = None) -> dict[str, Path]:
    """``{"man1/ls.1": path}`` for the man pages of an unpacked package, sections :data:`MAN_SECTIONS`.

    ``lang=None`` gives the English pages (``usr/share/man/manN``), ``lang="de"`` the German ones
    (``usr/share/man/de/manN``). Symbolic links are left out (they duplicate another page).
    """
    base = tree / "usr" / "share" / "man" / (lang or "")
    out: dict[str, Path] = {}
    for section in MAN_SECTIONS:
        folder = base / f"man{section}"
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_symlink() or not path.is_file():
                continue
            name = path.name[:-3] if path.name.endswith(".gz") else path.name
            out[f"man{section}/{name}"] = path
    return out


@dataclasses.dataclass
class ManCorpus:
    """Aligned, filtered pairs, the alignment statistics, and the English (``page_package``) and
    German (``page_translation``) package of each aligned page."""

    pairs: list[ManPair]
    stats: Counter[str]
    page_package: dict[str, str]
    page_translation: dict[str, str] = dataclasses.field(default_factory=dict)


def is_mdoc(source: str) -> bool:
    """True for a BSD ``mdoc`` page (``.Dd``/``.Nm``/``.Sh`` macros); its text lives in macros this
    parser does not read, so such pages are skipped."""
    return re.search(r"^\.(?:Dd|Sh|Nm)\b", source, re.M) is not None


def align_trees(
    en_trees: Iterable[tuple[str, Path]],
    de_trees: Iterable[tuple[str, Path]],
    config: FilterConfig = DEFAULT_FILTER,
) -> ManCorpus:
    """Align every German page with the English page of the same name and filter the pairs.

    ``en_trees`` and ``de_trees`` are ``(package name, unpacked tree)``. The English original of a
    German page is looked up first in the German page's own package (programs such as ``dpkg``
    ship their translations themselves), then in ``en_trees`` in order (the first package with a
    page of that name wins). A German page name seen before (in an earlier tree) is skipped, as is a
    page without an English original, a page that only includes another (``.so``) and an ``mdoc``
    page; each is counted. The page key (split unit) is ``"<English package>:<manN/name>"``. Pairs
    are filtered with :func:`~corpora.clean.filter_reason`; duplicates are kept (the split
    decides).
    """
    trees = dict(en_trees)
    english: dict[str, tuple[str, Path]] = {}
    for pkg, tree in trees.items():
        for rel, path in page_files(tree).items():
            english.setdefault(rel, (pkg, path))
    stats: Counter[str] = Counter()
    pairs: list[ManPair] = []
    page_package: dict[str, str] = {}
    page_translation: dict[str, str] = {}
    seen: set[str] = set()
    for de_pkg, tree in de_trees:
        own = page_files(tree)
        for rel, de_path in page_files(tree, "de").items():
            if rel in seen:
                stats["page-duplicate"] += 1
                continue
            seen.add(rel)
            de_source = read_page(de_path)
            if is_redirect(de_source):
                stats["page-redirect"] += 1
                continue
            if rel in own:
                pkg, en_path = de_pkg, own[rel]
            elif rel in english:
                pkg, en_path = english[rel]
            else:
                stats["page-no-english"] += 1
                continue
            en_source = read_page(en_path)
            if is_redirect(en_source):
                stats["page-redirect"] += 1
                continue
            if is_mdoc(en_source) or is_mdoc(de_source):
                stats["page-mdoc"] += 1
                continue
            page = f"{pkg}:{rel}"
            result = align_pages(en_source, de_source, page)
            stats[f"page-{result.status}"] += 1
            stats.update(result.stats)
            if result.status not in ("full", "sections"):
                continue
            page_package[page] = pkg
            page_translation[page] = de_pkg
            for pair in result.pairs:
                src, tgt = collapse_whitespace(pair.src), collapse_whitespace(pair.tgt)
                reason = filter_reason(src, tgt, config)
                if reason is not None:
                    stats[reason] += 1
                    continue
                stats["kept"] += 1
                pairs.append(dataclasses.replace(pair, src=src, tgt=tgt))
    log.info("man page alignment: %d pairs kept (%s)", stats["kept"], dict(stats))
    return ManCorpus(pairs, stats, page_package, page_translation)
