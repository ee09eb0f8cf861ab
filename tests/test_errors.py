"""Bad input and mismatched artefacts fail with messages that say what, where, expected vs found."""

from __future__ import annotations

import codecs
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import all_sentences
from knnmt.core.config import BuildConfig, IndexConfig, KNNConfig
from knnmt.core.errors import (
    CorpusError,
    DatastoreError,
    IncompatibleError,
    KnnmtError,
    UnsupportedModelError,
    UsageError,
)
from knnmt.hf import registry
from knnmt.hf.registry import key_dim, key_module, model_fingerprint, tokenizer_fingerprint
from knnmt.hf.teacher_forcing import KeyExtractor
from knnmt.hf.toy import make_marian_model, make_marian_tokenizer, toy_corpus
from knnmt.pipeline.build import build_datastore
from knnmt.pipeline.translator import KNNMT, load_model
from knnmt.search.index import SearchIndex, build_index
from knnmt.store.corpus import CorpusSpec, inspect_corpus, iter_pairs, read_lines
from knnmt.store.datastore import MANIFEST, Datastore, read_manifest


def _lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# ---- corpus input -----------------------------------------------------------------------------


def test_line_count_mismatch_names_both_counts(marian, toy_pairs, tmp_path: Path) -> None:
    model, tokenizer = marian
    src = _lines(tmp_path / "a.en", [s for s, _ in toy_pairs[:5]])
    tgt = _lines(tmp_path / "a.de", [t for _, t in toy_pairs[:4]])
    out = tmp_path / "ds"
    with pytest.raises(CorpusError, match=rf"{re.escape(src)} has 5 lines, {re.escape(tgt)} has 4 lines"):
        build_datastore(model, tokenizer, CorpusSpec((src, tgt), "text"), out, progress=False)
    assert not out.exists(), "nothing may be written before the corpus is validated"


def test_empty_lines_are_skipped_and_counted(marian, toy_pairs, tmp_path: Path) -> None:
    model, tokenizer = marian
    pairs = list(toy_pairs[:6])
    pairs[1] = ("", pairs[1][1])  # empty source, line 2
    pairs[3] = (pairs[3][0], "   ")  # blank target, line 4
    src = _lines(tmp_path / "e.en", [s for s, _ in pairs])
    tgt = _lines(tmp_path / "e.de", [t for _, t in pairs])
    spec = CorpusSpec((src, tgt), "text")

    store = build_datastore(model, tokenizer, spec, tmp_path / "ds", progress=False)
    corpus = store.manifest["corpora"][0]
    assert (corpus["skipped_empty"], corpus["sentences"], corpus["lines"]) == (2, 4, 6)
    assert [s["line"] for s in all_sentences(store)] == [1, 3, 5, 6]
    assert store.describe()["corpora"][0]["skipped_empty"] == 2

    with pytest.raises(CorpusError, match=rf"^{re.escape(src)}:2: empty source sentence"):
        build_datastore(
            model, tokenizer, spec, tmp_path / "strict", BuildConfig(skip_empty=False), progress=False
        )
    pairs[1] = toy_pairs[1]
    _lines(tmp_path / "e.en", [s for s, _ in pairs])
    with pytest.raises(CorpusError, match=rf"^{re.escape(tgt)}:4: empty target sentence"):
        build_datastore(
            model, tokenizer, spec, tmp_path / "strict2", BuildConfig(skip_empty=False), progress=False
        )


def test_non_utf8_names_file_and_line(marian, toy_pairs, tmp_path: Path) -> None:
    model, tokenizer = marian
    src = _lines(tmp_path / "u.en", [s for s, _ in toy_pairs[:4]])
    tgt = tmp_path / "u.de"
    tgt.write_bytes("Datei öffnen.\nZweite Zeile.\n".encode() + "Größe\n".encode("latin-1") + b"Vier.\n")
    out = tmp_path / "ds"
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(tgt))}:3: invalid UTF-8 at byte 2 of the line"):
        build_datastore(model, tokenizer, CorpusSpec((src, str(tgt)), "text"), out, progress=False)
    assert not out.exists()


def test_long_sentences_truncated_and_counted(marian, toy_pairs, tmp_path: Path) -> None:
    model, tokenizer = marian
    pairs = toy_pairs[:30]
    src = _lines(tmp_path / "l.en", [s for s, _ in pairs])
    tgt = _lines(tmp_path / "l.de", [t for _, t in pairs])
    spec = CorpusSpec((src, tgt), "text")
    limit = 10
    src_lens = [len(ids) for ids in tokenizer([s for s, _ in pairs])["input_ids"]]
    tgt_lens = [len(ids) for ids in tokenizer(text_target=[t for _, t in pairs])["input_ids"]]
    too_long = sum(n > limit for n in src_lens) + sum(n > limit for n in tgt_lens)
    assert 0 < too_long < 60

    store = build_datastore(
        model, tokenizer, spec, tmp_path / "ds", BuildConfig(max_length=limit), progress=False
    )
    assert store.manifest["corpora"][0]["truncated"] == too_long
    assert sum(s["truncated"] for s in store.manifest["shards"]) == too_long
    sentence_ids, _ = store.provenance(np.arange(store.count))
    per_sentence = np.bincount(sentence_ids, minlength=len(pairs))
    assert per_sentence.tolist() == [min(n, limit) for n in tgt_lens]
    # a truncated target still ends with </s>
    last = np.cumsum(per_sentence) - 1
    assert (store.values[last] == tokenizer.eos_token_id).all()

    first_bad = next(i for i in range(len(pairs)) if src_lens[i] > limit or tgt_lens[i] > limit)
    side = "source" if src_lens[first_bad] > limit else "target"
    with pytest.raises(
        CorpusError,
        match=rf":{first_bad + 1}: {side} sentence has \d+ tokens, more than the "
        rf"maximum {limit}",
    ):
        build_datastore(
            model,
            tokenizer,
            spec,
            tmp_path / "strict",
            BuildConfig(max_length=limit, truncate=False),
            progress=False,
        )


def test_long_target_error_names_the_target_file(marian, toy_pairs, tmp_path: Path) -> None:
    model, tokenizer = marian
    src = _lines(tmp_path / "t.en", ["Open the file.", "Open the file."])
    tgt = _lines(tmp_path / "t.de", ["Datei.", " ".join(["Datei"] * 30)])
    with pytest.raises(CorpusError, match=rf"^{re.escape(tgt)}:2: target sentence"):
        build_datastore(
            model,
            tokenizer,
            CorpusSpec((src, tgt), "text"),
            tmp_path / "ds",
            BuildConfig(max_length=12, truncate=False),
            progress=False,
        )


def test_malformed_tsv_and_jsonl(marian, toy_pairs, tmp_path: Path) -> None:
    model, tokenizer = marian
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("Open the file.\tDatei öffnen.\nA\tB\tC\nClose.\tSchließen.\n", encoding="utf-8")
    with pytest.raises(
        CorpusError, match=rf"^{re.escape(str(tsv))}:2: expected 2 tab-separated fields.*found 3"
    ):
        build_datastore(
            model, tokenizer, CorpusSpec.from_args(corpus=str(tsv)), tmp_path / "ds1", progress=False
        )

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"src": "Open.", "tgt": "Öffnen."}\n{"src": "Close.", "tgt": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(jsonl))}:2: invalid JSON"):
        build_datastore(
            model, tokenizer, CorpusSpec.from_args(corpus=str(jsonl)), tmp_path / "ds2", progress=False
        )
    jsonl.write_text(
        '{"src": "Open.", "tgt": "Öffnen."}\n{"source": "Close.", "translation": "x"}\n', encoding="utf-8"
    )
    with pytest.raises(CorpusError, match=r":2: expected an object with keys 'src' and 'tgt'"):
        build_datastore(
            model, tokenizer, CorpusSpec.from_args(corpus=str(jsonl)), tmp_path / "ds3", progress=False
        )
    jsonl.write_text('{"src": "Open.", "tgt": 3}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r":1: 'src' and 'tgt' must be strings"):
        build_datastore(
            model, tokenizer, CorpusSpec.from_args(corpus=str(jsonl)), tmp_path / "ds4", progress=False
        )


def test_malformed_tsv_fixed_then_rebuilt(marian, tmp_path: Path) -> None:
    model, tokenizer = marian
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("Open the file.\tDatei öffnen.\nA\tB\tC\n", encoding="utf-8")
    spec = CorpusSpec.from_args(corpus=str(tsv))
    out = tmp_path / "ds"
    with pytest.raises(CorpusError, match=":2: expected 2 tab-separated fields"):
        build_datastore(model, tokenizer, spec, out, progress=False)
    tsv.write_text("Open the file.\tDatei öffnen.\nA\tB\n", encoding="utf-8")  # the user fixes line 2
    store = build_datastore(model, tokenizer, spec, out, progress=False)
    assert store.manifest["sentences"] == 2


def test_corpus_spec_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="either --corpus FILE or --source FILE --target FILE"):
        CorpusSpec.from_args(source="a", target="b", corpus="c.tsv")
    with pytest.raises(UsageError, match="needs --source and --target"):
        CorpusSpec.from_args(source="a")
    with pytest.raises(UsageError, match=r"a text corpus needs 2 file\(s\), got 1"):
        CorpusSpec(("a",), "text")
    with pytest.raises(CorpusError, match=r"missing\.en: file not found"):
        inspect_corpus(CorpusSpec((str(tmp_path / "missing.en"), str(tmp_path / "missing.de")), "text"))


def test_config_validation_messages() -> None:
    with pytest.raises(UsageError, match=r"lambda must be in \[0, 1\], got 1.5"):
        KNNConfig(lambda_=1.5)
    with pytest.raises(UsageError, match=r"k must be an integer in \[1, 4096\], got 0"):
        KNNConfig(k=0)
    with pytest.raises(UsageError, match="temperature must be a positive number"):
        KNNConfig(temperature=float("nan"))
    with pytest.raises(UsageError, match="shard_sentences must be >= 1"):
        BuildConfig(shard_sentences=0)
    with pytest.raises(UsageError, match=r"KNNConfig: unknown field\(s\) \['lambda'\]"):
        KNNConfig.from_dict({"lambda": 0.3})
    with pytest.raises(UsageError, match="nprobe must be >= 1"):
        IndexConfig(nprobe=0)


# ---- artefacts that do not belong together ------------------------------------------------------


def test_datastore_from_another_model(marian, datastore) -> None:
    _, tokenizer = marian
    other = make_marian_model(tokenizer, seed=1)
    with pytest.raises(IncompatibleError, match=r"was built with model .*fingerprint.*rebuild the datastore"):
        KNNMT(other, tokenizer, datastore)


def test_datastore_from_another_tokenizer(marian, datastore, tmp_path: Path) -> None:
    model, _ = marian
    texts = [t for p in toy_corpus(60, seed=3) for t in p] + ["Ganz andere Wörter hier."]
    other = make_marian_tokenizer(texts, tmp_path / "tok", vocab_size=150)
    assert tokenizer_fingerprint(other) != datastore.manifest["tokenizer"]["fingerprint"]
    with pytest.raises(IncompatibleError, match="was built with another tokenizer"):
        KNNMT(model, other, datastore)


def test_dimension_mismatch(marian, datastore) -> None:
    model, tokenizer = marian
    with pytest.raises(IncompatibleError, match=r"has 64-dimensional keys, the model gives 72"):
        datastore.check_compatible(model_fingerprint(model), tokenizer_fingerprint(tokenizer), 72)


def test_datastore_with_wrong_key_dimension_in_manifest(marian, datastore, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(datastore.path, copy)
    manifest = json.loads((copy / MANIFEST).read_text(encoding="utf-8"))
    manifest["key"]["dim"] = 32
    (copy / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DatastoreError, match=r"keys\.npy: expected shape \(\d+, 32\)"):
        Datastore.open(copy)


@pytest.mark.parametrize("damage", ["truncate-keys", "delete-values", "corrupt-manifest", "no-manifest"])
def test_damaged_datastore_cannot_be_opened(datastore, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(datastore.path, copy)
    shard = copy / "shards" / "00001"
    if damage == "truncate-keys":
        data = (shard / "keys.npy").read_bytes()
        (shard / "keys.npy").write_bytes(data[: len(data) // 2])
        pattern = rf"shard file {re.escape(str(shard / 'keys.npy'))} is truncated or corrupt"
    elif damage == "delete-values":
        (shard / "values.npy").unlink()
        pattern = rf"shard file {re.escape(str(shard / 'values.npy'))} is missing"
    elif damage == "corrupt-manifest":
        (copy / MANIFEST).write_text('{"format": "knnmt-datastore", ', encoding="utf-8")
        pattern = rf"{re.escape(str(copy / MANIFEST))}: corrupt manifest"
    else:
        (copy / MANIFEST).unlink()
        pattern = rf"{re.escape(str(copy))} is not a knnmt datastore: {MANIFEST} is missing"
    with pytest.raises(DatastoreError, match=pattern):
        Datastore.open(copy)
    with pytest.raises(DatastoreError, match="does not exist"):
        Datastore.open(tmp_path / "nowhere")


def test_index_of_another_datastore(marian, toy_pairs, make_corpus, tmp_path: Path) -> None:
    model, tokenizer = marian
    out = tmp_path / "ds"
    store = build_datastore(model, tokenizer, make_corpus(toy_pairs[:10]), out, progress=False)
    build_index(store, IndexConfig(factory="Flat"), progress=False)  # <datastore>/index
    other = build_datastore(
        model, tokenizer, make_corpus(toy_pairs[10:20], name="b"), tmp_path / "other", progress=False
    )
    with pytest.raises(IncompatibleError, match="was built for another datastore"):
        KNNMT.load((model, tokenizer), other.path, index=out / "index")
    # growing the datastore invalidates its index as well
    build_datastore(
        model, tokenizer, make_corpus(toy_pairs[20:25], name="c"), out, append=True, progress=False
    )
    with pytest.raises(IncompatibleError, match="was built for another datastore"):
        KNNMT.load((model, tokenizer), out)
    with pytest.raises(IncompatibleError, match="was built for another datastore"):
        SearchIndex.load(out / "index", Datastore.open(out))


# ---- unsupported architectures ------------------------------------------------------------------


def _tiny_decoder_only() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()


def _tiny_encoder_only() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            num_hidden_layers=1,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=50,
            max_position_embeddings=32,
        )
    ).eval()


@pytest.mark.parametrize(
    ("make", "config_name"), [(_tiny_decoder_only, "GPT2Config"), (_tiny_encoder_only, "BertConfig")]
)
def test_unsupported_architecture_lists_supported_ones(make, config_name: str) -> None:
    model = make()
    with pytest.raises(
        UnsupportedModelError, match=rf"no kNN key location is registered for {config_name}"
    ) as err:
        key_module(model)
    message = str(err.value)
    for name in ("MarianConfig", "M2M100Config", "MBartConfig", "T5Config", "MT5Config"):
        assert name in message
    assert "register_architecture" in message and "decoder_output" in message
    with pytest.raises(UnsupportedModelError):
        KeyExtractor(model, pad_token_id=0)


def test_unsupported_architecture_writes_nothing(marian, toy_pairs, make_corpus, tmp_path: Path) -> None:
    _, tokenizer = marian
    out = tmp_path / "ds"
    with pytest.raises(UnsupportedModelError, match="GPT2Config"):
        build_datastore(_tiny_decoder_only(), tokenizer, make_corpus(toy_pairs[:3]), out, progress=False)
    assert not out.exists()


def test_register_architecture_and_key_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_decoder_only()
    assert key_module(model, "decoder_output") is model.lm_head  # every LM head model has one
    with pytest.raises(UsageError, match="unknown key layer 'middle'"):
        key_module(model, "middle")
    monkeypatch.setattr(registry, "_ARCHITECTURES", dict(registry._ARCHITECTURES))
    registry.register_architecture("GPT2Config", lambda m: m.transformer.h[-1].mlp.c_fc)
    assert "GPT2Config" in registry.supported_architectures()
    assert key_module(model) is model.transformer.h[-1].mlp.c_fc
    assert registry.key_module_name(model) == "transformer.h.0.mlp.c_fc"


def test_key_dim_of_registered_families(marian, t5, m2m100) -> None:
    assert key_dim(marian[0]) == 64 and key_dim(marian[0], "decoder_output") == 64
    assert key_dim(t5[0]) == 32 and key_dim(m2m100[0]) == 32


def test_index_of_same_sized_datastore_from_another_corpus(
    marian, toy_pairs, make_corpus, tmp_path: Path
) -> None:
    model, tokenizer = marian
    pairs = list(toy_pairs[:6])
    a = build_datastore(model, tokenizer, make_corpus(pairs, name="a"), tmp_path / "a", progress=False)
    b = build_datastore(model, tokenizer, make_corpus(pairs[::-1], name="b"), tmp_path / "b", progress=False)
    assert a.count == b.count and not np.array_equal(a.values, b.values)  # same size, other content
    build_index(a, IndexConfig(factory="Flat"), out=tmp_path / "index", progress=False)
    with pytest.raises(IncompatibleError, match="was built for another datastore"):
        SearchIndex.load(tmp_path / "index", b)


# ---- issue 15: clear errors instead of raw exceptions or silence; one rule for text inputs ----------


@pytest.mark.parametrize(
    ("fmt", "contents", "found"),
    [
        ("text", (b"", b""), "the files are empty"),
        ("text", (b"Open.\n\n", b"\n  \n"), r"all 2 line\(s\) have an empty side"),
        ("tsv", (b"\n \t \nx\t\n",), r"all 3 line\(s\) have an empty side"),
        ("jsonl", (b'\n{"src": "", "tgt": "x"}\n',), r"all 2 line\(s\) have an empty side"),
        ("tsv", (codecs.BOM_UTF8,), "the file is empty"),
    ],
)
def test_empty_corpus_is_refused_before_anything_is_written(
    marian, tmp_path: Path, fmt: str, contents: tuple[bytes, ...], found: str
) -> None:
    model, tokenizer = marian
    paths = [tmp_path / f"c{i}.{fmt}" for i in range(len(contents))]
    for path, data in zip(paths, contents, strict=True):
        path.write_bytes(data)
    spec = CorpusSpec(tuple(map(str, paths)), fmt)  # type: ignore[arg-type]
    where = re.escape(" and ".join(map(str, paths)))
    out = tmp_path / "ds"
    for skip_empty in (True, False):
        if not skip_empty and "empty side" in found:
            continue  # --no-skip-empty fails on the first empty line instead
        with pytest.raises(CorpusError, match=rf"^{where}: no sentence pair to store: {found}"):
            build_datastore(model, tokenizer, spec, out, BuildConfig(skip_empty=skip_empty), progress=False)
        assert not out.exists()


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda m: m.pop("count"), r"field 'count' is missing"),
        (lambda m: m["key"].update(dim="64"), r"field 'key\.dim' must be an integer >= 1, found \"64\""),
        (lambda m: m["key"].update(dtype="int8"), r"'key\.dtype' must be a float dtype"),
        (lambda m: m["shards"][0].pop("count"), r"field 'shards\[0\]\.count' is missing"),
        (lambda m: m["shards"].__setitem__(1, 7), r"field 'shards\[1\]' must be an object, found 7"),
        (lambda m: m["model"].pop("fingerprint"), r"field 'model\.fingerprint' is missing"),
        (lambda m: m.update(model="toy"), r"field 'model' must be an object, found \"toy\""),
        (lambda m: m.update(state="done"), r"field 'state' must be 'building' or 'complete'"),
        (lambda m: m.update(shards={}), r"field 'shards' must be a list, found \{\}"),
        (lambda m: m.update(count=True), r"field 'count' must be an integer >= 0, found true"),
        (lambda m: m["corpora"][0].update(sentences=-1), r"field 'corpora\[0\]\.sentences' must be"),
    ],
)
def test_manifest_with_missing_or_mistyped_field(datastore, tmp_path: Path, edit, pattern: str) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(datastore.path, copy)
    manifest = json.loads((copy / MANIFEST).read_text(encoding="utf-8"))
    edit(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DatastoreError, match=rf"^{re.escape(str(copy / MANIFEST))}: {pattern}") as err:
        read_manifest(copy)
    assert "knnmt build --force" in str(err.value)
    with pytest.raises(DatastoreError, match=pattern):
        Datastore.open(copy)
    (copy / MANIFEST).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DatastoreError, match=r"corrupt manifest \(JSON list, expected an object\)"):
        read_manifest(copy)


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "settings"])
def test_garbage_index_file_names_it_and_says_how_to_rebuild(datastore, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(datastore.path, copy)
    store = Datastore.open(copy)
    build_index(store, IndexConfig(factory="Flat"), progress=False)
    index_file = copy / "index" / "index.faiss"
    data = index_file.read_bytes()
    file = index_file
    if damage == "random":
        index_file.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        index_file.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        index_file.write_bytes(b"")
    else:
        file = copy / "index" / "index.json"
        file.write_text('{"factory": ', encoding="utf-8")
    rebuild = re.escape(f"knnmt index {copy} --force")
    with pytest.raises(DatastoreError, match=rf"^{re.escape(str(file))}: .*{rebuild}"):
        SearchIndex.load(copy / "index", store)
    with pytest.raises(DatastoreError, match=rf"{re.escape(str(file))}: .*--out {re.escape(str(copy))}"):
        SearchIndex.load(copy / "index")  # no datastore given: a placeholder and the directory


def test_directory_and_device_inputs_are_named_for_what_they_are(tmp_path: Path) -> None:
    text = tmp_path / "a.en"
    text.write_text("Open.\n", encoding="utf-8")
    for spec_paths, fmt in (((str(tmp_path), str(text)), "text"), ((str(tmp_path),), "tsv")):
        with pytest.raises(CorpusError, match=rf"^{re.escape(str(tmp_path))}: is a directory"):
            inspect_corpus(CorpusSpec(spec_paths, fmt))  # type: ignore[arg-type]
    # a corpus is read twice (validated, then built): a device or pipe cannot be
    with pytest.raises(CorpusError, match=r"^/dev/null: is not a regular file \(a character device\)"):
        inspect_corpus(CorpusSpec(("/dev/null",), "tsv"))
    # translate/evaluate inputs are read once: /dev/null is an empty input, like `< /dev/null`
    assert read_lines("/dev/null") == []
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(tmp_path))}: is a directory"):
        read_lines(str(tmp_path))
    with pytest.raises(CorpusError, match=r"nope\.txt: file not found"):
        read_lines(str(tmp_path / "nope.txt"))


def test_missing_model_path_and_uncached_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_dir: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    for name in ("./no-such-dir", str(tmp_path / "x" / "model"), "~/no/such/model", "a/b/c"):
        with pytest.raises(KnnmtError, match=rf"^model directory {re.escape(name)} does not exist"):
            load_model(name)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(KnnmtError, match=r"model weights\.bin: is a file, expected a model directory"):
        load_model("weights.bin")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(
        KnnmtError,
        match=r"model 'knnmt-test/no-such-model' is not a local directory, and not in the Hugging "
        r"Face cache .*hub-cache\) while downloads are off",
    ):
        load_model("knnmt-test/no-such-model")
    model, _ = load_model(str(toy_dir / "model"))  # an existing directory still loads
    assert model is not None


@pytest.mark.parametrize("fmt", ["text", "tsv"])
def test_cr_only_line_ends_are_named(tmp_path: Path, fmt: str) -> None:
    if fmt == "text":
        src, tgt = tmp_path / "mac.en", tmp_path / "mac.de"
        src.write_bytes(b"Open.\rClose.\r")
        tgt.write_bytes(b"Offnen.\nSchliessen.\n")  # a line-count mismatch, were CRs line ends
        spec = CorpusSpec((str(src), str(tgt)), "text")
    else:
        src = tmp_path / "mac.tsv"
        src.write_bytes(b"Open.\tOffnen.\rClose.\tSchliessen.\r")
        spec = CorpusSpec((str(src),), "tsv")
    pattern = rf"^{re.escape(str(src))}:1: line ends here are carriage returns only \(\\r, old Mac style\)"
    with pytest.raises(CorpusError, match=pattern + r".*tr '\\r' '\\n' <"):
        inspect_corpus(spec)
    with pytest.raises(CorpusError, match=pattern):
        read_lines(str(src))


def test_bom_is_dropped_from_every_text_input(
    marian, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = marian
    bom = codecs.BOM_UTF8
    (tmp_path / "b.en").write_bytes(bom + b"Open the file.\nClose it.\n")
    (tmp_path / "b.de").write_bytes(bom + "Datei öffnen.\r\nSchließen.\r\n".encode())
    (tmp_path / "b.tsv").write_bytes(bom + "Open the file.\tDatei öffnen.\n".encode())
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"src": "Open the file.", "tgt": "Datei \\u00f6ffnen."}\n')
    specs = [
        CorpusSpec((str(tmp_path / "b.en"), str(tmp_path / "b.de")), "text"),
        CorpusSpec((str(tmp_path / "b.tsv"),), "tsv"),
        CorpusSpec((str(tmp_path / "b.jsonl"),), "jsonl"),
    ]
    for spec in specs:
        first = next(iter_pairs(spec))
        assert (first.source, first.target) == ("Open the file.", "Datei öffnen.")
    store = build_datastore(model, tokenizer, specs[0], tmp_path / "ds", progress=False)
    assert [s["src"] for s in all_sentences(store)] == ["Open the file.", "Close it."]
    assert [s["tgt"] for s in all_sentences(store)] == ["Datei öffnen.", "Schließen."]
    assert read_lines(str(tmp_path / "b.de")) == ["Datei öffnen.", "Schließen."]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(bom + b"Open.\r\nClose.\n")))
    assert read_lines("-") == ["Open.", "Close."]


@pytest.mark.parametrize(
    ("name", "data", "line"),
    [
        ("n.en", b"Open.\nCl\x00ose.\n", 2),
        ("n.tsv", b"Open.\tOffnen.\nClose.\tSchlie\x00en.\n", 2),
        ("n.jsonl", b'{"src": "Open.", "tgt": "x"}\n{"src": "Cl\x00ose.", "tgt": "y"}\n', 2),
    ],
)
def test_nul_bytes_are_refused_with_file_and_line(tmp_path: Path, name: str, data: bytes, line: int) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    if name.endswith(".en"):
        other = tmp_path / "n.de"
        other.write_text("Offnen.\nSchliessen.\n", encoding="utf-8")
        spec = CorpusSpec((str(path), str(other)), "text")
    else:
        spec = CorpusSpec.from_args(corpus=str(path))
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:{line}: NUL byte"):
        inspect_corpus(spec)
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:{line}: NUL byte"):
        read_lines(str(path))
    escaped = tmp_path / "escaped.jsonl"  # the same character spelled as a JSON escape
    escaped.write_text('{"src": "Open.", "tgt": "x"}\n{"src": "a\\u0000b", "tgt": "y"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"escaped\.jsonl:2: 'src' contains a NUL character"):
        inspect_corpus(CorpusSpec.from_args(corpus=str(escaped)))


def test_search_parameters_checked_at_load(datastore, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(datastore.path, copy)
    store = Datastore.open(copy)
    build_index(store, IndexConfig(factory="Flat"), progress=False)
    for kwargs, pattern in (
        ({"nprobe": 0}, "nprobe must be >= 1, got 0"),
        ({"ef_search": -1}, "ef_search must be >= 1, got -1"),
        ({"rerank": -1}, "rerank must be >= 0, got -1"),
    ):
        with pytest.raises(UsageError, match=pattern):
            SearchIndex.load(copy / "index", store, **kwargs)
