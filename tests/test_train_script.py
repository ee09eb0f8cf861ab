"""``scripts/train_base_model.py``: a run is reproduced bit for bit by its step count, and a changed
training file never trains on the tokenizer or encoded cache of the old one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from knnmt.hf.toy import toy_corpus

pytestmark = pytest.mark.slow  # seven small training runs in subprocesses

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_base_model.py"
TINY = [
    "--vocab-size", "120", "--d-model", "16", "--ffn-dim", "32", "--heads", "2",
    "--encoder-layers", "1", "--decoder-layers", "1", "--max-tokens", "256", "--threads", "1",
    "--eval-steps", "3", "--dev-eval-size", "4", "--eval-batch-size", "4", "--no-final-eval",
]  # fmt: skip


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


def train(tmp: Path, run: str, train_file: Path, dev: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--train", str(train_file), "--dev", str(dev), "--test", str(dev),
         "--target-test", str(dev), "--run-dir", str(tmp / run), "--export-dir", str(tmp / f"{run}-model"),
         *TINY, *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("train")
    pairs = toy_corpus(300, seed=5)
    train_file = write_pairs(tmp / "train.tsv", pairs[:280])
    dev = write_pairs(tmp / "dev.tsv", pairs[280:])
    return tmp, train_file, dev


def test_same_steps_same_weights(corpus: tuple[Path, Path, Path]) -> None:
    tmp, train_file, dev = corpus
    for run in ("a", "b"):
        done = train(tmp, run, train_file, dev, "--max-steps", "7")
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = (tmp / f"{run}-model" / "model.safetensors" for run in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    # the history records a hash of the fp32 weights at every evaluation, the same in both runs
    histories = [json.loads((tmp / run / "history.json").read_text()) for run in ("a", "b")]
    assert [h["step"] for h in histories[0]] == [3, 6, 7]
    assert [h["weights_sha256"] for h in histories[0]] == [h["weights_sha256"] for h in histories[1]]
    assert len({h["weights_sha256"] for h in histories[0]}) == 3
    card = (tmp / "a-model" / "README.md").read_text(encoding="utf-8")
    assert "scripts/train_base_model.py --max-steps 7" in card  # the reproduce command names the steps
    # resuming a stopped run continues where it stopped: 4 + 3 steps equal 7 steps, and resuming a
    # finished run trains nothing more
    for steps in ("4", "7", "7"):
        done = train(tmp, "c", train_file, dev, "--max-steps", steps, "--resume")
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp / "c-model" / "model.safetensors").read_bytes() != a.read_bytes() or steps == "7"
    assert (tmp / "c-model" / "model.safetensors").read_bytes() == a.read_bytes()


def test_changed_training_file_is_not_trained_from_a_stale_cache(corpus: tuple[Path, Path, Path]) -> None:
    tmp, train_file, dev = corpus
    done = train(tmp, "d", train_file, dev, "--max-steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    changed = write_pairs(tmp / "changed.tsv", toy_corpus(300, seed=6)[:250])
    for refused in (
        train(tmp, "d", changed, dev, "--max-steps", "4", "--resume"),
        train(tmp, "d", changed, dev, "--export-only"),
        train(tmp, "d", train_file, dev, "--max-steps", "4", "--resume", "--lr", "0.01"),
    ):
        assert refused.returncode != 0 and "other settings or data" in refused.stderr
    assert "lr 0.001 → 0.01" in refused.stderr  # the message names what differs
    rebuilt = train(tmp, "d", changed, dev, "--max-steps", "2")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert "tokenizer, cache and checkpoints removed" in rebuilt.stderr
    card = (tmp / "d-model" / "README.md").read_text(encoding="utf-8")
    assert "250 pairs" in card
