"""Scale benchmark (issue 18): memory, disk and speed of build, index and translate as the memory grows.

One command (results in ``runs/scale/results.json``, a Markdown table on stdout)::

    .venv/bin/python benchmarks/scale.py --sizes 1000000 10000000 100000000

How the large memories are made (what is real, what is synthetic):

* **real**: the bundled model teacher-forces ``data/target/train.tsv`` (LibreOffice help, 760,876
  entries), plus ``data/general/train.tsv`` when it has been made (``scripts/make_corpora.py``);
  fp16 keys, built once into ``runs/scale/real``.
* **synthetic** datastores of N entries (``runs/scale/ds-N``): replica 0 is the real memory unchanged;
  replicas 1, 2, ... repeat every real entry with the same value, sentence and position, and its key
  plus Gaussian noise of ``--noise`` (0.25) times each dimension's standard deviation over the real
  keys, until N entries. So the real neighbours of a test query are still there, and every search has
  N entries to get through: the lists grow as they would with more data. Keys are stored as sq8 (one
  byte per dimension) at every size: 100M fp16 keys at d=256 would take 51 GB of this machine's 80.
  Replica sentences are given new sentence ids (replica·S + s) with the real text.

Per size, each phase runs in a child process so that its peak memory is its own; peak **private**
memory is the highest ``RssAnon`` of ``/proc/self/status`` (anonymous pages: what the process cannot
give back to the page cache), sampled every 10 ms; peak RSS (which counts mapped file pages) is given
beside it. Phases: ``synth`` (write the datastore), ``index-ram`` (auto factory in RAM: fast-scan PQ),
``index-disk`` (auto factory with on-disk lists: 8-bit PQ, memory-mapped), ``subset`` (the Subset
kNN-MT index: PQ codes of every key and the sentence search, ``--sentence-search``, default dense over
the stored sentence vectors, which the replicas carry with noise as their keys do; BM25 would tie the
replicas' identical texts), ``translate`` (plain model, vanilla kNN-MT with each index and Subset
kNN-MT, greedy, batch 32, on ``--sentences`` target test sentences: target tokens/s, ratio to plain,
BLEU; Subset also its time choosing subsets and their size; ``vanilla-disk-pq`` searches the on-disk
index without the exact re-rank, as a datastore whose keys were dropped does). The table goes to
stdout and a plot of speed ratio and BLEU against size to ``runs/scale/scaling.png``. ``--keep`` keeps
the datastores (default: each size's datastore is deleted after it was measured, so 100M fits within ~40 GB);
``--phases`` runs some phases only (builds now, translate later on an idle machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORK = ROOT / "runs" / "scale"
MODEL = ROOT / "models" / "opus-knnmt-en-de-small"
TARGET = ROOT / "data" / "target"
GENERAL = ROOT / "data" / "general"


class PeakMemory:
    """Samples this process's private (``RssAnon``) and total (``VmRSS``) resident memory every 10 ms in a
    background thread; :meth:`stop` returns the peaks in MiB."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = {"RssAnon": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in self.peak:
                    self.peak[name] = max(self.peak[name], int(rest.split()[0]))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {
            "peak_private_mib": round(self.peak["RssAnon"] / 1024, 1),
            "peak_rss_mib": round(self.peak["VmRSS"] / 1024, 1),
        }


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- phases (each in its own process) -----------------------------------------------------------


def phase_real(args: argparse.Namespace) -> dict[str, Any]:
    """Build the real memory (fp16) from the bundled corpora, once."""
    from knnmt.core.config import BuildConfig
    from knnmt.pipeline.build import build_datastore
    from knnmt.pipeline.translator import load_model
    from knnmt.store.corpus import CorpusSpec
    from knnmt.store.datastore import Datastore

    out = WORK / "real"
    if (out / "manifest.json").is_file():
        store = Datastore.open(out)
        return {"entries": store.count, "cached": True}
    model, tokenizer = load_model(str(MODEL))
    memory = PeakMemory()
    start = time.perf_counter()
    corpora = [path for path in (TARGET / "train.tsv", GENERAL / "train.tsv") if path.is_file()]
    for number, path in enumerate(corpora):  # the general corpus appended when it has been made
        spec = CorpusSpec.from_args(corpus=str(path))
        store = build_datastore(model, tokenizer, spec, out, BuildConfig(), append=number > 0, progress=False)
    return {"entries": store.count, "seconds": round(time.perf_counter() - start, 1), **memory.stop()}


def phase_synth(args: argparse.Namespace) -> dict[str, Any]:
    """Write the synthetic datastore of ``args.size`` entries (sq8 keys) from the real one."""
    from knnmt.core.durable import write_json_atomic
    from knnmt.store.datastore import MANIFEST, Datastore, ShardWriter, manifest_version, pack_values
    from knnmt.store.keycodec import KeyCodec

    real = Datastore.open(WORK / "real")
    out = WORK / f"ds-{args.size}"
    if (out / MANIFEST).is_file():
        return {"entries": Datastore.open(out, verify=False).count, "cached": True}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    memory = PeakMemory()
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    sample = real.sample_keys(100_000, seed=args.seed)
    scale = args.noise * sample.std(axis=0)  # [dim] noise per dimension
    codec = KeyCodec("sq8", real.dim)
    codec.train(sample + scale * rng.standard_normal(sample.shape, dtype=np.float32))
    sentences = int(real.manifest["sentences"])
    # sentence vectors (dense sentence search of Subset kNN-MT): replicas get the real unit vector plus
    # noise of the same relative size as the keys', renormalised
    vectors = np.concatenate([v for _, v in real.iter_sentence_vectors()])  # [sentences, d_model]
    vector_scale = args.noise * vectors.std(axis=0)
    records = [real.sentence(i) for i in range(sentences)]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(real.provenance(np.arange(real.count))[0]))])
    shards: list[dict[str, Any]] = []
    written, replica = 0, 0
    while written < args.size:
        # a prefix of whole sentences of the real memory (all of it but in the last replica)
        n_sent = int(np.searchsorted(offsets, min(real.count, args.size - written), side="right")) - 1
        count = int(offsets[n_sent])
        if count == 0:
            break
        name = f"{replica:05d}"
        writer = ShardWriter(out, name, count, real.dim, n_sent, vector_dim=real.vector_dim, codec=codec)
        for first, keys in real.iter_keys(200_000):
            hi = min(first + len(keys), count)
            if first >= hi:
                break
            block = keys[: hi - first]
            if replica:
                block = block + scale * rng.standard_normal(block.shape, dtype=np.float32)
            writer.keys[first:hi] = block
        ids = np.arange(count)
        sent, pos = real.provenance(ids)
        writer.values[:] = real.values[:count]
        writer.sentence_ids[:] = sent + replica * sentences
        writer.positions[:] = pos
        writer.offsets[:] = offsets[: n_sent + 1]
        noisy = vectors[:n_sent].copy()
        if replica:
            noisy += vector_scale * rng.standard_normal(noisy.shape, dtype=np.float32)
            noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        assert writer.vectors is not None
        writer.vectors[:] = noisy
        writer.finish([{**r, "id": r["id"] + replica * sentences} for r in records[:n_sent]])
        shards.append(
            {
                "name": name,
                "count": count,
                "sentences": n_sent,
                "first_sentence": replica * sentences,
                "corpus": 0,
                "skipped_empty": 0,
                "truncated": 0,
            }
        )
        written += count
        replica += 1
        if count < real.count:  # the last, partial replica (whole sentences: a few entries short of N)
            break
    manifest = {
        **{k: v for k, v in real.manifest.items() if k != "packed_values"},
        "version": manifest_version("sq8"),
        "key": {**real.manifest["key"], **codec.manifest_fields()},
        "count": written,
        "sentences": sum(s["sentences"] for s in shards),
        "shards": shards,
        "corpora": [
            {
                "paths": ["synthetic"],
                "sha256": f"synthetic-{args.size}-{args.noise}-{args.seed}",
                "sentences": sum(s["sentences"] for s in shards),
                "skipped_empty": 0,
                "truncated": 0,
                "state": "complete",
                "first_sentence": 0,
            }
        ],
        "synthetic": {"from": str(WORK / "real"), "noise": args.noise, "seed": args.seed},
    }
    manifest["packed_values"] = pack_values(Datastore(out, manifest))
    write_json_atomic(out / MANIFEST, manifest)
    return {
        "entries": written,
        "shards": len(shards),
        "seconds": round(time.perf_counter() - start, 1),
        "disk_gb": round(_du(out) / 1e9, 2),
        **memory.stop(),
    }


def phase_index(args: argparse.Namespace) -> dict[str, Any]:
    """Build the auto index with the lists in RAM or on disk (``args.storage``)."""
    from knnmt.core.config import IndexConfig
    from knnmt.search.index import build_index
    from knnmt.store.datastore import Datastore

    store = Datastore.open(WORK / f"ds-{args.size}", verify=False)
    out = store.path / f"index-{args.storage}"
    memory = PeakMemory()
    start = time.perf_counter()
    index = build_index(store, IndexConfig(storage=args.storage), out, progress=False, force=True)
    return {
        "factory": index.factory,
        "seconds": round(time.perf_counter() - start, 1),
        "disk_gb": round(_du(out) / 1e9, 2),
        "self_recall@8": index.settings.get("self_recall@8"),
        **memory.stop(),
    }


def phase_subset(args: argparse.Namespace) -> dict[str, Any]:
    """Build the Subset kNN-MT index (PQ codes of every key, sentence ranges, the sentence search)."""
    from knnmt.search.subset import SubsetConfig, SubsetIndex
    from knnmt.store.datastore import Datastore

    store = Datastore.open(WORK / f"ds-{args.size}", verify=False)
    out = store.path / "subset"
    memory = PeakMemory()
    start = time.perf_counter()
    built = SubsetIndex.build(
        store, SubsetConfig(sentence_search=args.sentence_search), out=out, progress=False, force=True
    )
    record = built.settings["sentence_search"][args.sentence_search]
    return {
        "sentence_search": args.sentence_search,
        "factory": record.get("factory", ""),
        "sentences": record["sentences"],
        "self_hit@1": record["self_hit_at_1"],
        "seconds": round(time.perf_counter() - start, 1),
        "disk_gb": round(_du(out) / 1e9, 2),
        **memory.stop(),
    }


def phase_translate(args: argparse.Namespace) -> dict[str, Any]:
    """Plain or vanilla kNN-MT with one index: tokens/s (greedy, batch 32), BLEU, peak memory."""
    import torch

    from knnmt.pipeline.evaluation import score
    from knnmt.pipeline.translator import (
        KNNMT,
        load_model,
        saved_knn_config,
        timed_translate,
        tokens_per_second,
    )
    from knnmt.search.subset import SubsetSearch
    from knnmt.store.datastore import Datastore

    torch.set_num_threads(os.cpu_count() or 2)
    rows = [line.split("\t") for line in (TARGET / "test.tsv").read_text(encoding="utf-8").splitlines()]
    sources, references = [r[0] for r in rows[: args.sentences]], [r[1] for r in rows[: args.sentences]]
    memory = PeakMemory()
    model, tokenizer = load_model(str(MODEL))
    store = Datastore.open(WORK / f"ds-{args.size}", verify=False)
    config = dataclasses.replace(saved_knn_config(Datastore.open(WORK / "real")), domain_gate=None)
    start = time.perf_counter()
    if args.mode == "subset":
        subset = SubsetSearch(sentence_search=args.sentence_search)
        knn = KNNMT.load((model, tokenizer), store.path, config=config, retrieval="subset", subset=subset)
    else:
        index = None if args.mode == "plain" else store.path / f"index-{args.mode.split('-')[1]}"
        rerank = 0 if args.mode.endswith("-pq") else None  # PQ distances only: what key storage none gives
        knn = KNNMT.load((model, tokenizer), store.path, index=index, config=config, rerank=rerank)
    load_seconds = time.perf_counter() - start
    gen = {"num_beams": 1, "batch_size": 32}
    use_knn = args.mode != "plain"
    timed_translate(knn, sources[:32], knn=use_knn, **gen)  # warm-up: page cache, allocator
    stats = getattr(knn.retriever, "stats", None) if use_knn else None  # Subset's own timings
    if stats:
        stats.update(dict.fromkeys(stats, 0))  # count the timed runs only, not the warm-up
    rates: list[float] = []
    result: list[Any] = []
    for _ in range(args.repeats):
        result, seconds = timed_translate(knn, sources, knn=use_knn, **gen)
        rates.append(tokens_per_second(result, seconds, tokenizer))
    scores = score([r.text for r in result], references)
    extra: dict[str, Any] = {}
    if stats:  # Subset: time choosing the subsets, and their size
        extra = {
            "prepare_seconds_per_run": round(stats["prepare_seconds"] / args.repeats, 2),
            "search_seconds_per_run": round(stats["search_seconds"] / args.repeats, 2),
            "entries_per_subset": round(stats["subset_entries"] / max(stats["sentences"], 1)),
        }
    return {
        **extra,
        "tok_s": round(max(rates), 1),
        "tok_s_runs": [round(r, 1) for r in rates],
        "bleu": round(scores.bleu, 2),
        "load_seconds": round(load_seconds, 1),
        **memory.stop(),
    }


PHASES = {
    "real": phase_real,
    "synth": phase_synth,
    "index": phase_index,
    "subset": phase_subset,
    "translate": phase_translate,
}


def run_phase(args: argparse.Namespace, phase: str, **extra: Any) -> dict[str, Any]:
    """Run one phase in a child process; returns its JSON result."""
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--noise",
        str(args.noise),
        "--seed",
        str(args.seed),
        "--sentences",
        str(args.sentences),
        "--repeats",
        str(args.repeats),
        "--sentence-search",
        args.sentence_search,
    ]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    print(f"[{time.strftime('%H:%M:%S')}] {phase} {extra}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"phase {phase} {extra} failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"    {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table(report: dict[str, Any]) -> str:
    lines = [
        "| entries | phase | seconds | peak private MiB | peak RSS MiB | disk GB | tok/s | ratio | BLEU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, phases in report["sizes"].items():
        plain = phases.get("translate-plain", {}).get("tok_s")
        for name, r in phases.items():
            ratio = f"{r['tok_s'] / plain:.2f}" if plain and "tok_s" in r else ""
            label = f"{name} {r.get('factory', '')}".strip()
            lines.append(
                f"| {int(size):,} | {label} | {r.get('seconds', '')} "
                f"| {r.get('peak_private_mib', '')} | {r.get('peak_rss_mib', '')} | {r.get('disk_gb', '')} "
                f"| {r.get('tok_s', '')} | {ratio} | {r.get('bleu', '')} |"
            )
    return "\n".join(lines)


MODES = {
    "translate-plain": "plain model",
    "translate-vanilla-ram": "vanilla kNN-MT, lists in RAM",
    "translate-vanilla-disk": "vanilla kNN-MT, lists on disk",
    "translate-vanilla-disk-pq": "vanilla kNN-MT, on disk, PQ distances only (no keys)",
    "translate-subset": "Subset kNN-MT",
}


def plot(report: dict[str, Any], out: Path) -> None:
    """Target tokens/s (as a ratio to the plain model's, measured beside it) and BLEU of each translate
    mode against the number of entries (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(report["sizes"], key=int)
    fig, (speed, bleu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for phase, label in MODES.items():
        points = [(int(n), report["sizes"][n][phase]) for n in sizes if phase in report["sizes"][n]]
        if not points:
            continue
        xs = [n for n, _ in points]
        plain = [report["sizes"][str(n)].get("translate-plain", {}).get("tok_s") for n in xs]
        ratios = [r["tok_s"] / p if p else float("nan") for (_, r), p in zip(points, plain, strict=True)]
        speed.plot(xs, ratios, marker="o", label=label)
        bleu.plot(xs, [r["bleu"] for _, r in points], marker="o", label=label)
    for axis, name in ((speed, "tokens/s ratio to the plain model"), (bleu, "BLEU (target test)")):
        axis.set_xscale("log")
        axis.set_xlabel("datastore entries")
        axis.set_ylabel(name)
        axis.grid(True, alpha=0.3)
    speed.legend(fontsize=8)
    fig.suptitle(
        f"knnmt scale: {report.get('cpu', '')}, {report.get('cores', '')} cores, {report.get('date', '')}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument(
        "--ram-up-to", type=int, default=10_000_000, help="build in-RAM indexes up to this size"
    )
    parser.add_argument("--noise", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sentences", type=int, default=300, help="target test sentences translated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--sentence-search",
        choices=["dense", "bm25"],
        default="dense",
        help="Subset kNN-MT's sentence search (the replicas repeat the real texts: BM25 ties them)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the synthetic datastores")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=["synth", "index", "subset", "translate"],
        default=["synth", "index", "subset", "translate"],
        help="the phases to run (e.g. builds now, translate later on an idle machine with --keep)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only print the table and draw the plot of results.json"
    )
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    results_file = WORK / "results.json"
    report: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.report_only:
        plot(report, WORK / "scaling.png")
        print(table(report))
        return
    report.update(
        command="benchmarks/scale.py " + " ".join(sys.argv[1:]),
        cpu=cpu_name(),
        cores=os.cpu_count(),
        date=time.strftime("%Y-%m-%d"),
        noise=args.noise,
    )
    report.setdefault("sizes", {})
    real = run_phase(args, "real")
    if not (real.get("cached") and "real" in report):
        report["real"] = real
    for size in args.sizes:
        phases: dict[str, Any] = report["sizes"].setdefault(str(size), {})
        storages = ["disk"] + (["ram"] if size <= args.ram_up_to else [])
        steps: list[tuple[str, str, dict[str, Any]]] = [("synth", "synth", {})]
        steps += [(f"index-{storage}", "index", {"storage": storage}) for storage in storages]
        steps += [("subset", "subset", {})]
        modes = ["plain"] + [f"vanilla-{s}" for s in storages] + ["vanilla-disk-pq", "subset"]
        steps += [(f"translate-{mode}", "translate", {"mode": mode}) for mode in modes]
        for name, phase, extra in steps:
            if phase not in args.phases:
                continue
            result = run_phase(args, phase, size=size, **extra)
            if not (result.get("cached") and name in phases):  # keep the timing of the run that made it
                phases[name] = result
            results_file.write_text(json.dumps(report, indent=2))
        if not args.keep:
            shutil.rmtree(WORK / f"ds-{size}", ignore_errors=True)
    plot(report, WORK / "scaling.png")
    print(table(report))


if __name__ == "__main__":
    main()
