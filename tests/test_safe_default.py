"""Safe by default (issue 16): what a domain memory does to other text is shown every time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knnmt.apps.cli import EXIT_OK, EXIT_USAGE, main
from knnmt.hf.toy import toy_corpus
from knnmt.pipeline.evaluation import SystemScore, format_domain_table
from knnmt.store.datastore import Datastore


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _score(name: str, bleu: float, off: float = 0.0) -> SystemScore:
    return SystemScore(name, bleu, 50.0, "BLEU|sig", "chrF|sig", 100.0, 1.0, 10, sentences_off=off)


def test_domain_table_shows_gain_and_cost_side_by_side() -> None:
    table = format_domain_table(
        [_score("base", 20.0), _score("knn-mt", 29.5)], [_score("base", 27.0), _score("knn-mt", 26.2, 0.8)]
    )
    assert "in-domain BLEU" in table and "out-of-domain BLEU" in table
    assert "(+9.50)" in table and "(-0.80)" in table
    assert "knn-mt: in-domain gain +9.50 BLEU, out-of-domain cost -0.80 BLEU" in table
    assert "the domain gate left 80% of it to the plain model" in table
    with pytest.raises(Exception, match="same systems"):
        format_domain_table([_score("base", 1)], [_score("other", 1)])


def test_evaluate_reports_out_of_domain_cost(
    toy_dir: Path, datastore: Datastore, toy_pairs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _write(tmp_path / "test.en", [s for s, _ in toy_pairs[:6]])
    ref = _write(tmp_path / "test.de", [t for _, t in toy_pairs[:6]])
    known = {s for s, _ in toy_pairs}
    other = [(s, t) for s, t in toy_corpus(300, seed=99) if s not in known][:6]
    ood_src = _write(tmp_path / "ood.en", [s[::-1] for s, _ in other])  # text unlike the memory
    ood_ref = _write(tmp_path / "ood.de", [t for _, t in other])
    argv = ["-q", "evaluate", "--model", str(toy_dir / "model"), "--datastore", str(datastore.path)]
    argv += ["--source", str(src), "--reference", str(ref), "--k", "1", "--lambda", "1"]
    argv += ["--max-new-tokens", "40", "--index", "exact"]
    scores_file = tmp_path / "scores.json"
    outputs = tmp_path / "out"
    extra = ["--ood-source", str(ood_src), "--ood-reference", str(ood_ref)]
    assert main([*argv, *extra, "--json", str(scores_file), "--output-dir", str(outputs)]) == EXIT_OK
    out = capsys.readouterr().out
    scores = json.loads(scores_file.read_text())
    inside = {s["name"]: s for s in scores["in_domain"]}
    outside = {s["name"]: s for s in scores["out_of_domain"]}
    assert inside["knn-mt"]["bleu"] == pytest.approx(100.0)
    gain = inside["knn-mt"]["bleu"] - inside["base"]["bleu"]
    cost = outside["knn-mt"]["bleu"] - outside["base"]["bleu"]
    assert f"knn-mt: in-domain gain {gain:+.2f} BLEU, out-of-domain cost {cost:+.2f} BLEU" in out
    assert {p.name for p in outputs.iterdir()} == {"base.txt", "knn-mt.txt", "base.ood.txt", "knn-mt.ood.txt"}

    assert main(argv) == EXIT_OK  # without an out-of-domain set it says the cost was not measured
    assert "out-of-domain cost not measured" in capsys.readouterr().out
    assert main([*argv, "--ood-source", str(ood_src)]) == EXIT_USAGE


# ---- the domain gate needs nothing beyond the datastore -------------------------------------------


def test_stored_sentence_vectors_are_the_gates_input_embeddings(marian, datastore: Datastore) -> None:
    """The build keeps each source's mean-pooled encoder output: the same vector the gate computes for
    that sentence as an input (fp16 storage aside)."""
    import numpy as np

    from knnmt.hf.teacher_forcing import embed_sources
    from knnmt.search.sentence_search import datastore_sources

    model, tokenizer = marian
    stored = np.concatenate([v for _, v in datastore.iter_sentence_vectors()])
    sources = list(datastore_sources(datastore))
    assert stored.shape == (len(sources), model.config.d_model)
    np.testing.assert_allclose(stored, embed_sources(model, tokenizer, sources), atol=2e-3)


def test_gate_from_stored_vectors_equals_the_dense_subset_gate(
    marian, datastore: Datastore, subset_dir: Path, toy_pairs
) -> None:
    import numpy as np

    from knnmt.hf.toy import toy_corpus
    from knnmt.pipeline.domain_gate import DomainGate

    model, tokenizer = marian
    known = {s for s, _ in toy_pairs}
    inputs = [s for s, _ in toy_pairs[:5]] + [s for s, _ in toy_corpus(60, seed=5) if s not in known][:10]
    stored = DomainGate.load(datastore).similarity_of(model, tokenizer, inputs)  # no index built at all
    dense = DomainGate.load(datastore, subset_dir).similarity_of(model, tokenizer, inputs)
    np.testing.assert_allclose(stored, dense, atol=2e-3)
    assert np.allclose(stored[:5], 1.0, atol=2e-3) and (stored[5:] < 0.9999).all()


def test_index_saves_the_sentence_index_and_the_gate_follows_appends(
    toy_dir: Path, marian, toy_pairs, make_corpus, tmp_path: Path, capsys, caplog
) -> None:
    import numpy as np

    from knnmt.core.config import BuildConfig
    from knnmt.pipeline.build import build_datastore
    from knnmt.pipeline.domain_gate import SENTENCE_DIR, DomainGate

    model, tokenizer = marian
    path = tmp_path / "ds"
    store = build_datastore(
        model, tokenizer, make_corpus(toy_pairs[:40]), path, BuildConfig(shard_sentences=15), progress=False
    )
    assert main(["-q", "index", str(path), "--factory", "Flat"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["sentence_index"]["sentences"] == 40 and report["sentence_index"]["factory"] == "Flat"
    assert report["sentence_index"]["build_seconds"] >= 0
    assert (path / SENTENCE_DIR / "sentences.faiss").is_file()
    new = toy_pairs[40:45]
    more = make_corpus(new, name="more")
    grown = build_datastore(model, tokenizer, more, path, append=True, progress=False)
    with caplog.at_level("INFO"):
        gate = DomainGate.load(grown)
    assert "another datastore" not in caplog.text and "in memory" not in caplog.text  # the saved one
    assert gate.search.count == 45
    sims = gate.similarity_of(model, tokenizer, [s for s, _ in new])
    assert np.allclose(sims, 1.0, atol=2e-3)  # the appended sources count as memory at once
    assert store.count < grown.count
    from knnmt.pipeline.domain_gate import index_sentences

    saved = (path / SENTENCE_DIR / "sentences.faiss").stat().st_mtime_ns
    assert index_sentences(grown, force=False) is None  # kept: the gate adds the appended tail itself
    assert (path / SENTENCE_DIR / "sentences.faiss").stat().st_mtime_ns == saved
    rebuilt = index_sentences(grown, force=True)  # what `knnmt index` and the demo do after the key index
    assert rebuilt is not None and rebuilt["sentences"] == 45
    assert rebuilt["datastore_fingerprint"] == grown.fingerprint


# ---- tune guards without being asked ------------------------------------------------------------


def _tune_argv(model: Path, store: Path, src: Path, ref: Path) -> list[str]:
    return ["-q", "tune", "--model", str(model), "--datastore", str(store), "--source", str(src),
            "--reference", str(ref), "--ks", "1,2", "--temperatures", "10", "--lambdas", "0,0.5",
            "--half-distances", "none", "--gates", "none", "--confirm", "1",
            "--max-new-tokens", "30"]  # fmt: skip


def test_tune_sets_the_domain_gate_and_says_the_cost_was_not_measured(
    toy_dir: Path, datastore: Datastore, toy_pairs, tmp_path: Path, capsys
) -> None:
    """The basic path (build, tune on an in-domain dev set): the gate is set without any index or flag,
    and knn.json and the output say plainly that the out-of-domain cost is unknown."""
    import shutil

    from knnmt.core.config import KNNConfig, read_about

    store = tmp_path / "ds"
    shutil.copytree(datastore.path, store)
    src = _write(tmp_path / "dev.en", [s for s, _ in toy_pairs[:8]])
    ref = _write(tmp_path / "dev.de", [t for _, t in toy_pairs[:8]])
    assert main(_tune_argv(toy_dir / "model", store, src, ref)) == EXIT_OK
    out = capsys.readouterr().out
    assert "out-of-domain cost NOT measured" in out and "--ood-source" in out
    config = KNNConfig.load(store / "knn.json")
    assert config.domain_gate is not None  # set without being asked
    about = read_about(store / "knn.json")
    assert about["domain_gate_rule"] == "recall" and "NOT measured" in about["out_of_domain"]


def test_tune_uses_the_out_of_domain_dev_set_a_model_ships(
    toy_dir: Path, datastore: Datastore, toy_pairs, tmp_path: Path, capsys
) -> None:
    import shutil

    from knnmt.core.config import read_about
    from knnmt.pipeline.tuning import MODEL_OOD_DEV

    model = tmp_path / "model"
    shutil.copytree(toy_dir / "model", model)
    known = {s for s, _ in toy_pairs}
    other = [(s[::-1], t) for s, t in toy_corpus(200, seed=31) if s not in known][:8]
    (model / MODEL_OOD_DEV).write_text("".join(f"{s}\t{t}\n" for s, t in other), encoding="utf-8")
    store = tmp_path / "ds"
    shutil.copytree(datastore.path, store)
    src = _write(tmp_path / "dev.en", [s for s, _ in toy_pairs[:8]])
    ref = _write(tmp_path / "dev.de", [t for _, t in toy_pairs[:8]])
    assert main(_tune_argv(model, store, src, ref)) == EXIT_OK
    out = capsys.readouterr().out
    assert f"out-of-domain dev set: {model / MODEL_OOD_DEV} (8 pairs, shipped with the model)" in out
    assert "out-of-domain dev BLEU: plain" in out
    about = read_about(store / "knn.json")
    assert about["ood_dev"] == str(model / MODEL_OOD_DEV) and "measured on" in about["out_of_domain"]
    assert about["domain_gate_rule"] in ("separate", None)  # the best split, when the similarity separates
    assert main([*_tune_argv(model, store, src, ref), "--no-ood", "--no-save"]) == EXIT_OK
    assert "NOT measured" in capsys.readouterr().out


def test_served_gate_counts_added_pairs_as_memory_at_once(
    toy_dir: Path, datastore: Datastore, toy_pairs, tmp_path: Path
) -> None:
    import shutil

    from fastapi.testclient import TestClient

    from knnmt.apps.service import ServeConfig, Service, create_app
    from knnmt.core.config import KNNConfig

    path = tmp_path / "served"
    shutil.copytree(datastore.path, path)
    config = ServeConfig(token="t" * 16, allowed_hosts=("testserver",), compact_every=0)
    gated = KNNConfig(domain_gate=0.5)
    service = Service.open(str(toy_dir / "model"), path, config, index=None, knn_config=gated)
    new = "zebra quantum violin seventeen"
    try:
        before = float(service.translator.source_similarity([new])[0])
        with TestClient(create_app(service, close_on_shutdown=False)) as client:
            added = client.post(
                "/memory",
                headers={"Authorization": "Bearer " + "t" * 16},
                json={"pairs": [{"source": new, "target": "Zebra Quanten Geige siebzehn"}]},
            )
            assert added.status_code == 201, added.text
        after = float(service.translator.source_similarity([new])[0])
    finally:
        service.close()
    assert before < 0.999 and after == pytest.approx(1.0, abs=2e-3)
