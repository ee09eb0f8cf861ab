"""``knnmt`` command line: a thin adapter over the library.

Exit codes: 0 success, 2 usage error (bad arguments or settings), 1 any other failure (also when the
reader of stdout goes away, as in ``knnmt info ds | head -1``: quietly), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.durable import write_json_atomic
from ..core.errors import KnnmtError, UsageError
from ..core.version import __version__

if TYPE_CHECKING:  # for annotations only; the commands import it where they run
    from ..pipeline.translator import KNNMT

logger = logging.getLogger("knnmt")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--src-lang", default=None, help="source language code (NLLB/M2M100/mBART tokenizers)")
    p.add_argument("--tgt-lang", default=None, help="target language code (NLLB/M2M100/mBART tokenizers)")


def _add_adaptive_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--half-distance",
        type=_float_or_off,
        default=None,
        help="adaptive λ: retrieval's weight halves when the neighbours are this far (squared L2) "
        "and fades for text unlike the memory ('none' = constant λ; default: saved, else constant λ)",
    )
    p.add_argument(
        "--confidence-gate",
        type=_float_or_off,
        default=None,
        help="skip retrieval at steps where the model's top token has at least this probability "
        "(faster; protects text unlike the memory; 'none' = off; default: saved, else off)",
    )
    p.add_argument(
        "--domain-gate",
        type=_float_or_off,
        default=None,
        help="retrieve only for inputs whose cosine similarity to the nearest memory source sentence is "
        "at least this (uses the sentence vectors every build stores; 'none' = off; default: the saved "
        "setting, which `knnmt tune` sets, else off)",
    )


def _add_knn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datastore", required=True, help="datastore directory")
    p.add_argument(
        "--index",
        default="auto",
        help="index directory; 'auto' = <datastore>/index if built, else exact search; 'exact' = Flat",
    )
    p.add_argument(
        "--k", type=int, default=None, help="neighbours per step (default: datastore's knn.json or 8)"
    )
    p.add_argument("--lambda", dest="lambda_", type=float, default=None, help="weight of p_kNN in [0, 1]")
    p.add_argument(
        "--temperature", type=float, default=None, help="softmax temperature of p_kNN (default 100)"
    )
    _add_adaptive_args(p)
    p.add_argument(
        "--rerank",
        type=int,
        default=None,
        help="approximate index: re-score RERANK x k candidates exactly (0 = off; default: saved)",
    )
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (overrides the saved value)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (overrides the saved value)")
    p.add_argument(
        "--retrieval",
        choices=["index", "subset", "ray"],
        default="index",
        help="index = search all keys with the faiss index; subset = Subset kNN-MT (knnmt index --subset); "
        "ray = the IVF index's lists split over Ray actors (pip install 'knnmt[ray]')",
    )
    p.add_argument(
        "--ray",
        dest="ray_address",
        default=None,
        metavar="ADDRESS",
        help="ray: the Ray cluster ('auto' = the one started here with `ray start`, ray://HOST:PORT; "
        "default: RAY_ADDRESS, else a local Ray started for this run)",
    )
    p.add_argument(
        "--ray-parts", type=int, default=2, help="ray: actors the index's inverted lists are split over"
    )
    p.add_argument(
        "--subset-size", type=int, default=None, help="subset: nearest sentences searched (saved: 512)"
    )
    p.add_argument(
        "--sentence-search", choices=["bm25", "dense"], default=None, help="subset: sentence search"
    )
    p.add_argument(
        "--subset-scorer",
        choices=["auto", "adc", "faiss", "exact"],
        default=None,
        help="subset: per-step distances (auto = faiss on CPU, adc on GPU)",
    )
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per generate() call")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest translation in tokens")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knnmt", description="Nearest-neighbour machine translation (kNN-MT)."
    )
    parser.add_argument("--version", action="version", version=f"knnmt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="build (or resume, or append to) a datastore from a parallel corpus")
    _add_model_args(b)
    b.add_argument("--source", help="source-language text file, one sentence per line")
    b.add_argument("--target", help="target-language text file, aligned with --source")
    b.add_argument("--corpus", help="one TSV (source<TAB>target) or JSONL ({'src','tgt'}) file instead")
    b.add_argument(
        "--format", choices=["tsv", "jsonl"], default=None, help="format of --corpus (default: suffix)"
    )
    b.add_argument("--out", required=True, help="datastore directory to write")
    b.add_argument("--force", action="store_true", help="replace an existing datastore")
    b.add_argument("--append", action="store_true", help="add this corpus to an existing datastore")
    b.add_argument("--key-layer", choices=["ffn_input", "decoder_output"], default="ffn_input")
    b.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per teacher-forcing batch")
    b.add_argument("--shard-sentences", type=int, default=20000, help="sentence pairs per shard")
    b.add_argument(
        "--key-storage",
        choices=["fp16", "sq8"],
        default="fp16",
        help="how keys are stored: fp16 (2 bytes per dimension) or sq8 (8-bit scalar-quantised, 1 byte per "
        "dimension, for large memories); an --append keeps the datastore's own. No keys at all: "
        "`knnmt index --drop-keys` once the index is built",
    )
    b.add_argument("--max-length", type=int, default=None, help="max tokens per side (default: model max)")
    b.add_argument(
        "--no-truncate", action="store_true", help="fail on over-long sentences instead of truncating"
    )
    b.add_argument(
        "--no-skip-empty", action="store_true", help="fail on empty lines instead of skipping them"
    )
    b.add_argument(
        "--source-prefix", default="", help="text prepended to each source (e.g. a T5 task prefix)"
    )
    b.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="teacher-force the shards on Ray workers: 'auto' (the local Ray, started if none runs) or a "
        "cluster's address (head:6379, ray://head:10001; the datastore must be on a shared filesystem). "
        "Needs pip install 'knnmt[ray]'",
    )
    b.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        help="Ray workers (default: the cluster's CPUs / cpus per worker)",
    )
    b.add_argument(
        "--ray-cpus-per-worker",
        type=int,
        default=None,
        help="CPUs (torch threads) per Ray worker (default 1)",
    )

    r = sub.add_parser(
        "rollback",
        help="undo an interrupted `build --append`: drop its shards, keep the datastore as it was before",
    )
    r.add_argument("datastore", help="datastore directory")

    i = sub.add_parser("index", help="build a faiss index over a datastore's keys")
    i.add_argument("datastore", help="datastore directory")
    i.add_argument(
        "--factory", default="auto", help="faiss factory string (Flat, IVF4096,PQ64x4fs, HNSW32...) or auto"
    )
    i.add_argument("--out", default=None, help="index directory (default: <datastore>/index)")
    i.add_argument("--nprobe", type=int, default=16)
    i.add_argument("--ef-search", type=int, default=128)
    i.add_argument("--train-size", type=int, default=200_000, help="keys sampled to train the index")
    i.add_argument("--rerank", type=int, default=8, help="re-score RERANK x k candidates exactly (0 = off)")
    i.add_argument("--gpu", action="store_true", help="build on GPU when faiss has one")
    where = i.add_mutually_exclusive_group()
    where.add_argument(
        "--on-disk",
        dest="storage",
        action="store_const",
        const="disk",
        help="keep the inverted lists on disk, memory-mapped: bounded memory to build and to search "
        "(default once the in-RAM index would take over a quarter of this machine's memory: from ~115M "
        "entries at d=256 on 24 GiB; 8-bit PQ codes)",
    )
    where.add_argument(
        "--in-ram", dest="storage", action="store_const", const="ram", help="read the whole index into memory"
    )
    i.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="with on-disk lists: fill the sub-indexes (one per group of shards) on Ray workers, 'auto' or "
        "a cluster's address (datastore and index on a shared filesystem). Needs pip install 'knnmt[ray]'",
    )
    i.add_argument("--force", action="store_true", help="replace an existing index")
    i.add_argument(
        "--drop-keys",
        action="store_true",
        help="key storage none: once the index is saved (or for the index already there), delete the "
        "datastore's keys (dim bytes per entry with sq8). Searches then use PQ distances without exact "
        "re-rank; the index and a Subset index can no longer be rebuilt from this datastore",
    )
    i.add_argument(
        "--no-sentence-index",
        action="store_true",
        help="skip the sentence index over the stored source vectors (what the domain gate reads)",
    )
    i.add_argument(
        "--subset", action="store_true", help="build the Subset kNN-MT index (<datastore>/subset) instead"
    )
    i.add_argument(
        "--sentence-search", choices=["bm25", "dense"], default="bm25", help="subset: how sentences are found"
    )
    i.add_argument(
        "--subset-size", type=int, default=512, help="subset: nearest sentences searched per input"
    )
    i.add_argument("--pq-m", type=int, default=0, help="subset: PQ sub-quantisers (0 = dim/8 bytes per key)")
    i.add_argument("--pq-bits", type=int, default=4, help="subset: bits per PQ code (4: fast-scan on a CPU)")
    i.add_argument(
        "--scorer",
        choices=["auto", "adc", "faiss", "exact"],
        default="auto",
        help="subset: default per-step distances",
    )
    i.add_argument(
        "--model", default=None, help="subset with dense search: the datastore's model (default: as recorded)"
    )
    i.add_argument("--device", default=None, help="subset with dense search: torch device")

    t = sub.add_parser("translate", help="translate a file or stdin to stdout")
    _add_model_args(t)
    _add_knn_args(t)
    t.add_argument("-i", "--input", default="-", help="input file (default: stdin)")
    t.add_argument("--no-knn", action="store_true", help="plain model, no retrieval")
    t.add_argument("--neighbors", default=None, help="write per-token neighbours as JSON lines to this file")

    e = sub.add_parser("evaluate", help="BLEU/chrF and tokens/s of the plain model vs kNN-MT")
    _add_model_args(e)
    _add_knn_args(e)
    e.add_argument("--source", required=True, help="test source file")
    e.add_argument("--reference", required=True, help="test reference file")
    e.add_argument(
        "--ood-source",
        default=None,
        help="a test set of other text (e.g. general-domain): its BLEU shows what the memory costs there",
    )
    e.add_argument("--ood-reference", default=None, help="references of --ood-source")
    e.add_argument("--json", default=None, help="also write the scores as JSON to this file")
    e.add_argument("--output-dir", default=None, help="write each system's translations here")

    u = sub.add_parser(
        "tune", help="choose k, lambda, temperature on a dev set and save them with the datastore"
    )
    _add_model_args(u)
    _add_knn_args(u)
    u.add_argument("--source", required=True, help="dev source file")
    u.add_argument("--reference", required=True, help="dev reference file")
    u.add_argument("--ks", default="1,2,4,8,16,32,64", help="comma-separated k values")
    u.add_argument("--temperatures", default="1,3,10,30,100,300,1000", help="comma-separated temperatures")
    u.add_argument("--lambdas", default=None, help="comma-separated lambdas (default 0, 0.05, ..., 1)")
    u.add_argument("--confirm", type=int, default=3, help="best grid points confirmed by decoding BLEU")
    u.add_argument(
        "--k-tolerance",
        type=float,
        default=0.005,
        help="prefer the smallest k whose log-likelihood is within this many nats/token of the best "
        "(retrieval cost grows with k; 0 = the most likely k)",
    )
    u.add_argument("--plot", default=None, help="heatmap PNG (default: <datastore>/tuning.png)")
    u.add_argument("--no-save", action="store_true", help="report only; do not write <datastore>/knn.json")
    u.add_argument(
        "--half-distances",
        default="auto",
        help="comma-separated half distances, 'none' = constant λ (default auto: none and percentiles of "
        "the dev set's nearest-neighbour distance)",
    )
    u.add_argument(
        "--ood-source",
        default=None,
        help="out-of-domain dev source: ranks the grid by in- and out-of-domain likelihood together and "
        "reports the BLEU cost there",
    )
    u.add_argument("--ood-reference", default=None, help="out-of-domain dev references")
    u.add_argument(
        "--no-ood",
        action="store_true",
        help="do not use the out-of-domain dev set a model directory ships (knnmt-ood-dev.tsv)",
    )
    u.add_argument(
        "--gates",
        default="none,0.5,0.7,0.8,0.9,0.95",
        help="comma-separated confidence gates, 'none' = retrieve at every step",
    )
    u.add_argument(
        "--domain-recall",
        default="auto",
        help="add a sentence-level domain gate: a share R keeps retrieval on for R of the dev sources; "
        "'separate' (needs --ood-*) sets it where it best tells the dev sources from the out-of-domain "
        "ones; 'none' = no gate; default auto: when the datastore has its dense sentence index, "
        "'separate' with --ood-* and 0.9 without",
    )
    u.add_argument(
        "--max-ood-loss",
        type=float,
        default=0.5,
        help="with --ood-*: the best dev BLEU among confirmed settings losing at most this much "
        "out-of-domain dev BLEU (default 0.5)",
    )

    m = sub.add_parser(
        "memory",
        help="add, delete, list or compact a datastore's translation memory (the library code of "
        "`knnmt serve`'s /memory endpoints, for scripts; refused while a writable service holds it)",
    )
    msub = m.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    ma = msub.add_parser("add", help="append pairs from a TSV or JSONL file as one shard")
    ma.add_argument("datastore", help="datastore directory")
    ma.add_argument("-i", "--input", required=True, help="pairs: TSV (source<TAB>target) or JSONL file")
    ma.add_argument("--format", choices=["tsv", "jsonl"], default=None, help="default: from the suffix")
    ma.add_argument(
        "--model", default=None, help="the datastore's model (default: the name it was built with)"
    )
    ma.add_argument("--device", default=None, help="torch device (default: cpu)")
    ma.add_argument("--src-lang", default=None, help="source language code (NLLB/M2M100/mBART tokenizers)")
    ma.add_argument("--tgt-lang", default=None, help="target language code (NLLB/M2M100/mBART tokenizers)")
    ma.add_argument(
        "--idempotency-key", default=None, help="a key that makes a repeated add of the same file a no-op"
    )
    md = msub.add_parser("delete", help="remove sentences from retrieval (every reading path), durably")
    md.add_argument("datastore", help="datastore directory")
    md.add_argument("sentence_ids", type=int, nargs="+", metavar="ID", help="global sentence ids")
    ml = msub.add_parser("list", help="JSON lines of the sentences added to the memory and removed from it")
    ml.add_argument("datastore", help="datastore directory")
    only = ml.add_mutually_exclusive_group()
    only.add_argument("--added", action="store_true", help="only the sentences added to the memory")
    only.add_argument("--removed", action="store_true", help="only the removed sentences")
    mc = msub.add_parser("compact", help="add the entries appended since the saved index to it")
    mc.add_argument("datastore", help="datastore directory")

    n = sub.add_parser("info", help="describe a datastore and its index")
    n.add_argument("datastore", help="datastore directory")
    n.add_argument("--json", action="store_true", help="machine-readable output")

    v = sub.add_parser("serve", help="HTTP translation-memory service with a web page (FastAPI)")
    _add_model_args(v)
    v.add_argument("--datastore", required=True, help="datastore directory (grows with POST /memory)")
    v.add_argument("--index", default="auto", help="index directory; 'auto' = <datastore>/index if built")
    v.add_argument("--k", type=int, default=None, help="default neighbours (default: knn.json or 8)")
    v.add_argument("--lambda", dest="lambda_", type=float, default=None, help="default weight of p_kNN")
    v.add_argument("--temperature", type=float, default=None, help="default temperature of p_kNN")
    _add_adaptive_args(v)
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument(
        "--token-file",
        default=None,
        help="bearer token for writes and --private-reads (default: $KNNMT_SERVE_TOKEN)",
    )
    v.add_argument("--read-only", action="store_true", help="no writes: POST/DELETE /memory answer 403")
    v.add_argument(
        "--private-reads",
        action="store_true",
        help="reads of stored text need the token too: GET /memory/{id}, /translate's neighbour "
        "explanations, /info's datastore path (the memory is confidential)",
    )
    v.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a further Host name to answer (reverse proxy, DNS name; repeatable; '*' = any); by default "
        "only the --host address (and localhost, 127.0.0.1, ::1 for loopback) is answered",
    )
    v.add_argument("--max-batch", type=int, default=16, help="sentences per generate call")
    v.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for company")
    v.add_argument("--no-batching", action="store_true", help="one request per generate call")
    v.add_argument("--threads", type=int, default=0, help="torch threads of the model (0 = torch default)")
    v.add_argument("--max-sentences", type=int, default=64, help="sentences (or pairs) per request")
    v.add_argument("--max-chars", type=int, default=1000, help="characters per sentence")
    v.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body size limit")
    v.add_argument("--compact-every", type=int, default=4096, help="side-index entries before compaction")
    v.add_argument(
        "--merge-fanout",
        type=int,
        default=8,
        help="appended shards merged into one in the background (0 = never): the shard count stays "
        "logarithmic in the number of additions",
    )

    d = sub.add_parser("demo", help="build, index, translate and score the bundled example end to end")
    d.add_argument("--workdir", default="runs/demo", help="where the demo writes its datastore and report")
    d.add_argument("--force", action="store_true", help="rebuild everything")
    d.add_argument("--limit", type=int, default=0, help="test sentences to translate (default 0 = all 1,000)")
    d.add_argument(
        "--toy", action="store_true", help="run on the tiny offline toy model even if a real one ships"
    )
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _knn_config(args: argparse.Namespace, datastore: str) -> Any:
    """The datastore's saved kNN settings (``knn.json``, else the defaults) with the command line's
    ``--k/--lambda/--temperature/--half-distance/--confidence-gate/--domain-gate`` on top (``none``
    switches the last three off)."""
    from ..core.config import KNNConfig
    from ..pipeline.translator import saved_knn_config

    base = saved_knn_config(datastore)
    changes = {
        k: v
        for k, v in {
            "k": args.k,
            "lambda_": args.lambda_,
            "temperature": args.temperature,
            "half_distance": args.half_distance,
            "confidence_gate": args.confidence_gate,
            "domain_gate": args.domain_gate,
        }.items()
        if v is not None
    }
    return KNNConfig(**{**base.to_dict(), **{k: None if v == OFF else v for k, v in changes.items()}})


#: ``--half-distance/--confidence-gate/--domain-gate none``: switch off a setting saved in ``knn.json``
OFF = "none"


def _float_or_off(text: str) -> float | str:
    """argparse type: a number, or ``none`` (:data:`OFF`)."""
    if text.strip().lower() == OFF:
        return OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _load_knn(args: argparse.Namespace) -> Any:
    from ..core.errors import DatastoreError
    from ..pipeline.translator import KNNMT, load_model
    from ..store.datastore import read_manifest

    manifest = read_manifest(Path(args.datastore))
    if manifest["state"] == "complete" and manifest["count"] == 0 and not getattr(args, "no_knn", False):
        plain = ", or translate with --no-knn" if args.command == "translate" else ""
        raise DatastoreError(
            f"datastore {args.datastore} has no entries (an older knnmt built it from an empty corpus): "
            f"nothing to retrieve; rebuild it from a corpus with at least one sentence pair "
            f"(`knnmt build --force`){plain}"
        )
    model, tokenizer = load_model(args.model, args.device)
    index = None if args.index == "exact" else args.index
    subset = None
    if args.retrieval == "subset":
        from ..search.subset import SubsetSearch

        subset = SubsetSearch(
            subset_size=args.subset_size, sentence_search=args.sentence_search, scorer=args.subset_scorer
        )
    return KNNMT.load(
        (model, tokenizer),
        args.datastore,
        index=index,
        retrieval=args.retrieval,
        subset=subset,
        ray_address=args.ray_address,
        ray_parts=args.ray_parts,
        config=_knn_config(args, args.datastore),
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        rerank=args.rerank,
        src_lang=args.src_lang,
        tgt_lang=args.tgt_lang,
    )


#: Integer options and their range (lowest, highest or ``None``), checked before any command runs so that
#: a bad value is named by its flag instead of failing deep inside faiss or torch.
_RANGES: dict[str, tuple[str, int, int | None]] = {
    "k": ("--k", 1, 4096),
    "nprobe": ("--nprobe", 1, None),
    "ef_search": ("--ef-search", 1, None),
    "rerank": ("--rerank", 0, 64),
    "subset_size": ("--subset-size", 1, None),
    "ray_parts": ("--ray-parts", 1, None),
    "beam": ("--beam", 1, None),
    "batch_size": ("--batch-size", 1, None),
    "max_new_tokens": ("--max-new-tokens", 1, None),
    "max_tokens": ("--max-tokens", 16, None),
    "shard_sentences": ("--shard-sentences", 1, None),
    "max_length": ("--max-length", 2, None),
    "pq_m": ("--pq-m", 0, None),
    "pq_bits": ("--pq-bits", 1, 16),
    "confirm": ("--confirm", 1, None),
    "limit": ("--limit", 0, None),
    "ray_workers": ("--ray-workers", 1, None),
    "ray_cpus_per_worker": ("--ray-cpus-per-worker", 1, None),
}


def _check_ranges(args: argparse.Namespace) -> None:
    """Raise :class:`UsageError` naming the first option of :data:`_RANGES` given out of its range."""
    for dest, (flag, low, high) in _RANGES.items():
        value = getattr(args, dest, None)
        if value is None or (low <= value and (high is None or value <= high)):
            continue
        want = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UsageError(f"{flag} must be an integer {want}, got {value}")


def _gen_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.beam < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--beam, --batch-size and --max-new-tokens must be >= 1")
    return {"num_beams": args.beam, "max_new_tokens": args.max_new_tokens}


def _cmd_build(args: argparse.Namespace) -> int:
    from ..core.config import BuildConfig
    from ..hf.registry import set_languages
    from ..pipeline.build import build_datastore, check_build_mode
    from ..pipeline.translator import load_model
    from ..store.corpus import CorpusSpec

    check_build_mode(args.append, args.force)  # before the model loads
    if args.ray is None and (args.ray_workers is not None or args.ray_cpus_per_worker is not None):
        raise UsageError("--ray-workers and --ray-cpus-per-worker need --ray (auto or a cluster's address)")
    spec = CorpusSpec.from_args(args.source, args.target, args.corpus, args.format)
    config = BuildConfig(
        key_layer=args.key_layer,
        max_tokens=args.max_tokens,
        shard_sentences=args.shard_sentences,
        truncate=not args.no_truncate,
        skip_empty=not args.no_skip_empty,
        max_length=args.max_length,
        key_storage=args.key_storage,
    )
    if args.ray is not None:
        return _build_on_ray(args, spec, config)
    model, tokenizer = load_model(args.model, args.device)
    set_languages(model, tokenizer, args.src_lang, args.tgt_lang)
    store = build_datastore(
        model,
        tokenizer,
        spec,
        args.out,
        config,
        append=args.append,
        force=args.force,
        model_name=args.model,
        source_prefix=args.source_prefix,
        progress=not args.quiet,
    )
    print(json.dumps(store.describe(), indent=2))
    return EXIT_OK


def _build_on_ray(args: argparse.Namespace, spec: Any, config: Any) -> int:
    """``build --ray``: the same build with the shards written by Ray workers (Ray imported only here)."""
    from ..pipeline.distributed import ModelSource, build_datastore_ray, import_ray

    import_ray()  # a missing Ray is a usage error, reported before the model loads
    store = build_datastore_ray(
        ModelSource(args.model, args.device, src_lang=args.src_lang, tgt_lang=args.tgt_lang),
        spec,
        args.out,
        config,
        address=args.ray,
        workers=args.ray_workers,
        cpus_per_worker=args.ray_cpus_per_worker or 1,
        append=args.append,
        force=args.force,
        source_prefix=args.source_prefix,
        progress=not args.quiet,
    )
    print(json.dumps(store.describe(), indent=2))
    return EXIT_OK


def _cmd_rollback(args: argparse.Namespace) -> int:
    from ..pipeline.build import rollback_append

    store = rollback_append(args.datastore)
    print(json.dumps(store.describe(), indent=2))
    return EXIT_OK


def _cmd_index(args: argparse.Namespace) -> int:
    from ..core.config import IndexConfig
    from ..search.index import INDEX_FILE, SearchIndex, build_index, drop_keys
    from ..store.datastore import Datastore

    config = IndexConfig(
        factory=args.factory,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        rerank=args.rerank,
        train_size=args.train_size,
        use_gpu=args.gpu,
        storage=args.storage or "auto",
        drop_keys=args.drop_keys,
    )
    store = Datastore.open(args.datastore)
    if args.subset:
        return _index_subset(args, store)
    target = Path(args.out) if args.out else store.path / "index"
    if args.drop_keys and not args.force and (target / INDEX_FILE).is_file():  # the index is there
        index = SearchIndex.load(target, store)
        print(json.dumps({"index": str(target), **drop_keys(store, index)}, indent=2))
        return EXIT_OK
    if args.ray is not None:
        from ..pipeline.distributed import build_index_ray

        index = build_index_ray(
            store, config, args.out, address=args.ray, progress=not args.quiet, force=args.force
        )
    else:
        index = build_index(store, config, args.out, progress=not args.quiet, force=args.force)
    report = dict(index.settings)
    if not args.no_sentence_index:
        report["sentence_index"] = _sentence_index(store)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def _sentence_index(store: Any) -> dict[str, Any] | None:
    """Rebuild the domain gate's sentence index with the key index (seconds, not minutes)."""
    from ..pipeline.domain_gate import index_sentences

    return index_sentences(store, force=True)


def _index_subset(args: argparse.Namespace, store: Any) -> int:
    from ..pipeline.build import build_subset_index
    from ..pipeline.translator import load_model
    from ..search.subset import SubsetConfig

    config = SubsetConfig(
        sentence_search=args.sentence_search,
        subset_size=args.subset_size,
        pq_m=args.pq_m,
        pq_bits=args.pq_bits,
        train_size=args.train_size,
        rerank=args.rerank,
        scorer=args.scorer,
    )
    model = tokenizer = None
    if args.sentence_search == "dense":
        model, tokenizer = load_model(args.model or store.manifest["model"]["name"], args.device)
    subset = build_subset_index(
        store,
        config,
        model=model,
        tokenizer=tokenizer,
        out=args.out,
        progress=not args.quiet,
        force=args.force,
    )
    print(json.dumps(subset.settings, indent=2))
    return EXIT_OK


def _read_input(path: str) -> list[str]:
    """The lines of ``-i/--input`` (``-``: stdin) under the rules of every text input
    (:func:`knnmt.store.corpus.decode_lines`: BOM dropped; NUL, CR-only line ends, bad UTF-8 refused)."""
    from ..store.corpus import read_lines

    return read_lines(path)


def _check_writable(path: str, flag: str) -> None:
    """Raise :class:`UsageError` unless the output file ``path`` of ``flag`` can be written: checked
    before the work that produces it, without touching an existing file."""
    file = Path(path)
    parent = file.parent
    if file.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, expected a file name")
    if file.exists():
        if not os.access(file, os.W_OK):
            raise UsageError(f"{flag} {path}: the file is not writable (permission denied)")
        return
    if not parent.exists():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot create files in {parent} (permission denied)")


def _cmd_translate(args: argparse.Namespace) -> int:
    from ..pipeline.translator import dump_jsonl

    if args.neighbors:
        _check_writable(args.neighbors, "--neighbors")
    sources = _read_input(args.input)
    knn = _load_knn(args)
    results = knn.translate(
        sources,
        knn=not args.no_knn,
        batch_size=args.batch_size,
        progress=not args.quiet,
        return_neighbors=bool(args.neighbors),
        **_gen_kwargs(args),
    )
    for result in results:
        sys.stdout.write(result.text + "\n")
    sys.stdout.flush()
    if args.neighbors:
        dump_jsonl(results, args.neighbors)
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..pipeline.evaluation import evaluate, format_domain_table, format_table
    from ..store.corpus import read_lines

    if bool(args.ood_source) != bool(args.ood_reference):
        raise UsageError("--ood-source and --ood-reference go together")
    sources, references = read_lines(args.source), read_lines(args.reference)
    ood = (read_lines(args.ood_source), read_lines(args.ood_reference)) if args.ood_source else None
    knn = _load_knn(args)
    scores, outputs = evaluate(
        knn, sources, references, batch_size=args.batch_size, progress=not args.quiet, **_gen_kwargs(args)
    )
    ood_scores, ood_outputs = (
        evaluate(knn, *ood, batch_size=args.batch_size, progress=not args.quiet, **_gen_kwargs(args))
        if ood
        else ([], {})
    )
    if ood_scores:
        print(format_domain_table(scores, ood_scores))
    else:
        print(format_table(scores))
        print(
            "out-of-domain cost not measured: pass --ood-source/--ood-reference (a test set of other text "
            "your users send) to see what the memory does to it"
        )
    print(
        f"kNN-MT settings: k={knn.config.k} lambda={knn.config.lambda_} temperature={knn.config.temperature} "
        f"half-distance={knn.config.half_distance} confidence-gate={knn.config.confidence_gate} "
        f"domain-gate={knn.config.domain_gate} {_retrieval_name(knn)} beam={args.beam}"
    )
    if args.json:
        payload: Any = [s.to_dict() for s in scores]
        if ood_scores:
            payload = {"in_domain": payload, "out_of_domain": [s.to_dict() for s in ood_scores]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for suffix, systems in (("", outputs), (".ood", ood_outputs)):
            for name, translations in systems.items():
                (out / f"{name}{suffix}.txt").write_text(
                    "".join(t.text + "\n" for t in translations), encoding="utf-8"
                )
    return EXIT_OK


def _retrieval_name(knn: KNNMT) -> str:
    return f"retrieval={knn.retriever.describe()}"


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _same(row: dict[str, Any], config: Any) -> bool:
    """Whether a tuning result row holds ``config``'s settings."""
    return all(row[key] == value for key, value in config.to_dict().items())


def _optional_floats(text: str, what: str) -> list[float | None]:
    """``"none,0.5,0.9"`` -> ``[None, 0.5, 0.9]``."""
    return [None if x.strip().lower() == OFF else _floats(x, what)[0] for x in text.split(",") if x.strip()]


#: ``knnmt tune --domain-recall auto`` without out-of-domain dev data: the share of in-domain dev
#: sources the domain gate keeps
AUTO_DOMAIN_RECALL = 0.9


def _domain_recall(text: str, knn: Any, has_ood: bool) -> float | str | None:
    """``--domain-recall``: a share in (0, 1], ``separate``, ``none``, or ``auto``: when the datastore has
    the dense sentence index the gate needs, ``separate`` with out-of-domain dev data and
    :data:`AUTO_DOMAIN_RECALL` without; else no gate."""
    from ..pipeline.domain_gate import SEPARATE

    value = text.strip().lower()
    if value == OFF:
        return None
    if value == SEPARATE:
        if not has_ood:
            raise UsageError("--domain-recall separate needs --ood-source and --ood-reference")
        return SEPARATE
    if value != "auto":
        recall = _floats(value, "--domain-recall")[0]
        if not 0 < recall <= 1:
            raise UsageError(f"--domain-recall must be in (0, 1], 'separate', 'auto' or 'none', got {text!r}")
        return recall
    try:
        knn.domain_gate  # noqa: B018  (loads it, or says why it cannot)
    except KnnmtError as exc:  # no dense sentence index, or one of an older datastore
        logger.info("no domain gate: %s", exc)
        return None
    return SEPARATE if has_ood else AUTO_DOMAIN_RECALL


def _cmd_tune(args: argparse.Namespace) -> int:
    from ..pipeline.domain_gate import SEPARATE
    from ..pipeline.tuning import DEFAULT_LAMBDAS, plot_grid, shipped_ood_dev, tune, tuning_note
    from ..store.corpus import read_lines
    from ..store.writelock import DatastoreLocked, describe_holder, holder_of

    holder = None if args.no_save else holder_of(args.datastore)
    if holder is not None:  # fail now, not after the whole tuning run
        raise DatastoreLocked(
            f"datastore {args.datastore} is being written by {describe_holder(holder)}, so tune could not "
            "save its choice there; wait for it, or pass --no-save to tune without saving",
            holder,
        )
    sources, references = read_lines(args.source), read_lines(args.reference)
    knn = _load_knn(args)
    lambdas = _floats(args.lambdas, "--lambdas") if args.lambdas else list(DEFAULT_LAMBDAS)
    ks = [int(k) for k in _floats(args.ks, "--ks")]
    halves = (
        None
        if args.half_distances.strip().lower() == "auto"
        else _optional_floats(args.half_distances, "--half-distances")
    )
    if bool(args.ood_source) != bool(args.ood_reference):
        raise UsageError("--ood-source and --ood-reference go together")
    ood_sources = read_lines(args.ood_source) if args.ood_source else []
    ood_references = read_lines(args.ood_reference) if args.ood_reference else []
    ood_from = args.ood_source
    shipped = None if args.ood_source or args.no_ood else shipped_ood_dev(args.model)
    if shipped is not None:
        ood_from, ood_sources, ood_references = str(shipped[0]), shipped[1], shipped[2]
        print(f"out-of-domain dev set: {ood_from} ({len(ood_sources)} pairs, shipped with the model)")
    domain = _domain_recall(args.domain_recall, knn, bool(ood_sources))
    result = tune(
        knn,
        sources,
        references,
        ks=ks,
        temperatures=_floats(args.temperatures, "--temperatures"),
        lambdas=lambdas,
        half_distances=halves,
        gates=_optional_floats(args.gates, "--gates"),
        max_ood_loss=args.max_ood_loss,
        domain_recall=domain if isinstance(domain, float) else None,
        separate_domains=domain == SEPARATE,
        ood_sources=ood_sources,
        ood_references=ood_references,
        confirm=args.confirm,
        k_tolerance=args.k_tolerance,
        batch_size=args.batch_size,
        **_gen_kwargs(args),
    )
    for row in result.confirmed:
        half, gate = row["half_distance"], row["confidence_gate"]
        ood = (
            f" ood-token-LL={row['ood_log_likelihood']:.4f} ood-BLEU={row['ood_bleu']:.2f}"
            if "ood_bleu" in row
            else ""
        )
        print(
            f"k={row['k']:<3} T={row['temperature']:<7g} lambda={row['lambda_']:<5g} "
            f"half-distance={'none' if half is None else f'{half:g}':<6} "
            f"gate={'none' if gate is None else f'{gate:g}':<5} "
            f"token-LL={row['log_likelihood']:.4f}{ood} dev BLEU={row['bleu']:.2f} chrF={row['chrf']:.2f}"
        )
    print(f"plain model token-LL={result.base_log_likelihood:.4f} over {result.tokens} reference tokens")
    if result.ood_base_log_likelihood is not None:
        print(
            f"plain model out-of-domain token-LL={result.ood_base_log_likelihood:.4f} "
            f"dev BLEU={result.ood_base_bleu:.2f}"
        )
    best = result.best
    print(
        f"chosen: k={best.k} lambda={best.lambda_} temperature={best.temperature} "
        f"half-distance={best.half_distance} confidence-gate={best.confidence_gate} "
        f"domain-gate={best.domain_gate}"
    )
    if best.domain_gate is not None:
        print(
            f"domain gate: retrieval for inputs at least {best.domain_gate:g} similar to a memory source "
            f"({result.domain_recall:.0%} of the dev sources"
            + (
                ""
                if result.ood_domain_kept is None
                else f", {result.ood_domain_kept:.0%} of the out-of-domain dev sources"
            )
            + (", the best split of the two" if result.domain_rule == SEPARATE else "")
            + ")"
        )
    datastore = Path(args.datastore)
    plot = plot_grid(result, args.plot or datastore / "tuning.png")
    write_json_atomic(datastore / "tuning.json", result.to_dict())
    print(f"heatmap: {plot}")
    chosen = next((row for row in result.confirmed if "ood_bleu" in row and _same(row, best)), None)
    about = tuning_note(result, chosen, args.source, ood_from)
    if chosen is not None:
        print(
            f"out-of-domain dev BLEU: plain {result.ood_base_bleu:.2f} -> kNN-MT {chosen['ood_bleu']:.2f} "
            f"({-chosen['ood_bleu_loss']:+.2f})"
            + (
                f"; the domain gate left {chosen['ood_sentences_off']:.0%} of it to the plain model"
                if "ood_sentences_off" in chosen
                else ""
            )
        )
    else:
        print(about["out_of_domain"])
    if not args.no_save:
        knn.config = best
        print(f"saved as the datastore's default: {knn.save_config(best, about)}")
    return EXIT_OK


def _read_json_object(file: Path) -> dict[str, Any]:
    """A JSON object file of a datastore (index or subset settings, knn.json) for ``knnmt info``."""
    from ..core.errors import DatastoreError

    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatastoreError(f"{file}: corrupt JSON ({exc}); rebuild or remove it") from None
    if not isinstance(data, dict):
        raise DatastoreError(
            f"{file}: expected a JSON object, found {type(data).__name__}; rebuild or remove it"
        )
    return data


def _cmd_info(args: argparse.Namespace) -> int:
    from ..pipeline.translator import KNN_CONFIG_FILE
    from ..search.index import SETTINGS_FILE
    from ..store.datastore import Datastore, read_manifest

    path = Path(args.datastore)
    manifest = read_manifest(path)
    info: dict[str, Any]
    if manifest["state"] == "complete":
        info = Datastore.open(path).describe()
    else:
        info = {
            "path": str(path),
            "state": manifest["state"],
            "entries": manifest["count"],
            "shards": len(manifest["shards"]),
            "note": "interrupted build: rerun `knnmt build` to resume",
        }
    if manifest["state"] == "complete" and manifest["count"] == 0:
        info["note"] = "empty: nothing to retrieve; rebuild it from a corpus with at least one sentence pair"
    settings = path / "index" / SETTINGS_FILE
    if settings.is_file():
        s = _read_json_object(settings)
        info["index"] = {
            k: s.get(k) for k in ("factory", "ntotal", "nprobe", "ef_search", "build_seconds")
        } | {"storage": s.get("storage", "ram")}  # indexes from before on-disk lists are in RAM
    subset_settings = path / "subset" / "subset.json"
    if subset_settings.is_file():
        s = _read_json_object(subset_settings)
        info["subset"] = {k: s.get(k) for k in ("sentence_search", "subset_size", "scorer", "rerank", "pq")}
    knn_file = path / KNN_CONFIG_FILE
    if knn_file.is_file():
        info["knn"] = _read_json_object(knn_file)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>15}: {json.dumps(value) if isinstance(value, list | dict) else value}")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .service import BatchConfig, ServeConfig, Service, bind_socket, read_token, run_server

    batch = (
        BatchConfig(max_batch=1, max_wait_ms=0, threads=args.threads)
        if args.no_batching
        else BatchConfig(max_batch=args.max_batch, max_wait_ms=args.batch_wait_ms, threads=args.threads)
    )
    needs_token = not args.read_only or args.private_reads
    config = ServeConfig(
        token=read_token(args.token_file, os.environ) if needs_token else None,
        writes=not args.read_only,
        private_reads=args.private_reads,
        host=args.host,
        allowed_hosts=tuple(args.allowed_host),
        max_body_bytes=args.max_body_bytes,
        max_sentences=args.max_sentences,
        max_chars=args.max_chars,
        compact_every=args.compact_every,
        merge_fanout=args.merge_fanout,
        batch=batch,
    )
    sock = bind_socket(args.host, args.port)  # a port in use fails now, before the model loads
    try:
        service = Service.open(
            args.model,
            args.datastore,
            config,
            index=None if args.index == "exact" else args.index,
            knn_config=_knn_config(args, args.datastore),
            device=args.device,
        )
    except BaseException:
        sock.close()
        raise
    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}/"
    logger.info("serving %s on %s (API schema at /openapi.json)", args.datastore, url)
    run_server(service, port=args.port, log_level="warning" if args.quiet else "info", sock=sock)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(
        Path(args.workdir), force=args.force, progress=not args.quiet, limit=args.limit or None, toy=args.toy
    )
    print(report)
    print(f"HTML report: {Path(args.workdir) / 'report.html'}")
    return EXIT_OK


def _cmd_memory(args: argparse.Namespace) -> int:
    from ..pipeline import memory
    from ..store.datastore import Datastore

    action = args.memory_command
    if action == "delete":
        try:
            report = memory.delete_sentences(args.datastore, args.sentence_ids)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
        print(json.dumps(report))
    elif action == "list":
        store = Datastore.open(args.datastore, verify=False)
        for record in memory.memory_records(store, added=not args.removed, removed=not args.added):
            print(json.dumps(record, ensure_ascii=False))
    elif action == "compact":
        print(json.dumps(memory.compact_memory(args.datastore)))
    else:
        print(json.dumps(_memory_add(args).report()))
    return EXIT_OK


def _memory_add(args: argparse.Namespace) -> Any:
    from ..hf.registry import set_languages
    from ..pipeline.memory import add_pairs
    from ..pipeline.translator import load_model
    from ..store.corpus import CorpusSpec, is_empty, iter_pairs
    from ..store.datastore import read_manifest

    spec = CorpusSpec.from_args(corpus=args.input, format=args.format)
    pairs = []
    for pair in iter_pairs(spec):  # read and checked before the model loads
        if is_empty(pair):
            raise UsageError(f"{args.input}:{pair.line}: an empty side; a memory keeps whole pairs only")
        pairs.append((pair.source, pair.target))
    name = args.model or read_manifest(Path(args.datastore))["model"]["name"]
    model, tokenizer = load_model(name, args.device)
    set_languages(model, tokenizer, args.src_lang, args.tgt_lang)
    return add_pairs(args.datastore, pairs, model, tokenizer, idempotency_key=args.idempotency_key)


COMMANDS = {
    "build": _cmd_build,
    "rollback": _cmd_rollback,
    "index": _cmd_index,
    "translate": _cmd_translate,
    "evaluate": _cmd_evaluate,
    "info": _cmd_info,
    "tune": _cmd_tune,
    "demo": _cmd_demo,
    "serve": _cmd_serve,
    "memory": _cmd_memory,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``knnmt`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        _check_ranges(args)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, so that a closed pipe is reported below and not at exit
        return code
    except BrokenPipeError:
        # the reader of stdout went away (`knnmt info ds | head -1`): stop quietly, and point stdout at
        # devnull so that Python's flush at exit fails no more (Python docs, "Note on SIGPIPE")
        with contextlib.suppress(AttributeError, OSError, ValueError):  # no real stdout (tests)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except UsageError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    except KnnmtError as exc:
        logger.error("%s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except Exception as exc:  # an unexpected failure: say what, show the traceback with -v
        if args.verbose:
            raise
        logger.error("%s: %s (run with -v for the traceback)", type(exc).__name__, exc)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
