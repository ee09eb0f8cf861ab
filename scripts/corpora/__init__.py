"""English→German corpora from real software translations shipped in Debian packages.

Tooling for the example corpora bundled in ``data/`` (run by ``scripts/make_corpora.py``), not part of
the installed ``knnmt`` package; it imports nothing of knnmt (standard library only).

* :mod:`~corpora.debian` — ``apt-get download`` + ``dpkg-deb -x`` into a cache, with provenance
* :mod:`~corpora.gettext_mo` — ``.mo`` catalog parser and pair extraction
* :mod:`~corpora.lo_help` — LibreOffice help aligner (English vs German HTML by element id)
* :mod:`~corpora.manpages` — man-page aligner (English vs German roff pages, unit by unit)
* :mod:`~corpora.clean` — normalisation and filters shared by all
* :mod:`~corpora.split` — deterministic hash-based split by group
* :mod:`~corpora.sources` — package lists and the held-out (games/education/science) exclusions
* :mod:`~corpora.build` — the pipeline behind ``scripts/make_corpora.py``
"""

from __future__ import annotations

from .clean import FilterConfig, filter_reason, normalise, strip_accelerators
from .gettext_mo import MoEntry, MoFormatError, extract_pairs, parse_mo, read_mo
from .lo_help import HelpPair, align_help_files, align_help_trees, parse_help_html
from .split import split_by_group, stable_hash

__all__ = [
    "FilterConfig",
    "HelpPair",
    "MoEntry",
    "MoFormatError",
    "align_help_files",
    "align_help_trees",
    "extract_pairs",
    "filter_reason",
    "normalise",
    "parse_help_html",
    "parse_mo",
    "read_mo",
    "split_by_group",
    "stable_hash",
    "strip_accelerators",
]
