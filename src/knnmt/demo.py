"""``knnmt demo``: the whole pipeline end to end on the example that ships with knnmt.

Until the bundled English→German model lands, the demo runs on the offline toy world of
:mod:`knnmt.toy`: a tiny *random* Marian model (its own translations are noise) and a synthetic
corpus, so what it shows is the mechanics (build, index, retrieve, interpolate, score, explain)
and how retrieval from a translation memory moves the output towards the domain.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .build import build_datastore
from .config import BuildConfig, KNNConfig
from .corpus import CorpusSpec
from .datastore import MANIFEST, Datastore
from .evaluation import evaluate, format_table
from .index import build_index
from .toy import build_toy_model, toy_corpus
from .translator import KNNMT, load_model

logger = logging.getLogger(__name__)


def _write_pairs(pairs: list[tuple[str, str]], stem: Path) -> None:
    stem.with_suffix(".en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    stem.with_suffix(".de").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


def run_demo(workdir: Path, force: bool = False, progress: bool = True) -> str:
    """Run the demo in ``workdir`` (reusing what is built unless ``force``); returns the report text."""
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "toy"
    if force or not (model_dir / "model" / "config.json").is_file():
        logger.info("creating the toy model in %s", model_dir)
        build_toy_model(model_dir, n_sentences=400)
    pairs = list(dict.fromkeys(toy_corpus(3000, seed=7)))
    memory, test = pairs[:-100], pairs[-100:]
    test_set = {p[0] for p in test}
    memory = [p for p in memory if p[0] not in test_set]
    _write_pairs(memory, workdir / "memory")
    _write_pairs(test, workdir / "test")

    model, tokenizer = load_model(str(model_dir / "model"))
    store_dir = workdir / "datastore"
    start = time.perf_counter()
    if force or not (store_dir / MANIFEST).is_file():
        build_datastore(
            model,
            tokenizer,
            CorpusSpec((str(workdir / "memory.en"), str(workdir / "memory.de")), "text"),
            store_dir,
            BuildConfig(),
            force=True,
            model_name="knnmt-toy",
            progress=progress,
        )
    store = Datastore.open(store_dir)
    if force or not (store_dir / "index" / "index.faiss").is_file():
        build_index(store, out=store_dir / "index", progress=progress, force=True)
    build_seconds = time.perf_counter() - start
    knn = KNNMT.load((model, tokenizer), store_dir, config=KNNConfig(k=8, lambda_=0.8, temperature=100.0))
    sources, references = [s for s, _ in test], [t for _, t in test]
    scores, outputs = evaluate(knn, sources, references, batch_size=32, max_new_tokens=48, progress=progress)
    lines = [
        "knnmt demo (toy world: random tiny Marian model + synthetic corpus)",
        f"datastore: {store.count} entries from {store.manifest['sentences']} sentences, index "
        f"{knn.index.factory}, built/loaded in {build_seconds:.1f}s",
        "",
        format_table(scores),
        "",
        "Examples where kNN-MT changed the output:",
    ]
    shown = 0
    for base, mixed, ref in zip(outputs["base"], outputs["knn-mt"], references, strict=True):
        if base.text == mixed.text or shown == 3:
            continue
        shown += 1
        lines += [
            f"  source   : {base.source}",
            f"  plain    : {base.text}",
            f"  kNN-MT   : {mixed.text}",
            f"  reference: {ref}",
        ]
        for tok in knn.explain(base.source, mixed.token_ids)[:3]:
            best = tok.neighbours[0] if tok.neighbours else None
            memo = f"{best.token!r} d={best.distance:.1f} from “{best.target}”" if best else "-"
            lines.append(f"    {tok.token!r}: p_MT={tok.p_mt:.3f} p_kNN={tok.p_knn:.3f}  nearest: {memo}")
        lines.append("")
    report = "\n".join(lines)
    (workdir / "report.txt").write_text(report + "\n", encoding="utf-8")
    print(report)
    return report
