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
from pathlib import Path

from knnmt.config import KNNConfig
from knnmt.evaluation import evaluate
from knnmt.translator import KNNMT

ROOT = Path(__file__).resolve().parents[2]
TUNED = KNNConfig(k=16, lambda_=0.8, temperature=30.0, half_distance=36.3)  # `knnmt tune`'s choice
CONFIGS = {
    "tuned": TUNED,
    **{
        f"tuned-gate{g:g}": KNNConfig(**{**TUNED.to_dict(), "confidence_gate": g})
        for g in (0.9, 0.8, 0.7, 0.5)
    },
    "h5-l95": KNNConfig(k=16, lambda_=0.95, temperature=30.0, half_distance=5.0),  # the previous choice
}
#: ``knnmt tune --domain-recall 0.9``'s domain gate: keeps retrieval for 90% of the target dev sources
DOMAIN_GATE = 0.7849
CONFIGS["tuned-domain"] = KNNConfig(**{**TUNED.to_dict(), "domain_gate": DOMAIN_GATE})
CONFIGS["shipped"] = KNNConfig(**{**CONFIGS["h5-l95"].to_dict(), "domain_gate": DOMAIN_GATE})  # knn.json


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
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    args = parser.parse_args()
    knn = KNNMT.load(str(ROOT / "models" / "opus-knnmt-en-de-small"), args.datastore)
    chosen = {"base": None, **{name: CONFIGS[name] for name in args.configs.split(",")}}
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
