"""Load benchmark of ``knnmt serve``: N concurrent clients on 127.0.0.1 for a bounded time, with and
without dynamic batching. Reports requests/s, latency percentiles, errors and the mean batch size.

One command (bundled model and the demo datastore built by ``knnmt demo``)::

    python benchmarks/serve_load.py --model models/opus-knnmt-en-de-small \\
        --datastore runs/demo/datastore --sentences data/target/test.tsv --clients 8 --duration 30

Without ``--model``/``--datastore`` it builds the tiny toy model and its datastore in a temporary
directory. Each mode starts its own read-only server subprocess; every client sends one sentence per
request (``POST /translate``) in a loop until the time is up (and at most ``--max-requests`` in all).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from knnmt.apps.service.process import spawn_server

logger = logging.getLogger("serve_load")
logging.getLogger("httpx").setLevel(logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]


def _start(model: str, datastore: str, extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    return spawn_server(model, datastore, ["--read-only", *extra], log, timeout=300)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def run_mode(
    name: str,
    url: str,
    sentences: list[str],
    clients: int,
    duration: float,
    max_requests: int,
    body: dict[str, Any],
) -> dict[str, Any]:
    """Drive the server at ``url`` with ``clients`` threads; returns the measured figures."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    start = time.perf_counter()
    deadline = start + duration

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.perf_counter() < deadline:
                with lock:
                    if next(counter, None) is None:
                        return
                sentence = sentences[int(rng.integers(len(sentences)))]
                t0 = time.perf_counter()
                try:
                    r = http.post("/translate", json={"sentences": [sentence], **body})
                    ok = r.status_code == 200
                    problem = "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, problem = False, f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors.append(problem)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    metrics = httpx.get(url + "/metrics", timeout=10).text
    lat = np.array(latencies) * 1000
    batches = _metric(metrics, "knnmt_batch_sentences_count")
    return {
        "mode": name,
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "mean_batch": round(_metric(metrics, "knnmt_batch_sentences_sum") / batches, 2) if batches else None,
        "tokens_per_s": round(_metric(metrics, "knnmt_generated_tokens_total") / wall, 1),
    }


_TOY_BUILD = """
import sys
from pathlib import Path
from knnmt.pipeline.build import build_datastore
from knnmt.store.corpus import CorpusSpec
from knnmt.hf.toy import build_toy_model
from knnmt.pipeline.translator import load_model
work = Path(sys.argv[1])
toy = build_toy_model(work / "toy", n_sentences=400)
model, tokenizer = load_model(str(toy / "model"))
spec = CorpusSpec((str(toy / "corpus.en"), str(toy / "corpus.de")), "text")
build_datastore(model, tokenizer, spec, work / "ds", progress=False)
"""


def _toy(workdir: Path) -> tuple[str, str]:
    """Build the toy model and datastore in a subprocess (this process stays free of torch threads)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", _TOY_BUILD, str(workdir)], env=env, check=True)
    return str(workdir / "toy" / "model"), str(workdir / "ds")


def _read_sources(path: str) -> list[str]:
    lines = [line.split("\t")[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [s for s in lines if s and len(s) <= 300]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model directory (default: the toy model)")
    parser.add_argument("--datastore", default=None, help="datastore directory (default: the toy one)")
    parser.add_argument("--sentences", default=None, help="TSV or text file of sources (first column)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per mode")
    parser.add_argument("--max-requests", type=int, default=20000, help="requests per mode at most")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--modes", default="unbatched,batched")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads of the server's model (0: default)"
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of sequential requests first")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    if args.model and args.datastore:
        model, datastore = args.model, args.datastore
    else:
        logger.info("building the toy model and datastore in %s", work)
        model, datastore = _toy(work)
    sources = _read_sources(args.sentences or str(Path(model).parent / "corpus.en"))
    modes = {
        "batched": ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)],
        "unbatched": ["--no-batching"],
    }
    if args.threads:
        modes = {name: [*extra, "--threads", str(args.threads)] for name, extra in modes.items()}
    body = {"max_new_tokens": args.max_new_tokens}
    results = []
    for name in args.modes.split(","):
        process, url = _start(model, datastore, modes[name], work / f"server-{name}.log")
        try:
            warm = time.perf_counter() + args.warmup  # warm-up: caches, allocator, thread pools
            for s in sources:
                httpx.post(url + "/translate", json={"sentences": [s], **body}, timeout=120)
                if time.perf_counter() > warm:
                    break
            result = run_mode(name, url, sources, args.clients, args.duration, args.max_requests, body)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        logger.info("%s", json.dumps(result))
        results.append(result)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "model": model,
        "datastore": datastore,
        "results": results,
    }
    header = "| mode | clients | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch | tokens/s |"
    print(header)
    print("|" + "---|" * 9)
    for r in results:
        print(
            f"| {r['mode']} | {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
            f"{r['p99_ms']} | {r['errors']} | {r['mean_batch']} | {r['tokens_per_s']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
