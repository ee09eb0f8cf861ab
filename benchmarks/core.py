"""Core benchmark (issue 3): build throughput, generation speed, index recall, peak memory.

One command (results are written to runs/bench-core/results.json and printed as a Markdown table)::

    .venv/bin/python benchmarks/core.py

Set-up (cached in runs/bench-core/): a SentencePiece vocabulary trained on the shipped target-domain
corpus, a *random* small Marian model (d_model 256, 3+3 layers, FFN 1024, 8k vocabulary: the size of the
model in PEERS.md and of the model this project trains on a CPU), and a datastore
of at least 1M entries (the corpus appended until it is that large). Each measured phase runs in a
child process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-core"
CORPUS = ROOT / "data" / "target" / "train.tsv"
TEST = ROOT / "data" / "target" / "test.tsv"
MIN_ENTRIES = 1_000_000


def _model_dir(args: argparse.Namespace) -> Path:
    return WORK / f"model-d{args.d_model}-l{args.layers}-v{args.vocab}"


def setup(args: argparse.Namespace) -> None:
    """Tokenizer + random model (cached)."""
    from knnmt.hf.toy import make_marian_model, make_marian_tokenizer

    out = _model_dir(args)
    if (out / "config.json").is_file():
        return
    texts = [f for line in CORPUS.read_text(encoding="utf-8").splitlines() for f in line.split("\t")]
    tokenizer = make_marian_tokenizer(texts, out, vocab_size=args.vocab, model_max_length=512)
    model = make_marian_model(tokenizer, d_model=args.d_model, layers=args.layers, heads=8, max_positions=512)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_build(args: argparse.Namespace) -> dict[str, Any]:
    """Build the datastore (appending the corpus until >= 1M entries); plain forward on the same batches."""
    import torch

    from knnmt.core.config import BuildConfig
    from knnmt.hf.teacher_forcing import decoder_inputs, encode_for_model, length_batches, pad_sequences
    from knnmt.pipeline.build import build_datastore
    from knnmt.pipeline.translator import load_model
    from knnmt.store.corpus import CorpusSpec

    torch.set_num_threads(os.cpu_count() or 2)
    model, tokenizer = load_model(str(_model_dir(args)))
    store_dir = WORK / "datastore"
    config = BuildConfig(max_tokens=args.max_tokens, shard_sentences=20000)
    spec = CorpusSpec((str(CORPUS),), "tsv")
    start = time.perf_counter()
    store = build_datastore(model, tokenizer, spec, store_dir, config, force=True, progress=False)
    while store.count < MIN_ENTRIES:
        store = build_datastore(model, tokenizer, spec, store_dir, config, append=True, progress=False)
    build_s = time.perf_counter() - start
    # plain teacher-forced forward (full model, logits included) over the same length batches of one shard
    lines = CORPUS.read_text(encoding="utf-8").splitlines()[: args.compare_sentences]
    rows = [(i, i + 1, *line.split("\t")) for i, line in enumerate(lines)]
    encoded, _ = encode_for_model(model, tokenizer, rows, paths=str(CORPUS))
    batches = list(length_batches(encoded, config.max_tokens))
    tokens = sum(len(p.target_ids) for p in encoded)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for batch_idx in batches:
            batch = [encoded[i] for i in batch_idx]
            src, mask = pad_sequences([p.source_ids for p in batch], tokenizer.pad_token_id)
            labels, _ = pad_sequences([p.target_ids for p in batch], tokenizer.pad_token_id)
            model(input_ids=src, attention_mask=mask, decoder_input_ids=decoder_inputs(model, labels))
        plain_s = time.perf_counter() - t0
    # the build path on the same sentences (written to a scratch datastore)
    scratch = WORK / "scratch-ds"
    (WORK / "compare.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    build_datastore(
        model,
        tokenizer,
        CorpusSpec((str(WORK / "compare.tsv"),), "tsv"),
        scratch,
        config,
        force=True,
        progress=False,
    )
    knn_s = time.perf_counter() - t0
    total_tokens = int(store.count)
    return {
        "entries": total_tokens,
        "sentences": int(store.manifest["sentences"]),
        "build_seconds": round(build_s, 1),
        "build_tokens_per_s": round(total_tokens / build_s),
        "compare_sentences": len(lines),
        "compare_tokens": tokens,
        "plain_forward_tokens_per_s": round(tokens / plain_s),
        "build_path_tokens_per_s": round(tokens / knn_s),
        "build_vs_plain": round(plain_s / knn_s, 3),
        "peak_rss_mb": round(_rss_mb()),
    }


def phase_index(args: argparse.Namespace) -> dict[str, Any]:
    """Default (auto) index: build time; recall@k against exact search on real decoder queries."""
    import faiss
    import numpy as np
    import torch

    from knnmt.core.config import IndexConfig
    from knnmt.hf.teacher_forcing import pair_queries
    from knnmt.pipeline.translator import load_model
    from knnmt.search.index import SearchIndex, build_index, recall_at_k
    from knnmt.search.retriever import IndexRetriever
    from knnmt.store.datastore import Datastore

    store = Datastore.open(WORK / "datastore")
    t0 = time.perf_counter()
    existing = WORK / "datastore" / "index" / "index.json"
    if args.reuse_index and existing.is_file():
        index = SearchIndex.load(WORK / "datastore" / "index", store)
        index_s = float(index.settings["build_seconds"])
    else:
        index = build_index(store, IndexConfig(factory=args.factory), progress=False, force=True)
        index_s = time.perf_counter() - t0
    model, tokenizer = load_model(str(_model_dir(args)))
    lines = TEST.read_text(encoding="utf-8").splitlines()[:200]
    pairs = [(src, tgt) for src, tgt in (line.split("\t") for line in lines)]
    queries = torch.cat(pair_queries(model, tokenizer, pairs, path=str(TEST)))
    q = (
        queries[torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))[:1000]]
        .float()
        .numpy()
    )
    exact = faiss.IndexFlatL2(store.dim)
    for _, keys in store.iter_keys():
        exact.add(keys)
    k = args.k
    _, exact_ids = exact.search(q, k)
    del exact
    results: dict[str, Any] = {
        "factory": index.factory,
        "index_seconds": round(index_s, 1),
        "k": k,
        "queries": len(q),
    }
    for nprobe in (8, 16, 32, 64):
        for rerank in (0, 4, 8):
            loaded = SearchIndex.load(WORK / "datastore" / "index", store, nprobe=nprobe, rerank=rerank)
            retriever = IndexRetriever(loaded, store)
            t0 = time.perf_counter()
            _, ids = retriever.search(q, k, np.zeros(len(q), dtype=np.int64))
            tag = f"nprobe{nprobe}_rerank{rerank}"
            results[f"recall@{k}_{tag}"] = round(recall_at_k(ids, exact_ids), 3)
            results[f"ms_per_query_{tag}"] = round(1000 * (time.perf_counter() - t0) / len(q), 3)
    results["peak_rss_mb"] = round(_rss_mb())
    return results


def phase_translate(args: argparse.Namespace) -> dict[str, Any]:
    """Target tokens/s, plain vs kNN-MT, greedy and beam 4, batch 32, same sentences side by side."""
    import torch

    from knnmt.core.config import KNNConfig
    from knnmt.pipeline.translator import KNNMT, load_model, timed_translate, tokens_per_second

    torch.set_num_threads(os.cpu_count() or 2)
    model, tokenizer = load_model(str(_model_dir(args)))
    knn = KNNMT.load((model, tokenizer), WORK / "datastore", config=KNNConfig(k=args.k, lambda_=0.5))
    sources = [
        line.split("\t")[0] for line in TEST.read_text(encoding="utf-8").splitlines()[: args.sentences]
    ]
    out: dict[str, Any] = {
        "sentences": len(sources),
        "index": knn.index.factory,
        "k": args.k,
        "nprobe": knn.index.settings.get("nprobe"),
        "rerank": knn.index.rerank,
    }
    for beams in (1, 4):
        # a random model rarely emits </s>, and kNN-MT changes when it does: fix every output at
        # max_new_tokens so that both systems do the same number of steps and emit the same tokens
        gen = {
            "num_beams": beams,
            "max_new_tokens": args.max_new_tokens,
            "min_new_tokens": args.max_new_tokens,
            "batch_size": 32,
        }
        timed_translate(knn, sources[:32], knn=True, **gen)  # warm-up (page cache, allocator)
        rates: dict[str, list[float]] = {"base": [], "knn": []}
        for _ in range(args.repeats):  # interleaved, so that drifting machine load hits both alike
            for name, setting in (("base", False), ("knn", True)):
                res, secs = timed_translate(knn, sources, knn=setting, **gen)
                rates[name].append(tokens_per_second(res, secs, tokenizer))
                if name == "knn":
                    out[f"beam{beams}_searched_rows_per_token"] = round(
                        knn.last_stats["searched"] / max(1, sum(len(r.token_ids) for r in res)), 2
                    )
        for name, values in rates.items():
            out[f"beam{beams}_{name}_tok_s"] = round(max(values), 1)
            out[f"beam{beams}_{name}_tok_s_runs"] = [round(v, 1) for v in values]
        out[f"beam{beams}_ratio"] = round(out[f"beam{beams}_knn_tok_s"] / out[f"beam{beams}_base_tok_s"], 3)
    out["peak_rss_mb"] = round(_rss_mb())
    return out


PHASES = {"build": phase_build, "index": phase_index, "translate": phase_translate}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phase", choices=sorted(PHASES), help="run one phase in this process (internal)")
    parser.add_argument("--only", nargs="*", default=["build", "index", "translate"], help="phases to run")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=6000)
    parser.add_argument("--compare-sentences", type=int, default=3000)
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--reuse-index", action="store_true", help="index phase: measure the existing index")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    setup(args)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": vars(args),
    }
    for phase in args.only:
        cmd = [
            sys.executable,
            __file__,
            "--phase",
            phase,
            "--d-model",
            str(args.d_model),
            "--layers",
            str(args.layers),
            "--vocab",
            str(args.vocab),
            "--max-tokens",
            str(args.max_tokens),
            "--factory",
            args.factory,
            "--k",
            str(args.k),
            "--sentences",
            str(args.sentences),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--repeats",
            str(args.repeats),
            "--compare-sentences",
            str(args.compare_sentences),
            *(["--reuse-index"] if args.reuse_index else []),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"phase {phase} failed")
        results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[phase]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(phase, json.dumps(results[phase]), flush=True)
    existing = json.loads((WORK / "results.json").read_text()) if (WORK / "results.json").is_file() else {}
    existing.update(results)
    (WORK / "results.json").write_text(json.dumps(existing, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
