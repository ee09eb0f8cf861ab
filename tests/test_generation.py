"""kNN-MT inside ``model.generate``: λ = 0 is a no-op, batching is invisible, every beam hypothesis
retrieves with its own query, sampling works and -inf masks survive the processor."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from conftest import strip_pad
from knnmt.core.config import KNNConfig
from knnmt.hf import logits_processor
from knnmt.hf.capture import ActivationCapture
from knnmt.hf.registry import key_module
from knnmt.knn.distribution import interpolate, knn_log_probs, retrieval_weights
from knnmt.pipeline.tuning import reference_statistics

GEN = {"max_new_tokens": 32}


@pytest.fixture
def knn_steps(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Spy on :class:`KNNLogitsProcessor`: records ``input_ids``, ``scores``, the captured queries and the
    output of every call during the test."""
    calls: list[dict[str, torch.Tensor]] = []
    original = logits_processor.KNNLogitsProcessor.__call__

    def spy(
        self: logits_processor.KNNLogitsProcessor, input_ids: torch.Tensor, scores: torch.Tensor
    ) -> torch.Tensor:
        scores_in = scores.clone()
        assert self.capture.last is not None
        queries = self.capture.last[:, -1, :].float().clone()
        out = original(self, input_ids, scores)
        calls.append(
            {"input_ids": input_ids.clone(), "scores": scores_in, "queries": queries, "out": out.clone()}
        )
        return out

    monkeypatch.setattr(logits_processor.KNNLogitsProcessor, "__call__", spy)
    return calls


def _sources(toy_pairs: list[tuple[str, str]], n: int, offset: int = 0) -> list[str]:
    return [s for s, _ in toy_pairs[offset : offset + n]]


def _median_top_probability(translator: Any, pairs: list[tuple[str, str]]) -> float:
    """The median probability of the model's most likely token over the teacher-forced ``pairs``: a
    confidence gate there skips about half of the steps (the random toy model is nowhere near sure)."""
    stats = reference_statistics(translator, [s for s, _ in pairs], [t for _, t in pairs], 1)
    return float(np.exp(np.median(stats.log_p_max)))


@pytest.mark.parametrize("num_beams", [1, 4])
def test_lambda_zero_equals_plain_generate(
    any_translator, marian, toy_pairs, knn_steps, num_beams: int
) -> None:
    """For every retrieval mode (``any_translator``): Subset kNN-MT's dense sentence search runs the encoder
    itself and hands its output to ``generate``, which must not change anything either."""
    translator = any_translator
    model, tokenizer = marian
    sources = _sources(toy_pairs, 12)
    gen = {"num_beams": num_beams, **GEN}
    batch = {"sort_by_length": False, "batch_size": len(sources)}

    zero = translator.translate(sources, knn=KNNConfig(lambda_=0.0, k=4), **batch, **gen)
    assert knn_steps, "the kNN processor never ran"
    assert translator.last_stats["searched"] > 0
    plain = translator.translate(sources, knn=False, **batch, **gen)
    inputs = tokenizer(sources, return_tensors="pt", padding=True, truncation=True)
    with torch.inference_mode():
        raw = model.generate(**inputs, **gen)

    for i in range(len(sources)):
        assert zero[i].token_ids == plain[i].token_ids == raw[i].tolist(), sources[i]
        assert zero[i].text == plain[i].text

    # the check above is not vacuous: with λ > 0 retrieval does change these translations
    mixed = translator.translate(sources, knn=KNNConfig(lambda_=0.5, k=4), **batch, **gen)
    assert any(m.token_ids != p.token_ids for m, p in zip(mixed, plain, strict=True))


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batch_of_one_equals_batch_of_many(any_translator, marian, toy_pairs, num_beams: int) -> None:
    """For every retrieval mode: Subset kNN-MT selects each sentence's own subset whatever its batch."""
    translator = any_translator
    _, tokenizer = marian
    sources = _sources(toy_pairs, 7, offset=20)
    config = KNNConfig(lambda_=0.5, k=4)
    gen = {"num_beams": num_beams, "max_new_tokens": 32}

    single = translator.translate(sources, knn=config, batch_size=1, **gen)
    full = translator.translate(sources, knn=config, batch_size=len(sources), **gen)
    uneven = translator.translate(sources, knn=config, batch_size=3, sort_by_length=False, **gen)

    pad = tokenizer.pad_token_id
    for a, b, c in zip(single, full, uneven, strict=True):
        # generate pads finished rows to the batch's longest row; compare up to that padding
        assert strip_pad(a.token_ids, pad) == strip_pad(b.token_ids, pad) == strip_pad(c.token_ids, pad)
        assert a.text == b.text == c.text
    assert len({t.text for t in single}) > 1


def _reference_step(
    model: Any,
    translator: Any,
    enc: dict[str, torch.Tensor],
    rows_per_source: int,
    call: dict[str, torch.Tensor],
    config: KNNConfig,
    finished: set[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference for one processor call: each row's query from a full teacher-forced forward pass
    of that row's own prefix (no cache), then retrieval and mixing from scratch."""
    input_ids, scores = call["input_ids"], call["scores"]
    rows = input_ids.shape[0]
    source_rows = torch.arange(rows) // rows_per_source
    with torch.inference_mode(), ActivationCapture(key_module(model)) as capture:
        model(
            input_ids=enc["input_ids"][source_rows],
            attention_mask=enc["attention_mask"][source_rows],
            decoder_input_ids=input_ids,
            use_cache=False,
        )
        assert capture.last is not None
        queries = capture.last[:, -1, :].float()
    distances, ids = translator.index.search(queries.numpy(), config.k)
    values = torch.from_numpy(
        np.where(ids >= 0, translator.datastore.values[np.clip(ids, 0, None)], -1)
    ).long()
    log_knn = knn_log_probs(torch.from_numpy(distances), values, config.temperature)
    lam = retrieval_weights(
        torch.from_numpy(distances), values, config.lambda_, config.temperature, config.half_distance
    )
    log_mt = torch.log_softmax(scores.float(), dim=-1)
    expected = interpolate(log_mt, values, log_knn, lam)
    if config.confidence_gate is not None:  # rows where the model is sure keep p_MT
        sure = log_mt.max(dim=-1).values >= np.log(config.confidence_gate)
        expected[sure] = log_mt[sure]
    if input_ids.shape[1] > 1:  # finished rows (last token eos/pad) are passed through untouched
        done = torch.tensor([int(t) in finished for t in input_ids[:, -1]])
        expected[done] = scores[done].float()
    return queries, expected


@pytest.mark.parametrize(
    ("num_beams", "half_distance", "gate"),
    [(4, None, None), (1, None, None), (4, 5.0, None), (4, None, "median")],
)
def test_each_hypothesis_uses_its_own_query(
    translator, marian, toy_pairs, knn_steps, num_beams: int, half_distance: float | None, gate: str | None
) -> None:
    model, tokenizer = marian
    sources = _sources(toy_pairs, 3, offset=40)
    confidence_gate = None if gate is None else _median_top_probability(translator, toy_pairs[40:43])
    config = KNNConfig(
        lambda_=0.5, k=4, temperature=10.0, half_distance=half_distance, confidence_gate=confidence_gate
    )
    try:  # the reference mixes every live row: also the beams of decided sentences (test_beam_tracking)
        translator.track_beams = False
        translator.translate(
            sources,
            knn=config,
            num_beams=num_beams,
            max_new_tokens=16,
            sort_by_length=False,
            batch_size=len(sources),
        )
    finally:
        translator.track_beams = True
    if gate is not None:  # the gate really skipped some rows and searched others
        assert 0 < translator.last_stats["gated"] < translator.last_stats["rows"]
    enc = tokenizer(sources, return_tensors="pt", padding=True, truncation=True)
    finished = {tokenizer.eos_token_id, tokenizer.pad_token_id}

    assert len(knn_steps) >= 5
    distinct_hypotheses = False
    for step, call in enumerate(knn_steps):
        assert call["input_ids"].shape[0] == len(sources) * num_beams
        queries, expected = _reference_step(model, translator, enc, num_beams, call, config, finished)
        torch.testing.assert_close(
            call["queries"], queries, atol=1e-4, rtol=1e-4, msg=f"queries, step {step}"
        )
        torch.testing.assert_close(call["out"], expected, atol=1e-4, rtol=1e-4, msg=f"log-probs, step {step}")
        beams = call["input_ids"].view(len(sources), num_beams, -1)
        outs = expected.view(len(sources), num_beams, -1)
        for b in range(len(sources)):
            if num_beams > 1 and len({tuple(r.tolist()) for r in beams[b]}) == num_beams:
                finite = torch.isfinite(outs[b]).all(dim=0)
                if (outs[b][0, finite] - outs[b][1, finite]).abs().max() > 1e-2:
                    distinct_hypotheses = True
    if num_beams > 1:
        # the comparison exercised beams whose prefixes and distributions really differ
        assert distinct_hypotheses


@pytest.mark.parametrize("num_beams", [1, 4])
def test_confidence_gate(translator, toy_pairs, num_beams: int) -> None:
    """A gate every step passes (any probability >= a tiny one) is the plain model and searches nothing;
    a middling gate skips some rows and still changes translations; gating all but nothing = no gate."""
    sources = _sources(toy_pairs, 10, offset=80)
    gen = {"num_beams": num_beams, "max_new_tokens": 24, "batch_size": 5}
    plain = translator.translate(sources, knn=False, **gen)
    closed = translator.translate(sources, knn=KNNConfig(lambda_=0.8, k=4, confidence_gate=1e-9), **gen)
    assert [t.token_ids for t in closed] == [t.token_ids for t in plain]
    stats = translator.last_stats
    assert stats["searched"] == 0 and stats["gated"] == stats["rows"] > 0

    open_ = translator.translate(sources, knn=KNNConfig(lambda_=0.8, k=4, confidence_gate=1.0), **gen)
    ungated = translator.translate(sources, knn=KNNConfig(lambda_=0.8, k=4), **gen)
    assert [t.token_ids for t in open_] == [t.token_ids for t in ungated]

    gate = _median_top_probability(translator, toy_pairs[80:90])
    half = translator.translate(sources, knn=KNNConfig(lambda_=0.8, k=4, confidence_gate=gate), **gen)
    stats = translator.last_stats
    assert 0 < stats["gated"] < stats["rows"] and stats["searched"] > 0
    assert any(h.token_ids != p.token_ids for h, p in zip(half, plain, strict=True))


def test_sampling_with_a_seed(translator, marian, toy_pairs, knn_steps) -> None:
    _, tokenizer = marian
    pairs = toy_pairs[60:66]
    sources = [s for s, _ in pairs]
    pad, start = tokenizer.pad_token_id, translator.model.config.decoder_start_token_id
    config = KNNConfig(lambda_=0.5, k=4)

    def sample(seed: int, cfg: KNNConfig = config) -> list[list[int]]:
        torch.manual_seed(seed)
        out = translator.translate(sources, knn=cfg, do_sample=True, top_k=0, max_new_tokens=32)
        return [strip_pad(t.token_ids, pad, start) for t in out]

    first, again = sample(123), sample(123)
    assert first == again  # reproducible with the same seed
    assert knn_steps and all(torch.isfinite(c["out"]).any(dim=1).all() for c in knn_steps)
    greedy = translator.translate(sources, knn=config, max_new_tokens=32)
    assert any(f != strip_pad(g.token_ids, pad, start) for f, g in zip(first, greedy, strict=True))
    for ids in first:
        assert all(0 <= i < len(tokenizer) for i in ids)
    # with λ = 1 and k = 1 the distribution is a point mass: sampling must reproduce the references
    point = sample(7, KNNConfig(lambda_=1.0, k=1))
    expected = tokenizer(text_target=[t for _, t in pairs])["input_ids"]
    assert point == [list(e) for e in expected]


@pytest.mark.parametrize(
    ("config", "gen"),
    [
        (KNNConfig(lambda_=1.0, k=1), {}),
        (KNNConfig(lambda_=0.5, k=4), {"num_beams": 4}),
        (KNNConfig(lambda_=0.8, k=8), {"do_sample": True, "top_k": 0}),
    ],
    ids=["lambda1-greedy", "beam4", "sampling"],
)
def test_masks_stay_masked(
    translator, marian, toy_pairs, knn_steps, config: KNNConfig, gen: dict[str, Any]
) -> None:
    _, tokenizer = marian
    pairs = toy_pairs[80:84]
    sources = [s for s, _ in pairs]
    references = tokenizer(text_target=[t for _, t in pairs])["input_ids"]
    # ban the first token of every reference: the datastore votes for exactly these tokens
    banned = sorted({ref[0] for ref in references})
    torch.manual_seed(0)
    out = translator.translate(
        sources, knn=config, bad_words_ids=[[b] for b in banned], max_new_tokens=24, **gen
    )

    assert knn_steps
    for step, call in enumerate(knn_steps):
        assert torch.isneginf(call["scores"][:, banned]).all(), "bad_words_ids did not run before kNN"
        assert torch.isneginf(call["out"][:, banned]).all(), f"a masked token came back at step {step}"
        assert torch.isfinite(call["out"]).any(dim=1).all()
    for t in out:
        assert not set(t.token_ids) & set(banned)
