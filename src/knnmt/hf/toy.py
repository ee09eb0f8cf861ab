"""A tiny, offline English→pseudo-German world: corpus, SentencePiece vocabulary, random models.

Used by the tests (no model hub is reachable) and by the quick-start before a real model ships.
Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_LEXICON: list[tuple[str, str]] = [
    ("file", "Datei"),
    ("folder", "Ordner"),
    ("window", "Fenster"),
    ("table", "Tabelle"),
    ("cell", "Zelle"),
    ("page", "Seite"),
    ("chart", "Diagramm"),
    ("document", "Dokument"),
    ("menu", "Menü"),
    ("button", "Schaltfläche"),
    ("field", "Feld"),
    ("image", "Bild"),
    ("column", "Spalte"),
    ("row", "Zeile"),
    ("sheet", "Tabellenblatt"),
    ("frame", "Rahmen"),
    ("style", "Vorlage"),
    ("font", "Schriftart"),
    ("list", "Liste"),
    ("dialog", "Dialog"),
]
_VERBS: list[tuple[str, str]] = [
    ("open", "öffnen"),
    ("close", "schließen"),
    ("select", "auswählen"),
    ("delete", "löschen"),
    ("insert", "einfügen"),
    ("save", "speichern"),
    ("print", "drucken"),
    ("copy", "kopieren"),
    ("move", "verschieben"),
    ("rename", "umbenennen"),
    ("hide", "ausblenden"),
    ("show", "anzeigen"),
]
_ADJ: list[tuple[str, str]] = [
    ("new", "neue"),
    ("current", "aktuelle"),
    ("selected", "ausgewählte"),
    ("empty", "leere"),
    ("first", "erste"),
    ("last", "letzte"),
    ("hidden", "ausgeblendete"),
    ("default", "Standard-"),
]


def toy_corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` synthetic (English, German-like) sentence pairs from a small grammar.

    Returns:
        list of ``(source, target)`` strings.
    """
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    for _ in range(n):
        verb_en, verb_de = rng.choice(_VERBS)
        adj_en, adj_de = rng.choice(_ADJ)
        noun_en, noun_de = rng.choice(_LEXICON)
        kind = rng.randrange(3)
        if kind == 0:
            src = f"{verb_en.capitalize()} the {adj_en} {noun_en}."
            tgt = f"Die {adj_de} {noun_de} {verb_de}."
        elif kind == 1:
            noun2_en, noun2_de = rng.choice(_LEXICON)
            src = f"To {verb_en} a {noun_en}, choose the {noun2_en} first."
            tgt = f"Um ein {noun_de} zu {verb_de}, wählen Sie zuerst {noun2_de}."
        else:
            src = f"The {noun_en} cannot be {verb_en}ed."
            tgt = f"{noun_de} kann nicht {verb_de} werden."
        pairs.append((src, tgt))
    return pairs


def train_sentencepiece(texts: list[str], out_dir: Path, vocab_size: int = 256) -> Path:
    """Train a shared SentencePiece unigram model on ``texts``; returns the ``.model`` path."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=-1,
        bos_id=-1,
        eos_id=1,
        unk_id=0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def make_marian_tokenizer(
    texts: list[str], out_dir: Path, vocab_size: int = 256, model_max_length: int = 64
) -> Any:
    """A MarianTokenizer with a locally trained shared SentencePiece vocabulary, saved in ``out_dir``."""
    import sentencepiece as spm
    from transformers import MarianTokenizer

    spm_dir = out_dir / "spm_train"
    model_path = train_sentencepiece(texts, spm_dir, vocab_size)
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab: dict[str, int] = {"</s>": 0, "<unk>": 1}
    for i in range(processor.get_piece_size()):
        piece = processor.id_to_piece(i)
        if piece not in vocab:
            vocab[piece] = len(vocab)
    vocab["<pad>"] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    for name in ("source.spm", "target.spm"):
        (out_dir / name).write_bytes(model_path.read_bytes())
    tokenizer = MarianTokenizer(
        source_spm=str(out_dir / "source.spm"),
        target_spm=str(out_dir / "target.spm"),
        vocab=str(out_dir / "vocab.json"),
        model_max_length=model_max_length,
    )
    return tokenizer


def make_marian_model(
    tokenizer: Any, d_model: int = 64, layers: int = 2, seed: int = 0, heads: int = 4, max_positions: int = 64
) -> Any:
    """A randomly initialised MarianMTModel (shared, scaled embeddings; FFN ``4·d_model``); tests use the
    defaults, the benchmarks larger sizes."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    vocab_size = len(tokenizer)
    config = MarianConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
    )
    model = MarianMTModel(config)
    model.generation_config.max_length = max_positions
    model.generation_config.num_beams = 1
    model.generation_config.bad_words_ids = None
    model.eval()
    return model


def build_toy_model(out_dir: str | Path, n_sentences: int = 400, d_model: int = 64, seed: int = 0) -> Path:
    """Write a tiny random Marian model + tokenizer and a toy corpus to ``out_dir``.

    Layout: ``out_dir/model`` (HF ``save_pretrained``), ``out_dir/corpus.{en,de}``.
    """
    out = Path(out_dir)
    pairs = toy_corpus(n_sentences, seed)
    tok_dir = out / "model"
    tokenizer = make_marian_tokenizer([t for p in pairs for t in p], tok_dir)
    model = make_marian_model(tokenizer, d_model=d_model, seed=seed)
    model.save_pretrained(tok_dir)
    tokenizer.save_pretrained(tok_dir)
    (out / "corpus.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (out / "corpus.de").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    logger.info("wrote toy model and %d-pair corpus to %s", len(pairs), out)
    return out
