"""Why faiss searches run with one OpenMP thread during decoding (needs `benchmarks/core.py` run first).

    .venv/bin/python benchmarks/faiss_threads.py

Decodes the same 64 sentences (greedy, batch 32, 40 new tokens) plain / kNN-MT / plain / kNN-MT with
faiss allowed ``search_threads`` = 1 and = 0 (faiss's default: all cores). With several threads,
faiss's idle OpenMP workers spin between the per-step searches and take the cores from PyTorch's
threads, which slows even the plain model's decoding that follows.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-core"


def run(threads: int) -> dict[str, float]:
    from knnmt.core.config import KNNConfig
    from knnmt.pipeline.translator import KNNMT, load_model

    model, tokenizer = load_model(str(next(WORK.glob("model-*"))))
    knn = KNNMT.load((model, tokenizer), WORK / "datastore", config=KNNConfig(k=8, lambda_=0.5))
    knn.index.settings["search_threads"] = threads
    lines = (ROOT / "data" / "target" / "test.tsv").read_text(encoding="utf-8").splitlines()[:64]
    sources = [line.split("\t")[0] for line in lines]
    out: dict[str, float] = {}
    for i, (name, setting) in enumerate((("base", False), ("knn", True), ("base", False), ("knn", True))):
        t0 = time.perf_counter()
        knn.translate(sources, knn=setting, max_new_tokens=40, batch_size=32)
        out[f"{name}_{i // 2 + 1}_s"] = round(time.perf_counter() - t0, 2)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(run(int(sys.argv[1]))))
    else:
        import subprocess

        for threads in (1, 0):
            proc = subprocess.run([sys.executable, __file__, str(threads)], capture_output=True, text=True)
            print(f"search_threads={threads}:", proc.stdout.strip().splitlines()[-1], flush=True)
