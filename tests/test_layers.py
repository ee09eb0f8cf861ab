"""The package's layers: each module belongs to the layer named by its folder, and no module imports a
higher layer (issue 17).

    0 core/      errors, configuration, version
    1 store/     corpus reading, the datastore format, the write lock
    1 knn/       the kNN distribution and its interpolation (pure torch)
    2 search/    retrievers, faiss indexes, Subset kNN-MT (PQ, sentence search); knows no model
    3 hf/        the only code that knows transformers: registry, capture, teacher forcing, processor
    4 pipeline/  datastore build, the KNNMT front door, domain gate, tuning, evaluation
    5 apps/      command line, HTTP service, demo
    6 knnmt/__init__.py: the public names only (the top: nothing inside the package imports it)

A module may import its own layer and the layers below. Every import counts: at module level, inside
functions (lazy imports) and under ``if TYPE_CHECKING:`` alike. A type-only import from a higher layer
is still a dependency on its design, so it is not allowed either: pass a ``Protocol`` or a callable
down instead (e.g. :class:`knnmt.search.sentence_search.SourceEmbedder`).

No module imports another's private names either (``from X import _name``; issue 17): what two
modules share is public, documented API of one of them.

The checks read the source with :mod:`ast` (nothing is imported), so they also cover code paths the
other tests do not run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "knnmt"

#: folder directly under ``knnmt/`` -> layer (same number: the layers may import each other)
LAYERS: dict[str, int] = {
    "core": 0,
    "store": 1,
    "knn": 1,
    "search": 2,
    "hf": 3,
    "pipeline": 4,
    "apps": 5,
}
TOP = max(LAYERS.values()) + 1  # ``knnmt/__init__.py``


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name under ``knnmt`` (``None``: in no known layer)."""
    parts = module.split(".")
    if parts[0] != "knnmt":
        return None
    if len(parts) == 1:
        return TOP
    return LAYERS.get(parts[1])


def layer_name(layer: int | None) -> str:
    if layer == TOP:
        return "the package root"
    names = [name for name, number in LAYERS.items() if number == layer]
    return f"layer {layer} ({'/'.join(names)})" if names else "no layer"


def module_name(path: Path) -> tuple[str, bool]:
    """``(dotted name, is a package __init__)`` of a file under ``src/``."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def knnmt_imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import of knnmt in ``source`` (the text of ``module``).

    Relative imports are resolved against ``module``; ``from X import name`` counts as importing ``X``
    (a submodule ``X.name`` is in the same folder, hence the same layer, except for ``from knnmt
    import ...``, which imports the package root). Imports in functions and ``TYPE_CHECKING`` blocks
    count too (``ast.walk`` visits every node).
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            found += [(node.lineno, name) for name in names if name.split(".")[0] == "knnmt"]
        elif isinstance(node, ast.ImportFrom):
            target = import_source(node, module, is_package)
            if target.split(".")[0] == "knnmt":
                found.append((node.lineno, target))
    return found


def import_source(node: ast.ImportFrom, module: str, is_package: bool = False) -> str:
    """The absolute module ``node`` (in ``module``) imports from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(package):
        raise ValueError(f"{module}:{node.lineno}: relative import beyond the top-level package")
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + (node.module.split(".") if node.module else []))


def is_private(name: str) -> bool:
    """A leading-underscore name that is not a dunder (``__version__`` is public)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Each ``from X import _name`` in ``source`` with ``X`` a knnmt module, as ``"module:line ..."``
    (importing ``import knnmt.x._y`` or ``from knnmt.x._y import z`` counts too)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = import_source(node, module, is_package)
            if target.split(".")[0] != "knnmt":
                continue
            names = [alias.name for alias in node.names if is_private(alias.name)]
            if any(is_private(part) for part in target.split(".")):
                names.append(target)
            problems += [f"{module}:{node.lineno} imports private {name} from {target}" for name in names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "knnmt" and any(is_private(part) for part in parts):
                    problems.append(f"{module}:{node.lineno} imports private module {alias.name}")
    return problems


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Each import in ``source`` of a layer above ``module``'s, as ``"module:line imports X (...)"``."""
    own = layer_of(module)
    if own is None:
        raise ValueError(f"{module} is in no known layer")
    problems = []
    for line, target in knnmt_imports(source, module, is_package):
        theirs = layer_of(target)
        if theirs is None or theirs > own:
            problems.append(f"{module}:{line} imports {target} ({layer_name(theirs)}) from {layer_name(own)}")
    return problems


def package_modules() -> list[tuple[Path, str, bool]]:
    return [(path, *module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_is_in_a_known_layer() -> None:
    modules = package_modules()
    assert len(modules) > 30  # the walk found the package
    stray = [name for _, name, _ in modules if layer_of(name) is None]
    assert not stray, (
        f"modules outside every layer folder ({', '.join(sorted(LAYERS))}): {stray}; "
        "move them into the folder of their layer (or add a layer to tests/test_layers.py)"
    )


def test_no_module_imports_a_higher_layer() -> None:
    problems = []
    for path, name, is_package in package_modules():
        if layer_of(name) is None:
            continue  # reported by test_every_module_is_in_a_known_layer
        problems += upward_imports(path.read_text(encoding="utf-8"), name, is_package)
    assert not problems, "imports of a higher layer:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("knnmt.store.fake", "from ..pipeline.translator import KNNMT\n"),
        ("knnmt.store.fake", "def f():\n    from ..hf.registry import key_dim\n    return key_dim\n"),
        (
            "knnmt.search.fake",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..hf.teacher_forcing import X\n",
        ),
        ("knnmt.knn.fake", "import knnmt.apps.cli\n"),
        ("knnmt.hf.fake", "from knnmt.pipeline import translator\n"),
        ("knnmt.pipeline.fake", "from .. import __version__\n"),  # the package root is the top
        ("knnmt.apps.fake", "from knnmt import KNNMT\n"),
        ("knnmt.core.fake", "from ..store.datastore import Datastore\n"),
        ("knnmt.core", "from .. import anything\n"),  # a package __init__, resolved as the package
    ],
)
def test_the_checker_flags_an_upward_import(module: str, source: str) -> None:
    is_package = module == "knnmt.core"
    problems = upward_imports(source, module, is_package)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{module}:")


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("knnmt.store.fake", "from ..core.errors import DatastoreError\nfrom .writelock import WriteLock\n"),
        ("knnmt.store.fake", "from ..knn.distribution import interpolate\n"),  # same layer
        ("knnmt.hf.fake", "from ..search.retriever import Retriever\nimport numpy\nimport knnmt.core\n"),
        ("knnmt.apps.service.fake", "from ...pipeline.translator import KNNMT\nfrom .memory import Live\n"),
        ("knnmt", "from .apps.cli import main\n"),
    ],
)
def test_the_checker_allows_own_and_lower_layers(module: str, source: str) -> None:
    assert upward_imports(source, module, is_package=module == "knnmt") == []


def test_the_checker_rejects_unknown_places() -> None:
    with pytest.raises(ValueError, match="no known layer"):
        upward_imports("import os\n", "knnmt.stray")
    assert layer_of("knnmt.stray.module") is None
    assert layer_of("knnmt") == TOP


def test_no_module_imports_another_modules_private_names() -> None:
    problems = []
    for path, name, is_package in package_modules():
        problems += private_imports(path.read_text(encoding="utf-8"), name, is_package)
    assert not problems, (
        "private names imported across modules (make them public, documented API):\n" + "\n".join(problems)
    )


@pytest.mark.parametrize(
    "source",
    [
        "from ..pipeline.build import _write_shard, vector_dim\n",
        "from ...core.config import KNNConfig, _check\n",
        "def f():\n    from .translator import _helper as helper\n    return helper\n",
        "from knnmt.store._private import thing\n",
        "import knnmt.store._private\n",
    ],
)
def test_the_checker_flags_a_private_import(source: str) -> None:
    problems = private_imports(source, "knnmt.apps.service.fake")
    assert len(problems) == 1, problems
    assert problems[0].startswith("knnmt.apps.service.fake:")


def test_the_checker_allows_public_dunder_and_foreign_names() -> None:
    source = (
        "from ..core.version import __version__\n"
        "from ..core.config import require as _check\n"  # a public name under a local alias
        "from os import _exit\n"  # outside knnmt
        "import numpy as _np\n"
    )
    assert private_imports(source, "knnmt.pipeline.fake") == []
