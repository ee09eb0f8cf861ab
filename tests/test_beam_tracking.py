"""Beam search skips the searches of decided sentences: outputs are exactly those of searching every
row, for the beam-search settings that change when a sentence is decided."""

from __future__ import annotations

import pytest
import torch

from knnmt.core.config import KNNConfig
from knnmt.hf.beam_tracking import BeamSettings, BeamTracker, beam_settings

KNN = KNNConfig(lambda_=0.5, k=4, temperature=10.0)


@pytest.mark.parametrize(
    ("num_beams", "extra"),
    [
        (4, {}),
        (3, {"length_penalty": 0.6}),
        (4, {"length_penalty": 2.0, "early_stopping": True}),
        (2, {"early_stopping": "never"}),
        (4, {"length_penalty": -0.5, "early_stopping": "never"}),
    ],
)
def test_tracking_changes_nothing_but_the_searches(
    translator, toy_pairs, num_beams: int, extra: dict
) -> None:
    sources = [
        s for s, _ in toy_pairs[120:132]
    ]  # different lengths: sentences are decided at different steps
    gen = {"num_beams": num_beams, "max_new_tokens": 40, "batch_size": 6, "sort_by_length": False, **extra}
    try:
        translator.track_beams = False
        full = translator.translate(sources, knn=KNN, **gen)
        searched_all = translator.last_stats["searched"]
        assert translator.last_stats["decided"] == 0
        translator.track_beams = True
        tracked = translator.translate(sources, knn=KNN, **gen)
        stats = translator.last_stats
    finally:
        translator.track_beams = True
    assert [t.token_ids for t in tracked] == [t.token_ids for t in full]
    assert stats["decided"] > 0 and stats["searched"] < searched_all


def test_tracking_with_gates_and_plain_generate(translator, toy_pairs) -> None:
    """λ = 0 with tracking is still plain beam search; tracking and the confidence gate combine."""
    sources = [s for s, _ in toy_pairs[140:146]]
    gen = {"num_beams": 4, "max_new_tokens": 32}
    plain = translator.translate(sources, knn=False, **gen)
    zero = translator.translate(sources, knn=KNNConfig(lambda_=0.0, k=4), **gen)
    assert [t.token_ids for t in zero] == [t.token_ids for t in plain]
    gated = KNNConfig(lambda_=0.5, k=4, temperature=10.0, confidence_gate=0.2)
    tracked = translator.translate(sources, knn=gated, **gen)
    try:
        translator.track_beams = False
        full = translator.translate(sources, knn=gated, **gen)
    finally:
        translator.track_beams = True
    assert [t.token_ids for t in tracked] == [t.token_ids for t in full]


def test_tracker_lets_go_when_the_beams_differ() -> None:
    settings = BeamSettings(
        num_beams=2, length_penalty=1.0, early_stopping=False, max_length=10, eos_token_ids=(0,)
    )
    tracker = BeamTracker(settings, batch_size=1)
    ids = torch.full((2, 1), 5)
    first = tracker.decided(ids)
    assert first is not None and not first.any()
    log_probs = torch.log_softmax(torch.randn(2, 7), dim=-1)
    tracker.update(ids, log_probs)
    assert tracker.expected is not None and tracker.expected.shape == (2, 2)
    wrong = tracker.expected.clone()
    wrong[0, -1] = (wrong[0, -1] + 1) % 7
    assert tracker.decided(wrong) is None and not tracker.active
    assert tracker.decided(tracker.expected) is None  # once off, off for the rest of the call


def test_settings_only_for_deterministic_beam_search(translator) -> None:
    model = translator.model
    assert beam_settings(model, {"num_beams": 1}) is None
    assert beam_settings(model, {"num_beams": 4, "do_sample": True}) is None
    assert beam_settings(model, {"num_beams": 4, "max_time": 1.0}) is None
    # settings it cannot read for certain, or processors that would run after the kNN processor
    assert beam_settings(model, {"num_beams": 4, "generation_config": model.generation_config}) is None
    assert beam_settings(model, {"num_beams": 4, "renormalize_logits": True}) is None
    settings = beam_settings(model, {"num_beams": 4, "max_new_tokens": 9, "length_penalty": 0.5})
    assert settings is not None
    assert (settings.num_beams, settings.max_length, settings.length_penalty) == (4, 10, 0.5)
    assert settings.eos_token_ids == (translator.tokenizer.eos_token_id,)


@pytest.mark.parametrize(
    ("num_beams", "extra"),
    [(4, {}), (3, {"length_penalty": 0.6}), (4, {"length_penalty": 2.0, "early_stopping": True})],
)
def test_tracked_finished_pool_is_the_beam_searchs(
    translator, toy_pairs, num_beams: int, extra: dict
) -> None:
    """The tracker's finished hypotheses' scores are the ones generate returns (``sequences_scores``)."""
    from knnmt.hf.logits_processor import knn_generation

    model, tokenizer = translator.model, translator.tokenizer
    sources = [s for s, _ in toy_pairs[120:128]]
    gen = {"num_beams": num_beams, "max_length": 80, **extra}
    settings = beam_settings(model, gen)
    assert settings is not None
    inputs = tokenizer(sources, return_tensors="pt", padding=True)
    with (
        torch.inference_mode(),
        knn_generation(
            model,
            translator.retriever,
            translator.datastore.values,
            KNN,
            batch_size=len(sources),
            finished_ids=[tokenizer.eos_token_id, tokenizer.pad_token_id],
            beam=settings,
        ) as proc,
    ):
        out = model.generate(
            **inputs,
            logits_processor=[proc],
            num_return_sequences=num_beams,
            output_scores=True,
            return_dict_in_generate=True,
            **gen,
        )
    assert out.sequences.shape[1] < 80  # every sentence was decided before max_length
    assert proc.tracker is not None and proc.tracker.active and proc.tracker.finished is not None
    torch.testing.assert_close(proc.tracker.finished.flatten(), out.sequences_scores, rtol=0, atol=0)
    assert proc.stats.decided > 0
