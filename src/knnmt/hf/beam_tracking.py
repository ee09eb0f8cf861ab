"""Which sentences of a beam search are already decided, seen from inside a ``LogitsProcessor``.

transformers' vectorised beam search keeps decoding every sentence of a batch until the whole batch
is done: once a sentence has its ``num_beams`` finished hypotheses and no running beam can beat them,
its beams keep running and their continuations are discarded. The processor is still called for
those rows, and kNN-MT would search for them: with beam 4, 40 % of all searches went to decided
sentences (docs/BENCHMARKS.md, "Speed").

A processor cannot read the beam search's state, but that state is a function of what the processor
returns: the beam search adds the processor's log-probabilities to the running scores, keeps the top
continuations, moves those ending in EOS to the finished pool, and marks a sentence decided by its
early-stopping rule. :class:`BeamTracker` repeats that bookkeeping on the processor's own output with
the same tensor operations (so the same floating-point results), and checks at every step that the
running sequences it predicted are the ones the beam search hands over next. On any difference (a
transformers version with other rules, a processor after ours, sampling) it switches itself off and
every row is searched again. Rows of a decided sentence can then be left alone: nothing they produce
reaches the output sequences or their ``sequences_scores`` (the per-step ``scores`` that
``output_scores=True`` returns do show those rows unmixed).

The check on the running sequences cannot see the settings that only decide *when* a sentence is
done (``length_penalty``, ``early_stopping``, ``max_length``), so :func:`beam_settings` declines
every call whose settings it cannot read with certainty.

Mirrors ``GenerationMixin._beam_search`` of transformers 5.x (``_get_top_k_continuations``,
``_get_running_beams_for_next_iteration``, ``_update_finished_beams``, ``_check_early_stop_heuristic``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

#: added to scores to rule a candidate out, as the beam search does
_OUT = -1.0e9


@dataclasses.dataclass(frozen=True)
class BeamSettings:
    """The generation settings the beam search's bookkeeping depends on."""

    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    max_length: int
    eos_token_ids: tuple[int, ...]


class BeamTracker:
    """Follows a beam search of ``batch_size`` sentences step by step.

    Call :meth:`decided` with each step's ``input_ids`` before processing (``[B·num_beams, L]``) and
    :meth:`update` with the processor's output of that step (``[B·num_beams, V]``, the log-probabilities
    the beam search will use). ``active`` is ``False`` once the tracker lost the beam search.
    """

    def __init__(self, settings: BeamSettings, batch_size: int) -> None:
        self.settings = settings
        self.batch_size = batch_size
        self.active = settings.num_beams > 1 and bool(settings.eos_token_ids)
        self.prompt_len: int | None = None
        self.expected: torch.Tensor | None = None  # [B·nb, L + 1] predicted next input_ids
        self.running: torch.Tensor | None = None  # [B, nb] running beam scores
        self.finished: torch.Tensor | None = None  # [B, nb] scores of the finished pool
        self.sent_finished: torch.Tensor | None = None  # [B, nb] slot holds a finished hypothesis
        self.open: torch.Tensor | None = None  # [B, 1] early-stop heuristic unsatisfied: can improve
        nb = settings.num_beams
        #: continuations kept per step (the beam search's ``beams_to_keep``); only the first ``nb`` of
        #: them may enter the finished pool (its ``top_num_beam_mask``)
        self.keep = max(2, 1 + len(settings.eos_token_ids)) * nb
        self.top_num_beam_mask = torch.arange(self.keep) < nb

    def _stop(self, why: str) -> None:
        if self.active:
            logger.debug("beam tracking off: %s", why)
        self.active = False

    def decided(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """``[B·num_beams]`` bool: rows of sentences whose result is fixed (``None``: unknown)."""
        if not self.active:
            return None
        nb = self.settings.num_beams
        if input_ids.shape[0] != self.batch_size * nb:
            self._stop(f"{input_ids.shape[0]} rows for {self.batch_size} sentences x {nb} beams")
            return None
        if self.prompt_len is None:  # first step: the beam search's initial state
            self.prompt_len = int(input_ids.shape[1])
            device = input_ids.device
            self.running = torch.zeros((self.batch_size, nb), dtype=torch.float, device=device)
            self.running[:, 1:] = _OUT
            self.finished = torch.full((self.batch_size, nb), _OUT, dtype=torch.float, device=device)
            self.sent_finished = torch.zeros((self.batch_size, nb), dtype=torch.bool, device=device)
            self.open = torch.ones((self.batch_size, 1), dtype=torch.bool, device=device)
        elif self.expected is None or not torch.equal(self.expected, input_ids):
            self._stop("the running beams differ from the predicted ones")
            return None
        assert self.open is not None
        return (~self.open).expand(-1, nb).reshape(-1)

    def update(self, input_ids: torch.Tensor, log_probs: torch.Tensor) -> None:
        """Repeat the beam search's step on the processor's output ``log_probs`` ``[B·nb, V]``."""
        if not self.active:
            return
        assert self.running is not None and self.finished is not None
        assert self.sent_finished is not None and self.open is not None and self.prompt_len is not None
        s = self.settings
        nb, batch = s.num_beams, self.batch_size
        cur_len = int(input_ids.shape[1])
        vocab = log_probs.shape[-1]
        if cur_len + 1 >= s.max_length:  # the last step (if our max_length is right): stop following
            self._stop("max_length reached")
            return
        # _get_top_k_continuations (greedy selection)
        accumulated = log_probs.float().view(batch, nb, vocab) + self.running[:, :, None]
        accumulated = accumulated.reshape(batch, -1)
        topk_log_probs, topk_indices = torch.topk(accumulated, k=self.keep)
        beams = topk_indices // vocab
        tokens = topk_indices % vocab
        sequences = input_ids.view(batch, nb, cur_len)
        candidates = torch.cat(
            [torch.gather(sequences, 1, beams[:, :, None].expand(-1, -1, cur_len)), tokens[:, :, None]], dim=2
        )  # [B, keep, cur_len + 1]
        # stopping criteria: EOS (max_length is the last step, not followed)
        hits = torch.isin(tokens, torch.tensor(s.eos_token_ids, device=tokens.device))
        # _get_running_beams_for_next_iteration
        running_log_probs = topk_log_probs + hits.to(torch.float32) * _OUT
        next_indices = torch.topk(running_log_probs, k=nb)[1]
        self.expected = torch.gather(
            candidates, 1, next_indices[:, :, None].expand(-1, -1, cur_len + 1)
        ).view(batch * nb, cur_len + 1)
        self.running = torch.gather(running_log_probs, 1, next_indices)
        # _update_finished_beams
        just_finished = hits & self.top_num_beam_mask.to(hits.device)[None, :]
        scores = topk_log_probs / ((cur_len + 1 - self.prompt_len) ** s.length_penalty)
        full = torch.all(self.sent_finished, dim=-1, keepdim=True) & (s.early_stopping is True)
        scores += full.to(torch.float32) * _OUT
        scores += (~self.open).to(torch.float32) * _OUT
        scores += (~just_finished) * _OUT
        merged_scores = torch.cat((self.finished, scores), dim=1)
        merged_finished = torch.cat((self.sent_finished, just_finished), dim=1)
        best = torch.topk(merged_scores, k=nb)[1]
        self.finished = torch.gather(merged_scores, 1, best)
        self.sent_finished = torch.gather(merged_finished, 1, best)
        # _check_early_stop_heuristic, with the length of the next step
        next_len = cur_len + 1
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            hypothetical = s.max_length - self.prompt_len
        else:
            hypothetical = next_len - self.prompt_len
        best_running = self.running[:, :1] / (hypothetical**s.length_penalty)
        worst_finished = torch.where(
            self.sent_finished, torch.min(self.finished, dim=1, keepdim=True)[0], _OUT
        )
        self.open = self.open & torch.any(best_running > worst_finished, dim=-1, keepdim=True)


def beam_settings(model: object, generate_kwargs: dict[str, object]) -> BeamSettings | None:
    """The settings of a beam search ``model.generate(**generate_kwargs)`` would run, or ``None`` where
    the tracker cannot follow it (no beams, sampling, custom stopping criteria, groups, constraints)."""
    config = getattr(model, "generation_config", None)

    def setting(name: str, default: object = None) -> object:
        """The value generate will use: the call's, else the model's generation config, else the
        transformers default (an unset config field is ``None``)."""
        value = generate_kwargs.get(name)
        if value is None and config is not None:
            value = getattr(config, name, None)
        return default if value is None else value

    num_beams = int(setting("num_beams", 1) or 1)  # type: ignore[call-overload]
    if num_beams < 2 or setting("do_sample", False):
        return None
    # settings the tracker does not read, or that add stopping rules or processors after ours
    unsupported = (
        "generation_config",
        "stopping_criteria",
        "stop_strings",
        "max_time",
        "constraints",
        "force_words_ids",
        "renormalize_logits",
        "watermarking_config",
        "decoder_input_ids",
    )
    if any(generate_kwargs.get(name) for name in unsupported):
        return None
    if any(getattr(config, name, None) for name in unsupported[1:]):
        return None
    if int(setting("num_beam_groups", 1) or 1) > 1:  # type: ignore[call-overload]
        return None
    eos = setting("eos_token_id")
    eos_ids: Sequence[int] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)  # type: ignore[call-overload]
    max_length = setting("max_length")
    new_tokens = setting("max_new_tokens")  # transformers lets max_new_tokens win over max_length
    if new_tokens is not None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        max_length = int(new_tokens) + 1  # type: ignore[call-overload]  # one decoder start token
    if max_length is None:
        return None
    return BeamSettings(
        num_beams=num_beams,
        length_penalty=float(setting("length_penalty", 1.0)),  # type: ignore[arg-type]
        early_stopping=setting("early_stopping", False),  # type: ignore[arg-type]
        max_length=int(max_length),  # type: ignore[call-overload]
        eos_token_ids=tuple(int(i) for i in eos_ids),
    )
