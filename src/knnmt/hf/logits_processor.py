"""kNN-MT inside ``model.generate``: a query hook plus a ``LogitsProcessor``.

:func:`knn_generation` installs, for the duration of a ``with`` block, a forward pre-hook on
the key module (see :mod:`knnmt.hf.registry`) that keeps the current decoding step's queries, and
returns a :class:`KNNLogitsProcessor` to pass to ``generate(logits_processor=[...])``. At every
step the processor searches the neighbours of all live hypotheses (except those the confidence gate
skips) in one batched call and returns ``log((1 - λ) p_MT + λ p_kNN)``. Nothing is patched; on exit
the hook is removed.

The processor runs after ``generate``'s own processors, so ``p_MT`` here is the distribution they
left (masks such as min-length or a forced first token, and sampling warpers); the confidence gate
reads that distribution too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from ..core.config import KNNConfig
from ..core.errors import KnnmtError
from ..knn.distribution import interpolate, knn_log_probs, retrieval_weights
from ..search.retriever import Retriever
from ..store.datastore import Values
from .beam_tracking import BeamSettings, BeamTracker
from .capture import ActivationCapture
from .registry import key_module


class StepStats:
    """Counters of what retrieval did (for benchmarks and logs)."""

    def __init__(self) -> None:
        self.steps = 0
        self.rows = 0
        self.searched = 0
        self.gated = 0
        self.decided = 0
        self.sentences = 0
        self.sentences_off = 0
        self.seconds = 0.0
        self.search_seconds = 0.0

    def as_dict(self) -> dict[str, float]:
        """``steps``: processor calls; ``rows``: live hypotheses seen (beams of sentences whose beam search
        is decided are not live: ``decided`` counts those rows); ``gated``: of those, skipped by the
        confidence gate; ``searched``: distinct queries searched; ``sentences``: input sentences, of
        which ``sentences_off`` the domain gate left to the plain model; ``seconds``: wall-clock time
        inside the processor, of which ``search_seconds`` in the retriever's ``search``."""
        return {
            "steps": self.steps,
            "rows": self.rows,
            "gated": self.gated,
            "decided": self.decided,
            "sentences": self.sentences,
            "sentences_off": self.sentences_off,
            "searched": self.searched,
            "seconds": self.seconds,
            "search_seconds": self.search_seconds,
        }


class KNNLogitsProcessor(LogitsProcessor):
    """Mixes retrieval into the next-token distribution of every live hypothesis.

    Args:
        capture: the active :class:`ActivationCapture` on the key module.
        retriever: searches neighbour ids for queries.
        values: ``[N]`` int32 token id of each datastore entry.
        config: k, λ, temperature, adaptive-λ half distance, confidence gate.
        batch_size: number of source sentences in this ``generate`` call (rows are grouped by
            source as ``row // (rows / batch_size)``, which matches beams and return sequences).
        finished_ids: token ids (eos, pad) after which a row is finished and not searched.
        sentence_on: ``[batch_size]`` bool, the sources whose rows are searched (the domain gate's
            decision); the rows of the others keep the model's log-probabilities. ``None``: all.
        beam: the settings of the beam search this processor runs in
            (:func:`knnmt.hf.beam_tracking.beam_settings`); the beams of sentences whose result is
            already fixed are then not searched. ``None``: every live row is searched.
    """

    def __init__(
        self,
        capture: ActivationCapture,
        retriever: Retriever,
        values: np.ndarray | Values,
        config: KNNConfig,
        batch_size: int,
        finished_ids: Sequence[int],
        sentence_on: torch.Tensor | None = None,
        beam: BeamSettings | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if sentence_on is not None and sentence_on.shape != (batch_size,):
            raise ValueError(f"sentence_on must have shape ({batch_size},), got {tuple(sentence_on.shape)}")
        self.capture = capture
        self.retriever = retriever
        # [N] int32 (an array or a store.datastore.Values view); gathered per step, never copied whole
        self.values = values if isinstance(values, Values) else np.asarray(values)
        self.config = config
        self.batch_size = batch_size
        self.finished_ids = torch.tensor(sorted(set(finished_ids)), dtype=torch.long)
        self.sentence_on = None if sentence_on is None else sentence_on.detach().cpu().bool()
        # beam search: rows of sentences whose result is already fixed are not searched
        self.tracker = BeamTracker(beam, batch_size) if beam is not None else None
        self.stats = StepStats()
        self.stats.sentences = batch_size
        if self.sentence_on is not None:
            self.stats.sentences_off = int((~self.sentence_on).sum())

    def _queries(self, rows: int) -> torch.Tensor:
        captured = self.capture.last
        if captured is None:
            raise KnnmtError(
                "the kNN query hook did not fire: was generate() called inside knn_generation()?"
            )
        if captured.shape[0] != rows:
            raise KnnmtError(f"kNN query rows ({captured.shape[0]}) do not match the scores' rows ({rows})")
        return captured[:, -1, :].float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids [R, L]`` and ``scores [R, V]`` (logits or log-probs) -> ``[R, V]`` log-probs.

        Rows that are finished come back as given (or as their log-softmax, the same distribution, when
        a gate acted at this step); rows a gate skips come back as the model's own log-probabilities
        (λ = 0); the others are searched in one batched call and mixed.
        """
        started = time.perf_counter()
        try:
            out = self._process(input_ids, scores)
            if self.tracker is not None:
                self.tracker.update(input_ids, out)
            return out  # type: ignore[return-value]
        finally:
            self.stats.seconds += time.perf_counter() - started

    def _process(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = scores.shape[0]
        queries = self._queries(rows)
        cfg = self.config
        self.stats.steps += 1
        active = torch.ones(rows, dtype=torch.bool)
        if input_ids.shape[1] > 1:  # a row that emitted eos/pad is finished: nothing to search
            active = ~torch.isin(input_ids[:, -1].cpu(), self.finished_ids)
        decided = self.tracker.decided(input_ids) if self.tracker is not None else None
        if decided is not None:  # beams of a sentence whose result is fixed: their output is unused
            decided = active & decided.cpu()
            self.stats.decided += int(decided.sum())
            active = active & ~decided
        self.stats.rows += int(active.sum())
        groups = torch.arange(rows) // max(1, rows // self.batch_size)
        log_mt_all: torch.Tensor | None = None
        gated = torch.zeros(rows, dtype=torch.bool)
        if self.sentence_on is not None:  # the domain gate: sources unlike the memory keep p_MT
            gated = active & ~self.sentence_on[groups]
            active = active & ~gated
        if cfg.confidence_gate is not None:  # the model is sure: keep p_MT, search nothing
            log_mt_all = torch.log_softmax(scores.float(), dim=-1)
            sure = active & (log_mt_all.amax(dim=-1) >= cfg.log_gate).cpu()
            active = active & ~sure
            gated = gated | sure
            self.stats.gated += int(sure.sum())
        if bool(gated.any()) and log_mt_all is None:
            log_mt_all = torch.log_softmax(scores.float(), dim=-1)
        act_rows = active.nonzero().squeeze(1)
        if act_rows.numel() == 0 and log_mt_all is None:
            return scores
        act_dev = act_rows.to(scores.device)
        if act_rows.numel() == rows:  # every row searched (also when a gate looked and skipped none)
            log_mt = log_mt_all if log_mt_all is not None else torch.log_softmax(scores.float(), dim=-1)
            return self._mix(queries.cpu(), groups, log_mt)
        if log_mt_all is not None:
            # our own tensor: gated rows keep p_MT as it is; finished rows get the log-softmax of their
            # scores (the same distribution; generate pads them anyway); searched rows are mixed in
            if act_rows.numel():
                log_mt_all[act_dev] = self._mix(
                    queries.cpu()[act_rows], groups[act_rows], log_mt_all[act_dev]
                )
            return log_mt_all
        out = scores.float().clone()  # finished rows come back as given
        out[act_dev] = self._mix(
            queries.cpu()[act_rows], groups[act_rows], torch.log_softmax(scores[act_dev].float(), dim=-1)
        )
        return out

    def _mix(self, queries: torch.Tensor, groups: torch.Tensor, log_mt: torch.Tensor) -> torch.Tensor:
        """Search the rows' neighbours and mix them into their model log-probabilities.

        Args:
            queries: ``[A, dim]`` float32 (CPU) queries of the rows to search.
            groups: ``[A]`` source sentence (in the batch) of each row.
            log_mt: ``[A, V]`` the rows' model log-probabilities (on the model's device).

        Returns:
            ``[A, V]`` ``log((1 - λ_q) p_MT + λ_q p_kNN)``.
        """
        # identical (query, source) pairs - e.g. all beams at the first step - are searched once
        keyed = torch.cat([queries, groups.unsqueeze(1).float()], dim=1)
        unique, inverse = torch.unique(keyed, dim=0, return_inverse=True)
        self.stats.searched += int(unique.shape[0])
        cfg = self.config
        started = time.perf_counter()
        distances, ids = self.retriever.search(
            unique[:, :-1].contiguous().numpy(), cfg.k, unique[:, -1].long().numpy()
        )
        self.stats.search_seconds += time.perf_counter() - started
        dist_t = torch.from_numpy(distances)[inverse]
        tokens = torch.from_numpy(np.where(ids >= 0, self.values[np.clip(ids, 0, None)], -1).astype(np.int64))
        tokens = tokens[inverse]
        log_knn = knn_log_probs(dist_t, tokens, cfg.temperature)
        lam = (
            cfg.lambda_
            if cfg.half_distance is None
            else retrieval_weights(dist_t, tokens, cfg.lambda_, cfg.temperature, cfg.half_distance)
        )
        device = log_mt.device
        return interpolate(log_mt, tokens.to(device), log_knn.to(device), lam)


@contextlib.contextmanager
def knn_generation(
    model: torch.nn.Module,
    retriever: Retriever,
    values: np.ndarray | Values,
    config: KNNConfig,
    *,
    batch_size: int,
    finished_ids: Sequence[int],
    key_layer: str = "ffn_input",
    sentence_on: torch.Tensor | None = None,
    beam: BeamSettings | None = None,
) -> Iterator[KNNLogitsProcessor]:
    """Install the query hook on ``model`` and yield the processor for ``generate``.

    Example::

        with knn_generation(model, retriever, ds.values, KNNConfig(k=8), batch_size=len(src),
                            finished_ids=[tok.eos_token_id, tok.pad_token_id]) as proc:
            out = model.generate(**inputs, logits_processor=[proc])
    """
    with ActivationCapture(key_module(model, key_layer)) as capture:
        yield KNNLogitsProcessor(
            capture, retriever, values, config, batch_size, finished_ids, sentence_on, beam
        )
