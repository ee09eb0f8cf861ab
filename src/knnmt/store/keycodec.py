"""How a datastore stores its keys on disk: the key codec named in the manifest.

``fp16``
    IEEE half precision, ``2·dim`` bytes per entry (knnmt's original format; manifest version 1).
``sq8``
    faiss's 8-bit scalar quantizer (``ScalarQuantizer.QT_8bit``): one byte per dimension, each
    dimension's range learnt once from the first shard written and saved in the manifest, so every
    later shard and append is encoded the same way. Half the disk of ``fp16``; the exact re-rank and
    index training decode it back to float32 (error: about 1/510 of each dimension's range). Manifest
    version 2, so that older knnmt refuses the datastore instead of misreading its keys.

The codec sits in the manifest's ``key`` object: ``{"dtype": "uint8", "codec": {"name": "sq8",
"vmin": [dim floats], "vdiff": [dim floats]}}``; an ``fp16`` datastore has ``{"dtype": "float16"}``
and no ``codec`` (as before the codec existed).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from ..core.config import KEY_STORAGES
from ..core.errors import DatastoreError, UsageError

#: Rows of the first shard the sq8 ranges are learnt from (evenly spaced).
SQ8_TRAIN_ROWS = 65_536
#: The learnt range of every dimension is widened by this fraction on both sides, so that keys of
#: later shards slightly outside the first shard's range are not clipped.
SQ8_MARGIN = 0.05


class KeyCodec:
    """Encodes float keys ``[n, dim]`` to the stored dtype and decodes them back to float32.

    Args:
        name: ``"fp16"`` or ``"sq8"``.
        dim: key dimension.
        params: sq8 only: ``[2, dim]`` float32 ``(vmin, vdiff)`` of a trained codec (``None``: untrained;
            the first :meth:`train` learns it).
    """

    def __init__(self, name: str, dim: int, params: np.ndarray | None = None) -> None:
        if name not in KEY_STORAGES:
            raise UsageError(f"key storage must be one of {KEY_STORAGES}, got {name!r}")
        self.name = name
        self.dim = dim
        self._sq: Any = None
        if name == "sq8":
            self._sq = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit)
            if params is not None:
                params = np.asarray(params, dtype=np.float32)
                if params.shape != (2, dim) or not np.isfinite(params).all() or (params[1] <= 0).any():
                    raise DatastoreError(
                        f"sq8 key codec: expected finite ranges of shape (2, {dim}) with positive widths"
                    )
                faiss.copy_array_to_vector(params.reshape(-1), self._sq.trained)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype of ``keys.npy``: float16 or uint8."""
        return np.dtype(np.uint8) if self.name == "sq8" else np.dtype(np.float16)

    @property
    def bytes_per_entry(self) -> int:
        return self.dim * self.dtype.itemsize

    @property
    def trained(self) -> bool:
        return self._sq is None or self._sq.trained.size() == 2 * self.dim

    @property
    def params(self) -> np.ndarray | None:
        """sq8: ``[2, dim]`` ``(vmin, vdiff)``; ``None`` for fp16 or an untrained codec."""
        if self._sq is None or not self.trained:
            return None
        return faiss.vector_to_array(self._sq.trained).reshape(2, self.dim)

    def train(self, sample: np.ndarray) -> None:
        """Learn each dimension's range from ``sample`` (float ``[n, dim]``), widened by
        :data:`SQ8_MARGIN` (no-op for fp16 or a codec already trained)."""
        if self.trained:
            return
        x = np.asarray(sample, dtype=np.float32)
        low, high = x.min(axis=0), x.max(axis=0)
        width = np.maximum(high - low, 1e-6)
        params = np.stack([low - SQ8_MARGIN * width, (1 + 2 * SQ8_MARGIN) * width]).astype(np.float32)
        faiss.copy_array_to_vector(params.reshape(-1), self._sq.trained)

    def encode(self, keys: np.ndarray) -> np.ndarray:
        """float ``[n, dim]`` -> stored dtype ``[n, dim]`` (sq8 clips values outside the learnt range)."""
        if self._sq is None:
            return np.asarray(keys, dtype=np.float16)
        if not self.trained:
            raise DatastoreError("sq8 key codec used before it was trained")
        x = np.ascontiguousarray(keys, dtype=np.float32)
        out: np.ndarray = self._sq.compute_codes(x)
        return out

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored ``[..., dim]`` -> float32 ``[..., dim]`` (a new array the caller may modify)."""
        if self._sq is None:
            # widened by torch: numpy's fp16 -> fp32 conversion has no SIMD path and took 0.7 ms of the
            # 0.9 ms of one decoding step's re-rank gather (32 x 64 keys)
            array = np.ascontiguousarray(stored)
            if not array.flags.writeable:  # a read-only memory map: torch wants memory it may write
                array = array.copy()
            return torch.from_numpy(array).float().numpy()
        flat = np.ascontiguousarray(stored, dtype=np.uint8).reshape(-1, self.dim)
        out: np.ndarray = self._sq.decode(flat) if len(flat) else np.zeros((0, self.dim), np.float32)
        return out.reshape(stored.shape)

    def manifest_fields(self) -> dict[str, Any]:
        """The manifest ``key`` fields that describe this codec (``dtype``, and ``codec`` for sq8)."""
        if self._sq is None:
            return {"dtype": "float16"}
        params = self.params
        codec: dict[str, Any] = {"name": "sq8"}
        if params is not None:
            codec.update(vmin=params[0].tolist(), vdiff=params[1].tolist())
        return {"dtype": "uint8", "codec": codec}

    @classmethod
    def from_manifest(cls, key: dict[str, Any]) -> KeyCodec:
        """The codec described by a manifest's ``key`` object (checked by ``read_manifest``)."""
        dim = int(key["dim"])
        codec = key.get("codec")
        if codec is None:
            return cls("fp16", dim)
        params = None
        if "vmin" in codec:
            params = np.array([codec["vmin"], codec["vdiff"]], dtype=np.float32)
        return cls(str(codec["name"]), dim, params)


def check_codec_fields(key: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's ``key`` codec fields (``None`` when they are valid)."""
    codec = key.get("codec")
    if codec is None:
        try:
            return None if np.dtype(key.get("dtype")).kind == "f" else "'key.dtype' must be a float dtype"
        except TypeError:
            return "'key.dtype' must be a numpy dtype name such as 'float16'"
    if not isinstance(codec, dict) or codec.get("name") != "sq8":
        return f"'key.codec' must be {{'name': 'sq8', ...}}, found {str(codec)[:60]}"
    if key.get("dtype") != "uint8":
        return "'key.dtype' must be 'uint8' with the sq8 codec"
    dim = key.get("dim")
    for name in ("vmin", "vdiff"):
        values = codec.get(name)
        if values is not None and (not isinstance(values, list) or len(values) != dim):
            return f"'key.codec.{name}' must be a list of {dim} numbers"
    if ("vmin" in codec) != ("vdiff" in codec):
        return "'key.codec' must have both 'vmin' and 'vdiff', or neither"
    return None
