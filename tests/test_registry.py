"""The architecture registry (``knnmt.hf.registry``): one entry per Hugging Face config class holds both
where the kNN key is read and how the languages are set; every registered architecture has both, and
both work on a tiny random model of that class (built offline from a config)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers

from knnmt.core.errors import UsageError
from knnmt.hf import registry
from knnmt.hf.registry import (
    FORCED_BOS_LANGUAGE,
    ONE_PAIR,
    TASK_PREFIX,
    LanguageRule,
    architecture,
    key_dim,
    key_module,
    key_module_name,
    register_architecture,
    set_languages,
    supported_architectures,
)
from knnmt.hf.teacher_forcing import EncodedPair, KeyExtractor

VOCAB = 64
BART_FAMILY = {
    "vocab_size": VOCAB,
    "d_model": 16,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "max_position_embeddings": 32,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}
T5_FAMILY = {
    "vocab_size": VOCAB,
    "d_model": 16,
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 2,
    "num_heads": 2,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
MOE = {"num_experts": 2, "encoder_sparse_step": 2, "decoder_sparse_step": 2, "expert_capacity": 8}


def _tiny(config: str, model: str, **kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        torch.manual_seed(0)
        return getattr(transformers, model)(getattr(transformers, config)(**kwargs)).eval()

    return make


#: a tiny random model of every architecture the registry ships, and its language rule
BUILT_IN: dict[str, tuple[Callable[[], Any], LanguageRule]] = {
    "MarianConfig": (_tiny("MarianConfig", "MarianMTModel", **BART_FAMILY), ONE_PAIR),
    "BartConfig": (_tiny("BartConfig", "BartForConditionalGeneration", **BART_FAMILY), ONE_PAIR),
    "PegasusConfig": (_tiny("PegasusConfig", "PegasusForConditionalGeneration", **BART_FAMILY), ONE_PAIR),
    "MBartConfig": (
        _tiny("MBartConfig", "MBartForConditionalGeneration", **BART_FAMILY),
        FORCED_BOS_LANGUAGE,
    ),
    "M2M100Config": (
        _tiny("M2M100Config", "M2M100ForConditionalGeneration", **BART_FAMILY),
        FORCED_BOS_LANGUAGE,
    ),
    "NllbMoeConfig": (
        _tiny("NllbMoeConfig", "NllbMoeForConditionalGeneration", **BART_FAMILY, **MOE),
        FORCED_BOS_LANGUAGE,
    ),
    "T5Config": (_tiny("T5Config", "T5ForConditionalGeneration", **T5_FAMILY), TASK_PREFIX),
    "MT5Config": (_tiny("MT5Config", "MT5ForConditionalGeneration", **T5_FAMILY), TASK_PREFIX),
}


class LanguageTokenizer:
    """The parts of a multilingual tokenizer (NLLB style: language codes are tokens) set_languages uses."""

    unk_token_id = 3

    def __init__(self) -> None:
        self.src_lang = "eng_Latn"
        self.tgt_lang: str | None = None

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"eng_Latn": 60, "deu_Latn": 61}.get(token, self.unk_token_id)


class PairTokenizer:
    """A bilingual tokenizer: no language settings."""

    unk_token_id = 3


def test_every_registered_architecture_has_a_key_rule_and_a_language_rule() -> None:
    assert sorted(BUILT_IN) == supported_architectures(), "give a new architecture a tiny model here"
    for name in supported_architectures():
        entry = registry._ARCHITECTURES[name]
        assert entry.config_class == name and callable(entry.ffn_input)
        assert entry.languages == BUILT_IN[name][1], name
    # the rule that once disagreed between the key registry and set_languages
    forced = {n for n in supported_architectures() if registry._ARCHITECTURES[n].languages.forced_bos}
    assert forced == {"M2M100Config", "MBartConfig", "NllbMoeConfig"}


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_key_is_the_last_decoder_layers_ffn_input(name: str) -> None:
    model = BUILT_IN[name][0]()
    assert type(model.config).__name__ == name and architecture(model) is not None
    module = key_module(model)
    path = key_module_name(model)
    assert "decoder" in path and (".1." in path or "layers.1" in path), path  # the last of 2 layers
    encoded = [
        EncodedPair(0, 1, "s", "t", [5, 6, 7, 2], [8, 9, 2]),
        EncodedPair(1, 2, "s", "t", [5, 2], [8, 2]),
    ]
    keys = KeyExtractor(model, model.config.pad_token_id)(encoded)
    assert [k.shape for k in keys] == [(3, key_dim(model)), (2, key_dim(model))]
    # the full model (lm_head included, as tuning and explain run it) reads the same keys
    forced = KeyExtractor(model, model.config.pad_token_id).run(encoded, log_probs=True)
    for a, b in zip(keys, forced.keys, strict=True):
        torch.testing.assert_close(a, b)
    assert module is key_module(model)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_languages_follow_the_registered_rule(name: str) -> None:
    model = BUILT_IN[name][0]()
    rule = BUILT_IN[name][1]
    if rule.forced_bos:
        tokenizer = LanguageTokenizer()
        assert set_languages(model, tokenizer, "eng_Latn", "deu_Latn") == {"forced_bos_token_id": 61}
        assert tokenizer.tgt_lang == "deu_Latn"
        with pytest.raises(UsageError, match="unknown target language code 'xx'"):
            set_languages(model, tokenizer, None, "xx")
    else:
        assert set_languages(model, LanguageTokenizer(), "eng_Latn", "deu_Latn") == {}
        assert set_languages(model, PairTokenizer(), None, None) == {}
        with pytest.raises(UsageError, match=r"has no source language setting .*drop --src-lang"):
            set_languages(model, PairTokenizer(), "en", None)
        if rule is TASK_PREFIX:
            with pytest.raises(UsageError, match="--source-prefix"):
                set_languages(model, PairTokenizer(), None, "de")


def test_register_architecture_takes_a_language_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_ARCHITECTURES", dict(registry._ARCHITECTURES))
    model = BUILT_IN["BartConfig"][0]()
    assert set_languages(model, LanguageTokenizer(), None, "deu_Latn") == {}
    register_architecture("BartConfig", lambda m: m.get_decoder().layers[0].fc1, FORCED_BOS_LANGUAGE)
    assert key_module_name(model) == "model.decoder.layers.0.fc1"
    assert set_languages(model, LanguageTokenizer(), None, "deu_Latn") == {"forced_bos_token_id": 61}
    register_architecture("BartConfig", lambda m: m.get_decoder().layers[-1].fc1)  # the old signature
    assert architecture(model).languages == ONE_PAIR  # type: ignore[union-attr]


def test_real_m2m100_tokenizer(m2m100) -> None:
    model, tokenizer = m2m100
    assert set_languages(model, tokenizer, "en", "de") == {"forced_bos_token_id": tokenizer.get_lang_id("de")}
