"""Re-ranking by neighbourhood averaging: alpha query expansion (QE) and database-side
augmentation (DBA).

Both replace a vector by the re-normalised weighted sum of itself (weight 1) and its top-k gallery
neighbours, each weighted ``max(score, 0) ** alpha`` (Radenovic et al., "Fine-tuning CNN image
retrieval with no human annotation", 2018; alpha = 0 is plain average QE). QE does it to a query
and searches again; DBA does it once to every gallery vector, with the vector itself left out of
its own neighbours. When a product has several gallery images, its other images pull the
query (and each other) toward the product -- the reason MCS2023's leading solutions used both.
When it has one, there is nothing of the same product to pull toward, and both tend to hurt:
on emoji-shop every setting tried lowered mAP@1000, so both are off unless asked for.
Everything is vectorised in row blocks, so memory stays bounded for any number of rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Rows per block: a block gathers (rows, k, D) float32 neighbour vectors; 4M elements = 16 MiB.
_BLOCK_ELEMENTS = 1 << 22
# Gallery rows searched at a time by augment_gallery.
_SEARCH_ROWS = 1 << 16

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Rerank:
    """Re-ranking settings; ``k == 0`` switches a step off."""

    qe_k: int = 0
    qe_alpha: float = 3.0
    dba_k: int = 0
    dba_alpha: float = 3.0

    def __post_init__(self) -> None:
        negative = [f"{name}={value}" for name, value in self.to_dict().items() if value < 0]
        if negative:
            raise ValueError(f"re-ranking settings must be >= 0: {', '.join(negative)}")

    def to_dict(self) -> dict[str, float]:
        return {
            "qe_k": self.qe_k,
            "qe_alpha": self.qe_alpha,
            "dba_k": self.dba_k,
            "dba_alpha": self.dba_alpha,
        }


def neighbour_average(
    vectors: np.ndarray, pool: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float
) -> np.ndarray:
    """``normalise(v_i + sum_j max(s_ij, 0) ** alpha * pool[n_ij])`` for every row ``i``.

    ``neighbours``/``scores`` are ``(N, k)`` rows into ``pool`` and their similarities to
    ``vectors``; ``pool`` may be a memmap (only the neighbours are read).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    neighbours = np.asarray(neighbours)
    scores = np.asarray(scores, dtype=np.float32)
    if (
        vectors.ndim != 2
        or neighbours.shape != scores.shape
        or neighbours.shape[:1] != vectors.shape[:1]
    ):
        raise ValueError(
            f"need (N, D) vectors and (N, k) neighbours and scores, got {vectors.shape}, "
            f"{neighbours.shape} and {scores.shape}"
        )
    n, k = neighbours.shape
    out = vectors.copy()
    if k == 0:
        return out
    weights = np.maximum(scores, 0) ** np.float32(alpha)
    block = max(1, _BLOCK_ELEMENTS // (k * vectors.shape[1]))
    for start in range(0, n, block):
        stop = min(n, start + block)
        ids = neighbours[start:stop]
        gathered = np.asarray(pool[ids.ravel()], dtype=np.float32).reshape(*ids.shape, -1)
        out[start:stop] += np.einsum("bk,bkd->bd", weights[start:stop], gathered)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, np.finfo(np.float32).tiny)


def query_expansion(
    queries: np.ndarray,
    gallery: np.ndarray,
    neighbours: np.ndarray,
    scores: np.ndarray,
    k: int,
    alpha: float,
) -> np.ndarray:
    """alpha-QE: each query averaged with its top ``k`` results (``neighbours`` best first)."""
    return neighbour_average(queries, gallery, neighbours[:, :k], scores[:, :k], alpha)


def without_self(
    neighbours: np.ndarray, scores: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of each row's ranked neighbours that are not the row itself: ``rows`` are
    the searched vectors' own rows (DBA over a gallery, recall measured leave-one-out).

    A row that does not find itself (a duplicate outranked it) drops its last neighbour instead.
    """
    neighbours, scores = neighbours[:, : k + 1], scores[:, : k + 1]
    keep = neighbours != rows[:, None]
    keep[keep.all(axis=1), -1] = False
    return neighbours[keep].reshape(len(rows), k), scores[keep].reshape(len(rows), k)


def augment_gallery(gallery: np.ndarray, search: SearchFn, k: int, alpha: float) -> np.ndarray:
    """DBA: each gallery vector averaged with its top ``k`` gallery neighbours other than itself,
    which ``search`` (an index over ``gallery``) finds.

    The gallery is searched in row blocks, so neighbour lists never hold more than one block.
    """
    n = gallery.shape[0]
    if not 0 < k < n:
        raise ValueError(f"DBA k={k} needs 0 < k < {n} (the gallery size)")
    out = np.empty((n, gallery.shape[1]), np.float32)
    for start in range(0, n, _SEARCH_ROWS):
        stop = min(n, start + _SEARCH_ROWS)
        rows = np.asarray(gallery[start:stop], dtype=np.float32)
        idx, sims = search(rows, k + 1)
        out[start:stop] = neighbour_average(
            rows, gallery, *without_self(idx, sims, np.arange(start, stop), k), alpha
        )
    return out


def expanded_search(
    search: SearchFn, gallery: np.ndarray, queries: np.ndarray, k: int, qe_k: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Search, expand each query with its top ``qe_k`` results, and search again for ``k``."""
    if qe_k == 0:
        return search(queries, k)
    idx, sims = search(queries, qe_k)
    return search(query_expansion(queries, gallery, idx, sims, qe_k, alpha), k)
