"""A complete datastore written from arrays, without a model: for tests and benchmarks of the layers
that only read keys and values (indexes, retrievers, the kNN math)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.durable import write_json_atomic
from .datastore import FORMAT, MANIFEST, VERSION, Datastore, ShardWriter


def write_synthetic_datastore(
    path: Path, keys: np.ndarray, values: np.ndarray, shard_size: int, fingerprint: str = "synthetic"
) -> Datastore:
    """A complete datastore of arbitrary ``keys``/``values`` written with :class:`ShardWriter`.

    Each entry is its own one-token "sentence" (enough for index tests; no model needed).
    """
    path.mkdir(parents=True)
    count, dim = keys.shape
    shards = []
    for number, lo in enumerate(range(0, count, shard_size)):
        hi = min(lo + shard_size, count)
        name = f"{number:05d}"
        writer = ShardWriter(path, name, hi - lo, dim, hi - lo)
        writer.keys[:] = keys[lo:hi]
        writer.values[:] = values[lo:hi]
        writer.sentence_ids[:] = np.arange(lo, hi)
        writer.positions[:] = 0
        writer.offsets[:] = np.arange(hi - lo + 1)
        writer.finish(
            [{"id": i, "src": f"s{i}", "tgt": f"t{i}", "corpus": 0, "line": i + 1} for i in range(lo, hi)]
        )
        shards.append(
            {
                "name": name,
                "count": hi - lo,
                "sentences": hi - lo,
                "first_sentence": lo,
                "corpus": 0,
                "skipped_empty": 0,
                "truncated": 0,
            }
        )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "state": "complete",
        "count": count,
        "sentences": count,
        "model": {"name": "synthetic", "class": "None", "config_class": "None", "fingerprint": fingerprint},
        "tokenizer": {"class": "None", "fingerprint": "none", "vocab_size": int(values.max()) + 1},
        "key": {"layer": "ffn_input", "module": "none", "dim": dim, "dtype": "float16"},
        "values_dtype": "int32",
        "tokenization": {},
        "shards": shards,
        "corpora": [
            {
                "paths": ["synthetic"],
                "sentences": count,
                "skipped_empty": 0,
                "truncated": 0,
                "state": "complete",
            }
        ],
        "build": {},
    }
    write_json_atomic(path / MANIFEST, manifest)
    return Datastore.open(path)
