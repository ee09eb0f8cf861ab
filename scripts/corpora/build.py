"""Build the general-domain, target-domain (LibreOffice help) and man-page corpora from Debian packages.

This is the library side of ``scripts/make_corpora.py``: it downloads the packages listed in
:mod:`corpora.sources` (see :mod:`corpora.debian`), extracts and filters pairs, splits them
deterministically and writes ``src<TAB>tgt`` files plus ``README.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .clean import DEFAULT_FILTER, FilterConfig, detect_accelerator_markers
from .debian import DebianError, DebPackage, fetch_package
from .gettext_mo import CatalogPairs, MoEntry, MoFormatError, extract_pairs, parse_mo, raw_pairs
from .lo_help import HelpPair, align_help_trees, help_root
from .manpages import ManPair, align_trees
from .sources import (
    GENERAL_PACKAGES,
    HELP_PACKAGES,
    MANPAGES_DE_PACKAGES,
    MANPAGES_EN_PACKAGES,
    exclusion_reason,
    manpages_package_names,
)
from .split import GroupSplit, dedupe_by, split_by_group

log = logging.getLogger(__name__)

LANG = "de"
#: Catalogs that are lists of names (languages, countries, currencies), not UI text.
_NAME_LIST_CATALOG_RE = re.compile(r"^iso[-_]?\d+|^iso_|^iso639|^iso3166|^iso4217|^iso15924")
_MO_IN_ZIP_RE = re.compile(rf"(?:^|/){LANG}/(?:LC_MESSAGES/)?([^/]+)\.mo$")
_GROUP_VERSION_RE = re.compile(r"(?:-\d+(?:\.\d+)*)+$")

GENERAL_SIZES: tuple[tuple[str, int], ...] = (("test", 1000), ("dev", 1000))
TARGET_SIZES: tuple[tuple[str, int], ...] = (("test", 1000), ("dev", 500))
#: At most this many pairs of one held-out catalog group go into a general dev/test set.
GENERAL_MAX_PER_GROUP = 200
#: Groups (source packages) larger than this are never held out of general train.
GENERAL_MAX_GROUP_SIZE = 5000
#: At most this many pairs of one held-out help file go into a target dev/test set.
TARGET_MAX_PER_FILE = 40
MANPAGES_SIZES: tuple[tuple[str, int], ...] = (("test", 1000), ("dev", 500))
#: At most this many pairs of one held-out man page go into a man-page dev/test set.
MANPAGES_MAX_PER_PAGE = 25
#: The corpora ``build_all`` can build, in build order.
DOMAINS: tuple[str, ...] = ("target", "general", "manpages")


@dataclasses.dataclass(frozen=True)
class Pair:
    """A clean sentence pair and the split unit (``group``) and origin it came from."""

    src: str
    tgt: str
    group: str
    origin: str


@dataclasses.dataclass
class PackageRecord:
    """Provenance of one package used for a corpus."""

    name: str
    version: str
    section: str
    source: str
    licence: str
    category: str
    sha256: str
    catalogs: int = 0
    pairs: int = 0


@dataclasses.dataclass
class BuildReport:
    """Everything the README needs: provenance, filter tallies, split sizes and timings."""

    general_packages: list[PackageRecord] = dataclasses.field(default_factory=list)
    skipped_packages: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    help_packages: list[PackageRecord] = dataclasses.field(default_factory=list)
    general_filter: Counter[str] = dataclasses.field(default_factory=Counter)
    help_filter: Counter[str] = dataclasses.field(default_factory=Counter)
    general_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    target_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    general_heldout_groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    manpages_packages: list[PackageRecord] = dataclasses.field(default_factory=list)
    manpages_skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    manpages_filter: Counter[str] = dataclasses.field(default_factory=Counter)
    manpages_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    manpages_heldout_pages: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    domains: tuple[str, ...] = DOMAINS
    seconds: float = 0.0


def split_group(source_package: str) -> str:
    """Split unit of a package: its Debian source name without a trailing version number.

    ``gcc-12`` and ``gcc-11`` both become ``gcc``, ``postgresql-15`` becomes ``postgresql``, so
    two versions of one catalog can never end up on both sides of a split.
    """
    stripped = _GROUP_VERSION_RE.sub("", source_package)
    return stripped or source_package


def find_catalogs(pkg: DebPackage, lang: str = LANG) -> list[tuple[str, bytes]]:
    """``(name, .mo bytes)`` for every ``lang`` catalog in an unpacked package.

    Looks for ``.../<lang>/LC_MESSAGES/*.mo`` files and for ``<lang>/*.mo`` members of zip archives
    (calibre ships its catalogs in ``locales.zip``). Name-list catalogs (``iso639`` …) are skipped.
    """
    found: list[tuple[str, bytes]] = []
    for path in sorted(pkg.root.rglob("*.mo")):
        in_lang_dir = path.parent.name == "LC_MESSAGES" and path.parent.parent.name == lang
        if in_lang_dir and path.is_file() and not _NAME_LIST_CATALOG_RE.search(path.stem):
            found.append((path.relative_to(pkg.root).as_posix(), path.read_bytes()))
    for path in sorted(pkg.root.rglob("*.zip")):
        try:
            with zipfile.ZipFile(path) as zf:
                for member in sorted(zf.namelist()):
                    m = _MO_IN_ZIP_RE.search(member)
                    if m and not _NAME_LIST_CATALOG_RE.search(m.group(1)):
                        found.append((f"{path.relative_to(pkg.root).as_posix()}!{member}", zf.read(member)))
        except (zipfile.BadZipFile, OSError) as exc:
            log.warning("%s: cannot read zip %s: %s", pkg.name, path, exc)
    return found


def _fetch_all(names: Sequence[str], cache: Path, jobs: int) -> dict[str, DebPackage | Exception]:
    def one(name: str) -> DebPackage | Exception:
        try:
            return fetch_package(name, cache)
        except DebianError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def _record(pkg: DebPackage, category: str) -> PackageRecord:
    return PackageRecord(pkg.name, pkg.version, pkg.section, pkg.source, pkg.licence, category, pkg.sha256)


def collect_general(
    cache: Path,
    report: BuildReport,
    config: FilterConfig = DEFAULT_FILTER,
    packages: dict[str, tuple[str, ...]] = GENERAL_PACKAGES,
    jobs: int = 2,
) -> list[Pair]:
    """Download the general-domain packages and extract clean pairs from their catalogs.

    Packages excluded by name or by their real Debian section are skipped (and reported), as are
    packages that fail to download. Pairs are in package-list order, not yet deduplicated.
    """
    wanted: list[tuple[str, str]] = []
    for category, names in packages.items():
        for name in names:
            reason = exclusion_reason(name)
            if reason:
                report.skipped_packages.append((name, reason))
            elif name not in [n for n, _ in wanted]:
                wanted.append((name, category))
    fetched = _fetch_all([n for n, _ in wanted], cache, jobs)
    pairs: list[Pair] = []
    for name, category in wanted:
        pkg = fetched[name]
        if isinstance(pkg, Exception):
            log.warning("skipping %s: %s", name, pkg)
            report.skipped_packages.append((name, f"download failed: {pkg}"))
            continue
        reason = exclusion_reason(pkg.name, pkg.section)
        if reason:
            log.warning("skipping %s: %s", name, reason)
            report.skipped_packages.append((name, reason))
            continue
        record = _record(pkg, category)
        group = split_group(pkg.source)
        parsed: list[tuple[str, list[MoEntry]]] = []
        for cat_name, data in find_catalogs(pkg):
            try:
                parsed.append((cat_name, parse_mo(data)[1]))
            except MoFormatError as exc:
                log.warning("%s: %s: %s", name, cat_name, exc)
        # Accelerator style is a property of the toolkit, so evidence is pooled over the package
        # (small catalogs rarely have enough on their own).
        package_markers = detect_accelerator_markers(p for _, entries in parsed for p in raw_pairs(entries))
        for cat_name, entries in parsed:
            result: CatalogPairs = extract_pairs(entries, config, extra_markers=package_markers)
            report.general_filter.update(result.stats)
            record.catalogs += 1
            record.pairs += len(result.pairs)
            origin = f"{pkg.name}:{cat_name}"
            pairs.extend(Pair(s, t, group, origin) for s, t in result.pairs)
        if record.catalogs == 0:
            log.warning("%s has no %s catalogs", name, LANG)
            report.skipped_packages.append((name, f"no {LANG} catalogs"))
            continue
        report.general_packages.append(record)
    return pairs


def split_general(
    pairs: Sequence[Pair], blocked_sources: Iterable[str], report: BuildReport
) -> GroupSplit[Pair]:
    """Deduplicate the general pairs and split them by source-package group.

    Pairs whose source sentence (case-folded) is in ``blocked_sources`` (the target dev/test
    sources) are removed first. Held-out (dev/test) pairs must have a source sentence that occurs in
    no other group, so common strings such as ``Cancel`` never sit on both sides of the split.
    """
    key_groups: dict[str, set[str]] = {}
    for p in pairs:
        key_groups.setdefault(p.src.casefold(), set()).add(p.group)
    unique = dedupe_by(pairs, lambda p: (p.src, p.tgt))
    report.general_counts["extracted"] = len(pairs)
    report.general_counts["unique"] = len(unique)
    blocked = set(blocked_sources)
    kept = [p for p in unique if p.src.casefold() not in blocked]
    report.general_counts["removed-target-heldout-overlap"] = len(unique) - len(kept)
    result = split_by_group(
        kept,
        group_of=lambda p: p.group,
        sizes=GENERAL_SIZES,
        key_of=lambda p: p.src.casefold(),
        max_per_group=GENERAL_MAX_PER_GROUP,
        max_group_size=GENERAL_MAX_GROUP_SIZE,
        eligible=lambda p: len(key_groups[p.src.casefold()]) == 1,
    )
    for name, items in result.splits.items():
        report.general_counts[name] = len(items)
    report.general_counts["discarded-heldout-groups"] = len(result.discarded)
    report.general_heldout_groups = result.groups
    return result


def build_target(
    cache: Path, report: BuildReport, config: FilterConfig = DEFAULT_FILTER
) -> GroupSplit[HelpPair]:
    """Align the LibreOffice help (en-US vs de) and split it by help file.

    Dev/test take whole files (at most :data:`TARGET_MAX_PER_FILE` pairs of each, one pair per
    source sentence). Train is every other file's pairs, deduplicated, minus any pair whose source
    sentence (case-folded) occurs in dev or test, so the datastore never holds a test sentence.
    """
    roots: dict[str, Path] = {}
    for lang, name in HELP_PACKAGES.items():
        pkg = fetch_package(name, cache)
        report.help_packages.append(_record(pkg, "target"))
        roots[lang] = help_root(pkg.root, lang)
    corpus = align_help_trees(roots["en-US"], roots["de"], config)
    report.help_filter.update(corpus.stats)
    report.target_counts["aligned"] = len(corpus.pairs)
    report.target_counts["unique"] = len({(p.src, p.tgt) for p in corpus.pairs})
    result = split_by_group(
        corpus.pairs,
        group_of=lambda p: p.file,
        sizes=TARGET_SIZES,
        key_of=lambda p: p.src.casefold(),
        max_per_group=TARGET_MAX_PER_FILE,
    )
    heldout = {p.src.casefold() for name, _ in TARGET_SIZES for p in result.splits[name]}
    train = dedupe_by(result.splits["train"], lambda p: (p.src, p.tgt))
    report.target_counts["train-duplicates"] = len(result.splits["train"]) - len(train)
    clean_train = [p for p in train if p.src.casefold() not in heldout]
    report.target_counts["train-removed-heldout-overlap"] = len(train) - len(clean_train)
    result.splits["train"] = clean_train
    for name, items in result.splits.items():
        report.target_counts[name] = len(items)
    report.target_counts["discarded-heldout-files"] = len(result.discarded)
    report.target_counts["heldout-files-test"] = len(result.groups["test"])
    report.target_counts["heldout-files-dev"] = len(result.groups["dev"])
    return result


def build_manpages(
    cache: Path,
    report: BuildReport,
    other_sources: Iterable[str],
    config: FilterConfig = DEFAULT_FILTER,
    jobs: int = 2,
) -> GroupSplit[ManPair]:
    """Align English and German manual pages (:mod:`corpora.manpages`) and split them by page.

    Packages excluded by name or by their real Debian section are skipped (and reported).
    ``other_sources`` are the case-folded source sentences of the other corpora (general and
    target, all splits): dev/test take only pairs whose source is not among them, and train drops
    them too, so no sentence of another corpus's dev/test can sit in a man-page memory. Dev/test
    take whole pages (at most :data:`MANPAGES_MAX_PER_PAGE` pairs of each, one pair per source
    sentence); train is every other page's pairs, deduplicated, minus any pair whose source
    sentence occurs in dev or test.

    Raises:
        DebianError: when a package of the list cannot be downloaded.
    """
    wanted: list[str] = []
    for name in manpages_package_names():
        reason = exclusion_reason(name)
        if reason:
            report.manpages_skipped.append((name, reason))
        else:
            wanted.append(name)
    fetched = _fetch_all(wanted, cache, jobs)
    trees: dict[str, Path] = {}
    records: dict[str, PackageRecord] = {}
    for name in wanted:
        pkg = fetched[name]
        if isinstance(pkg, Exception):
            raise pkg
        reason = exclusion_reason(pkg.name, pkg.section)
        if reason:
            log.warning("skipping %s: %s", name, reason)
            report.manpages_skipped.append((name, reason))
            continue
        trees[name] = pkg.root
        if name not in MANPAGES_DE_PACKAGES:
            category = "English pages"
        elif name.startswith("manpages-de"):
            category = "German pages"
        else:
            category = "German and English pages"
        records[name] = _record(pkg, category)
    corpus = align_trees(
        [(n, trees[n]) for n in MANPAGES_EN_PACKAGES if n in trees],
        [(n, trees[n]) for n in MANPAGES_DE_PACKAGES if n in trees],
        config,
    )
    report.manpages_filter.update(corpus.stats)
    # For man pages, ``catalogs`` counts the aligned pages a package holds (either language).
    page_packages = {
        page: sorted({en, corpus.page_translation[page]})
        for page, en in corpus.page_package.items()
    }
    for names in page_packages.values():
        for pkg_name in names:
            records[pkg_name].catalogs += 1
    for pair in corpus.pairs:
        for pkg_name in page_packages[pair.page]:
            records[pkg_name].pairs += 1
    report.manpages_packages = [r for r in records.values() if r.catalogs]
    report.manpages_skipped.extend((n, "no aligned page") for n, r in records.items() if not r.catalogs)
    report.manpages_counts["pages"] = len(corpus.page_package)
    return split_manpages(corpus.pairs, other_sources, report)


def split_manpages(
    pairs: Sequence[ManPair], other_sources: Iterable[str], report: BuildReport
) -> GroupSplit[ManPair]:
    """Split aligned man-page pairs by page (the split half of :func:`build_manpages`).

    ``other_sources`` are case-folded source sentences of the other corpora: no dev/test pair and
    no train pair may have one as its source. Counts go to ``report.manpages_counts``.
    """
    report.manpages_counts["aligned"] = len(pairs)
    report.manpages_counts["unique"] = len({(p.src, p.tgt) for p in pairs})
    blocked = set(other_sources)
    result = split_by_group(
        pairs,
        group_of=lambda p: p.page,
        sizes=MANPAGES_SIZES,
        key_of=lambda p: p.src.casefold(),
        max_per_group=MANPAGES_MAX_PER_PAGE,
        eligible=lambda p: p.src.casefold() not in blocked,
    )
    heldout = {p.src.casefold() for name, _ in MANPAGES_SIZES for p in result.splits[name]}
    train = dedupe_by(result.splits["train"], lambda p: (p.src, p.tgt))
    report.manpages_counts["train-duplicates"] = len(result.splits["train"]) - len(train)
    no_heldout = [p for p in train if p.src.casefold() not in heldout]
    report.manpages_counts["train-removed-heldout-overlap"] = len(train) - len(no_heldout)
    clean_train = [p for p in no_heldout if p.src.casefold() not in blocked]
    report.manpages_counts["train-removed-other-corpora"] = len(no_heldout) - len(clean_train)
    result.splits["train"] = clean_train
    for name, items in result.splits.items():
        report.manpages_counts[name] = len(items)
    report.manpages_counts["discarded-heldout-pages"] = len(result.discarded)
    report.manpages_heldout_pages = result.groups
    return result


def read_tsv_sources(path: Path) -> set[str]:
    """Case-folded source sentences of a ``src<TAB>tgt`` file.

    Raises:
        FileNotFoundError: with a hint to build that corpus first.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the man-page corpus is filtered against the general and target"
            " corpora, so build them first (make_corpora.py --domains target,general,manpages)"
        )
    with path.open(encoding="utf-8") as fh:
        return {line.split("\t", 1)[0].casefold() for line in fh if line.strip()}


def write_tsv(path: Path, pairs: Iterable[tuple[str, str]]) -> int:
    """Write ``src<TAB>tgt`` lines (UTF-8, ``\\n``); returns the number of lines.

    Raises:
        ValueError: if a field is empty or holds a tab or newline (normalisation should prevent it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for src, tgt in pairs:
            for field in (src, tgt):
                if not field or "\t" in field or "\n" in field or "\r" in field:
                    raise ValueError(f"bad field for TSV: {field!r}")
            fh.write(f"{src}\t{tgt}\n")
            n += 1
    log.info("wrote %d pairs to %s", n, path)
    return n


def build_all(
    out_dir: str | Path,
    cache_dir: str | Path,
    jobs: int = 2,
    config: FilterConfig = DEFAULT_FILTER,
    domains: Sequence[str] = DOMAINS,
) -> BuildReport:
    """Build the corpora named in ``domains`` under ``out_dir`` (``target/``, ``general/``,
    ``manpages/``); ``README.md`` is written only when all of :data:`DOMAINS` are built.

    The man-page corpus needs the source sentences of the general and target corpora; those not
    built in the same run are read from ``out_dir``.

    Raises:
        ValueError: for an unknown domain name.
    """
    from .readme import render_readme

    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown corpus {', '.join(unknown)}; choose from {', '.join(DOMAINS)}")
    start = time.monotonic()
    out, cache = Path(out_dir), Path(cache_dir)
    report = BuildReport(domains=tuple(d for d in DOMAINS if d in domains))
    other_sources: set[str] = set()
    if "target" in domains:
        target = build_target(cache, report, config)
        for name, help_items in target.splits.items():
            write_tsv(out / "target" / f"{name}.tsv", ((p.src, p.tgt) for p in help_items))
        blocked = {p.src.casefold() for name, _ in TARGET_SIZES for p in target.splits[name]}
        other_sources |= {p.src.casefold() for items in target.splits.values() for p in items}
    elif "general" in domains:
        blocked = set()
        for name, _ in TARGET_SIZES:
            blocked |= read_tsv_sources(out / "target" / f"{name}.tsv")

    if "general" in domains:
        general_pairs = collect_general(cache, report, config, jobs=jobs)
        general = split_general(general_pairs, blocked, report)
        for name, items in general.splits.items():
            write_tsv(out / "general" / f"{name}.tsv", ((p.src, p.tgt) for p in items))
        other_sources |= {p.src.casefold() for items in general.splits.values() for p in items}

    if "manpages" in domains:
        for corpus in ("target", "general"):
            if corpus not in domains:
                for name in ("train", "dev", "test"):
                    other_sources |= read_tsv_sources(out / corpus / f"{name}.tsv")
        manpages = build_manpages(cache, report, other_sources, config, jobs=jobs)
        for name, man_items in manpages.splits.items():
            write_tsv(out / "manpages" / f"{name}.tsv", ((p.src, p.tgt) for p in man_items))
    report.seconds = time.monotonic() - start
    if set(DOMAINS) <= set(domains):
        (out / "README.md").write_text(render_readme(report, config), encoding="utf-8")
    return report
