"""``knnmt demo``: the whole pipeline end to end on the example that ships with knnmt.

With the bundled English→German model (``models/opus-knnmt-en-de-small``, trained on software UI
strings) and the shipped LibreOffice-help corpus (``data/target``), the demo adapts the model to
the help domain: it builds the datastore and index from the training pairs, translates the test
set with the plain model and with kNN-MT, and reports BLEU/chrF (sacreBLEU), speed, and examples
where retrieval changed the output together with their nearest neighbours. Without the bundled
files (e.g. an installed wheel) it runs the same steps on the offline toy world of :mod:`knnmt.hf.toy`.
Everything is written to the work directory; a re-run reuses what is already built.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU

from ..core.config import BuildConfig, KNNConfig
from ..core.errors import DatastoreError, IncompatibleError, KnnmtError
from ..hf.registry import open_reusable
from ..hf.toy import build_toy_model, toy_corpus
from ..pipeline.build import build_datastore
from ..pipeline.evaluation import SystemScore, evaluate, format_table
from ..pipeline.translator import (
    KNN_CONFIG_FILE,
    KNNMT,
    TokenExplanation,
    Translation,
    load_model,
    saved_knn_config,
)
from ..search.index import INDEX_FILE, build_index
from ..store.corpus import CorpusSpec, read_lines
from ..store.datastore import MANIFEST, Datastore, read_manifest

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
BUNDLED_MODEL = REPO / "models" / "opus-knnmt-en-de-small"
BUNDLED_DATA = REPO / "data" / "target"


@dataclasses.dataclass(frozen=True)
class DemoInputs:
    """What the demo runs on."""

    title: str
    model: str
    memory: CorpusSpec
    test_sources: list[str]
    test_references: list[str]
    knn: KNNConfig
    #: A ``knn.json`` chosen by ``knnmt tune`` for this model and memory, used instead of ``knn``.
    tuned: Path | None = None


def _split_tsv(path: Path) -> tuple[list[str], list[str]]:
    rows = [line.split("\t") for line in read_lines(str(path))]
    return [r[0] for r in rows], [r[1] for r in rows]


def bundled_inputs(limit: int | None) -> DemoInputs | None:
    """The shipped model and LibreOffice-help corpus, when this is a source checkout that has them."""
    if not (BUNDLED_MODEL / "config.json").is_file() or not (BUNDLED_DATA / "test.tsv").is_file():
        return None
    sources, references = _split_tsv(BUNDLED_DATA / "test.tsv")
    return DemoInputs(
        title="English→German UI model adapted to LibreOffice help by kNN-MT",
        model=str(BUNDLED_MODEL),
        memory=CorpusSpec((str(BUNDLED_DATA / "train.tsv"),), "tsv"),
        test_sources=sources[:limit],
        test_references=references[:limit],
        knn=KNNConfig(k=8, lambda_=0.5, temperature=10.0),
        tuned=tuned if (tuned := BUNDLED_DATA / KNN_CONFIG_FILE).is_file() else None,
    )


def toy_inputs(workdir: Path, force: bool, limit: int | None) -> DemoInputs:
    """A tiny random model and a synthetic corpus (the mechanics only: plain scores are noise)."""
    model_dir = workdir / "toy"
    if force or not (model_dir / "model" / "config.json").is_file():
        build_toy_model(model_dir, n_sentences=400)
    pairs = list(dict.fromkeys(toy_corpus(3000, seed=7)))
    test = pairs[-100:][:limit]
    held_out = {s for s, _ in test}
    memory = [p for p in pairs[:-100] if p[0] not in held_out]
    (workdir / "memory.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in memory), encoding="utf-8")
    return DemoInputs(
        title="toy world: a random tiny Marian model and a synthetic corpus (mechanics only)",
        model=str(model_dir / "model"),
        memory=CorpusSpec((str(workdir / "memory.tsv"),), "tsv"),
        test_sources=[s for s, _ in test],
        test_references=[t for _, t in test],
        knn=KNNConfig(k=8, lambda_=0.8, temperature=100.0),
    )


def _examples(
    knn: KNNMT, base: list[Translation], mixed: list[Translation], refs: list[str], n: int = 4
) -> list[dict[str, Any]]:
    """Sentences where kNN-MT changed the output, most improved first, with the tokens retrieval decided."""
    bleu = BLEU(effective_order=True)
    changed = []
    for b, m, r in zip(base, mixed, refs, strict=True):
        if b.text != m.text:
            gain = bleu.sentence_score(m.text, [r]).score - bleu.sentence_score(b.text, [r]).score
            changed.append((gain, b, m, r))
    changed.sort(key=lambda row: -row[0])
    out = []
    for gain, b, m, r in changed[:n]:
        tokens: list[TokenExplanation] = knn.explain(m.source, m.token_ids)
        decisive = sorted(tokens, key=lambda t: -(t.p_final - t.p_mt))[:3]
        out.append(
            {
                "source": m.source,
                "plain": b.text,
                "knn": m.text,
                "reference": r,
                "gain": gain,
                "tokens": sorted(decisive, key=lambda t: t.position),
            }
        )
    return out


def _plot(scores: list[SystemScore]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.0), dpi=110)
    names = [s.name for s in scores]
    for ax, values, label in (
        (axes[0], [(s.bleu, s.chrf) for s in scores], "score"),
        (axes[1], [(s.tokens_per_second,) for s in scores], "target tokens/s"),
    ):
        width = 0.8 / len(values[0])
        for j in range(len(values[0])):
            ax.bar(
                [i + j * width for i in range(len(names))],
                [v[j] for v in values],
                width=width,
                label=["BLEU", "chrF"][j] if len(values[0]) > 1 else None,
            )
        ax.set_xticks([i + (len(values[0]) - 1) * width / 2 for i in range(len(names))], names)
        ax.set_ylabel(label)
        if len(values[0]) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _html(
    title: str, facts: list[str], scores: list[SystemScore], examples: list[dict[str, Any]], png: bytes
) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(s.name)}</td><td>{s.bleu:.2f}</td><td>{s.chrf:.2f}</td><td>{s.tokens_per_second:.1f}</td>"
        f"<td>{s.seconds:.1f}</td></tr>"
        for s in scores
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>knnmt demo</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .6em;text-align:left}"
        "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}.n{color:#555;font-size:90%}"
        f"</style></head><body><h1>knnmt demo</h1><p>{e(title)}</p><ul>"
        + "".join(f"<li>{e(f)}</li>" for f in facts)
        + "</ul>",
        f"<table><tr><th>system</th><th>BLEU</th><th>chrF</th><th>tok/s</th><th>seconds</th></tr>{rows}</table>",
        f"<p class='n'>{e(scores[0].bleu_signature)}<br>{e(scores[0].chrf_signature)}</p>",
        f"<img alt='scores and speed' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
        "<h2>Where retrieval changed the translation</h2>",
    ]
    for ex in examples:
        parts.append(
            f"<h3>{e(ex['source'])}</h3><p>plain: {e(ex['plain'])}<br><b>kNN-MT: {e(ex['knn'])}</b>"
            f"<br>reference: {e(ex['reference'])}</p><ul>"
        )
        for tok in ex["tokens"]:
            neighbours = "".join(
                f"<li>{e(n.token)} (d={n.distance:.1f}) from “{e(n.target or '')}” "
                f"(sentence {n.sentence_id}, position {n.position})</li>"
                for n in tok.neighbours[:3]
            )
            parts.append(
                f"<li><b>{e(tok.token)}</b>: p_MT={tok.p_mt:.3f}, p_kNN={tok.p_knn:.3f}, "
                f"mixed={tok.p_final:.3f}<ul class='n'>{neighbours}</ul></li>"
            )
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _gate_index(store: Datastore, model: Any, tokenizer: Any, force: bool, progress: bool) -> None:
    """Build the sentence index the domain gate reads, unless it is there for this datastore: over the
    stored sentence vectors (seconds); for a datastore from before they were stored, Subset kNN-MT's
    dense sentence index (a pass of the encoder over every source)."""
    from ..pipeline.build import build_subset_index
    from ..pipeline.domain_gate import index_sentences
    from ..search.subset import SUBSET_DIR, SubsetConfig, checked_settings

    if store.vector_dim:
        index_sentences(store, force=force)
        return
    if not force:
        try:
            if "dense" in checked_settings(store.path / SUBSET_DIR, store).get("sentence_search", {}):
                return
        except KnnmtError:  # none yet, or one of an older datastore: (re)built below
            pass
    build_subset_index(
        store,
        SubsetConfig(sentence_search="dense"),
        model=model,
        tokenizer=tokenizer,
        progress=progress,
        force=True,
    )


def run_demo(
    workdir: Path, force: bool = False, progress: bool = True, limit: int | None = None, toy: bool = False
) -> str:
    """Run the demo in ``workdir`` (reusing what is built unless ``force``); returns the text report.

    ``toy`` forces the offline toy world even where the bundled model is present."""
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = (None if toy else bundled_inputs(limit)) or toy_inputs(workdir, force, limit)
    model, tokenizer = load_model(inputs.model)
    store_dir = workdir / "datastore"
    start = time.perf_counter()
    complete = (store_dir / MANIFEST).is_file() and read_manifest(store_dir).get("state") == "complete"
    store = None if force else open_reusable(store_dir, model, tokenizer)
    if store is not None:
        logger.info("reusing the datastore in %s (--force rebuilds)", store_dir)
    elif complete:  # built with another model (e.g. the bundled one was retrained): rebuilt, index too
        force = True
    if store is None:
        build = functools.partial(
            build_datastore, model, tokenizer, inputs.memory, store_dir, BuildConfig(),
            model_name=inputs.model, progress=progress,
        )  # fmt: skip
        try:  # resumes an interrupted build of the same corpus with the same model
            store = build(force=force)
        except (DatastoreError, IncompatibleError) as exc:
            logger.warning("%s; rebuilding the datastore", exc)
            store = build(force=True)
    if force or not (store_dir / "index" / INDEX_FILE).is_file():
        build_index(store, out=store_dir / "index", progress=progress, force=True)
        force = True  # the sentence index follows the key index, as `knnmt index` does
    tuned = store_dir / KNN_CONFIG_FILE
    if not tuned.is_file() and inputs.tuned is not None:
        shutil.copyfile(inputs.tuned, tuned)  # the setting `knnmt tune` chose for the bundled model
    config = saved_knn_config(store_dir, inputs.knn)
    if config.domain_gate is not None:
        _gate_index(store, model, tokenizer, force, progress)
    build_seconds = time.perf_counter() - start
    knn = KNNMT.load((model, tokenizer), store_dir, config=config)
    scores, outputs = evaluate(
        knn,
        inputs.test_sources,
        inputs.test_references,
        batch_size=32,
        max_new_tokens=128,
        num_beams=1,  # greedy, whatever the model's generation config says
        progress=progress,
    )
    facts = [
        f"model: {inputs.model}",
        f"datastore: {store.count:,} entries from {store.manifest['sentences']:,} sentence pairs, "
        f"{store.describe()['bytes_on_disk'] / 2**20:.0f} MB; index {knn.index.factory}; "
        f"built (or reused) in {build_seconds:.0f} s",
        f"kNN-MT: k={config.k}, λ={config.lambda_}, τ={config.temperature}"
        + (f", half-distance {config.half_distance:g}" if config.half_distance is not None else "")
        + (f", confidence gate {config.confidence_gate:g}" if config.confidence_gate is not None else "")
        + (f", domain gate {config.domain_gate:g}" if config.domain_gate is not None else "")
        + (" (tuned)" if tuned.is_file() else " (defaults; `knnmt tune` picks better ones)"),
        f"test: {len(inputs.test_sources)} sentences, greedy decoding, batch 32"
        + (
            f"; the domain gate left {int(knn.last_stats.get('sentences_off', 0))} of them to the plain model"
            if config.domain_gate is not None
            else ""
        ),
    ]
    examples = _examples(knn, outputs["base"], outputs["knn-mt"], inputs.test_references)
    lines = [
        "knnmt demo: " + inputs.title,
        *facts,
        "",
        format_table(scores),
        "",
        "Where retrieval changed the translation (most improved first):",
    ]
    for ex in examples:
        lines += [
            f"  source   : {ex['source']}",
            f"  plain    : {ex['plain']}",
            f"  kNN-MT   : {ex['knn']}",
            f"  reference: {ex['reference']}",
        ]
        for tok in ex["tokens"]:
            best = tok.neighbours[0] if tok.neighbours else None
            memo = f"{best.token!r} d={best.distance:.1f} from “{best.target}”" if best else "-"
            lines.append(f"    {tok.token!r}: p_MT={tok.p_mt:.3f} p_kNN={tok.p_knn:.3f}  nearest: {memo}")
        lines.append("")
    report = "\n".join(lines)
    (workdir / "report.txt").write_text(report + "\n", encoding="utf-8")
    (workdir / "report.html").write_text(
        _html(inputs.title, facts, scores, examples, _plot(scores)), encoding="utf-8"
    )
    logger.info("HTML report: %s", workdir / "report.html")
    return report
