"""Subset kNN-MT benchmark (issue 5): recall against exact search, per-step search cost, and translation
speed and quality of the plain model, vanilla kNN-MT and Subset kNN-MT (BM25 / dense sentence search),
with the bundled model on the LibreOffice-help corpus.

One command (results in runs/bench-subset/results.json, tables printed as Markdown)::

    .venv/bin/python benchmarks/subset.py
    .venv/bin/python benchmarks/subset.py --only translate --sentences 500 --beams 1,4
    .venv/bin/python benchmarks/subset.py --datastore runs/demo/datastore   # reuse a built datastore

Set-up (cached): a datastore of ``data/target/train.tsv`` (plus the general-domain corpus appended until
``--min-entries`` when given), its default faiss index, and a Subset kNN-MT index with both sentence
searches (stored in ``--subset-dir``, default ``<datastore>/subset``).
Systems are named ``base``, ``vanilla``, ``subset-{bm25|dense}[-{adc|faiss|exact}][-{n}]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-subset"
MODEL = ROOT / "models" / "opus-knnmt-en-de-small"
TRAIN = ROOT / "data" / "target" / "train.tsv"
TEST = ROOT / "data" / "target" / "test.tsv"
GENERAL = ROOT / "data" / "general" / "train.tsv"

logger = logging.getLogger("bench-subset")


def _pairs(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [tuple(line.split("\t")[:2]) for line in lines[:limit] if "\t" in line]
    return [(s, t) for s, t in rows]


def ensure_datastore(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    """Open ``--datastore`` or build ``WORK/datastore`` (target corpus, general corpus appended to size)."""
    from knnmt.core.config import BuildConfig
    from knnmt.hf.registry import open_reusable
    from knnmt.pipeline.build import build_datastore
    from knnmt.store.corpus import CorpusSpec
    from knnmt.store.datastore import Datastore

    if args.datastore:
        return Datastore.open(args.datastore)
    out = WORK / "datastore"
    config = BuildConfig(max_tokens=6000)
    store = open_reusable(out, model, tokenizer)
    if store is None:
        spec = CorpusSpec((str(TRAIN),), "tsv")
        store = build_datastore(model, tokenizer, spec, out, config, force=True, model_name=str(MODEL))
    if store.count < args.min_entries and not GENERAL.is_file():
        raise SystemExit(f"missing corpus {GENERAL}: run `python scripts/make_corpora.py --out data` first")
    lines: list[str] | None = None
    while store.count < args.min_entries:  # append general-domain chunks, in order, until large enough
        lines = lines or GENERAL.read_text(encoding="utf-8").splitlines()
        parts = [c for c in store.manifest["corpora"] if "general-part" in c["paths"][0]]
        used = sum(int(c["sentences"]) + int(c.get("skipped_empty", 0)) for c in parts)
        if used >= len(lines):
            raise SystemExit(f"the general corpus is used up at {store.count} entries")
        last = parts[-1] if parts else None
        per_sentence = store.count / store.manifest["sentences"] if last is None else 10.0
        need = int((args.min_entries - store.count) / per_sentence * 1.05) + 1
        part = WORK / f"general-part-{used}.tsv"
        part.write_text("".join(line + "\n" for line in lines[used : used + need]), encoding="utf-8")
        spec = CorpusSpec((str(part),), "tsv")
        store = build_datastore(model, tokenizer, spec, out, config, append=True, model_name=str(MODEL))
    return store


def ensure_indexes(args: argparse.Namespace, store: Any, model: Any, tokenizer: Any) -> Path:
    """The default faiss index (built if missing) and the subset index with bm25 and dense; its directory."""
    from knnmt.pipeline.build import build_subset_index
    from knnmt.search.index import build_index
    from knnmt.search.subset import SubsetConfig

    if not (store.path / "index" / "index.json").is_file():
        build_index(store)
    subset_dir = Path(args.subset_dir) if args.subset_dir else store.path / "subset"
    settings = subset_dir / "subset.json"
    built = json.loads(settings.read_text())["sentence_search"] if settings.is_file() else {}
    for kind in ("bm25", "dense"):
        if kind not in built:
            t0 = time.perf_counter()
            build_subset_index(
                store,
                SubsetConfig(sentence_search=kind, pq_m=args.pq_m),
                model=model,
                tokenizer=tokenizer,
                out=subset_dir,
            )
            logger.warning("subset index (%s) built in %.0f s", kind, time.perf_counter() - t0)
    return subset_dir


def _system(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``subset-bm25-faiss-256`` -> {"kind": "bm25", "scorer": "faiss", "n": 256}."""
    parts = name.split("-")
    spec: dict[str, Any] = {"kind": parts[1], "scorer": args.scorer, "n": args.subset_size}
    for part in parts[2:]:
        if part.isdigit():
            spec["n"] = int(part)
        else:
            spec["scorer"] = part
    return spec


def _retriever(store: Any, subset_dir: Path, spec: dict[str, Any], rerank: int | None = None) -> Any:
    from knnmt.search.subset import SubsetRetriever, SubsetSearch

    options = SubsetSearch(
        subset_size=spec["n"], sentence_search=spec["kind"], scorer=spec["scorer"], rerank=rerank
    )
    return SubsetRetriever.load(store, subset_dir, options)


# ---- recall -----------------------------------------------------------------------------------


def phase_recall(args: argparse.Namespace, store: Any, subset_dir: Path, model: Any, tokenizer: Any) -> dict:
    """recall@k of vanilla and Subset kNN-MT against exact search, on teacher-forced test queries."""
    import faiss

    from knnmt.hf.teacher_forcing import encode_sources, pair_queries, sequence_limit
    from knnmt.search.index import SearchIndex, recall_at_k
    from knnmt.search.retriever import IndexRetriever, prepare_retrieval

    pairs = _pairs(TEST, args.recall_sentences)
    per_sentence = pair_queries(model, tokenizer, pairs, path=str(TEST))
    queries = torch.cat(per_sentence).numpy()
    groups = np.repeat(np.arange(len(per_sentence)), [len(k) for k in per_sentence])
    k = args.k
    limit = sequence_limit(model, tokenizer)
    exact = faiss.IndexFlatL2(store.dim)
    for _, keys in store.iter_keys():
        exact.add(keys)
    _, exact_ids = exact.search(queries, k)
    del exact
    exact_sentences, _ = store.provenance(exact_ids)
    out: dict[str, Any] = {"queries": len(queries), "sentences": len(pairs), "k": k}
    index = SearchIndex.load(store.path / "index", store)
    t0 = time.perf_counter()
    _, ids = IndexRetriever(index, store).search(queries, k, groups)
    out["vanilla"] = {
        "index": index.factory,
        "nprobe": index.settings["nprobe"],
        "rerank": index.rerank,
        f"recall@{k}": round(recall_at_k(ids, exact_ids), 3),
        "ms_per_query": round(1000 * (time.perf_counter() - t0) / len(queries), 3),
    }
    for kind in ("bm25", "dense"):
        for n in args.recall_sizes:
            retriever = _retriever(store, subset_dir, {"kind": kind, "scorer": args.scorer, "n": n})
            found = np.zeros_like(exact_ids)
            covered = 0
            search_s = prepare_s = 0.0
            for lo in range(0, len(pairs), 32):
                batch = list(range(lo, min(lo + 32, len(pairs))))
                inputs, _ = encode_sources(tokenizer, [pairs[i][0] for i in batch], limit)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    prepare_retrieval(retriever, model, [pairs[i][0] for i in batch], inputs)
                prepare_s += time.perf_counter() - t0
                mask = (groups >= lo) & (groups < lo + len(batch))
                t0 = time.perf_counter()
                _, found[mask] = retriever.search(queries[mask], k, groups[mask] - lo)
                search_s += time.perf_counter() - t0
                chosen = retriever.last_sentence_ids
                for row in np.nonzero(mask)[0]:
                    covered += int(np.isin(exact_sentences[row], chosen[groups[row] - lo]).sum())
            out[f"subset-{kind}-{n}"] = {
                f"recall@{k}": round(recall_at_k(found, exact_ids), 3),
                f"exact_neighbours_in_subset@{k}": round(covered / exact_ids.size, 3),
                "mean_subset_entries": round(
                    retriever.stats["subset_entries"] / max(1, retriever.stats["sentences"])
                ),
                "ms_per_query": round(1000 * search_s / len(queries), 3),
                "ms_prepare_per_sentence": round(1000 * prepare_s / len(pairs), 2),
            }
            logger.warning("recall %s-%d: %s", kind, n, out[f"subset-{kind}-{n}"])
    return out


# ---- per-step cost of the scorers ---------------------------------------------------------------


def phase_scorers(args: argparse.Namespace, store: Any, subset_dir: Path, model: Any, tokenizer: Any) -> dict:
    """ms per decoding step of each scorer for 32 sentences (1 query each = greedy; 4 = beam 4)."""
    from knnmt.search.index import SearchIndex
    from knnmt.search.retriever import IndexRetriever

    sources = [s for s, _ in _pairs(TEST, 32)]
    rng = np.random.default_rng(0)
    real = store.get_keys(rng.choice(store.count, 128, replace=False))
    queries = (real + 0.1 * rng.standard_normal(real.shape)).astype(np.float32)
    out: dict[str, Any] = {}
    vanilla = IndexRetriever(SearchIndex.load(store.path / "index", store), store)
    for per_group in (1, 4):
        q = queries[: 32 * per_group]
        groups = np.repeat(np.arange(32), per_group)
        vanilla.search(q, args.k, groups)
        t0 = time.perf_counter()
        for _ in range(args.step_repeats):
            vanilla.search(q, args.k, groups)
        out[f"vanilla_ms_per_step_q{per_group}"] = round(
            1000 * (time.perf_counter() - t0) / args.step_repeats, 2
        )
    for n in args.recall_sizes:
        for scorer in ("adc", "faiss", "exact"):
            retriever = _retriever(store, subset_dir, {"kind": "bm25", "scorer": scorer, "n": n})
            t0 = time.perf_counter()
            retriever.prepare(sources)
            row: dict[str, Any] = {
                "prepare_ms_per_batch": round(1000 * (time.perf_counter() - t0), 1),
                "mean_subset_entries": int(np.mean(retriever.subset_sizes())),
            }
            for per_group in (1, 4):
                q = queries[: 32 * per_group]
                groups = np.repeat(np.arange(32), per_group)
                retriever.search(q, args.k, groups)  # warm-up
                t0 = time.perf_counter()
                for _ in range(args.step_repeats):
                    retriever.search(q, args.k, groups)
                row[f"ms_per_step_q{per_group}"] = round(
                    1000 * (time.perf_counter() - t0) / args.step_repeats, 2
                )
            out[f"{scorer}-{n}"] = row
            logger.warning("scorer %s n=%d: %s", scorer, n, row)
    return out


def phase_kernels(args: argparse.Namespace, store: Any, subset_dir: Path, model: Any, tokenizer: Any) -> dict:
    """Raw per-query distance kernels over one real subset (n = --subset-size, BM25): torch ADC as
    index_select + sum (int32 / int64 offsets) or as one fused embedding_bag, faiss's PQ scanner, and the
    exact matrix product over the gathered keys; q = 1 (greedy) and 4 (beam) queries per sentence."""
    from knnmt.search.index import omp_threads

    retriever = _retriever(store, subset_dir, {"kind": "bm25", "scorer": "adc", "n": args.subset_size})
    retriever.prepare([s for s, _ in _pairs(TEST, 32)])
    sizes = retriever.subset_sizes()
    entries = retriever._subsets[int(np.argsort(sizes)[len(sizes) // 2])].entries  # the median subset
    book = retriever.index.codebook
    codes = retriever.index.codes[entries]
    keys = torch.from_numpy(store.get_keys(entries))
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"subset_entries": len(entries), "pq_m": book.m}
    for q in (1, 4):
        queries = torch.from_numpy(keys[rng.choice(len(keys), q)].numpy() + 0.1)
        with omp_threads(1):
            for name, fn in _kernels(book, codes, keys, queries).items():
                fn()
                t0 = time.perf_counter()
                for _ in range(args.step_repeats * 5):
                    fn()
                out[f"{name}_q{q}_ms"] = round(1000 * (time.perf_counter() - t0) / (args.step_repeats * 5), 3)
    return out


def _kernels(book: Any, codes: np.ndarray, keys: torch.Tensor, queries: torch.Tensor) -> dict[str, Any]:
    q = len(queries)
    flat32 = book.flat_codes(codes)
    flat64 = flat32.long()
    bags = flat32.view(-1, book.m)
    pq_index = book.faiss_index(codes)
    flat_luts = book.luts(queries).reshape(q, -1)
    weight = flat_luts.T.contiguous()
    norms = (keys**2).sum(-1)
    return {
        "adc_index_select_int32": lambda: flat_luts.index_select(1, flat32).view(q, -1, book.m).sum(-1),
        "adc_index_select_int64": lambda: flat_luts.index_select(1, flat64).view(q, -1, book.m).sum(-1),
        "adc_embedding_bag": lambda: torch.nn.functional.embedding_bag(bags, weight, mode="sum"),
        "adc_luts_and_embedding_bag": lambda: torch.nn.functional.embedding_bag(
            bags, book.luts(queries).reshape(q, -1).T.contiguous(), mode="sum"
        ),
        "faiss_pq_scan": lambda: pq_index.search(queries.numpy(), 64),
        "exact_matmul": lambda: norms - 2 * queries @ keys.T,
    }


# ---- translation ------------------------------------------------------------------------------


def phase_translate(
    args: argparse.Namespace, store: Any, subset_dir: Path, model: Any, tokenizer: Any
) -> dict:
    """BLEU, chrF and target tokens/s of each system on the first ``--sentences`` test sentences."""
    from knnmt.core.config import KNNConfig
    from knnmt.pipeline.evaluation import score
    from knnmt.pipeline.translator import KNNMT, timed_translate, tokens_per_second

    pairs = _pairs(TEST, args.sentences)
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    config = KNNConfig(k=args.k, lambda_=args.lambda_, temperature=args.temperature)
    systems: dict[str, tuple[Any, Any]] = {}
    for name in args.systems:
        if name == "base":
            systems[name] = (KNNMT.load((model, tokenizer), store.path, config=config), False)
        elif name == "vanilla":
            systems[name] = (KNNMT.load((model, tokenizer), store.path, config=config), True)
        else:
            retriever = _retriever(store, subset_dir, _system(name, args))
            systems[name] = (KNNMT(model, tokenizer, store, config=config, retriever=retriever), True)
    out: dict[str, Any] = {"sentences": len(sources), "knn": config.to_dict(), "batch_size": 32}
    for beams in args.beams:
        gen = {"num_beams": beams, "max_new_tokens": 200, "batch_size": 32}
        for knn, setting in systems.values():  # warm-up: page cache, allocator, faiss/bm25 first calls
            timed_translate(knn, sources[:32], knn=setting, **gen)
        rates: dict[str, list[float]] = {name: [] for name in systems}
        results: dict[str, Any] = {}
        for _ in range(args.repeats):  # interleaved, so that drifting load hits every system alike
            for name, (knn, setting) in systems.items():
                stats = getattr(knn.retriever, "stats", None)
                before = dict(stats) if stats else {}
                res, secs = timed_translate(knn, sources, knn=setting, **gen)
                rates[name].append(tokens_per_second(res, secs, tokenizer))
                s = score([r.text for r in res], references, name)
                results[name] = {"bleu": s.bleu, "chrf": s.chrf, "seconds": round(secs, 2)}
                if stats:
                    results[name]["prepare_s"] = round(
                        stats["prepare_seconds"] - before["prepare_seconds"], 2
                    )
                    results[name]["search_s"] = round(stats["search_seconds"] - before["search_seconds"], 2)
        base = max(rates["base"]) if "base" in rates else float("nan")
        for name in systems:
            results[name]["tok_s"] = round(max(rates[name]), 1)
            results[name]["tok_s_runs"] = [round(r, 1) for r in rates[name]]
            results[name]["ratio_to_base"] = round(max(rates[name]) / base, 3)
            logger.warning("beam %d %s: %s", beams, name, results[name])
        out[f"beam{beams}"] = results
    return out


def _table(title: str, rows: dict[str, dict[str, Any]]) -> str:
    columns = sorted({c for r in rows.values() if isinstance(r, dict) for c in r}, key=str)
    lines = [
        f"### {title}",
        "",
        "| system | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, row in rows.items():
        if isinstance(row, dict):
            lines.append(f"| {name} | " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


PHASES = {
    "kernels": phase_kernels,
    "recall": phase_recall,
    "scorers": phase_scorers,
    "translate": phase_translate,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", default=list(PHASES), choices=list(PHASES))
    parser.add_argument("--datastore", default=None, help="use this datastore instead of building one")
    parser.add_argument(
        "--subset-dir", default=None, help="subset index directory (default <datastore>/subset)"
    )
    parser.add_argument(
        "--min-entries", type=int, default=0, help="append general-domain data up to this size"
    )
    parser.add_argument("--pq-m", type=int, default=0)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--lambda", dest="lambda_", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=10.0)
    parser.add_argument("--subset-size", type=int, default=512)
    parser.add_argument("--scorer", default="adc")
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--beams", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--systems", type=lambda s: s.split(","), default="base,vanilla,subset-bm25,subset-dense"
    )
    parser.add_argument("--recall-sentences", type=int, default=200)
    parser.add_argument(
        "--recall-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256, 512]
    )
    parser.add_argument("--step-repeats", type=int, default=20)
    parser.add_argument("--tag", default="", help="key prefix of these results in results.json")
    args = parser.parse_args()
    if isinstance(args.systems, str):
        args.systems = args.systems.split(",")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from knnmt.pipeline.translator import load_model

    model, tokenizer = load_model(str(MODEL))
    WORK.mkdir(parents=True, exist_ok=True)
    store = ensure_datastore(args, model, tokenizer)
    subset_dir = ensure_indexes(args, store, model, tokenizer)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "datastore": {
            "path": str(store.path),
            "entries": store.count,
            "sentences": store.manifest["sentences"],
        },
    }
    for phase in args.only:
        t0 = time.perf_counter()
        results[phase] = PHASES[phase](args, store, subset_dir, model, tokenizer)
        results[phase]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        rows = results[phase]
        if phase == "kernels":
            print(json.dumps(rows, indent=1))
        elif phase == "translate":
            for beams in args.beams:
                print(_table(f"translate, beam {beams}", rows[f"beam{beams}"]))
        else:
            print(_table(phase, {k: v for k, v in rows.items() if isinstance(v, dict)}))
        print(json.dumps({k: v for k, v in rows.items() if not isinstance(v, dict)}))
        print(flush=True)
    file = WORK / "results.json"
    existing = json.loads(file.read_text()) if file.is_file() else {}
    existing[args.tag + time.strftime("%H%M")] = results
    file.write_text(json.dumps(existing, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
