"""Registry: Hugging Face config class -> the module whose *input* is the kNN key.

kNN-MT's key ``f(x, y<t)`` is the input of the final decoder layer's feed-forward block
(Khandelwal et al., 2021; Deguchi et al., 2023). Where that lives depends on the
architecture, so each supported config class maps to a function returning that module.
The alternative key ``decoder_output`` is the input of the output projection (``lm_head``),
which every model exposes through ``get_output_embeddings()``.

Model identity lives here too: fingerprints of a model and tokenizer, :func:`check_model` (is this
the model a datastore was built with?) and :func:`open_reusable` (a built datastore as a cache).

To support another architecture, register it once::

    from knnmt.hf.registry import register_architecture
    register_architecture("MyConfig", lambda model: model.get_decoder().layers[-1].fc1)
"""

from __future__ import annotations

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


def _last_fc1(model: nn.Module) -> nn.Module:
    """BART-family decoders (Marian, MBart, M2M100/NLLB, BART, Pegasus): ``layers[-1].fc1``."""
    decoder = model.get_decoder()  # type: ignore[operator]
    return decoder.layers[-1].fc1


def _t5_last_ffn(model: nn.Module) -> nn.Module:
    """T5/mT5: the ``DenseReluDense`` of the last decoder block's feed-forward sub-layer."""
    decoder = model.get_decoder()  # type: ignore[operator]
    return decoder.block[-1].layer[-1].DenseReluDense


_FFN_INPUT: dict[str, ModuleGetter] = {
    "MarianConfig": _last_fc1,
    "M2M100Config": _last_fc1,
    "MBartConfig": _last_fc1,
    "BartConfig": _last_fc1,
    "PegasusConfig": _last_fc1,
    "T5Config": _t5_last_ffn,
    "MT5Config": _t5_last_ffn,
}


def register_architecture(config_class_name: str, ffn_input: ModuleGetter) -> None:
    """Declare where the ``ffn_input`` key of a new architecture is read.

    Args:
        config_class_name: ``type(model.config).__name__``, e.g. ``"MarianConfig"``.
        ffn_input: returns the module whose forward *input* is the key, shape ``[batch, tgt_len, dim]``.
    """
    _FFN_INPUT[config_class_name] = ffn_input


def supported_architectures() -> list[str]:
    """Config class names with a registered key location."""
    return sorted(_FFN_INPUT)


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
    name = type(model.config).__name__
    getter = _FFN_INPUT.get(name)
    if getter is None:
        raise UnsupportedModelError(
            f"no kNN key location is registered for {name} ({type(model).__name__}). "
            f"Supported: {', '.join(supported_architectures())}. To add one, call "
            "knnmt.hf.registry.register_architecture('<ConfigClass>', lambda m: <module whose input is the "
            "final decoder layer's feed-forward input>), or use key_layer='decoder_output'."
        )
    return getter(model)


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
        in_features = module.wi.in_features if hasattr(module, "wi") else module.wi_0.in_features
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
