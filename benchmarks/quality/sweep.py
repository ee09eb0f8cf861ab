"""Decode the candidate kNN-MT settings of docs/BENCHMARKS.md ("Quality") on the dev or the test sets.

    python benchmarks/quality/sweep.py dev     # target dev + 500 general dev sentences (the choice)
    python benchmarks/quality/sweep.py test    # target test + general test (reported after the choice)

Needs runs/quality/ from benchmarks/quality/run.sh (datastore ``runs/quality/ds`` and the split files).
Beam 4 (the bundled model's generation default), batch 32, up to 128 new tokens.
"""

from __future__ import annotations

import sys

from knnmt.config import KNNConfig
from knnmt.corpus import read_lines
from knnmt.evaluation import evaluate
from knnmt.translator import KNNMT

CONFIGS = {
    "tuned-h36.3-l85": KNNConfig(k=16, lambda_=0.85, temperature=30.0, half_distance=36.3),
    "h10.6-l80": KNNConfig(k=16, lambda_=0.8, temperature=30.0, half_distance=10.6),
    "h5-l95": KNNConfig(k=16, lambda_=0.95, temperature=30.0, half_distance=5.0),
    "h2-l100": KNNConfig(k=16, lambda_=1.0, temperature=30.0, half_distance=2.0),
}
SETS = {"dev": ("general-dev500", "target-dev"), "test": ("general-test", "target-test")}


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "dev"
    knn = KNNMT.load("models/opus-knnmt-en-de-small", "runs/quality/ds")
    for name in SETS[which]:
        src = read_lines(f"runs/quality/{name}.en")
        ref = read_lines(f"runs/quality/{name}.de")
        scores, _ = evaluate(
            knn, src, ref, configs={"base": None, **CONFIGS}, batch_size=32, max_new_tokens=128, num_beams=4
        )
        for s in scores:
            print(name, s.name, round(s.bleu, 2), round(s.chrf, 2), flush=True)


if __name__ == "__main__":
    main()
