"""The command line: subcommands end to end on the toy model, exit codes, messages."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import knnmt
from knnmt.apps.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from knnmt.hf.toy import build_toy_model
from knnmt.store.writelock import LOCK_FILE


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    build_toy_model(root, n_sentences=60)
    return root


@pytest.fixture(scope="module")
def datastore(toy: Path) -> Path:
    out = toy / "ds"
    code = main(
        [
            "-q",
            "build",
            "--model",
            str(toy / "model"),
            "--source",
            str(toy / "corpus.en"),
            "--target",
            str(toy / "corpus.de"),
            "--out",
            str(out),
            "--shard-sentences",
            "25",
        ]
    )
    assert code == EXIT_OK
    return out


def test_build_writes_datastore_and_info_reports_it(
    datastore: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((datastore / "manifest.json").read_text())
    assert manifest["state"] == "complete"
    assert manifest["sentences"] == 60
    assert len(manifest["shards"]) == 3
    assert main(["info", str(datastore), "--json"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == manifest["count"]
    assert info["key_layer"] == "ffn_input"


def test_build_refuses_to_overwrite(toy: Path, datastore: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = (datastore / "manifest.json").read_text()
    code = main(
        [
            "-q",
            "build",
            "--model",
            str(toy / "model"),
            "--source",
            str(toy / "corpus.en"),
            "--target",
            str(toy / "corpus.de"),
            "--out",
            str(datastore),
        ]
    )
    assert code == EXIT_FAILURE
    assert "already exists" in caplog.text and "--force" in caplog.text
    assert (datastore / "manifest.json").read_text() == before


def test_usage_errors_exit_2(toy: Path, datastore: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["build", "--model"])  # argparse: missing value
    assert exc.value.code == EXIT_USAGE
    code = main(
        [
            "-q",
            "translate",
            "--model",
            str(toy / "model"),
            "--datastore",
            str(datastore),
            "--k",
            "0",
            "-i",
            str(toy / "corpus.en"),
        ]
    )
    assert code == EXIT_USAGE
    code = main(
        [
            "-q",
            "build",
            "--model",
            str(toy / "model"),
            "--source",
            str(toy / "corpus.en"),
            "--out",
            str(toy / "x"),
        ]
    )
    assert code == EXIT_USAGE


def test_missing_input_file_exits_1(toy: Path, datastore: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(
        [
            "-q",
            "translate",
            "--model",
            str(toy / "model"),
            "--datastore",
            str(datastore),
            "-i",
            str(toy / "nope.txt"),
        ]
    )
    assert code == EXIT_FAILURE
    assert "nope.txt" in caplog.text and "not found" in caplog.text


def test_translate_stdin_to_stdout_with_neighbours(
    toy: Path, datastore: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = (toy / "corpus.en").read_text().splitlines()[:3]
    refs = (toy / "corpus.de").read_text().splitlines()[:3]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    neighbours = toy / "neighbours.jsonl"
    code = main(
        [
            "-q",
            "translate",
            "--model",
            str(toy / "model"),
            "--datastore",
            str(datastore),
            "--k",
            "1",
            "--lambda",
            "1.0",
            "--max-new-tokens",
            "40",
            "--neighbors",
            str(neighbours),
        ]
    )
    assert code == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out == refs  # λ = 1, k = 1 over a datastore holding these pairs reproduces them
    records = [json.loads(line) for line in neighbours.read_text().splitlines()]
    assert len(records) == 3
    first = records[0]["explanation"][0]
    assert first["neighbours"][0]["sentence_id"] == 0 and first["neighbours"][0]["position"] == 0


def _evaluate_args(toy: Path, datastore: Path, src: Path, ref: Path, *extra: str) -> list[str]:
    return ["-q", "evaluate", "--model", str(toy / "model"), "--datastore", str(datastore),
            "--source", str(src), "--reference", str(ref), *extra]  # fmt: skip


def test_index_then_evaluate_prints_scores_with_signatures(
    toy: Path, datastore: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-q", "index", str(datastore), "--factory", "Flat"]) == EXIT_OK
    capsys.readouterr()
    assert main(["-q", "index", str(datastore), "--factory", "Flat"]) == EXIT_FAILURE  # exists, no --force
    assert main(["-q", "index", str(datastore), "--factory", "Flat", "--force"]) == EXIT_OK
    capsys.readouterr()
    src, ref = toy / "test.en", toy / "test.de"
    src.write_text("".join(line + "\n" for line in (toy / "corpus.en").read_text().splitlines()[:8]))
    ref.write_text("".join(line + "\n" for line in (toy / "corpus.de").read_text().splitlines()[:8]))
    scores_file = toy / "scores.json"
    extra = ["--k", "1", "--lambda", "1", "--max-new-tokens", "40", "--json", str(scores_file)]
    code = main(_evaluate_args(toy, datastore, src, ref, *extra))
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "BLEU signature: nrefs:1" in out and "chrF signature:" in out
    scores = {s["name"]: s for s in json.loads(scores_file.read_text())}
    assert scores["knn-mt"]["bleu"] == pytest.approx(100.0)
    assert scores["base"]["bleu"] < scores["knn-mt"]["bleu"]
    assert scores["knn-mt"]["tokens_per_second"] > 0
    # greedy, nothing gated: one search per target token, plus the step that ends each sentence
    assert 1.0 <= scores["knn-mt"]["searched_per_token"] <= 1.5 and scores["base"]["searched_per_token"] == 0
    gated = toy / "gated.json"
    assert (
        main(_evaluate_args(toy, datastore, src, ref, *extra[:-1], str(gated), "--confidence-gate", "1e-6"))
        == 0
    )
    assert json.loads(gated.read_text())[1]["searched_per_token"] == 0  # every step passes a tiny gate


def test_evaluate_reference_count_mismatch(
    toy: Path, datastore: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, ref = toy / "m.en", toy / "m.de"
    src.write_text("a\nb\n")
    ref.write_text("a\n")
    code = main(_evaluate_args(toy, datastore, src, ref))
    assert code == EXIT_USAGE
    assert "2 source sentences but 1 references" in caplog.text


def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "demo", "--toy", "--workdir", str(tmp_path), "--limit", "6"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "BLEU signature" in out and "knn-mt" in out
    html = (tmp_path / "report.html").read_text()
    assert "<img" in html and "knn-mt" in html
    built = (tmp_path / "datastore" / "manifest.json").stat().st_mtime_ns
    assert main(["-q", "demo", "--toy", "--workdir", str(tmp_path), "--limit", "6"]) == EXIT_OK
    assert (tmp_path / "datastore" / "manifest.json").stat().st_mtime_ns == built  # reused, not rebuilt


# ---- issue 15: clear errors and exit codes --------------------------------------------------------


def _translate_args(toy: Path, datastore: Path, *extra: str) -> list[str]:
    return ["-q", "translate", "--model", str(toy / "model"), "--datastore", str(datastore), *extra]


@pytest.mark.parametrize(
    ("flag", "value", "want"),
    [
        ("--nprobe", "0", ">= 1"),
        ("--ef-search", "-5", ">= 1"),
        ("--rerank", "-1", r"in \[0, 64\]"),
        ("--k", "0", r"in \[1, 4096\]"),
        ("--beam", "0", ">= 1"),
        ("--subset-size", "0", ">= 1"),
        ("--ray-parts", "0", ">= 1"),
    ],
)
def test_out_of_range_option_exits_2_naming_it(
    toy: Path, datastore: Path, caplog: pytest.LogCaptureFixture, flag: str, value: str, want: str
) -> None:
    assert main(_translate_args(toy, datastore, flag, value, "-i", str(toy / "corpus.en"))) == EXIT_USAGE
    assert re.search(rf"{flag} must be an integer {want}, got {value}", caplog.text)
    caplog.clear()
    if flag in ("--nprobe", "--ef-search", "--rerank"):
        assert main(["-q", "index", str(datastore), flag, value]) == EXIT_USAGE
        assert f"{flag} must be an integer" in caplog.text


def test_neighbors_path_is_checked_before_translating(
    toy: Path, datastore: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-such-dir" / "n.jsonl"
    args = _translate_args(toy, datastore, "-i", str(toy / "corpus.en"), "--neighbors")
    assert main([*args, str(missing)]) == EXIT_USAGE
    assert f"--neighbors {missing}: directory {missing.parent} does not exist" in caplog.text
    assert main([*args, str(tmp_path)]) == EXIT_USAGE
    assert f"--neighbors {tmp_path}: is a directory" in caplog.text
    (tmp_path / "file").write_text("x")
    assert main([*args, str(tmp_path / "file" / "n.jsonl")]) == EXIT_USAGE
    assert "is not a directory" in caplog.text


def test_missing_model_directory_exits_1(
    datastore: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(
        ["-q", "translate", "--model", "./no-such-dir", "--datastore", str(datastore), "-i", "/dev/null"]
    )
    assert code == EXIT_FAILURE
    assert "model directory ./no-such-dir does not exist" in caplog.text
    assert "Repo id" not in caplog.text


def _copy_with_manifest(datastore: Path, out: Path, edit: Any) -> Path:
    shutil.copytree(
        datastore, out, ignore=shutil.ignore_patterns("index", "subset")
    )  # built for the original
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_empty_datastore_of_an_older_version(
    toy: Path,
    datastore: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def empty(m: dict[str, Any]) -> None:  # what knnmt built from an empty corpus before it refused one
        m.update(count=0, sentences=0, shards=[])
        m["corpora"][0].update(sentences=0, lines=0)

    old = _copy_with_manifest(datastore, tmp_path / "old", empty)
    shutil.rmtree(old / "shards")
    src = tmp_path / "in.en"
    src.write_text("Open the file.\n")
    assert main(_translate_args(toy, old, "-i", str(src))) == EXIT_FAILURE
    assert f"datastore {old} has no entries" in caplog.text and "--no-knn" in caplog.text
    assert "IndexError" not in caplog.text
    capsys.readouterr()
    assert main(_translate_args(toy, old, "-i", str(src), "--no-knn", "--max-new-tokens", "5")) == EXIT_OK
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["info", str(old), "--json"]) == EXIT_OK
    assert "nothing to retrieve" in json.loads(capsys.readouterr().out)["note"]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.pop("count"), "count"),
        (lambda m: m["key"].update(dim="64"), "key.dim"),
        (lambda m: m["shards"][0].pop("count"), "shards[0].count"),
        (lambda m: m["model"].pop("fingerprint"), "model.fingerprint"),
    ],
)
def test_damaged_manifest_exits_1_naming_the_field(
    toy: Path, datastore: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: Any, field: str
) -> None:
    copy = _copy_with_manifest(datastore, tmp_path / "ds", edit)
    assert main(["info", str(copy)]) == EXIT_FAILURE
    assert f"{copy / 'manifest.json'}: field '{field}'" in caplog.text
    caplog.clear()
    assert main(_translate_args(toy, copy, "-i", "/dev/null")) == EXIT_FAILURE
    assert f"{copy / 'manifest.json'}: field '{field}'" in caplog.text
    assert "KeyError" not in caplog.text and "AttributeError" not in caplog.text


def test_corrupt_index_exits_1_naming_the_file(
    toy: Path, datastore: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(datastore, copy, ignore=shutil.ignore_patterns("index"))
    assert main(["-q", "index", str(copy), "--factory", "Flat"]) == EXIT_OK
    (copy / "index" / "index.faiss").write_bytes(b"\x00garbage" * 100)
    assert main(_translate_args(toy, copy, "-i", str(toy / "corpus.en"))) == EXIT_FAILURE
    assert f"{copy / 'index' / 'index.faiss'}: cannot read the faiss index" in caplog.text
    assert f"knnmt index {copy} --force" in caplog.text and "RuntimeError" not in caplog.text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"Open.\rClose.\r", r":1: line ends here are carriage returns only"),
        (b"Open.\nCl\x00ose.\n", r":2: NUL byte"),
        ("Größe\n".encode("latin-1"), r":1: invalid UTF-8"),
    ],
)
def test_bad_translate_input_exits_1_with_file_and_line(
    toy: Path, datastore: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, data: bytes, message: str
) -> None:
    src = tmp_path / "in.txt"
    src.write_bytes(data)
    assert main(_translate_args(toy, datastore, "-i", str(src))) == EXIT_FAILURE
    assert re.search(re.escape(str(src)) + message, caplog.text)


def test_empty_test_set_exits_2(toy: Path, datastore: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(_evaluate_args(toy, datastore, Path("/dev/null"), Path("/dev/null"))) == EXIT_USAGE
    assert "nothing to evaluate: the test set has no sentences" in caplog.text


def test_empty_corpus_build_exits_1_and_writes_nothing(
    toy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, tgt = tmp_path / "e.en", tmp_path / "e.de"
    src.write_text("\n\n")
    tgt.write_text("Datei.\n\n")
    out = tmp_path / "ds"
    args = ["-q", "build", "--model", str(toy / "model"), "--source", str(src), "--target", str(tgt)]
    assert main([*args, "--out", str(out)]) == EXIT_FAILURE
    assert f"{src} and {tgt}: no sentence pair to store: all 2 line(s) have an empty side" in caplog.text
    assert not out.exists()


def test_failing_append_via_cli_changes_nothing(
    toy: Path, datastore: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(datastore, copy)
    def files() -> dict[Path, bytes]:  # the write lock's file says who holds it: not datastore content
        return {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file() and p.name != LOCK_FILE}

    before = files()
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"Open.\tOffnen.\nClose.\tSchlie\x00en.\n")
    args = [
        "-q",
        "build",
        "--model",
        str(toy / "model"),
        "--corpus",
        str(bad),
        "--out",
        str(copy),
        "--append",
    ]
    assert main(args) == EXIT_FAILURE
    assert f"{bad}:2: NUL byte" in caplog.text
    assert files() == before


def test_closed_stdout_ends_quietly(datastore: Path) -> None:
    """`knnmt info ds | head -1`: the reader goes away; no BrokenPipeError traceback, exit 1."""
    src = str(Path(knnmt.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "knnmt.apps.cli", "info", str(datastore)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child writes: its first write finds no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_FAILURE
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
