"""Registry: one entry per Hugging Face config class, saying what knnmt must know of that architecture.

* **Where the kNN key is read.** kNN-MT's key ``f(x, y<t)`` is the input of the final decoder layer's
  feed-forward block (Khandelwal et al., 2021; Deguchi et al., 2023). Where that lives depends on the
  architecture, so each entry has a function returning that module. The alternative key
  ``decoder_output`` is the input of the output projection (``lm_head``), which every model exposes
  through ``get_output_embeddings()``.
* **How languages are set** (:class:`LanguageRule`, applied by :func:`set_languages`): multilingual
  tokenizers take ``src_lang``/``tgt_lang`` and some models must start the target with the target
  language's token (``forced_bos_token_id``); T5 reads the languages from a task prefix.

Model identity lives here too: fingerprints of a model and tokenizer, :func:`check_model` (is this
the model a datastore was built with?) and :func:`open_reusable` (a built datastore as a cache).

To support another architecture, register it once::

    from knnmt.hf.registry import FORCED_BOS_LANGUAGE, register_architecture
    register_architecture("MyConfig", lambda model: model.get_decoder().layers[-1].fc1)
    # a multilingual one that starts its targets with the language token:
    register_architecture("MyM2MConfig", lambda m: m.get_decoder().layers[-1].fc1, FORCED_BOS_LANGUAGE)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import IncompatibleError, UnsupportedModelError, UsageError
from ..store.datastore import MANIFEST, Datastore, read_manifest

logger = logging.getLogger(__name__)

ModuleGetter = Callable[[nn.Module], nn.Module]


@dataclasses.dataclass(frozen=True)
class LanguageRule:
    """How an architecture is told the languages of a pair (see :func:`set_languages`).

    A tokenizer with ``src_lang``/``tgt_lang`` attributes (NLLB, M2M100, mBART) takes the language
    codes given; one without refuses them (with ``hint`` on what to do instead).
    """

    #: ``generate`` must start the target with the target language's token: ``forced_bos_token_id``
    forced_bos: bool = False
    #: what to do instead when the tokenizer takes no language (ends the error message)
    hint: str = "this model translates one language pair"


#: bilingual models (Marian, BART, Pegasus) and architectures registered without a rule
ONE_PAIR = LanguageRule()
#: NLLB, NLLB-MoE, M2M100, mBART-50: the tokenizer's ``tgt_lang`` token starts every target
FORCED_BOS_LANGUAGE = LanguageRule(forced_bos=True, hint="this tokenizer takes no language codes")
#: T5 and mT5: the languages are in the task prefix of every source
TASK_PREFIX = LanguageRule(
    hint="T5 reads the languages from a task prefix: pass --source-prefix "
    "(e.g. 'translate English to German: ')"
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What knnmt knows of one Hugging Face config class."""

    config_class: str
    #: returns the module whose forward *input* is the ``ffn_input`` key, ``[batch, tgt_len, dim]``
    ffn_input: ModuleGetter
    languages: LanguageRule = ONE_PAIR


def _last_fc1(model: nn.Module) -> nn.Module:
    """BART-family decoders (Marian, MBart, M2M100/NLLB, BART, Pegasus): ``layers[-1].fc1``."""
    decoder = model.get_decoder()  # type: ignore[operator]
    return decoder.layers[-1].fc1


def _last_moe_ffn(model: nn.Module) -> nn.Module:
    """NLLB-MoE: the last decoder layer's ``ffn`` (dense or mixture of experts); its input is the
    normalised state, as ``fc1``'s is in NLLB."""
    decoder = model.get_decoder()  # type: ignore[operator]
    return decoder.layers[-1].ffn


def _t5_last_ffn(model: nn.Module) -> nn.Module:
    """T5/mT5: the ``DenseReluDense`` of the last decoder block's feed-forward sub-layer."""
    decoder = model.get_decoder()  # type: ignore[operator]
    return decoder.block[-1].layer[-1].DenseReluDense


_ARCHITECTURES: dict[str, Architecture] = {
    a.config_class: a
    for a in (
        Architecture("MarianConfig", _last_fc1),
        Architecture("M2M100Config", _last_fc1, FORCED_BOS_LANGUAGE),
        Architecture("NllbMoeConfig", _last_moe_ffn, FORCED_BOS_LANGUAGE),
        Architecture("MBartConfig", _last_fc1, FORCED_BOS_LANGUAGE),
        Architecture("BartConfig", _last_fc1),
        Architecture("PegasusConfig", _last_fc1),
        Architecture("T5Config", _t5_last_ffn, TASK_PREFIX),
        Architecture("MT5Config", _t5_last_ffn, TASK_PREFIX),
    )
}


def register_architecture(
    config_class_name: str, ffn_input: ModuleGetter, languages: LanguageRule = ONE_PAIR
) -> None:
    """Declare a new architecture: where its ``ffn_input`` key is read and how its languages are set.

    Args:
        config_class_name: ``type(model.config).__name__``, e.g. ``"MarianConfig"``.
        ffn_input: returns the module whose forward *input* is the key, shape ``[batch, tgt_len, dim]``.
        languages: :data:`FORCED_BOS_LANGUAGE` for a multilingual model whose targets start with the
            language token, else the default :data:`ONE_PAIR` (or a :class:`LanguageRule` of its own).
    """
    _ARCHITECTURES[config_class_name] = Architecture(config_class_name, ffn_input, languages)


def supported_architectures() -> list[str]:
    """Config class names with a registered key location and language rule."""
    return sorted(_ARCHITECTURES)


def architecture(model: nn.Module) -> Architecture | None:
    """The registry's entry for ``model``'s config class (``None``: not registered)."""
    return _ARCHITECTURES.get(type(model.config).__name__)


def key_module(model: nn.Module, key_layer: str = "ffn_input") -> nn.Module:
    """The module whose forward input is the kNN key/query for ``model``.

    Raises:
        UnsupportedModelError: the architecture is not registered (the message lists those that are).
    """
    if key_layer == "decoder_output":
        head = model.get_output_embeddings()  # type: ignore[operator]
        if head is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no output embeddings (lm_head)")
        return head
    if key_layer != "ffn_input":
        raise UsageError(f"unknown key layer {key_layer!r}; expected 'ffn_input' or 'decoder_output'")
    entry = architecture(model)
    if entry is None:
        name = type(model.config).__name__
        raise UnsupportedModelError(
            f"no kNN key location is registered for {name} ({type(model).__name__}). "
            f"Supported: {', '.join(supported_architectures())}. To add one, call "
            "knnmt.hf.registry.register_architecture('<ConfigClass>', lambda m: <module whose input is the "
            "final decoder layer's feed-forward input>), or use key_layer='decoder_output'."
        )
    return entry.ffn_input(model)


def set_languages(model: Any, tokenizer: Any, src_lang: str | None, tgt_lang: str | None) -> dict[str, Any]:
    """Set the source/target languages by the architecture's :class:`LanguageRule`: on multilingual
    tokenizers (NLLB, M2M100, mBART) ``src_lang``/``tgt_lang``; a tokenizer without them refuses a
    language. An unregistered architecture follows :data:`ONE_PAIR`.

    Returns:
        extra ``generate`` arguments: ``forced_bos_token_id`` of the target language when the model
        needs one.

    Raises:
        UsageError: a language is given to a tokenizer without that setting, or the target language
            code is unknown to the tokenizer.
    """
    entry = architecture(model)
    rule = entry.languages if entry is not None else ONE_PAIR
    for attribute, lang, side, flag in (
        ("src_lang", src_lang, "source", "--src-lang"),
        ("tgt_lang", tgt_lang, "target", "--tgt-lang"),
    ):
        if not lang:
            continue
        if not hasattr(tokenizer, attribute):
            raise UsageError(
                f"{type(tokenizer).__name__} has no {side} language setting ({rule.hint}); drop {flag}"
            )
        setattr(tokenizer, attribute, lang)
    lang = getattr(tokenizer, "tgt_lang", None)
    if lang and rule.forced_bos:
        get_lang_id = getattr(tokenizer, "get_lang_id", None)  # M2M100: "de" -> id of "__de__"
        try:
            token_id = get_lang_id(lang) if get_lang_id else tokenizer.convert_tokens_to_ids(lang)
        except KeyError:
            token_id = None
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise UsageError(f"unknown target language code {lang!r} for {type(tokenizer).__name__}")
        return {"forced_bos_token_id": int(token_id)}
    return {}


def key_module_name(model: nn.Module, key_layer: str = "ffn_input") -> str:
    """Dotted path of :func:`key_module` inside ``model`` (recorded in manifests)."""
    target = key_module(model, key_layer)
    for name, module in model.named_modules():
        if module is target:
            return name
    return type(target).__name__


def key_dim(model: nn.Module, key_layer: str = "ffn_input") -> int:
    """Dimension ``D`` of the key vectors."""
    module: Any = key_module(model, key_layer)
    in_features = getattr(module, "in_features", None)
    if in_features is None:  # T5 DenseReluDense (wi) or gated (wi_0)
        first = getattr(module, "wi", None) or getattr(module, "wi_0", None)
        in_features = getattr(first, "in_features", None)
    if in_features is None:  # a block taking the model's states (NLLB-MoE's ffn)
        return encoder_dim(model)
    return int(in_features)


def model_fingerprint(model: nn.Module) -> str:
    """Content hash of the architecture and every parameter/buffer (names, shapes, dtypes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(model).__name__.encode())
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.data_ptr() in seen:  # tied weights: hash the bytes once
            continue
        seen.add(tensor.data_ptr())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's class, vocabulary and special tokens."""
    vocab = tokenizer.get_vocab()
    payload = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])),
        "special": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
    }
    return hashlib.blake2b(json.dumps(payload, ensure_ascii=False).encode(), digest_size=16).hexdigest()


def model_max_length(model: nn.Module, tokenizer: Any) -> int:
    """Longest token sequence the model accepts (positions) and the tokenizer declares."""
    candidates = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    sane = [int(c) for c in candidates if isinstance(c, int) and 0 < c < 100_000]
    return min(sane) if sane else 512


def encoder_dim(model: nn.Module) -> int:
    """Width of the encoder's output states (the size of a mean-pooled source sentence vector)."""
    config = model.config
    for name in ("d_model", "hidden_size"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(f"cannot tell the encoder width of {type(config).__name__} (no d_model)")


def check_model(datastore: Datastore, model: nn.Module, tokenizer: Any) -> None:
    """Raise :class:`IncompatibleError` unless ``model`` and ``tokenizer`` are the ones ``datastore``
    was built with (their fingerprints and the key dimension of its key layer)."""
    datastore.check_compatible(
        model_fingerprint(model), tokenizer_fingerprint(tokenizer), key_dim(model, datastore.key_layer)
    )


def open_reusable(path: str | Path, model: nn.Module, tokenizer: Any) -> Datastore | None:
    """The complete datastore at ``path`` if it was built with ``model`` and ``tokenizer``, else
    ``None`` (nothing there, an interrupted build, or another model: logged) for the caller to
    rebuild; used where a built datastore is a cache (the demo, the benchmarks)."""
    p = Path(path)
    if not (p / MANIFEST).is_file() or read_manifest(p).get("state") != "complete":
        return None
    store = Datastore.open(p)
    try:
        check_model(store, model, tokenizer)
    except IncompatibleError as exc:  # e.g. the model was retrained since
        logger.warning("%s; not reused", exc)
        return None
    return store
