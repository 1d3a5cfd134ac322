"""ScaNN: a tree over ~sqrt(N) leaves, anisotropic hashing and exact reordering, for galleries
too large for exact search. Training is here; the search knobs are set by
:func:`vsearch_tf.index.tuning.tune`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from vsearch_tf.config import IndexSettings
from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.index.base import as_queries, register

SCANN_DIR = "scann"  # inside the index folder
_SEARCH_PARAMS = ("num_leaves", "leaves_to_search", "reorder_factor")
# Params fixed when ScaNN is trained; the others are search knobs, re-tuned after updates.
_TRAINED_PARAMS = (
    "metric",
    "num_leaves",
    "dims_per_block",
    "anisotropic_quantization_threshold",
    "training_sample_size",
    "seed",
)
_MAX_LEAVES = 4_000
_UPSERT_BATCH = 256


def _scann() -> Any:
    """Import ScaNN lazily: it pulls in TensorFlow (~5 s), which exact search never needs."""
    from scann.scann_ops.py import scann_ops_pybind

    return scann_ops_pybind


@register
class ScannSearcher:
    """ScaNN tree + anisotropic hashing + float32 reordering, searched with threads.

    Search-time knobs live in ``params`` (and so in the manifest): per query, ScaNN scores
    the points of ``leaves_to_search`` leaves with the quantised codes, then re-scores the
    best ``reorder_factor * k`` of them exactly. ``params["large_k"]`` holds a second set,
    tuned for the evaluation k, used for any k above ``recall_k``.
    """

    backend = "scann"

    def __init__(
        self,
        searcher: Any,
        params: dict[str, Any],
        dim: int,
        measured_recall: float | None = None,
        settings: IndexSettings | None = None,
    ) -> None:
        self.searcher = searcher
        self._params = dict(params)
        self.dim = dim
        self.measured_recall = measured_recall
        self.settings = settings or IndexSettings()

    @classmethod
    def train(cls, embeddings: np.ndarray, settings: IndexSettings) -> ScannSearcher:
        """Train on ``embeddings`` (~sqrt(N) leaves, seeded); its search knobs are not set yet."""
        n, dim = embeddings.shape
        num_leaves = int(max(2, min(round(math.sqrt(n)), n // 50, _MAX_LEAVES)))
        sample, seed, k = min(n, 100_000), settings.seed, settings.num_neighbors
        scann = _scann()
        config = (
            scann.builder(embeddings, k, "dot_product")
            .tree(num_leaves, max(1, math.ceil(num_leaves * 0.05)), training_sample_size=sample)
            .score_ah(2, anisotropic_quantization_threshold=0.2, training_sample_size=sample)
            .reorder(10 * k)
            .create_config()
        )
        # The builder has no seed option; the config proto does.
        config = config.replace("partitioning {", f"partitioning {{\n clustering_seed: {seed}", 1)
        config = config.replace(
            "asymmetric_hash {",
            f"asymmetric_hash {{\n clustering_seed: {seed}\n sampling_seed: {seed}",
            1,
        )
        raw = scann.create_searcher(
            np.ascontiguousarray(embeddings, dtype=np.float32), config, os.cpu_count() or 1
        )
        params = {
            "metric": "dot_product",
            "num_leaves": num_leaves,
            "dims_per_block": 2,
            "anisotropic_quantization_threshold": 0.2,
            "training_sample_size": sample,
            "seed": seed,
        }
        return cls(raw, params, dim, settings=settings)

    @property
    def count(self) -> int:
        return int(self.searcher.size())

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def trained_params(self) -> dict[str, Any]:
        """The params fixed by training, without the search knobs tuning sets."""
        return {k: v for k, v in self._params.items() if k in _TRAINED_PARAMS}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``min(k, N)`` by descending approximate-then-reordered score."""
        p = self._params
        large = p.get("large_k")
        if large is not None and k > p["recall_k"]:
            return self.search_with(queries, k, large["leaves_to_search"], large["reorder_factor"])
        return self.search_with(queries, k, p["leaves_to_search"], p["reorder_factor"])

    def search_with(
        self,
        queries: np.ndarray,
        k: int,
        leaves_to_search: int,
        reorder_factor: int,
        plus_self: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search with the given knobs (tuning tries them out).

        ``plus_self``: the queries are gallery rows; return k + 1 results, giving the extra
        one (the query itself) one extra reorder slot, so the other k are searched exactly as a
        fresh query's k would be (a budget of reorder_factor x (k + 1) would flatter recall)."""
        queries = as_queries(queries, self.dim, k)
        n, num_leaves = self.count, self._params["num_leaves"]
        kk = min(k + plus_self, n)
        reorder = min(n, reorder_factor * (kk - plus_self) + plus_self)
        # Large k needs enough leaves to hold k candidates: ~2k points on average.
        leaves = min(num_leaves, max(leaves_to_search, math.ceil(2 * kk * num_leaves / n)))
        indices, scores = self.searcher.search_batched_parallel(queries, kk, reorder, leaves)
        # Leaves are uneven: a query whose leaves held fewer than k points comes back padded
        # with NaN scores. Search those few again over every leaf.
        short = np.isnan(scores).any(axis=1)
        if short.any():
            indices[short], scores[short] = self.searcher.search_batched_parallel(
                queries[short], kk, n, num_leaves
            )
        return indices.astype(np.int64), scores.astype(np.float32)

    def remove_rows(self, rows: np.ndarray) -> np.ndarray:
        """Delete datapoints ``rows`` in place; returns ``order``: new row i = old row ``order[i]``.

        ScaNN deletes one datapoint at a time and fills each hole with its current last
        datapoint, so positions shift as it goes. The same moves are replayed here to give
        the caller the new row order, and checked against the moves ScaNN reports.
        """
        n = self.count
        order = np.arange(n)
        position = np.arange(n)  # position[row before] = where that row sits now
        holes = []
        for last, row in zip(range(n - 1, -1, -1), rows):
            hole = int(position[row])
            holes.append(hole)
            order[hole] = order[last]
            position[order[hole]] = hole
        moved_from = self.searcher.searcher.delete(holes)
        if list(moved_from) != list(range(n - 1, n - 1 - len(holes), -1)):
            raise RuntimeError(
                f"ScaNN delete moved datapoints {moved_from[:5]}..., not the last ones"
            )
        return order[: n - len(holes)]

    def append(self, vectors: np.ndarray) -> None:
        """Append rows: each goes to its nearest leaf, coded with the trained codebooks."""
        n = self.count
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        got = self.searcher.searcher.upsert([None] * len(vectors), vectors, _UPSERT_BATCH)
        if list(got) != list(range(n, n + len(vectors))):
            raise RuntimeError(f"ScaNN upsert placed new datapoints at {got[:5]}..., not from {n}")

    def save(self, folder: Path) -> None:
        """Serialise to ``folder/scann`` with relative asset paths, so the folder can be moved
        (atomic rename)."""
        (folder / SCANN_DIR).mkdir(parents=True)
        self.searcher.serialize(str(folder / SCANN_DIR), relative_path=True)

    @classmethod
    def load(
        cls, folder: Path, manifest: dict[str, Any], embeddings: np.ndarray, settings: IndexSettings
    ) -> ScannSearcher:
        path = folder / SCANN_DIR
        if not path.is_dir():
            raise VSearchError(f"{path}: missing ScaNN folder")
        absent = [p for p in _SEARCH_PARAMS if p not in manifest["params"]]
        if absent:
            raise VSearchError(f"{folder}: the manifest's ScaNN params lack {absent}")
        try:
            raw = _scann().load_searcher(str(path))
        except (RuntimeError, ValueError, OSError) as err:
            raise VSearchError(f"{path}: cannot load ScaNN searcher ({one_line(err)})") from err
        raw.set_num_threads(os.cpu_count() or 1)
        return cls(
            raw, manifest["params"], manifest["dim"], manifest.get("measured_recall"), settings
        )
