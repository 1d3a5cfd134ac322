"""Exact search: a blocked numpy matrix product and top-k, perfect and fast enough below ~20k
vectors (``IndexSettings.exact_below``); also the ground truth ScaNN's recall is measured by."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vsearch_tf.config import IndexSettings
from vsearch_tf.index.base import as_queries, register

# (query block x gallery block) score matrix size: 16M float32 = 64 MiB (+2x that for
# argpartition's int64 output), whatever the gallery size.
_BLOCK_ELEMENTS = 1 << 24
# Gallery rows per block: 16M / 32K = 512 queries share each pass over the gallery, so a
# 1M-row gallery is read from memory once per 512 queries, not once per 16.
_GALLERY_ROWS = 1 << 15


@register
class ExactSearcher:
    """Brute-force inner-product search over ``embeddings`` (which may be a memmap).

    Queries are scored in blocks so the score matrix stays ~64 MiB for any gallery size.
    ``settings`` are kept so that a later rebuild of a grown gallery tunes ScaNN the same way.
    """

    backend = "exact"
    measured_recall: float | None = None

    def __init__(self, embeddings: np.ndarray, settings: IndexSettings | None = None) -> None:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got {embeddings.shape}")
        self.embeddings = embeddings
        self.settings = settings or IndexSettings()

    @property
    def count(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def params(self) -> dict[str, Any]:
        return {"metric": "dot_product"}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``min(k, N)`` by descending score; equal scores are ordered by index.

        Queries x gallery rows are scored tile by tile; each tile's best ``k`` are merged into
        a running best ``k`` per query.
        """
        queries = as_queries(queries, self.dim, k)
        n = self.count
        kk = min(k, n)
        rows = min(n, _GALLERY_ROWS)
        block = max(1, _BLOCK_ELEMENTS // rows)
        indices = np.empty((queries.shape[0], kk), dtype=np.int64)
        scores = np.empty((queries.shape[0], kk), dtype=np.float32)
        for start in range(0, queries.shape[0], block):
            chunk = queries[start : start + block]
            top = np.empty((len(chunk), 0), np.int64)
            top_scores = np.empty((len(chunk), 0), np.float32)
            for first in range(0, n, rows):
                sims = chunk @ np.asarray(self.embeddings[first : first + rows]).T
                best = _largest(sims, kk)
                top = np.concatenate([top, best + first], axis=1)
                top_scores = np.concatenate([top_scores, np.take_along_axis(sims, best, 1)], 1)
                best = _largest(top_scores, kk)
                top, top_scores = (
                    np.take_along_axis(top, best, 1),
                    np.take_along_axis(top_scores, best, 1),
                )
            order = np.lexsort((top, -top_scores), axis=1)
            indices[start : start + block] = np.take_along_axis(top, order, axis=1)
            scores[start : start + block] = np.take_along_axis(top_scores, order, axis=1)
        return indices, scores

    def save(self, folder: Path) -> None:
        """Nothing to write: the folder's ``embeddings.npy`` is the whole index."""

    @classmethod
    def load(
        cls, folder: Path, manifest: dict[str, Any], embeddings: np.ndarray, settings: IndexSettings
    ) -> ExactSearcher:
        return cls(embeddings, settings)


def _largest(scores: np.ndarray, k: int) -> np.ndarray:
    """Column positions of each row's ``k`` largest scores, unordered (all columns if fewer)."""
    cols = scores.shape[1]
    if k >= cols:
        return np.broadcast_to(np.arange(cols), scores.shape)
    return np.argpartition(scores, cols - k, axis=1)[:, cols - k :]
