"""`knnmt tune`: the log-likelihood grid against references, and the tuning loop end to end."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knnmt.apps.cli import EXIT_OK, main
from knnmt.core.config import KNNConfig
from knnmt.pipeline.translator import KNNMT
from knnmt.pipeline.tuning import _choose, grid_log_likelihood, reference_statistics, tune


def test_grid_matches_a_per_token_loop() -> None:
    rng = np.random.default_rng(0)
    tokens, k_max = 30, 6
    log_mt = np.log(rng.uniform(0.01, 1.0, tokens))
    distances = np.sort(rng.uniform(0, 50, (tokens, k_max)), axis=1)
    distances[3, 4:] = np.inf  # missing neighbours
    match = rng.random((tokens, k_max)) < 0.4
    match[5] = False  # no neighbour votes for the reference token
    log_max = np.maximum(log_mt, np.log(rng.uniform(0.05, 1.0, tokens)))  # the model's top token
    ks, temps, lambdas, halves = [1, 3, 6], [1.0, 10.0], [0.0, 0.3, 1.0], [None, 5.0, 40.0]
    gates = [None, 0.4, 0.8]
    grid = grid_log_likelihood(log_mt, distances, match, ks, temps, lambdas, halves, gates, log_max)
    assert grid.shape == (3, 2, 3, 3, 3)
    skipped = 0
    for (i, k), (j, tau), (m, lam), (h, half), (g, gate) in itertools.product(
        enumerate(ks), enumerate(temps), enumerate(lambdas), enumerate(halves), enumerate(gates)
    ):
        total = 0.0
        for t in range(tokens):
            if gate is not None and np.exp(log_max[t]) >= gate:  # the gate keeps the model alone
                total += log_mt[t]
                skipped += 1
                continue
            weights = [np.exp(-d / tau) for d in distances[t, :k] if np.isfinite(d)]
            hit = sum(np.exp(-d / tau) for d, ok in zip(distances[t, :k], match[t, :k], strict=True) if ok)
            p_knn = hit / sum(weights) if weights else 0.0
            s = sum(weights)
            lam_t = lam if half is None else lam * s / (s + np.exp(-half / tau))
            rest = (
                1 - lam if half is None else (1 - lam) + lam * np.exp(-half / tau) / (s + np.exp(-half / tau))
            )
            p = lam_t * p_knn + rest * np.exp(log_mt[t])  # rest = 1 - lam_t, without cancellation
            total += np.log(p) if p > 0 else -np.inf
        assert grid[i, j, m, h, g] == pytest.approx(total / tokens, rel=1e-9, abs=1e-12)
    assert skipped > 0


def test_grid_agrees_with_explain(translator: KNNMT, toy_pairs: list[tuple[str, str]]) -> None:
    """The cheap grid score of one setting equals the mean log P(y_t) the generation path gives."""
    pairs = toy_pairs[:6]
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    stats = reference_statistics(translator, sources, refs, k_max=8)
    half = float(np.median(stats.distances[:, 0]))  # λ then varies from step to step
    gate = float(np.exp(np.median(stats.log_p_max)))  # about half of the tokens are skipped
    grid = grid_log_likelihood(
        stats.log_p_mt, stats.distances, stats.match, [4], [10.0], [0.4], [None, half], [None, gate],
        stats.log_p_max,
    )  # fmt: skip
    for (h, g), config in {
        (0, 0): KNNConfig(k=4, lambda_=0.4, temperature=10.0),
        (1, 0): KNNConfig(k=4, lambda_=0.4, temperature=10.0, half_distance=half),
        (0, 1): KNNConfig(k=4, lambda_=0.4, temperature=10.0, confidence_gate=gate),
        (1, 1): KNNConfig(k=4, lambda_=0.4, temperature=10.0, half_distance=half, confidence_gate=gate),
    }.items():
        explained = [tok for s, r in pairs for tok in translator.explain(s, r, config)]
        assert len(explained) == len(stats.log_p_mt)
        expected = np.mean([np.log(tok.p_final) for tok in explained])
        assert grid[0, 0, 0, h, g] == pytest.approx(expected, rel=1e-4)
        if g:  # skipped tokens carry no retrieval weight, the others do
            weights = np.array([tok.weight for tok in explained])
            assert 0 < (weights == 0).sum() < len(weights)
    assert grid[0, 0, 0, 0, 0] != pytest.approx(grid[0, 0, 0, 1, 0], rel=1e-3)
    assert grid[0, 0, 0, 0, 0] != pytest.approx(grid[0, 0, 0, 0, 1], rel=1e-3)


def test_tune_prefers_retrieval_when_the_memory_holds_the_answers(
    translator: KNNMT, toy_pairs: list[tuple[str, str]]
) -> None:
    pairs = toy_pairs[:8]  # in the datastore: retrieval is exactly right, the random model is not
    result = tune(
        translator,
        [s for s, _ in pairs],
        [t for _, t in pairs],
        ks=[1, 4],
        temperatures=[1.0, 100.0],
        lambdas=[0.0, 0.5, 0.9],
        confirm=2,
        max_new_tokens=40,
    )
    assert result.log_likelihood.shape == (2, 2, 3, len(result.half_distances), len(result.gates))
    assert (
        result.half_distances[0] is None and len(result.half_distances) > 1
    )  # auto: constant λ + percentiles
    assert result.best.lambda_ > 0
    assert result.log_likelihood.max() > result.base_log_likelihood
    assert len(result.confirmed) == 2 and all("bleu" in row for row in result.confirmed)
    assert max(row["bleu"] for row in result.confirmed) == max(
        row["bleu"]
        for row in result.confirmed
        if row["k"] == result.best.k and row["lambda_"] == result.best.lambda_
    )
    pairs_confirmed = {(row["half_distance"], row["confidence_gate"]) for row in result.confirmed}
    assert len(pairs_confirmed) == len(result.confirmed)  # distinct (half distance, gate) settings


def test_tune_with_out_of_domain_dev_decodes_it_for_every_confirmed_setting(
    translator: KNNMT, toy_pairs: list[tuple[str, str]]
) -> None:
    pairs, ood = toy_pairs[:6], toy_pairs[200:206]
    stats = reference_statistics(translator, [s for s, _ in pairs], [t for _, t in pairs], 1)
    gate = float(np.exp(np.median(stats.log_p_max)))  # skips about half of the tokens
    result = tune(
        translator,
        [s for s, _ in pairs],
        [t for _, t in pairs],
        ks=[1, 4],
        temperatures=[10.0],
        lambdas=[0.5, 0.9],
        half_distances=[None],
        gates=[None, 1.0, gate],  # the toy model is never sure: gate 1.0 skips nothing, like none
        ood_sources=[s for s, _ in ood],
        ood_references=[t for _, t in ood],
        confirm=2,
        max_new_tokens=40,
    )
    assert result.ood_log_likelihood is not None and result.ood_base_bleu is not None
    # gate 1.0 behaves like none here, so only one of them is decoded: the two settings really differ
    assert sorted(
        row["confidence_gate"] is None or row["confidence_gate"] == 1.0 for row in result.confirmed
    ) == [
        False,
        True,
    ]
    for row in result.confirmed:
        assert row["ood_bleu_loss"] == pytest.approx(result.ood_base_bleu - row["ood_bleu"])
    assert result.best == KNNConfig.from_dict(
        {key: value for key, value in _choose(result.confirmed, 0.5).items() if key in result.best.to_dict()}
    )


def test_cli_switches_a_saved_gate_off(tmp_path: Path) -> None:
    from knnmt.apps.cli import _knn_config, _parser

    KNNConfig(k=4, half_distance=5.0, confidence_gate=0.9).save(tmp_path / "knn.json")
    base = ["translate", "--model", "m", "--datastore", str(tmp_path)]
    parser = _parser()
    assert _knn_config(parser.parse_args(base), str(tmp_path)).confidence_gate == 0.9
    off = _knn_config(
        parser.parse_args([*base, "--confidence-gate", "none", "--half-distance", "none"]), str(tmp_path)
    )
    assert off.confidence_gate is None and off.half_distance is None and off.k == 4
    assert (
        _knn_config(parser.parse_args([*base, "--confidence-gate", "0.5"]), str(tmp_path)).confidence_gate
        == 0.5
    )


def test_choice_keeps_the_out_of_domain_loss_within_bounds() -> None:
    rows = [
        {"bleu": 30.0, "log_likelihood": -1.0, "ood_bleu_loss": 2.0},
        {"bleu": 28.0, "log_likelihood": -1.1, "ood_bleu_loss": 0.4},
        {"bleu": 27.0, "log_likelihood": -0.9, "ood_bleu_loss": -0.1},
    ]
    assert _choose(rows, 0.5) is rows[1]  # the best BLEU that loses <= 0.5 out of domain
    assert _choose(rows, 5.0) is rows[0]
    assert _choose(rows, -1.0) is rows[2]  # none qualifies: the least loss
    plain = [{k: v for k, v in r.items() if k != "ood_bleu_loss"} for r in rows]
    assert _choose(plain, 0.5) is plain[0]  # without out-of-domain data: dev BLEU alone


def test_cli_tune_saves_the_choice_and_translate_uses_it(
    toy_dir: Path, marian: tuple[Any, Any], datastore: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    store_dir = tmp_path / "ds"
    shutil.copytree(datastore.path, store_dir)
    src, ref = tmp_path / "dev.en", tmp_path / "dev.de"
    src.write_text("".join(line + "\n" for line in (toy_dir / "corpus.en").read_text().splitlines()[:6]))
    ref.write_text("".join(line + "\n" for line in (toy_dir / "corpus.de").read_text().splitlines()[:6]))
    code = main(
        [
            "-q",
            "tune",
            "--model",
            str(toy_dir / "model"),
            "--datastore",
            str(store_dir),
            "--source",
            str(src),
            "--reference",
            str(ref),
            "--ks",
            "1,2",
            "--temperatures",
            "10,100",
            "--lambdas",
            "0,0.5,1",
            "--confirm",
            "2",
            "--max-new-tokens",
            "40",
        ]
    )
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "chosen:" in out
    saved = json.loads((store_dir / "knn.json").read_text())
    assert "NOT measured" in saved.pop("about")["out_of_domain"]  # no out-of-domain dev set: said so
    assert saved["k"] in (1, 2) and saved["lambda_"] in (0.0, 0.5, 1.0)
    assert (store_dir / "tuning.png").stat().st_size > 1000
    assert json.loads((store_dir / "tuning.json").read_text())["best"] == saved
    model, tokenizer = marian
    assert KNNMT.load((model, tokenizer), store_dir).config == KNNConfig.from_dict(saved)


def test_tune_prefers_the_smallest_k_within_the_tolerance(
    translator: KNNMT, toy_pairs: list[tuple[str, str]]
) -> None:
    pairs = toy_pairs[:6]
    kwargs: dict[str, Any] = dict(temperatures=[10.0], lambdas=[0.5, 0.9], confirm=1, max_new_tokens=20)
    loose = tune(
        translator, [s for s, _ in pairs], [t for _, t in pairs], ks=[2, 8], k_tolerance=1e9, **kwargs
    )
    assert loose.best.k == 2  # any k is "close enough": the cheapest wins
    strict = tune(
        translator, [s for s, _ in pairs], [t for _, t in pairs], ks=[2, 8], k_tolerance=0.0, **kwargs
    )
    best_k = [2, 8][int(np.argmax(strict.log_likelihood.reshape(2, -1).max(axis=1)))]
    assert strict.best.k == best_k


def test_saved_settings_else_defaults_is_one_rule(marian, datastore, tmp_path: Path) -> None:
    """``saved_knn_config`` (the datastore's ``knn.json``, else the defaults) is what the library, the
    command line and the service start from."""
    import argparse
    import shutil

    from knnmt.apps.cli import _knn_config
    from knnmt.apps.service.app import ServeConfig, Service
    from knnmt.pipeline.translator import KNN_CONFIG_FILE, saved_knn_config

    copy = tmp_path / "ds"
    shutil.copytree(datastore.path, copy, ignore=shutil.ignore_patterns("index", KNN_CONFIG_FILE))
    fallback = KNNConfig(k=3)
    assert saved_knn_config(copy) == KNNConfig() and saved_knn_config(copy, fallback) == fallback
    tuned = KNNConfig(k=5, lambda_=0.3, temperature=7.0, half_distance=2.0)
    tuned.save(copy / KNN_CONFIG_FILE, {"chosen by": "this test"})
    assert saved_knn_config(copy) == saved_knn_config(copy, fallback) == tuned
    assert KNNMT.load(marian, copy).config == tuned
    flags = dict.fromkeys(("k", "lambda_", "temperature", "half_distance", "confidence_gate", "domain_gate"))
    assert _knn_config(argparse.Namespace(**flags), str(copy)) == tuned
    service = Service.open(marian, copy, ServeConfig(writes=False), index=None)
    try:
        assert service.translator.config == tuned
    finally:
        service.close()
