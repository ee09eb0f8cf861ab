"""The front door: :class:`KNNMT` = model + tokenizer + datastore + index, translating with kNN-MT."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.config import KNNConfig
from ..core.errors import KnnmtError, UsageError
from ..hf.beam_tracking import beam_settings
from ..hf.logits_processor import knn_generation
from ..hf.registry import check_model, set_languages
from ..hf.teacher_forcing import (
    EncodedPair,
    encode_source_ids,
    encode_sources,
    encode_targets,
    sequence_limit,
    teacher_force,
    warn_truncated,
)
from ..knn.distribution import interpolate, knn_log_probs, retrieval_weights
from ..search.index import INDEX_FILE, SearchIndex, exact_index
from ..search.retriever import IndexRetriever, Retriever, prepare_retrieval
from ..store.datastore import Datastore
from .domain_gate import DomainGate

logger = logging.getLogger(__name__)

#: the datastore's saved kNN settings (written by ``knnmt tune`` / :meth:`KNNMT.save_config`)
KNN_CONFIG_FILE = "knn.json"


def saved_knn_config(datastore: str | Path | Datastore, default: KNNConfig | None = None) -> KNNConfig:
    """The one rule for a datastore's kNN settings: its saved ``knn.json`` (:data:`KNN_CONFIG_FILE`)
    when there is one, else ``default`` (:class:`KNNConfig`'s defaults when not given). The library
    (:meth:`KNNMT.load`), the command line, the service and the demo all start from this."""
    path = datastore.path if isinstance(datastore, Datastore) else Path(datastore)
    saved = path / KNN_CONFIG_FILE
    if saved.is_file():
        return KNNConfig.load(saved)
    return default if default is not None else KNNConfig()


@dataclasses.dataclass(frozen=True)
class Neighbour:
    """One retrieved datastore entry."""

    token: str
    token_id: int
    distance: float
    entry_id: int
    sentence_id: int
    position: int
    source: str | None = None
    target: str | None = None


@dataclasses.dataclass(frozen=True)
class TokenExplanation:
    """Why a target token was chosen: model vs retrieval probabilities and the neighbours."""

    position: int
    token: str
    token_id: int
    p_mt: float
    p_knn: float
    p_final: float
    top_mt: list[tuple[str, float]]
    top_knn: list[tuple[str, float]]
    neighbours: list[Neighbour]
    #: the weight λ of ``p_kNN`` at this step (constant unless ``half_distance`` is set; 0 where gated or
    #: where nothing was retrieved)
    weight: float = 0.0
    #: the confidence gate skipped retrieval at this step, or the domain gate at every step of this
    #: sentence: decoding used ``p_MT`` alone and searched nothing (the neighbours shown are what a
    #: search would have found)
    gated: bool = False


@dataclasses.dataclass
class Translation:
    """A translation and, when asked for, an explanation of each of its tokens."""

    source: str
    text: str
    token_ids: list[int]
    explanation: list[TokenExplanation] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: A Hugging Face Hub model id: ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _check_model_location(name: str) -> None:
    """Raise :class:`KnnmtError` with a plain message when ``name`` is neither an existing local model
    directory nor a Hub id that can be loaded: a path that does not exist (rather than the Hub's "Repo id
    must be in the form..."), a file, or, offline, a Hub id that is not in the local cache."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KnnmtError(
                f"model {name}: is a file, expected a model directory (with config.json) or a Hugging Face "
                "model id"
            )
        return  # a directory: what transformers finds missing in it is reported by load_model
    if name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1) or not _HUB_ID.fullmatch(name):
        raise KnnmtError(
            f"model directory {name} does not exist ({path.absolute()}); give a local model directory "
            "or a Hugging Face model id such as Helsinki-NLP/opus-mt-en-de"
        )
    import huggingface_hub
    from huggingface_hub import constants

    offline = getattr(constants, "is_offline_mode", lambda: bool(constants.HF_HUB_OFFLINE))()
    if offline and not isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        raise KnnmtError(
            f"model {name!r} is not a local directory, and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) while downloads are off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE "
            "is set); download it once with them unset, or give a local model directory"
        )


def load_model(name_or_path: str, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """Load a Hugging Face seq2seq model (eval mode) and its tokenizer.

    ``dtype`` (e.g. ``"bfloat16"``) defaults to float32 on CPU, whatever the checkpoint stores: fp16
    matrix products on a CPU are many times slower than fp32 ones.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    _check_model_location(name_or_path)
    kwargs: dict[str, Any] = {}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    elif device is None or str(device).startswith("cpu"):
        kwargs["dtype"] = torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise KnnmtError(f"cannot load model {name_or_path!r}: {exc}") from None
    model.eval()
    if device:
        model.to(device)
    return model, tokenizer


class KNNMT:
    """kNN-MT translator.

    Example::

        knn = KNNMT.load("path/to/model", "path/to/datastore")
        print(knn.translate(["Open the file."]))
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        datastore: Datastore,
        index: SearchIndex | None = None,
        config: KNNConfig | None = None,
        retriever: Retriever | None = None,
        check: bool = True,
        domain_gate: DomainGate | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.datastore = datastore
        self.key_layer = datastore.key_layer
        if check:
            check_model(datastore, model, tokenizer)
        self._index = index  # None: an exact index is built on first use (not needed by a given retriever)
        self.config = config or KNNConfig()
        self._retriever = retriever  # None: vanilla search of ``index``, made on first use
        tokenization = datastore.manifest.get("tokenization", {})
        self.source_prefix: str = tokenization.get("source_prefix", "") or ""
        self.generate_defaults = set_languages(
            model, tokenizer, tokenization.get("src_lang"), tokenization.get("tgt_lang")
        )
        self.last_stats: dict[str, float] = {}
        self._domain_gate = domain_gate  # None: loaded from the datastore when a config needs it
        #: beam search: skip the searches of sentences whose beam search is decided (knnmt.hf.beam_tracking)
        self.track_beams = True

    @property
    def retriever(self) -> Retriever:
        """How queries find neighbours (vanilla search of :attr:`index` unless another was given); made
        on first use, so that the plain model never builds an exact index it does not need."""
        if self._retriever is None:
            self._retriever = IndexRetriever(self.index, self.datastore)
        return self._retriever

    @property
    def index(self) -> SearchIndex:
        """The faiss index of vanilla retrieval (if none was given, an exact one built on first use)."""
        if self._index is None:
            self._index = exact_index(self.datastore)
        return self._index

    @classmethod
    def load(
        cls,
        model: str | tuple[Any, Any],
        datastore: str | Path,
        index: str | Path | None = "auto",
        config: KNNConfig | None = None,
        device: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
        src_lang: str | None = None,
        tgt_lang: str | None = None,
        retrieval: str = "index",
        subset: Any = None,
        ray_address: str | None = None,
        ray_parts: int = 2,
    ) -> KNNMT:
        """Load model, datastore and index; ``index="auto"`` uses ``<datastore>/index`` if built, else exact
        search; ``None`` forces exact search. ``config`` defaults to ``<datastore>/knn.json`` (from tuning)
        or :class:`KNNConfig` defaults.

        ``retrieval="subset"`` uses Subset kNN-MT (:mod:`knnmt.search.subset`, built by
        ``knnmt index --subset``) instead of the faiss index; ``subset`` (a
        :class:`knnmt.search.subset.SubsetSearch`) overrides its saved search settings.

        ``retrieval="ray"`` searches the saved IVF index (``index``: ``"auto"`` or a directory) with its
        inverted lists split into ``ray_parts`` Ray actors
        (:class:`knnmt.search.distributed.RayIndexRetriever`, same results as ``"index"``);
        ``ray_address``: the Ray cluster (``None``: a local Ray started here, or ``RAY_ADDRESS``;
        ``"auto"``: the cluster started on this machine with ``ray start``; ``ray://host:port``). This
        process keeps only the coarse quantizer; ``retriever.close()`` stops the actors (they also end
        with the process). Needs ``pip install 'knnmt[ray]'``."""
        model_obj, tokenizer = load_model(model, device) if isinstance(model, str) else model
        set_languages(model_obj, tokenizer, src_lang, tgt_lang)
        store = Datastore.open(datastore)
        if config is None:
            config = saved_knn_config(store)
        if retrieval == "subset":
            from ..search.subset import SubsetRetriever, SubsetSearch

            options = subset or SubsetSearch()
            device_name = str(next(model_obj.parameters()).device)
            options = dataclasses.replace(
                options,
                rerank=options.rerank if rerank is None else rerank,
                device=options.device or device_name,
            )
            return cls(
                model_obj, tokenizer, store, None, config, SubsetRetriever.load(store, options=options)
            )
        if retrieval == "ray":
            from ..search.distributed import RayIndexRetriever

            directory = store.path / "index" if index == "auto" else index
            if directory is None:
                raise UsageError("retrieval 'ray' distributes a saved IVF index, not exact search")
            if not (Path(directory) / INDEX_FILE).is_file():
                raise UsageError(
                    f"retrieval 'ray' distributes a saved IVF index, and there is none at {directory}: "
                    f"build one with `knnmt index {store.path}` (or use --retrieval index)"
                )
            distributed_index = SearchIndex.load(
                directory, store, nprobe=nprobe, ef_search=ef_search, rerank=rerank
            )
            retriever = RayIndexRetriever(
                distributed_index, store, parts=ray_parts, address=ray_address, release_lists=True
            )
            return cls(model_obj, tokenizer, store, None, config, retriever)
        if retrieval != "index":
            raise UsageError(f"retrieval must be 'index', 'subset' or 'ray', got {retrieval!r}")
        search_index: SearchIndex | None = None
        if index == "auto":
            default = store.path / "index"
            if (default / INDEX_FILE).is_file():
                search_index = SearchIndex.load(
                    default, store, nprobe=nprobe, ef_search=ef_search, rerank=rerank
                )
        elif index is not None:
            search_index = SearchIndex.load(index, store, nprobe=nprobe, ef_search=ef_search, rerank=rerank)
        return cls(model_obj, tokenizer, store, search_index, config)

    # ---- translation ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _finished_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id, self.tokenizer.pad_token_id]
        return [int(i) for i in ids if i is not None]

    def _generate(
        self, sources: Sequence[str], knn: KNNConfig | None, gen: dict[str, Any]
    ) -> list[list[int]]:
        limit = sequence_limit(self.model, self.tokenizer)
        inputs, cut = encode_sources(self.tokenizer, [self.source_prefix + s for s in sources], limit)
        inputs = inputs.to(self.device)
        if cut:  # the encoder has no positions beyond the limit
            warn_truncated(cut, limit, "translation input")
            self._add_stats({"truncated_sources": cut})
        with torch.inference_mode():
            if knn is None:
                out = self.model.generate(**inputs, **gen)
            else:
                out = self._generate_knn(sources, inputs, knn, gen)
        sequences = out.sequences if hasattr(out, "sequences") else out
        pad = self.tokenizer.pad_token_id
        rows = [row.tolist() for row in sequences.cpu()]
        for row in rows:  # generate pads finished rows to the batch's longest; drop that padding
            while len(row) > 1 and row[-1] == pad:
                row.pop()
        return rows

    def _generate_knn(self, sources: Sequence[str], inputs: Any, knn: KNNConfig, gen: dict[str, Any]) -> Any:
        """``generate`` with retrieval for one tokenised batch (the domain gate decides per sentence)."""
        extra: dict[str, Any] = {}
        sentence_on: torch.Tensor | None = None
        if knn.domain_gate is not None:
            encoder_outputs = self.model.get_encoder()(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], return_dict=True
            )
            extra["encoder_outputs"] = encoder_outputs
            similarity = self.domain_gate.similarity(
                encoder_outputs.last_hidden_state, inputs["attention_mask"]
            )
            sentence_on = torch.from_numpy(similarity >= knn.domain_gate)
            if not bool(sentence_on.any()):  # nothing like the memory: the plain model, no search at all
                self._add_stats({"sentences": len(sources), "sentences_off": len(sources)})
                return self.model.generate(**inputs, **extra, **gen)
        extra.update(
            prepare_retrieval(self.retriever, self.model, sources, inputs, extra.get("encoder_outputs"))
        )
        with knn_generation(
            self.model,
            self.retriever,
            self.datastore.values,
            knn,
            batch_size=len(sources),
            finished_ids=self._finished_ids(),
            key_layer=self.key_layer,
            sentence_on=sentence_on,
            beam=beam_settings(self.model, gen) if self.track_beams else None,
        ) as proc:
            out = self.model.generate(**inputs, logits_processor=[proc], **extra, **gen)
        self._add_stats(proc.stats.as_dict())
        return out

    def _add_stats(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.last_stats[key] = self.last_stats.get(key, 0) + value

    @property
    def domain_gate(self) -> DomainGate:
        """The datastore's :class:`~knnmt.pipeline.domain_gate.DomainGate` (loaded on first use)."""
        if self._domain_gate is None:
            self._domain_gate = DomainGate.load(self.datastore)
        return self._domain_gate

    @property
    def loaded_domain_gate(self) -> DomainGate | None:
        """The domain gate if it is loaded (``None`` otherwise; :attr:`domain_gate` loads it)."""
        return self._domain_gate

    def source_similarity(self, sources: Sequence[str]) -> np.ndarray:
        """``[len(sources)]`` what the domain gate compares with its threshold: the cosine similarity of
        each source's mean-pooled encoder states to the nearest memory source sentence."""
        return self.domain_gate.similarity_of(self.model, self.tokenizer, sources, self.source_prefix)

    def translate_iterable(
        self,
        sources: Iterable[str],
        *,
        knn: KNNConfig | bool | None = True,
        batch_size: int = 32,
        **generate_kwargs: Any,
    ) -> Iterator[Translation]:
        """Translate lazily, ``batch_size`` sentences per ``generate`` call, in input order.

        An input longer than the model's maximum (:func:`~knnmt.hf.teacher_forcing.sequence_limit`) is
        truncated to it (a warning per batch; counted in ``last_stats["truncated_sources"]``), and the
        output never runs past the decoder's positions, whatever length is asked for.

        Args:
            knn: ``True`` for this translator's config, a :class:`KNNConfig`, or ``False``/``None`` for the
                plain model.
            generate_kwargs: passed to ``model.generate`` (``num_beams``, ``max_new_tokens``...).
        """
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        knn_config = self.config if knn is True else (knn or None)
        gen = {**self.generate_defaults, **generate_kwargs}
        self._cap_length(gen)
        if (
            gen.get("max_new_tokens") is not None
            and "max_length" not in gen
            and "decoder_input_ids" not in gen
            and self.model.config.is_encoder_decoder
            and getattr(self.model.generation_config, "max_new_tokens", None) is None
        ):
            # the same limit (the decoder starts from one start token); passed as max_length, transformers
            # does not warn on every batch that the model's generation config sets max_length too
            gen["max_length"] = int(gen.pop("max_new_tokens")) + 1
        if gen.get("num_return_sequences", 1) != 1:
            raise UsageError(
                "num_return_sequences > 1 is not supported by translate(); call generate() directly"
            )
        batch: list[str] = []
        for source in sources:
            batch.append(source)
            if len(batch) == batch_size:
                yield from self._translate_batch(batch, knn_config, gen)
                batch = []
        if batch:
            yield from self._translate_batch(batch, knn_config, gen)

    def _cap_length(self, gen: dict[str, Any]) -> None:
        """Keep generation within the decoder's positions (:func:`~knnmt.hf.teacher_forcing.sequence_limit`):
        at most that many decoder tokens, the start token (or given ``decoder_input_ids``) included.
        ``gen`` (``generate`` arguments) is changed in place; ``transformers`` itself only warns."""
        limit = sequence_limit(self.model, self.tokenizer)
        prefix = int(gen["decoder_input_ids"].shape[-1]) if "decoder_input_ids" in gen else 1
        config = self.model.generation_config
        new_tokens = gen.get("max_new_tokens", config.max_new_tokens)  # it wins over max_length
        if new_tokens is not None:
            if new_tokens > limit - prefix:
                gen["max_new_tokens"] = max(1, limit - prefix)
        elif (gen.get("max_length") or config.max_length or 0) > limit:
            gen["max_length"] = limit

    def _translate_batch(
        self, batch: list[str], knn: KNNConfig | None, gen: dict[str, Any]
    ) -> list[Translation]:
        ids = self._generate(batch, knn, gen)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [Translation(s, t, i) for s, t, i in zip(batch, texts, ids, strict=True)]

    def translate(
        self,
        sources: Sequence[str],
        *,
        knn: KNNConfig | bool | None = True,
        batch_size: int = 32,
        sort_by_length: bool = True,
        return_neighbors: bool = False,
        progress: bool = False,
        **generate_kwargs: Any,
    ) -> list[Translation]:
        """Translate ``sources``; batches are formed from length-sorted inputs, results in input order.

        With ``return_neighbors`` each translation carries a per-token :class:`TokenExplanation`.
        """
        order = (
            sorted(range(len(sources)), key=lambda i: len(sources[i]))
            if sort_by_length
            else list(range(len(sources)))
        )
        results: list[Translation | None] = [None] * len(sources)
        self.last_stats = {}
        stream = self.translate_iterable(
            (sources[i] for i in order), knn=knn, batch_size=batch_size, **generate_kwargs
        )
        for i, result in zip(
            order,
            tqdm(stream, total=len(sources), unit="sent", disable=not progress, desc="translate"),
            strict=True,
        ):
            results[i] = result
        final = [r for r in results if r is not None]
        if return_neighbors:
            knn_config = self.config if knn is True else (knn or self.config)
            for result in final:
                result.explanation = self.explain(result.source, result.token_ids, knn_config)
        return final

    # ---- inspection -----------------------------------------------------------------------
    @torch.inference_mode()
    def explain(
        self, source: str, target: str | Sequence[int], config: KNNConfig | None = None, top: int = 5
    ) -> list[TokenExplanation]:
        """Re-score ``target`` for ``source`` by teacher forcing and report, per target token, ``p_MT``,
        ``p_kNN``, the mixed probability and the neighbours (token, distance, sentence, position).

        A source or target longer than the model's maximum is truncated to it (with a warning); the
        target tokens beyond it are not explained."""
        config = config or self.config
        tok = self.tokenizer
        limit = sequence_limit(self.model, tok)
        cut = 0
        if isinstance(target, str):
            (label_ids,), cut = encode_targets(tok, [target], limit)
        else:
            special = {tok.pad_token_id}
            given = list(target)
            start = 1 if given and given[0] == self.model.config.decoder_start_token_id else 0
            label_ids = [i for i in given[start:] if i not in special]
            if len(label_ids) > limit:
                label_ids, cut = label_ids[:limit], 1
        if not label_ids:
            return []
        (source_ids,), cut_source = encode_source_ids(tok, [self.source_prefix + source], limit)
        warn_truncated(cut + cut_source, limit, "explain")
        pair = EncodedPair(0, 1, source, target if isinstance(target, str) else "", source_ids, label_ids)
        (forced,) = teacher_force(
            self.model,
            tok,
            [pair],
            key_layer=self.key_layer,
            batches=[[0]],
            log_probs=True,
            prepare=self.prepare_batch,
        )
        assert forced.log_probs is not None
        queries = forced.keys[0].float()
        log_mt = forced.log_probs[0]
        k = config.k
        distances, ids = self.retriever.search(queries.numpy(), k, np.zeros(len(label_ids), dtype=np.int64))
        values = torch.from_numpy(np.where(ids >= 0, self.datastore.values[np.clip(ids, 0, None)], -1)).long()
        log_knn = knn_log_probs(torch.from_numpy(distances), values, config.temperature)
        weights = retrieval_weights(
            torch.from_numpy(distances), values, config.lambda_, config.temperature, config.half_distance
        ).tolist()  # λ of each step
        confident = [False] * len(weights)
        if config.confidence_gate is not None:  # steps the gate skips keep p_MT
            confident = (log_mt.max(dim=-1).values >= config.log_gate).tolist()
            weights = [0.0 if sure else w for w, sure in zip(weights, confident, strict=True)]
        if config.domain_gate is not None and self.source_similarity([source])[0] < config.domain_gate:
            confident = [True] * len(weights)  # the domain gate leaves this sentence to the model
            weights = [0.0] * len(weights)
        # the mixture of generation at every step, with its λ_q (float64: explain reports probabilities)
        log_final = interpolate(
            log_mt.double(), values, log_knn.double(), torch.tensor(weights, dtype=torch.float64)
        )
        sent_ids, positions = self.datastore.provenance(ids)
        cache: dict[int, dict[str, Any]] = {}
        out: list[TokenExplanation] = []
        for t, token_id in enumerate(label_ids):
            knn_probs: dict[int, float] = {}
            for v, lp in zip(values[t].tolist(), log_knn[t].tolist(), strict=True):
                if v >= 0:
                    knn_probs[v] = float(np.exp(lp))
            p_mt = float(log_mt[t, token_id].exp())
            p_knn = knn_probs.get(token_id, 0.0)
            neighbours = []
            for j in range(k):
                if ids[t, j] < 0:
                    continue
                sid = int(sent_ids[t, j])
                if sid not in cache:
                    cache[sid] = self.datastore.sentence(sid)
                neighbours.append(
                    Neighbour(
                        token=tok.convert_ids_to_tokens(int(values[t, j])),
                        token_id=int(values[t, j]),
                        distance=float(distances[t, j]),
                        entry_id=int(ids[t, j]),
                        sentence_id=sid,
                        position=int(positions[t, j]),
                        source=cache[sid]["src"],
                        target=cache[sid]["tgt"],
                    )
                )
            top_mt = torch.topk(log_mt[t], top)
            out.append(
                TokenExplanation(
                    position=t,
                    token=tok.convert_ids_to_tokens(token_id),
                    token_id=token_id,
                    p_mt=p_mt,
                    p_knn=p_knn,
                    p_final=float(log_final[t, token_id].exp()),
                    weight=weights[t],
                    gated=confident[t],
                    top_mt=[
                        (tok.convert_ids_to_tokens(int(i)), float(v.exp()))
                        for v, i in zip(top_mt.values, top_mt.indices, strict=True)
                    ],
                    top_knn=sorted(
                        ((tok.convert_ids_to_tokens(v), p) for v, p in knn_probs.items()), key=lambda x: -x[1]
                    )[:top],
                    neighbours=neighbours,
                )
            )
        return out

    def prepare_batch(self, pairs: list[EncodedPair], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Give the retriever a teacher-forced batch before its queries (a
        :data:`~knnmt.hf.teacher_forcing.PrepareBatch`): Subset kNN-MT selects each sentence's subset."""
        return prepare_retrieval(self.retriever, self.model, [p.source for p in pairs], inputs)

    def save_config(self, config: KNNConfig | None = None, about: dict[str, Any] | None = None) -> Path:
        """Store ``config`` (default: the current one) as the datastore's default ``knn.json``, holding the
        datastore's write lock (:class:`~knnmt.store.writelock.WriteLock`) while it writes; ``about`` is a
        note on how it was chosen, saved with it (see :func:`knnmt.core.config.read_about`)."""
        from ..store.writelock import WriteLock

        path = self.datastore.path / KNN_CONFIG_FILE
        with WriteLock(self.datastore.path, "save kNN settings"):
            (config or self.config).save(path, about)
        return path


def target_tokens(translations: Sequence[Translation], tokenizer: Any) -> int:
    """Target tokens produced, special tokens (decoder start, eos, pad) excluded."""
    special = set(tokenizer.all_special_ids)
    return sum(sum(1 for i in t.token_ids if i not in special) for t in translations)


def tokens_per_second(translations: Sequence[Translation], seconds: float, tokenizer: Any) -> float:
    """Target tokens (special tokens excluded) produced per second."""
    count = target_tokens(translations, tokenizer)
    return count / seconds if seconds > 0 else float("nan")


def timed_translate(
    translator: KNNMT, sources: Sequence[str], **kwargs: Any
) -> tuple[list[Translation], float]:
    """:meth:`KNNMT.translate` and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = translator.translate(sources, **kwargs)
    return result, time.perf_counter() - start


def dump_jsonl(translations: Iterable[Translation], path: str | Path) -> None:
    """Write translations (with explanations when present) as JSON lines."""
    with open(path, "w", encoding="utf-8") as handle:
        for t in translations:
            handle.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")
