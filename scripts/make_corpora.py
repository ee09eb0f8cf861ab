#!/usr/bin/env python3
"""Build the English→German corpora from Debian packages.

    python scripts/make_corpora.py --out data

writes ``data/target/{train,dev,test}.tsv`` (LibreOffice help, the kNN datastore domain),
``data/general/{train,dev,test}.tsv`` (UI message catalogs, for the base model),
``data/manpages/{train,dev,test}.tsv`` (manual pages, a second target domain) and
``data/README.md``; ``--domains`` builds a subset (the README is then left as it is).
Needs ``apt-get`` and ``dpkg-deb`` (Debian/Ubuntu) and access to a Debian
mirror; downloaded packages are cached, so a rerun needs no network. See ``data/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from corpora.build import DOMAINS, build_all  # scripts/corpora, beside this script
from corpora.debian import have_tools


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/knnmt/debian`` (``~/.cache/knnmt/debian`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "knnmt" / "debian"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the corpora, print a summary; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data"), help="output directory (default: data)")
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="where .deb files are downloaded and unpacked (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel downloads/unpacks (default: 2)")
    ap.add_argument("--domains", default=",".join(DOMAINS),
                    help="comma-separated corpora to build (default: %(default)s); manpages needs"
                         " target and general, built in the same run or already in --out")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every package")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not have_tools():
        print("error: apt-get and dpkg-deb are required (a Debian-based system)", file=sys.stderr)
        return 2
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown or not domains:
        print(f"error: --domains takes a comma-separated subset of {','.join(DOMAINS)}"
              f" (got {args.domains!r})", file=sys.stderr)
        return 2
    try:
        report = build_all(args.out, args.cache, jobs=args.jobs, domains=domains)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    g, t, m = report.general_counts, report.target_counts, report.manpages_counts
    if "general" in domains:
        print(f"general: {len(report.general_packages)} packages, {g['unique']:,} unique pairs -> "
              f"train {g['train']:,} / dev {g['dev']:,} / test {g['test']:,}")
    if "target" in domains:
        print(f"target:  {t['unique']:,} unique aligned pairs -> "
              f"train {t['train']:,} / dev {t['dev']:,} / test {t['test']:,}")
    if "manpages" in domains:
        print(f"manpages: {m['pages']:,} pages, {m['unique']:,} unique aligned pairs -> "
              f"train {m['train']:,} / dev {m['dev']:,} / test {m['test']:,}")
    if report.skipped_packages:
        print(f"skipped packages: {', '.join(n for n, _ in report.skipped_packages)}")
    written = ", ".join(f"{args.out}/{d}" for d in report.domains)
    readme = f" and {args.out}/README.md" if set(DOMAINS) <= set(domains) else " (README.md not rewritten)"
    print(f"wrote {written}{readme} in {report.seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
