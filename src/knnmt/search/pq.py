"""Product quantisation with asymmetric distance computation (ADC) in torch.

A product quantiser splits a ``D``-dimensional vector into ``M`` sub-vectors of ``dsub = D / M``
dimensions and replaces each by the index of its nearest centroid among ``ksub = 2**nbits`` (one
byte per sub-vector for ``nbits = 8``). The squared L2 distance of a query to a coded vector is then
approximated without decoding anything: a look-up table ``LUT [M, ksub]`` of the query's
sub-vector-to-centroid distances is computed once per query, and the distance to a code ``c [M]`` is
``Σ_m LUT[m, c_m]`` (asymmetric: the query is exact, only the key is quantised).

Training and encoding use faiss's ``ProductQuantizer``; the look-up tables and their sums run in
torch, so the same code serves a CPU and a GPU. :meth:`PQCodebook.faiss_index` builds a faiss
``IndexPQ`` over given codes for the CPU fast path (same distances, computed in C++).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ..core.durable import atomic_path
from ..core.errors import DatastoreError, UsageError


def pq_subquantizers(dim: int, nbits: int = 8) -> int:
    """Sub-quantisers for ``dim / 8`` bytes of PQ code per key, a divisor of ``dim``: ``dim / 8`` of 8
    bits (at most 64) or, for 4-bit codes of an even ``dim``, ``dim / 4`` (at most 128, even, as
    fast-scan packs codes in pairs; ``m = 2`` always tiles an even key); other widths ``dim / 8``.
    The one rule behind the automatic IVF factory and Subset kNN-MT's codes."""
    if nbits == 4 and dim % 2 == 0:
        m = min(128, max(2, dim // 4))
        while dim % m or m % 2:
            m -= 1
        return m
    m = min(64, max(1, dim // 8))
    while dim % m:
        m -= 1
    return m


class PQCodebook:
    """Trained product-quantisation centroids.

    Args:
        centroids: ``[M, ksub, dsub]`` float32.
    """

    def __init__(self, centroids: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> None:
        c = torch.as_tensor(np.asarray(centroids, dtype=np.float32)).float()
        if c.dim() != 3:
            raise UsageError(f"PQ centroids must be [M, ksub, dsub], got shape {tuple(c.shape)}")
        self.centroids = c.to(device).contiguous()  # [M, ksub, dsub]
        self.m, self.ksub, self.dsub = (int(s) for s in c.shape)
        self.dim = self.m * self.dsub
        self.nbits = int(self.ksub).bit_length() - 1
        if 2**self.nbits != self.ksub:
            raise UsageError(f"PQ codebooks must have a power-of-two size, got {self.ksub}")
        self._sq_norms = (self.centroids**2).sum(-1)  # [M, ksub]
        self._faiss_pq: faiss.ProductQuantizer | None = None

    # ---- training and coding (faiss) ------------------------------------------------------
    @classmethod
    def train(cls, sample: np.ndarray, m: int, nbits: int = 8, seed: int = 1234) -> PQCodebook:
        """Train ``m`` sub-quantisers of ``2**nbits`` centroids on ``sample`` ``[n, dim]`` float32."""
        n, dim = sample.shape
        if m < 1 or dim % m:
            raise UsageError(f"PQ sub-quantisers ({m}) must divide the key dimension ({dim})")
        if not 1 <= nbits <= 8:
            raise UsageError(f"PQ bits per code must be in [1, 8], got {nbits}")
        if n < 2**nbits:
            raise UsageError(f"PQ training needs at least {2**nbits} vectors, got {n}")
        pq = faiss.ProductQuantizer(dim, m, nbits)
        pq.cp.seed = seed
        pq.train(np.ascontiguousarray(sample, dtype=np.float32))
        centroids = faiss.vector_to_array(pq.centroids).reshape(m, 2**nbits, dim // m)
        book = cls(centroids)
        book._faiss_pq = pq
        return book

    def faiss_pq(self) -> faiss.ProductQuantizer:
        """The equivalent faiss ``ProductQuantizer`` (built once, on the CPU)."""
        if self._faiss_pq is None:
            pq = faiss.ProductQuantizer(self.dim, self.m, self.nbits)
            faiss.copy_array_to_vector(self.centroids.cpu().numpy().reshape(-1), pq.centroids)
            self._faiss_pq = pq
        return self._faiss_pq

    @property
    def code_size(self) -> int:
        """Bytes of one bit-packed code (faiss's ``code_size``): ``ceil(M · nbits / 8)``."""
        return (self.m * self.nbits + 7) // 8

    def encode(self, x: np.ndarray, packed: bool = False) -> np.ndarray:
        """Codes of ``x`` ``[n, dim]``: ``[n, M]`` uint8 (one byte per sub-vector, ``nbits <= 8``), or
        faiss's bit-packed ``[n, code_size]`` when ``packed``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        pq = self.faiss_pq()
        codes = np.asarray(pq.compute_codes(x), dtype=np.uint8)  # [n, code_size] bit-packed
        if packed or self.nbits == 8:
            return codes
        return self.unpack(codes)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """Bit-packed faiss codes ``[n, code_size]`` -> one uint8 per sub-quantiser ``[n, M]`` (faiss
        packs LSB first)."""
        if self.nbits == 8:
            return np.asarray(packed, dtype=np.uint8)
        n = len(packed)
        bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : self.m * self.nbits]
        bits = bits.reshape(n, self.m, self.nbits).astype(np.uint8)
        weights = (1 << np.arange(self.nbits, dtype=np.uint16)).astype(np.uint8)
        return (bits * weights).sum(-1).astype(np.uint8)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """One uint8 per sub-quantiser ``[n, M]`` -> faiss's bit-packed ``[n, code_size]``."""
        if self.nbits == 8:
            return np.ascontiguousarray(codes, dtype=np.uint8)
        n = len(codes)
        bits = ((codes[:, :, None] >> np.arange(self.nbits)) & 1).astype(np.uint8).reshape(n, -1)
        return np.packbits(bits, axis=1, bitorder="little")

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstruction ``[n, dim]`` float32 of codes ``[n, M]``."""
        c = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=self.centroids.device)
        parts = self.centroids[torch.arange(self.m, device=c.device), c]  # [n, M, dsub]
        return parts.reshape(len(codes), self.dim).cpu().numpy()

    # ---- asymmetric distances (torch) -----------------------------------------------------
    def luts(self, queries: torch.Tensor) -> torch.Tensor:
        """Look-up tables ``[R, M, ksub]`` of squared L2 from each query sub-vector to each centroid.

        Args:
            queries: ``[R, dim]`` float32 (on the codebook's device).
        """
        q = queries.float().reshape(len(queries), self.m, self.dsub).transpose(0, 1)  # [M, R, dsub]
        dots = torch.bmm(q, self.centroids.transpose(1, 2))  # [M, R, ksub]
        out = (q**2).sum(-1, keepdim=True) - 2 * dots + self._sq_norms[:, None, :]
        return out.transpose(0, 1).contiguous()  # [R, M, ksub]

    def flat_codes(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Codes ``[S, M]`` as offsets ``m * ksub + c_m`` into a flattened LUT: ``[S * M]`` int32 (on the
        codebook's device; int32 halves the memory traffic of int64). Computed once per code set, then
        reused by :meth:`adc` at every step."""
        c = torch.as_tensor(np.asarray(codes) if isinstance(codes, np.ndarray) else codes)
        c = c.to(device=self.centroids.device, dtype=torch.int32)
        base = torch.arange(self.m, device=c.device, dtype=torch.int32) * self.ksub
        return (c + base).reshape(-1)

    def adc(self, luts: torch.Tensor, flat_codes: torch.Tensor) -> torch.Tensor:
        """ADC distances ``[R, S]``: ``Σ_m luts[r, m, codes[s, m]]``.

        Args:
            luts: ``[R, M, ksub]`` from :meth:`luts`.
            flat_codes: ``[S * M]`` int32/int64 from :meth:`flat_codes`.
        """
        rows = luts.shape[0]
        picked = luts.reshape(rows, self.m * self.ksub).index_select(1, flat_codes)  # [R, S*M]
        return picked.view(rows, -1, self.m).sum(-1)

    def faiss_index(self, codes: np.ndarray, fast_scan: bool = False, packed: bool = False) -> Any:
        """A faiss ``IndexPQ`` holding ``codes`` ``[S, M]`` (or bit-packed ``[S, code_size]`` when
        ``packed``) (CPU; its search computes the same ADC).

        ``fast_scan``: for 4-bit codes of an even ``M``, the ``IndexPQFastScan`` made from it (faiss
        packs the codes in blocks of 32 and scores them with SIMD look-up tables rounded to 8 bits:
        several times faster, distances approximate to about 1 %); other codes stay ``IndexPQ``."""
        index: Any = faiss.IndexPQ(self.dim, self.m, self.nbits)
        faiss.copy_array_to_vector(self.centroids.cpu().numpy().reshape(-1), index.pq.centroids)
        index.is_trained = True
        if len(codes):
            index.add_sa_codes(np.ascontiguousarray(codes) if packed else self.pack(codes))
        if fast_scan and self.nbits == 4 and self.m % 2 == 0:
            return faiss.IndexPQFastScan(index)
        return index

    # ---- storage --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Save the centroids as ``.npy`` (``[M, ksub, dsub]`` float32)."""
        with atomic_path(path) as tmp:
            np.save(tmp, self.centroids.cpu().numpy())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> PQCodebook:
        try:
            centroids = np.load(path)
        except (OSError, ValueError) as exc:
            raise DatastoreError(f"cannot read PQ codebooks {path}: {exc}") from None
        return cls(centroids, device)
