"""Teacher forcing: tokenise sentence pairs, batch them by length, and read the kNN keys.

For a pair ``(x, y)`` with target tokens ``y_1..y_T`` (the final ``</s>`` included) the model
is run once on ``x`` and the decoder inputs ``[start, y_1..y_{T-1}]``; the key of position
``t`` is the captured representation ``f(x, y<t)`` and its value is ``y_t``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import CorpusError, UsageError
from ..search.sentence_search import mean_pool
from .capture import ActivationCapture
from .registry import key_module, model_max_length

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """A tokenised pair: ``target_ids`` are the values ``y_1..y_T`` (``</s>`` included)."""

    sentence_id: int
    line: int
    source: str
    target: str
    source_ids: list[int]
    target_ids: list[int]


class TooLongError(CorpusError):
    """A sentence side has more tokens than allowed (raised when truncation is off).

    ``side`` is ``"source"`` or ``"target"``; ``line`` the line (1-based position) of the pair.
    """

    def __init__(
        self, side: str, tokens: int, limit: int, hint: str, path: str | None, line: int | None
    ) -> None:
        super().__init__(
            f"{side} sentence has {tokens} tokens, more than the maximum {limit}; {hint}",
            path,
            line,
        )
        self.side = side
        self.tokens = tokens
        self.limit = limit


def sequence_limit(model: nn.Module, tokenizer: Any, requested: int | None = None) -> int:
    """The most tokens one sentence side may have: :func:`~knnmt.hf.registry.model_max_length`, the model's
    position embeddings and the tokenizer's declared maximum (``T`` target tokens take the decoder
    positions ``0..T-1``: its inputs are ``[start, y_1..y_{T-1}]``). Every path that feeds the model
    (build, tune, explain, memory appends, generation) uses this limit.

    Args:
        requested: a smaller limit asked for (e.g. ``BuildConfig.max_length``); more than the model's
            maximum is an error.

    Raises:
        UsageError: ``requested`` is above the model's maximum.
    """
    limit = model_max_length(model, tokenizer)
    if requested is None:
        return limit
    if requested > limit:
        raise UsageError(
            f"max_length {requested} is more than the model's maximum of {limit} tokens "
            "(its position embeddings and tokenizer); use at most that"
        )
    return requested


def warn_truncated(count: int, limit: int, what: str) -> None:
    """Log one warning that ``count`` over-long sentence sides of ``what`` were cut to ``limit`` tokens."""
    if count:
        logger.warning(
            "%s: truncated %d over-long sentence side(s) to the model's maximum of %d tokens",
            what,
            count,
            limit,
        )


def _tokenize(
    tokenizer: Any,
    texts: list[str],
    target: bool,
    max_length: int,
    truncate: bool,
    lines: list[int],
    path: str,
    hint: str,
) -> tuple[list[list[int]], int]:
    """Token ids of ``texts`` (source or target side), truncating over-long ones if allowed."""
    kwargs = {"text_target": texts} if target else {"text": texts}
    ids: list[list[int]] = tokenizer(**kwargs, truncation=False)["input_ids"]
    too_long = [i for i, seq in enumerate(ids) if len(seq) > max_length]
    if too_long and not truncate:
        side = "target" if target else "source"
        raise TooLongError(side, len(ids[too_long[0]]), max_length, hint, path, lines[too_long[0]])
    if too_long:
        cut_kwargs = (
            {"text_target": [texts[i] for i in too_long]}
            if target
            else {"text": [texts[i] for i in too_long]}
        )
        cut = tokenizer(**cut_kwargs, truncation=True, max_length=max_length)["input_ids"]
        for i, seq in zip(too_long, cut, strict=True):
            ids[i] = list(seq)
    return ids, len(too_long)


def encode_pairs(
    tokenizer: Any,
    pairs: Sequence[tuple[int, int, str, str]],
    *,
    max_length: int,
    truncate: bool,
    paths: tuple[str, str] | str,
    source_prefix: str = "",
    hint: str = "shorten it",
) -> tuple[list[EncodedPair], int]:
    """Tokenise ``(sentence_id, line, source, target)`` tuples.

    ``max_length`` should come from :func:`sequence_limit`. ``paths`` names the source and target
    files (or one file for both) in error messages; ``hint`` ends the message of an over-long side
    when ``truncate`` is off (what the caller's user can do about it).

    Returns:
        the encoded pairs and how many sides were truncated.

    Raises:
        TooLongError: a side has more than ``max_length`` tokens and ``truncate`` is off.
    """
    src_path, tgt_path = (paths, paths) if isinstance(paths, str) else paths
    lines = [p[1] for p in pairs]
    sources = [source_prefix + p[2] for p in pairs]
    src_ids, cut_src = _tokenize(tokenizer, sources, False, max_length, truncate, lines, src_path, hint)
    tgt_ids, cut_tgt = _tokenize(
        tokenizer, [p[3] for p in pairs], True, max_length, truncate, lines, tgt_path, hint
    )
    encoded = [
        EncodedPair(sid, line, src, tgt, s, t)
        for (sid, line, src, tgt), s, t in zip(pairs, src_ids, tgt_ids, strict=True)
    ]
    return encoded, cut_src + cut_tgt


def encode_for_model(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[int, int, str, str]],
    *,
    paths: tuple[str, str] | str,
    source_prefix: str = "",
) -> tuple[list[EncodedPair], int]:
    """:func:`encode_pairs` at the model's own maximum (:func:`sequence_limit`), truncating over-long
    sides and logging their count (what tuning, explanation and the benchmarks teacher-force).

    Returns:
        the encoded pairs and how many sides were truncated.
    """
    limit = sequence_limit(model, tokenizer)
    encoded, cut = encode_pairs(
        tokenizer, pairs, max_length=limit, truncate=True, paths=paths, source_prefix=source_prefix
    )
    warn_truncated(cut, limit, paths if isinstance(paths, str) else " / ".join(paths))
    return encoded, cut


def encode_targets(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Target-side token ids of ``texts`` (``y_1..y_T``, ``</s>`` included), over-long ones truncated
    to ``max_length`` as :func:`encode_pairs` truncates them.

    Returns:
        the ids and how many of ``texts`` were truncated.
    """
    return _tokenize(tokenizer, list(texts), True, max_length, True, [], "", "")


def encode_source_ids(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Source-side token ids of ``texts`` (prefix already added), over-long ones truncated to
    ``max_length`` as :func:`encode_pairs` truncates them.

    Returns:
        the ids and how many of ``texts`` were truncated.
    """
    return _tokenize(tokenizer, list(texts), False, max_length, True, [], "", "")


def encode_sources(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[Any, int]:
    """Tokenise model inputs for generation or encoding, padded, cut to ``max_length`` tokens.

    Returns:
        the tokenizer's batch (``input_ids``/``attention_mask`` ``[len(texts), width]`` tensors) and
        how many of ``texts`` were longer than ``max_length`` and truncated.
    """
    inputs = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    full = (inputs["attention_mask"].sum(dim=1) == max_length).nonzero().flatten().tolist()
    cut = 0
    if full:  # exactly full rows may have been cut: count those longer untruncated
        ids = tokenizer([texts[i] for i in full], truncation=False)["input_ids"]
        cut = sum(len(seq) > max_length for seq in ids)
    return inputs, cut


def length_batches(pairs: Sequence[EncodedPair], max_tokens: int) -> Iterator[list[int]]:
    """Indices of ``pairs`` grouped into batches sorted by length.

    A batch's padded size ``rows * (max_src_len + max_tgt_len)`` stays within ``max_tokens``
    (a single longer pair forms a batch of its own).
    """
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i].target_ids), len(pairs[i].source_ids)))
    batch: list[int] = []
    longest_src = longest_tgt = 0
    for i in order:
        src_len, tgt_len = len(pairs[i].source_ids), len(pairs[i].target_ids)
        new_src, new_tgt = max(longest_src, src_len), max(longest_tgt, tgt_len)
        if batch and (len(batch) + 1) * (new_src + new_tgt) > max_tokens:
            yield batch
            batch, new_src, new_tgt = [], src_len, tgt_len
        batch.append(i)
        longest_src, longest_tgt = new_src, new_tgt
    if batch:
        yield batch


def pad_sequences(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def decoder_inputs(model: Any, labels: torch.Tensor) -> torch.Tensor:
    """``[start, y_1..y_{T-1}]`` for padded ``labels`` ``[batch, T]``, the way the model itself shifts."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    shifted = labels.new_full(labels.shape, int(model.config.pad_token_id))
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = int(model.config.decoder_start_token_id)
    return shifted


#: extra keyword arguments for the model's forward pass of a batch (e.g. ``{"encoder_outputs": ...}``),
#: given the batch's pairs and its tokenised sources (``input_ids``/``attention_mask`` on the model's
#: device): how a sentence-dependent retriever (Subset kNN-MT) sees each batch before its queries.
PrepareBatch = Callable[[list[EncodedPair], dict[str, torch.Tensor]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ForcedBatch:
    """One teacher-forced batch: per pair (in batch order) its keys and, when asked for, more.

    ``keys[i]`` is ``[len(pairs[i].target_ids), dim]`` (model dtype, on CPU): the key of position ``t``
    is ``f(x, y<t)``, read where :func:`~knnmt.hf.registry.key_module` says.
    """

    #: positions of ``pairs`` in the sequence given to :func:`teacher_force`
    indices: list[int]
    pairs: list[EncodedPair]
    keys: list[torch.Tensor]
    #: ``[len(pairs), d_model]`` float32 unit vectors: the encoder output mean-pooled over the source
    #: tokens (:func:`mean_pool`, as the domain gate and dense sentence search embed inputs)
    vectors: np.ndarray | None = None
    #: per pair ``[len(target_ids), vocab]`` float32 ``log p_MT`` (on CPU) of every target position
    log_probs: list[torch.Tensor] | None = None

    @property
    def groups(self) -> np.ndarray:
        """``[sum of target lengths]`` the batch row of each row of ``torch.cat(keys)``."""
        return np.repeat(np.arange(len(self.pairs)), [len(p.target_ids) for p in self.pairs])


class KeyExtractor:
    """Runs teacher forcing on one batch (see :func:`teacher_force`, which batches a whole list).

    With ``key_layer="ffn_input"`` and no log-probabilities asked for, only the encoder and decoder run
    (no ``lm_head``, no loss).
    """

    def __init__(self, model: nn.Module, pad_token_id: int, key_layer: str = "ffn_input") -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.key_layer = key_layer
        self.module = key_module(model, key_layer)
        self.device = next(model.parameters()).device

    def __call__(self, batch: Sequence[EncodedPair]) -> list[torch.Tensor]:
        """Keys per pair: a list of ``[len(target_ids), dim]`` tensors (model dtype, on CPU)."""
        return self.run(batch).keys

    @torch.inference_mode()
    def run(
        self,
        batch: Sequence[EncodedPair],
        indices: Sequence[int] | None = None,
        *,
        vectors: bool = False,
        log_probs: bool = False,
        prepare: PrepareBatch | None = None,
    ) -> ForcedBatch:
        """Teacher-force ``batch`` (padded into one forward pass).

        Args:
            indices: recorded as :attr:`ForcedBatch.indices` (default ``0..len(batch)-1``).
            vectors: also return the mean-pooled encoder output of each source.
            log_probs: also return the model's ``log p_MT`` of every target position (runs ``lm_head``).
            prepare: extra forward arguments for this batch (:data:`PrepareBatch`); the whole model runs.
        """
        pairs = list(batch)
        src, src_mask = pad_sequences([p.source_ids for p in pairs], self.pad_token_id)
        labels, _ = pad_sequences([p.target_ids for p in pairs], self.pad_token_id)
        dec_in = decoder_inputs(self.model, labels)
        src, src_mask, dec_in = src.to(self.device), src_mask.to(self.device), dec_in.to(self.device)
        extra = prepare(pairs, {"input_ids": src, "attention_mask": src_mask}) if prepare else {}
        logits: torch.Tensor | None = None
        with ActivationCapture(self.module) as capture:
            if self.key_layer == "ffn_input" and not log_probs and prepare is None:
                encoded = self.model.get_encoder()(input_ids=src, attention_mask=src_mask)  # type: ignore[operator]
                self.model.get_decoder()(  # type: ignore[operator]
                    input_ids=dec_in,
                    encoder_hidden_states=encoded[0],
                    encoder_attention_mask=src_mask,
                    use_cache=False,
                )
                states = encoded[0]
            else:
                out = self.model(
                    input_ids=src, attention_mask=src_mask, decoder_input_ids=dec_in, use_cache=False, **extra
                )
                states, logits = out.encoder_last_hidden_state, out.logits
            keys = capture.last
        assert keys is not None, "the key hook did not fire"
        keys = keys.to("cpu")
        per_pair = [keys[row, : len(p.target_ids)] for row, p in enumerate(pairs)]
        lp: list[torch.Tensor] | None = None
        if log_probs:
            assert logits is not None
            full = torch.log_softmax(logits.float().cpu(), dim=-1)
            lp = [full[row, : len(p.target_ids)] for row, p in enumerate(pairs)]
        return ForcedBatch(
            list(range(len(pairs))) if indices is None else list(indices),
            pairs,
            per_pair,
            mean_pool(states, src_mask) if vectors else None,
            lp,
        )


def teacher_force(
    model: nn.Module,
    tokenizer: Any,
    encoded: Sequence[EncodedPair],
    *,
    key_layer: str = "ffn_input",
    max_tokens: int | None = None,
    batches: Iterable[Sequence[int]] | None = None,
    vectors: bool = False,
    log_probs: bool = False,
    prepare: PrepareBatch | None = None,
) -> Iterator[ForcedBatch]:
    """The one teacher-forced pass: the datastore build (keys, sentence vectors), ``tune``'s reference
    statistics and ``explain`` (keys as queries, ``log p_MT``) and :func:`pair_queries` all run this.

    ``encoded`` comes from :func:`encode_pairs` / :func:`encode_for_model` (cut to
    :func:`sequence_limit`). The pairs run in :func:`length_batches` of ``max_tokens`` padded tokens,
    or in the given ``batches`` (lists of indices into ``encoded``); each yields a :class:`ForcedBatch`.
    The keys are read by a forward pre-hook (:class:`~knnmt.hf.capture.ActivationCapture`) on
    :func:`~knnmt.hf.registry.key_module` for ``key_layer``: the input of the final decoder layer's
    feed-forward block, or of ``lm_head``. ``vectors``, ``log_probs`` and ``prepare``: see
    :meth:`KeyExtractor.run`.

    Raises:
        UsageError: neither ``max_tokens`` nor ``batches`` is given.
    """
    if batches is None:
        if max_tokens is None:
            raise UsageError("teacher_force needs max_tokens (length batches) or explicit batches")
        batches = length_batches(encoded, max_tokens)
    extractor = KeyExtractor(model, tokenizer.pad_token_id, key_layer)
    for rows in batches:
        rows = list(rows)
        yield extractor.run(
            [encoded[i] for i in rows], rows, vectors=vectors, log_probs=log_probs, prepare=prepare
        )


def pair_queries(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    path: str = "pairs",
    key_layer: str = "ffn_input",
) -> list[torch.Tensor]:
    """The kNN queries a model makes while teacher-forced on each ``(source, target)`` pair.

    Returns:
        one float32 ``[len(target_ids), dim]`` tensor per pair, in input order (for recall checks
        against exact search on realistic queries). ``path`` names the pairs in messages. Sides
        longer than the model's maximum are truncated (see :func:`encode_for_model`). Batches are
        ``batch_size`` consecutive pairs.
    """
    rows = [(i, i + 1, s, t) for i, (s, t) in enumerate(pairs)]
    encoded, _ = encode_for_model(model, tokenizer, rows, paths=path)
    batches = [range(i, min(i + batch_size, len(encoded))) for i in range(0, len(encoded), batch_size)]
    return [
        k.float()
        for forced in teacher_force(model, tokenizer, encoded, key_layer=key_layer, batches=batches)
        for k in forced.keys
    ]


@torch.inference_mode()
def embed_sources(
    model: Any,
    tokenizer: Any,
    sources: Sequence[str],
    *,
    source_prefix: str = "",
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Mean-pooled encoder states of ``sources`` (tokenised as ``KNNMT`` tokenises inputs): ``[n, d]``."""
    device = next(model.parameters()).device
    encoder = model.get_encoder()
    limit = sequence_limit(model, tokenizer)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: np.ndarray | None = None
    bar = tqdm(
        total=len(sources), unit="sent", desc="embed sources", disable=not progress, dynamic_ncols=True
    )
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        # cut like translation inputs (which count and log what they truncate)
        inputs, _ = encode_sources(tokenizer, [source_prefix + sources[i] for i in rows], limit)
        inputs = inputs.to(device)
        states = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])[0]
        pooled = mean_pool(states, inputs["attention_mask"])
        if out is None:
            out = np.zeros((len(sources), pooled.shape[1]), dtype=np.float32)
        out[rows] = pooled
        bar.update(len(rows))
    bar.close()
    if out is None:
        raise UsageError("no sentences to embed")
    return out
