"""The command line: subcommands end to end on the toy model, exit codes, messages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from knnmt.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from knnmt.toy import build_toy_model


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
