"""Decode candidate kNN-MT settings on the dev or the test sets (docs/BENCHMARKS.md, "Quality").

    python benchmarks/quality/sweep.py DATASTORE dev  [--beam 1]   # target dev + general dev (the choice)
    python benchmarks/quality/sweep.py DATASTORE test [--beam 4]   # target test + general test (after it)

``DATASTORE``: the bundled model's datastore of ``data/target/train.tsv`` (with its index), e.g. the one
``knnmt demo`` builds (runs/demo/datastore). The general-domain sets come from scripts/make_corpora.py.
Batch 32, up to 128 new tokens. Prints one line per (set, system): BLEU, chrF, searched queries per
target token.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from knnmt.core.config import KNNConfig
from knnmt.pipeline.evaluation import evaluate
from knnmt.pipeline.translator import KNNMT

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data" / "target" / "knn.json"


def configs(datastore: str) -> dict[str, KNNConfig]:
    """The settings to compare: the shipped one (``data/target/knn.json``, what the demo uses), the same
    without its domain gate, and the datastore's own ``knn.json`` (``knnmt tune``'s choice) if any."""
    shipped = KNNConfig.load(SHIPPED)
    found = {"shipped": shipped, "shipped-nogate": dataclasses.replace(shipped, domain_gate=None)}
    tuned = Path(datastore) / "knn.json"
    if tuned.is_file():
        found["tuned"] = KNNConfig.load(tuned)
    return found


def pairs(name: str) -> tuple[list[str], list[str]]:
    rows = [line.split("\t") for line in (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()]
    return [r[0] for r in rows], [r[1] for r in rows]


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """``DATASTORE dev|test [--beam N]``, shared by the quality scripts."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datastore")
    parser.add_argument("split", choices=["dev", "test"])
    parser.add_argument("--beam", type=int, default=1)
    return parser


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--configs", default="shipped,shipped-nogate,tuned",
                        help="comma-separated: shipped, shipped-nogate, tuned (the datastore's knn.json)")
    args = parser.parse_args()
    knn = KNNMT.load(str(ROOT / "models" / "opus-knnmt-en-de-small"), args.datastore)
    found = configs(args.datastore)
    names = [name for name in args.configs.split(",") if name]
    unknown = [name for name in names if name not in found and name != "tuned"]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: shipped, shipped-nogate, tuned")
    if "tuned" in names and "tuned" not in found:
        print(f"no {args.datastore}/knn.json: 'tuned' skipped", flush=True)
    chosen = {"base": None, **{name: found[name] for name in names if name in found}}
    for corpus in ("target", "general"):
        sources, references = pairs(f"{corpus}/{args.split}.tsv")
        scores, _ = evaluate(
            knn, sources, references, configs=chosen, batch_size=32, max_new_tokens=128, num_beams=args.beam
        )
        for s in scores:
            print(f"{corpus}-{args.split} beam{args.beam} {s.name} BLEU {s.bleu:.2f} chrF {s.chrf:.2f} "
                  f"searched/token {s.searched_per_token:.2f} plain-only {s.sentences_off:.0%}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
