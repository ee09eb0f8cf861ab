"""Fetch Debian binary packages and unpack them into a cache, without installing anything.

``apt-get download NAME`` fetches the ``.deb`` of the candidate version into the cache, and
``dpkg-deb -x`` unpacks its file tree next to it. Package metadata (version, section, source) is
read from the control file with ``dpkg-deb -f``; the licence summary comes from
``/usr/share/doc/<pkg>/copyright`` of the unpacked tree. A package already in the cache is reused,
so a second run needs no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

_LICENSE_LINE_RE = re.compile(r"^License:\s*(\S.*?)\s*$", re.M | re.I)
#: (regular expression, short name) pairs for copyright files that are not machine-readable.
_LICENCE_HINTS: tuple[tuple[str, str], ...] = (
    (r"GNU (?:Library|Lesser) General Public License|\bLGPL\b", "LGPL"),
    (r"GNU Affero General Public License|\bAGPL\b", "AGPL"),
    (r"GNU General Public License|\bGPL\b", "GPL"),
    (r"Mozilla Public License", "MPL"),
    (r"Apache License", "Apache"),
    (r"\bBSD\b", "BSD"),
    (r"\bMIT\b|Permission is hereby granted, free of charge", "MIT/Expat"),
    (r"Artistic License", "Artistic"),
    (r"PostgreSQL", "PostgreSQL"),
    (r"public domain", "public-domain"),
)


class DebianError(RuntimeError):
    """A package could not be downloaded or unpacked."""


@dataclasses.dataclass(frozen=True)
class DebPackage:
    """A downloaded and unpacked binary package."""

    name: str
    version: str
    section: str
    source: str
    licence: str
    deb_path: Path
    root: Path
    sha256: str

    def files(self, pattern: str) -> list[Path]:
        """Files of the unpacked tree matching a glob ``pattern`` (relative to the root), sorted."""
        return sorted(p for p in self.root.glob(pattern) if p.is_file())


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DebianError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def have_tools() -> bool:
    """True when ``apt-get`` and ``dpkg-deb`` are on PATH."""
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


def _find_deb(deb_dir: Path, name: str) -> Path | None:
    found = sorted(deb_dir.glob(f"{name}_*.deb"))
    return found[-1] if found else None


def download_deb(name: str, deb_dir: Path, refresh: bool = False) -> Path:
    """Download the candidate ``.deb`` of ``name`` into ``deb_dir`` (reused if already there)."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    existing = _find_deb(deb_dir, name)
    if existing is not None and not refresh:
        return existing
    # apt drops privileges to _apt when it can; downloading as root into a root-owned cache
    # only triggers a warning, which this option silences.
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", name], cwd=deb_dir)
    found = _find_deb(deb_dir, name)
    if found is None:
        raise DebianError(f"apt-get download {name} produced no .deb in {deb_dir}")
    return found


def control_fields(deb: Path) -> dict[str, str]:
    """Selected control fields (Package, Version, Section, Source) of a ``.deb``."""
    out = _run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Section", "Source"])
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _is_short_name(text: str) -> bool:
    """True for DEP-5 short names (``GPL-2+``, ``BSD-3-clause``, ``GPL-2+ with OpenSSL exception``),
    false for prose that old-style copyright files put after ``License:``."""
    return (
        bool(text)
        and len(text.split()) <= 4
        and not re.search(r"[;:]", text)
        and not text[0].islower()
        and not re.match(r"(?:This|These|The|You|It)\b", text)
    )


def summarise_licence(copyright_text: str) -> str:
    """Short licence summary of a Debian copyright file.

    For machine-readable (DEP-5) files this is the distinct ``License:`` short names in order of
    appearance; otherwise, names guessed from well-known licence titles. ``unknown`` if neither.
    """
    names: list[str] = []
    for m in _LICENSE_LINE_RE.finditer(copyright_text):
        for part in re.split(r"\s+(?:or|and)\s+|\s*,\s*", m.group(1)):
            part = part.strip()
            if _is_short_name(part) and part not in names:
                names.append(part)
    if not names:
        for pattern, short in _LICENCE_HINTS:
            if re.search(pattern, copyright_text, re.I) and short not in names:
                names.append(short)
    return ", ".join(names) if names else "unknown"


def read_licence(root: Path, name: str) -> str:
    """Licence summary from ``usr/share/doc/<name>/copyright`` of an unpacked tree.

    Many ``-data``/``-common`` packages symlink their doc dir to the main package's; a dangling
    link (the target lives in another package) gives ``see <target package>``.
    """
    doc = root / "usr" / "share" / "doc" / name
    copyright_file = doc / "copyright"
    if copyright_file.is_file():
        return summarise_licence(copyright_file.read_text(encoding="utf-8", errors="replace"))
    if doc.is_symlink():
        return f"see {Path(str(doc.readlink())).name}"
    return "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_package(name: str, cache_dir: str | Path, refresh: bool = False) -> DebPackage:
    """Download (``apt-get download``) and unpack (``dpkg-deb -x``) one package into ``cache_dir``.

    Layout: ``cache_dir/debs/NAME_VERSION_ARCH.deb`` and ``cache_dir/tree/NAME_VERSION/``. Nothing
    is installed. Raises :class:`DebianError` when apt or dpkg fail.
    """
    cache = Path(cache_dir)
    deb = download_deb(name, cache / "debs", refresh=refresh)
    fields = control_fields(deb)
    version = fields.get("Version", "unknown")
    safe_version = version.replace(":", "%3a")
    root = cache / "tree" / f"{name}_{safe_version}"
    marker = root / ".unpacked"
    if not marker.exists():
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        marker.touch()
    source = fields.get("Source", name).split(" ")[0] or name
    pkg = DebPackage(
        name=fields.get("Package", name),
        version=version,
        section=fields.get("Section", "unknown"),
        source=source,
        licence=read_licence(root, name),
        deb_path=deb,
        root=root,
        sha256=_sha256(deb),
    )
    log.info("package %s %s (%s, %s)", pkg.name, pkg.version, pkg.section, pkg.licence)
    return pkg
