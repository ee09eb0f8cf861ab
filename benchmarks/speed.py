"""Speed benchmark (issue 5): kNN-MT decoding speed per retrieval mode, and how it grows with the datastore.

One command (results in runs/bench-speed/results.json, a Markdown table on stdout, a PNG plot)::

    .venv/bin/python benchmarks/speed.py

What it measures, side by side in one run, on the same target-domain test sentences with the bundled
model (``models/opus-knnmt-en-de-small``):

* modes: the plain model; vanilla kNN-MT with the default index (``auto``: IVF-PQ + exact re-rank),
  without and with the confidence gate (``-gated``: steps where the model's top token has probability
  >= ``--gate`` are not searched), and ``vanilla-fast`` (gated, nprobe 8, re-rank 4); vanilla kNN-MT
  with exact search (Flat, the quality reference); ``vanilla-k4``, ``vanilla-k32``...: vanilla with
  another k (the k sweep); ``vanilla-n32``, ``vanilla-n8-r2``...: another nprobe (and re-rank
  factor); ``vanilla-pq8``: the previous default
  index (8-bit PQ), where a view keeps it in ``index-pq8/``;
  Subset kNN-MT with lexical (BM25) and dense (mean-pooled encoder states) sentence search;
* target tokens/s (greedy and beam 4, batch 32), the ratio to the plain model, BLEU and chrF, recall@k
  of each mode's neighbours against exact search on teacher-forced test queries, searched queries per
  target token, and the share of decoding time spent in the kNN processor and in its search;
* the same at several datastore sizes (``--sizes``, in entries): the memory is LibreOffice help
  (data/target/train.tsv) followed by the general-domain UI corpus (data/general/train.tsv; run
  ``scripts/make_corpora.py`` first) and repeated until the largest size is reached; smaller sizes are
  prefixes of it (whole shards), so every size has its own index.

Everything built is cached under runs/bench-speed/ (``--rebuild`` starts over; a memory built with other
model weights is rebuilt by itself). Timings are best of
``--repeats`` interleaved runs (machine load drifts; see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import dataclasses  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

from knnmt.core.config import BuildConfig, IndexConfig, KNNConfig  # noqa: E402
from knnmt.core.durable import write_json_atomic  # noqa: E402
from knnmt.hf.registry import open_reusable  # noqa: E402
from knnmt.hf.teacher_forcing import pair_queries  # noqa: E402
from knnmt.pipeline.build import build_datastore, build_subset_index  # noqa: E402
from knnmt.pipeline.evaluation import score  # noqa: E402
from knnmt.pipeline.translator import (  # noqa: E402
    KNNMT,
    load_model,
    target_tokens,
    timed_translate,
    tokens_per_second,
)
from knnmt.search.index import INDEX_FILE, SearchIndex, build_index, exact_index, recall_at_k  # noqa: E402
from knnmt.search.retriever import IndexRetriever, Retriever  # noqa: E402
from knnmt.search.subset import SubsetConfig, SubsetRetriever, SubsetSearch  # noqa: E402
from knnmt.store.corpus import CorpusSpec  # noqa: E402
from knnmt.store.datastore import MANIFEST, Datastore, read_manifest  # noqa: E402

logger = logging.getLogger("bench-speed")

WORK = ROOT / "runs" / "bench-speed"
MODEL = ROOT / "models" / "opus-knnmt-en-de-small"
TARGET = ROOT / "data" / "target"
GENERAL = ROOT / "data" / "general"


# ---- memory of every size --------------------------------------------------------------------------
def full_datastore(model: Any, tokenizer: Any, want: int) -> Datastore:
    """The biggest memory: target train, general train, then again, until >= ``want`` entries (cached)."""
    path = WORK / "memory"
    corpora = [TARGET / "train.tsv", GENERAL / "train.tsv"]
    missing = [str(p) for p in corpora if not p.is_file()]
    if missing:
        raise SystemExit(f"missing corpus {missing}: run `python scripts/make_corpora.py --out data` first")
    config = BuildConfig(shard_sentences=20000)
    store = open_reusable(path, model, tokenizer)
    if store is None:  # none yet, unfinished, or of other weights: start over, views and indexes too
        clear_cache()
        store = build_datastore(
            model, tokenizer, CorpusSpec((str(corpora[0]),), "tsv"), path, config,
            model_name=str(MODEL), progress=True, force=True,
        )  # fmt: skip
    i = 1
    while store.count < want:
        spec = CorpusSpec((str(corpora[i % len(corpora)]),), "tsv")
        store = build_datastore(model, tokenizer, spec, path, config, append=True, progress=True)
        i += 1
    return store


def clear_cache() -> None:
    """Remove the cached memory and every view of it (with their indexes); results files stay."""
    for path in [WORK / "memory", *WORK.glob("view-*")]:
        if path.is_dir():
            shutil.rmtree(path)


def prefix_view(store: Datastore, size: int) -> Datastore:
    """A datastore made of ``store``'s first whole shards holding >= ``size`` entries (shards linked, not
    copied); cached in runs/bench-speed/view-<size>/."""
    manifest = dict(store.manifest)
    shards, count, sentences = [], 0, 0
    for info in manifest["shards"]:
        if count >= size:
            break
        shards.append(info)
        count += int(info["count"])
        sentences += int(info["sentences"])
    path = WORK / f"view-{size}"
    (path / "shards").mkdir(parents=True, exist_ok=True)
    for info in shards:
        link = path / "shards" / info["name"]
        if not link.exists():
            link.symlink_to((store.path / "shards" / info["name"]).resolve(), target_is_directory=True)
    manifest.update(shards=shards, count=count, sentences=sentences, view_of=str(store.path))
    if not (path / MANIFEST).is_file() or read_manifest(path)["count"] != count:
        write_json_atomic(path / MANIFEST, manifest)
    return Datastore.open(path)


def default_index(store: Datastore) -> SearchIndex:
    if (store.path / "index" / INDEX_FILE).is_file():
        return SearchIndex.load(store.path / "index", store)
    return build_index(store, IndexConfig(), out=store.path / "index", progress=True, force=True)


# ---- modes ----------------------------------------------------------------------------------------
#: name -> function(store, exact retriever, model, tokenizer) returning the mode's retriever
#: (``None``: the plain model)
Mode = Callable[[Datastore, Retriever, Any, Any], Retriever | None]


def subset_retriever(store: Datastore, kind: str, model: Any, tokenizer: Any) -> Retriever:
    """Subset kNN-MT over ``store`` with sentence search ``kind`` (its index built once, in the view)."""
    directory = store.path / "subset"
    settings = directory / "subset.json"
    built = json.loads(settings.read_text())["sentence_search"] if settings.is_file() else {}
    if kind not in built:
        started = time.perf_counter()
        build_subset_index(
            store, SubsetConfig(sentence_search=kind), model=model, tokenizer=tokenizer, out=directory
        )
        logger.info("subset index (%s) of %d entries built in %.0f s", kind, store.count,
                    time.perf_counter() - started)  # fmt: skip
    return SubsetRetriever.load(store, directory, SubsetSearch(sentence_search=kind))


def probed_mode(nprobe: int, rerank: int | None) -> Mode:
    """Vanilla kNN-MT over the default index searched with another nprobe (and re-rank factor)."""
    return lambda store, exact, m, t: IndexRetriever(
        SearchIndex.load(store.path / "index", store, nprobe=nprobe, rerank=rerank), store
    )


def modes(names: list[str]) -> dict[str, Mode]:
    available: dict[str, Mode] = {
        "plain": lambda store, exact, m, t: None,
        "vanilla": lambda store, exact, m, t: IndexRetriever(default_index(store), store),
        "exact": lambda store, exact, m, t: exact,
        # the cheapest vanilla setting measured: half the probes and candidates (and the gate, below)
        "vanilla-fast": lambda store, exact, m, t: IndexRetriever(
            SearchIndex.load(store.path / "index", store, nprobe=8, rerank=4), store
        ),
        # the previous default index (8-bit PQ, IVF{n},PQ{dim/8}), where a view keeps it in index-pq8/
        "vanilla-pq8": lambda store, exact, m, t: IndexRetriever(
            SearchIndex.load(store.path / "index-pq8", store), store
        ),
        "subset-bm25": lambda store, exact, m, t: subset_retriever(store, "bm25", m, t),
        "subset-dense": lambda store, exact, m, t: subset_retriever(store, "dense", m, t),
    }
    available.update({f"{name}-gated": make for name, make in available.items() if name != "plain"})
    for name in names:  # vanilla-k4, vanilla-k32...: vanilla with another k (the k sweep)
        if re.fullmatch(r"vanilla-k\d+", name):
            available[name] = available["vanilla"]
        # vanilla-n32, vanilla-n8-r2(-gated)...: another nprobe (and re-rank factor)
        if probes := re.fullmatch(r"vanilla-n(\d+)(?:-r(\d+))?", name.removesuffix("-gated")):
            available[probes[0]] = probed_mode(int(probes[1]), None if probes[2] is None else int(probes[2]))
            available[f"{probes[0]}-gated"] = available[probes[0]]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; available: {sorted(available)}")
    return {n: available[n] for n in names}


# ---- measurements ---------------------------------------------------------------------------------
def test_queries(
    model: Any, tokenizer: Any, sources: list[str], references: list[str], n: int
) -> list[tuple[str, np.ndarray]]:
    """Decoder queries of the teacher-forced test references: ``(source, [t, dim])`` for a fixed random
    sample of sentences holding about ``n`` queries in all."""
    per_sentence = pair_queries(model, tokenizer, list(zip(sources, references, strict=True)), path="test")
    order = torch.randperm(len(sources), generator=torch.Generator().manual_seed(0)).tolist()
    picked: list[tuple[str, np.ndarray]] = []
    for i in order:
        if sum(len(q) for _, q in picked) >= n:
            break
        picked.append((sources[i], per_sentence[i].float().numpy()))
    return picked


def subset_ids(
    model: Any, tokenizer: Any, retriever: Any, recall: list[tuple[str, np.ndarray]], k: int
) -> np.ndarray:
    """Subset kNN-MT's neighbours of the recall queries, each sentence's queries in its own subset."""
    from knnmt.hf.teacher_forcing import encode_sources, sequence_limit
    from knnmt.search.retriever import prepare_retrieval

    found = []
    for start in range(0, len(recall), 32):
        chunk = recall[start : start + 32]
        sources = [s for s, _ in chunk]
        inputs, _ = encode_sources(tokenizer, sources, sequence_limit(model, tokenizer))
        with torch.inference_mode():
            prepare_retrieval(retriever, model, sources, dict(inputs))
        groups = np.concatenate([np.full(len(q), g) for g, (_, q) in enumerate(chunk)])
        found.append(retriever.search(np.concatenate([q for _, q in chunk]), k, groups)[1])
    return np.concatenate(found)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 2)
    model, tokenizer = load_model(str(MODEL))
    rows = [line.split("\t") for line in (TARGET / "test.tsv").read_text(encoding="utf-8").splitlines()]
    sources = [r[0] for r in rows][: args.sentences]
    references = [r[1] for r in rows][: args.sentences]
    sizes = sorted(args.sizes)
    full = full_datastore(model, tokenizer, max(sizes))
    # the search is measured on every sentence: no domain gate (on target text it would only skip a few)
    config = dataclasses.replace(KNNConfig.load(args.knn_config), confidence_gate=None, domain_gate=None)
    gated = dataclasses.replace(config, confidence_gate=args.gate)
    recall = test_queries(model, tokenizer, sources, references, args.recall_queries)
    queries = np.concatenate([q for _, q in recall])
    zeros = np.zeros(len(queries), dtype=np.int64)
    results: list[dict[str, Any]] = []
    for size in sizes:
        store = prefix_view(full, size)
        logger.info("size %d: view of %d entries", size, store.count)
        exact = IndexRetriever(exact_index(store), store)
        exact_ids = exact.search(queries, config.k, zeros)[1]
        chosen = modes(args.modes)
        if store.count > args.exact_max_size:  # Flat search grows linearly: the reference at small sizes only
            chosen = {n: make for n, make in chosen.items() if not n.startswith("exact")}
        built: dict[str, Retriever | None] = {}  # "vanilla" and "vanilla-gated" share one retriever
        for name, make in chosen.items():
            base = re.sub(r"-k\d+$", "", name.removesuffix("-gated"))
            if base not in built:
                built[base] = make(store, exact, model, tokenizer)
        retrievers = {name: built[re.sub(r"-k\d+$", "", name.removesuffix("-gated"))] for name in chosen}
        translator = KNNMT(model, tokenizer, store, config=config)
        recall_ids = {  # each mode's neighbours of the recall queries (the k sweep's modes: same as vanilla)
            name: subset_ids(model, tokenizer, r, recall, config.k)
            if hasattr(r, "prepare")
            else r.search(queries, config.k, zeros)[1]
            for name, r in retrievers.items()
            if r is not None and not re.search(r"-k\d+$", name)
        }
        for beams in args.beams:
            gen = {"num_beams": beams, "max_new_tokens": 128, "batch_size": 32}
            timed_translate(translator, sources[:32], knn=False, **gen)  # warm-up
            best: dict[str, float] = {}
            outputs: dict[str, list[Any]] = {}
            stats: dict[str, dict[str, float]] = {}
            for repeat in range(args.repeats):  # interleaved: drifting machine load hits every mode alike
                for name, retriever in retrievers.items():
                    if name.startswith("exact") and (repeat > 0 or beams > 1):
                        continue  # the quality reference: decoded once, greedy
                    knn: KNNConfig | bool = False
                    if retriever is not None:
                        translator.retriever = retriever
                        knn = gated if name.endswith(("-gated", "-fast")) else config
                        if match := re.search(r"-k(\d+)$", name):
                            knn = dataclasses.replace(config, k=int(match.group(1)))
                    hyps, secs = timed_translate(translator, sources, knn=knn, **gen)
                    rate = tokens_per_second(hyps, secs, tokenizer)
                    if rate > best.get(name, 0.0):
                        best[name] = rate
                        stats[name] = {**translator.last_stats, "wall": secs} if knn else {"wall": secs}
                    outputs[name] = hyps
            for name, retriever in retrievers.items():
                if name not in outputs:
                    continue
                quality = score([h.text for h in outputs[name]], references, name)
                row: dict[str, Any] = {
                    "size": store.count,
                    "mode": name,
                    "beam": beams,
                    "tok_s": round(best[name], 1),
                    "ratio": round(best[name] / best["plain"], 3) if "plain" in best else None,
                    "bleu": round(quality.bleu, 2),
                    "chrf": round(quality.chrf, 2),
                }
                if retriever is not None:
                    if name in recall_ids:
                        row[f"recall@{config.k}"] = round(recall_at_k(recall_ids[name], exact_ids), 3)
                    run = stats[name]
                    emitted = target_tokens(outputs[name], tokenizer)
                    row["searched_per_token"] = round(run["searched"] / max(1, emitted), 3)
                    row["gated_share"] = round(run["gated"] / max(1, run["rows"]), 3)
                    row["knn_share"] = round(run["seconds"] / run["wall"], 3)
                    row["search_share"] = round(run["search_seconds"] / run["wall"], 3)
                results.append(row)
                logger.info("%s", row)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "knn": config.to_dict(),
        "sentences": len(sources),
        "rows": results,
    }


def table(report: dict[str, Any]) -> str:
    k = report["knn"]["k"]
    lines = [
        f"| entries | mode | beam | tok/s | × plain | BLEU | chrF | recall@{k} | searched/token | gated "
        "| kNN time | search time |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return "-" if row.get(key) is None else format(row[key], fmt)

    for r in report["rows"]:
        lines.append(
            f"| {r['size']:,} | {r['mode']} | {r['beam']} | {r['tok_s']:,.0f} | {r['ratio'] or 1:.2f} | "
            f"{r['bleu']:.2f} | {r['chrf']:.2f} | {cell(r, f'recall@{k}', '.3f')} | "
            f"{cell(r, 'searched_per_token', '.2f')} | {cell(r, 'gated_share', '.0%')} | "
            f"{cell(r, 'knn_share', '.0%')} | {cell(r, 'search_share', '.0%')} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beams = sorted({r["beam"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(beams), figsize=(5.5 * len(beams), 3.8), dpi=110, squeeze=False)
    for ax, beam in zip(axes[0], beams, strict=True):
        for mode in dict.fromkeys(r["mode"] for r in report["rows"]):
            pts = sorted(
                (r["size"], r["tok_s"]) for r in report["rows"] if r["mode"] == mode and r["beam"] == beam
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_xscale("log")
        ax.set_xlabel("datastore entries")
        ax.set_ylabel("target tokens/s")
        ax.set_title(f"{'greedy' if beam == 1 else f'beam {beam}'}, batch 32")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000, 4_000_000])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["plain", "vanilla", "vanilla-gated", "subset-bm25-gated", "subset-dense-gated", "exact"],
    )
    parser.add_argument("--gate", type=float, default=0.9, help="confidence gate of the -gated modes")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--exact-max-size", type=int, default=2_500_000, help="largest size decoded with Flat"
    )
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument(
        "--knn-config",
        default=str(TARGET / "knn.json"),
        help="k, λ, τ, half distance (default: the shipped data/target/knn.json; its gates are replaced)",
    )
    parser.add_argument("--out", default=str(WORK / "results.json"))
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild the cached memory, views and indexes first"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    WORK.mkdir(parents=True, exist_ok=True)
    if args.rebuild:
        clear_cache()
    report = measure(args)
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, out.with_suffix(".png"))
    print(table(report))
    print(f"\n{out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
