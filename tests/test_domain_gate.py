"""The sentence-level domain gate: inputs unlike the memory's sources are translated by the plain model
(and searched nowhere), the others exactly as without the gate, whatever the batch holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knnmt.core.config import KNNConfig
from knnmt.core.errors import DatastoreError, UsageError
from knnmt.hf.toy import toy_corpus
from knnmt.pipeline.domain_gate import DomainGate, threshold_for_recall, threshold_separating
from knnmt.pipeline.translator import KNNMT

KNN = KNNConfig(lambda_=0.8, k=4, temperature=10.0)


@pytest.fixture(scope="module")
def gated(marian: tuple[Any, Any], datastore, subset_dir: Path) -> KNNMT:
    model, tokenizer = marian
    return KNNMT(model, tokenizer, datastore, domain_gate=DomainGate.load(datastore, subset_dir))


@pytest.fixture(scope="module")
def mixed_sources(toy_pairs: list[tuple[str, str]]) -> list[str]:
    """Memory sources (similarity 1) interleaved with new sentences of the same toy language."""
    memory = [s for s, _ in toy_pairs[100:106]]
    new = [s for s, _ in toy_corpus(30, seed=77) if s not in {m for m, _ in toy_pairs}][:6]
    return [x for pair in zip(memory, new, strict=True) for x in pair]


def test_similarity_is_one_for_memory_sources(gated: KNNMT, toy_pairs) -> None:
    sims = gated.source_similarity([s for s, _ in toy_pairs[:5]])
    assert sims.shape == (5,) and np.allclose(sims, 1.0, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_gated_sentences_are_plain_and_the_rest_unchanged(gated: KNNMT, mixed_sources, num_beams) -> None:
    sims = gated.source_similarity(mixed_sources)
    threshold = float(np.median(sims))
    on = sims >= threshold
    assert 0 < on.sum() < len(on)
    gen = {"num_beams": num_beams, "max_new_tokens": 24, "batch_size": 4, "sort_by_length": False}
    plain = gated.translate(mixed_sources, knn=False, **gen)
    ungated = gated.translate(mixed_sources, knn=KNN, **gen)
    changed = np.array([p.token_ids != u.token_ids for p, u in zip(plain, ungated, strict=True)])
    assert any(changed & on) and any(changed & ~on)
    out = gated.translate(mixed_sources, knn=KNNConfig(**{**KNN.to_dict(), "domain_gate": threshold}), **gen)
    stats = gated.last_stats
    for i, result in enumerate(out):
        expected = ungated[i] if on[i] else plain[i]
        assert result.token_ids == expected.token_ids, (i, bool(on[i]))
    assert stats["sentences"] == len(mixed_sources) and stats["sentences_off"] == int((~on).sum())
    assert stats["searched"] > 0


def test_no_sentence_passes_the_gate_is_the_plain_model(gated: KNNMT, mixed_sources) -> None:
    new = mixed_sources[1::2]
    threshold = float(gated.source_similarity(new).max()) + 1e-4
    gen = {"num_beams": 1, "max_new_tokens": 24}
    plain = gated.translate(new, knn=False, **gen)
    out = gated.translate(new, knn=KNNConfig(**{**KNN.to_dict(), "domain_gate": threshold}), **gen)
    assert [t.token_ids for t in out] == [t.token_ids for t in plain]
    assert gated.last_stats.get("searched", 0) == 0 and gated.last_stats["sentences_off"] == len(new)


def test_explain_marks_a_gated_sentence(gated: KNNMT, mixed_sources) -> None:
    source = mixed_sources[1]
    threshold = float(gated.source_similarity([source])[0]) + 1e-4
    config = KNNConfig(**{**KNN.to_dict(), "domain_gate": threshold})
    target = gated.translate([source], knn=False, max_new_tokens=16)[0].token_ids
    steps = gated.explain(source, target, config)
    assert steps and all(s.gated and s.weight == 0.0 and s.p_final == pytest.approx(s.p_mt) for s in steps)
    open_steps = gated.explain(source, target, KNN)
    assert not any(s.gated for s in open_steps) and any(s.weight > 0 for s in open_steps)


def test_threshold_for_recall_keeps_that_share() -> None:
    sims = np.random.default_rng(0).uniform(0.3, 0.99, size=203)
    for recall in (1.0, 0.95, 0.9, 0.5, 0.01):
        threshold = threshold_for_recall(sims, recall)
        assert (sims >= threshold).mean() >= recall
        assert round(threshold, 4) == threshold
    assert threshold_for_recall(sims, 1.0) <= sims.min()
    with pytest.raises(UsageError, match="recall"):
        threshold_for_recall(sims, 0.0)
    with pytest.raises(UsageError, match="in-domain sentence"):
        threshold_for_recall(np.zeros(0), 0.9)


def test_gate_of_an_older_datastore_needs_the_dense_sentence_index(marian, datastore, tmp_path: Path) -> None:
    """Datastores built before sentence vectors were stored fall back to Subset's dense index."""
    import json
    import shutil

    from knnmt.store.datastore import MANIFEST, VECTORS_FILE, Datastore

    with pytest.raises(DatastoreError, match="knnmt index --subset"):
        DomainGate.load(datastore, tmp_path / "nothing-here")
    old = tmp_path / "old"
    shutil.copytree(datastore.path, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["sentence_vectors"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    for file in old.glob(f"shards/*/{VECTORS_FILE}"):
        file.unlink()
    model, tokenizer = marian
    knn = KNNMT(model, tokenizer, Datastore.open(old))
    with pytest.raises(DatastoreError, match="knnmt index --subset"):
        knn.translate(["a"], knn=KNNConfig(domain_gate=0.5), max_new_tokens=4)


def test_config_validates_the_gate() -> None:
    with pytest.raises(UsageError, match="domain_gate"):
        KNNConfig(domain_gate=1.5)
    assert KNNConfig.from_dict(KNNConfig(domain_gate=0.75).to_dict()).domain_gate == 0.75


def test_tune_sets_the_gate_from_the_dev_sources(gated: KNNMT, toy_pairs, mixed_sources) -> None:
    from knnmt.pipeline.tuning import tune

    dev = toy_pairs[100:106]
    ood_sources = mixed_sources[1::2]
    result = tune(
        gated,
        [s for s, _ in dev],
        [t for _, t in dev],
        ks=[4],
        temperatures=[10.0],
        lambdas=[0.5, 0.9],
        half_distances=[None],
        gates=[None],
        ood_sources=ood_sources,
        ood_references=["x y z"] * len(ood_sources),
        domain_recall=1.0,
        confirm=2,
        max_new_tokens=24,
    )
    expected = threshold_for_recall(gated.source_similarity([s for s, _ in dev]), 1.0)
    off = float((gated.source_similarity(ood_sources) < expected).mean())
    assert off > 0.5
    assert result.domain_recall == 1.0 and result.best.domain_gate == expected
    assert result.domain_rule == "recall"
    for row in result.confirmed:
        assert row["domain_gate"] == expected and row["ood_sentences_off"] == pytest.approx(off)


def test_cli_gate_options(tmp_path: Path, gated: KNNMT) -> None:
    from knnmt.apps.cli import AUTO_DOMAIN_RECALL, _domain_recall, _knn_config, _parser

    KNNConfig(k=4, domain_gate=0.8).save(tmp_path / "knn.json")
    base = ["translate", "--model", "m", "--datastore", str(tmp_path)]
    parser = _parser()
    assert _knn_config(parser.parse_args(base), str(tmp_path)).domain_gate == 0.8
    assert _knn_config(parser.parse_args([*base, "--domain-gate", "none"]), str(tmp_path)).domain_gate is None
    assert _knn_config(parser.parse_args([*base, "--domain-gate", "0.6"]), str(tmp_path)).domain_gate == 0.6
    from knnmt.pipeline.domain_gate import SEPARATE

    # it has the dense sentence index: with out-of-domain dev data the gate separates, else keeps 0.9
    assert _domain_recall("auto", gated, has_ood=False) == AUTO_DOMAIN_RECALL
    assert _domain_recall("auto", gated, has_ood=True) == SEPARATE
    assert _domain_recall("separate", gated, has_ood=True) == SEPARATE
    assert _domain_recall("none", gated, True) is None and _domain_recall("0.75", gated, True) == 0.75
    model, tokenizer = gated.model, gated.tokenizer
    # every datastore built now keeps its sentence vectors, so the gate is there without any index
    assert _domain_recall("auto", KNNMT(model, tokenizer, gated.datastore), True) == SEPARATE
    with pytest.raises(UsageError, match="domain-recall"):
        _domain_recall("1.5", gated, False)
    with pytest.raises(UsageError, match="ood-source"):
        _domain_recall("separate", gated, has_ood=False)


def test_threshold_separating_maximises_kept_in_minus_kept_out() -> None:
    rng = np.random.default_rng(0)
    ins, outs = rng.normal(0.85, 0.05, 400), rng.normal(0.7, 0.08, 300)
    t = threshold_separating(ins, outs)

    def j(x: float) -> float:
        return float((ins >= x).mean() - (outs >= x).mean())

    # no threshold on a fine grid separates better; the chosen one is an in-domain value rounded down
    assert t is not None and all(j(t) >= j(x) - 1e-9 for x in np.linspace(0.5, 1.0, 2001))
    assert t == round(t, 4) and 0 <= ins[ins >= t].min() - t < 1e-4
    # cleanly separated sets: everything in domain is kept, nothing else
    assert threshold_separating(np.array([0.9, 0.95]), np.array([0.2, 0.5])) == 0.9
    # ties go to the lowest threshold (most in-domain kept): 0.2 and 0.6 both score 1/2
    assert threshold_separating(np.array([0.2, 0.6]), np.array([0.1, 0.4])) == 0.2
    # rounding down must not let an out-of-domain sentence through
    assert threshold_separating(np.array([0.80005, 0.9]), np.array([0.80002, 0.1])) == 0.80005
    # a similarity that does not separate the sets gives no gate
    assert threshold_separating(np.array([0.1, 0.2]), np.array([0.5, 0.6])) is None
    with pytest.raises(UsageError, match="out-of-domain"):
        threshold_separating(ins, np.array([]))


def test_tune_separates_the_domains(gated: KNNMT, toy_pairs, mixed_sources) -> None:
    from knnmt.pipeline.tuning import tune

    dev = toy_pairs[100:106]
    ood_sources = mixed_sources[1::2]
    kwargs: dict[str, Any] = dict(
        ks=[4],
        temperatures=[10.0],
        lambdas=[0.9],
        half_distances=[None],
        gates=[None],
        ood_sources=ood_sources,
        ood_references=["x y z"] * len(ood_sources),
        confirm=1,
        max_new_tokens=24,
    )
    result = tune(gated, [s for s, _ in dev], [t for _, t in dev], separate_domains=True, **kwargs)
    ins = gated.source_similarity([s for s, _ in dev])
    outs = gated.source_similarity(ood_sources)
    expected = threshold_separating(ins, outs)
    assert result.best.domain_gate == expected and result.domain_rule == "separate"
    assert result.domain_recall == pytest.approx(float((ins >= expected).mean()))
    assert result.ood_domain_kept == pytest.approx(float((outs >= expected).mean()))
    with pytest.raises(UsageError, match="either domain_recall or separate_domains"):
        tune(
            gated,
            [s for s, _ in dev],
            [t for _, t in dev],
            separate_domains=True,
            domain_recall=0.9,
            **kwargs,
        )
    kwargs.update(ood_sources=[], ood_references=[])
    with pytest.raises(UsageError, match="needs out-of-domain dev sources"):
        tune(gated, [s for s, _ in dev], [t for _, t in dev], separate_domains=True, **kwargs)


def test_gate_of_a_grown_datastore_warns_and_works(marian, toy_pairs, tmp_path: Path, caplog) -> None:
    """Pairs appended after the dense sentence index was built (the service adds some): the gate still
    loads, compares with the sentences it covers, and says how to include the new ones."""
    from conftest import build_test_subset, write_text_corpus
    from knnmt.core.errors import IncompatibleError
    from knnmt.pipeline.build import build_datastore
    from knnmt.search.subset import SubsetIndex

    model, tokenizer = marian
    first = write_text_corpus(tmp_path / "a", toy_pairs[:40])
    store = build_datastore(model, tokenizer, first, tmp_path / "ds", progress=False)
    build_test_subset(store, model, tokenizer)
    more = write_text_corpus(tmp_path / "b", toy_pairs[40:60])
    grown = build_datastore(model, tokenizer, more, tmp_path / "ds", append=True, progress=False)
    with caplog.at_level("WARNING"):
        gate = DomainGate.load(grown, tmp_path / "ds" / "subset")  # the older datastores' source
    assert "covers 40 of the datastore's 60 sentences" in caplog.text
    sims = gate.similarity_of(model, tokenizer, [s for s, _ in toy_pairs[:2]])
    assert np.allclose(sims, 1.0, atol=1e-4)
    with pytest.raises(IncompatibleError):  # Subset kNN-MT itself needs an index of every entry
        SubsetIndex.load(tmp_path / "ds" / "subset", grown)
