"""Gallery embeddings on disk, nearest-neighbour searchers, and saved index folders.

Embeddings are L2-normalised, so every searcher ranks by inner product (= cosine). Small
galleries use exact numpy search; large ones use a ScaNN tree + anisotropic hashing + exact
reordering, tuned until a recall target measured against exact search is met, both at the
query k (10) and at the evaluation k (1000). Index folders take live updates -- rows added or
removed without retraining ScaNN -- and are only ever replaced whole, by one writer at a time,
so a job killed at any point leaves the previous index loadable.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.io import atomic_path, write_json
from vsearch_tf.rerank import augment_gallery, expanded_search

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS = "ids.csv"
EMBEDDINGS = "embeddings.npy"
SCANN_DIR = "scann"
ID_COLUMNS = ("seller_img_id", "product_id")

# (query block x gallery block) score matrix size for exact search: 16M float32 = 64 MiB (+2x
# that for argpartition's int64 output), whatever the gallery size.
_BLOCK_ELEMENTS = 1 << 24
# Gallery rows per exact-search block: 16M / 32K = 512 queries share each pass over the gallery,
# so a 1M-row gallery is read from memory once per 512 queries, not once per 16.
_GALLERY_ROWS = 1 << 15
# Rows copied at a time when streaming embeddings between .npy files.
_COPY_ROWS = 1 << 16
# Below this many vectors ScaNN's tree and quantisers have too little to train on, and exact
# search is instant anyway.
_SCANN_MIN_POINTS = 1_000
_RECALL_SAMPLE = 1_000
# Recall@1000 is averaged over 1,000 neighbours per query, so fewer queries measure it as well.
_LARGE_K_SAMPLE = 300
_MAX_LEAVES = 4_000
_SCANN_SEARCH_PARAMS = ("num_leaves", "leaves_to_search", "reorder_factor")
# ScaNN params fixed when it is trained; the others are search knobs, re-tuned after updates.
_TRAINED_PARAMS = (
    "metric",
    "num_leaves",
    "dims_per_block",
    "anisotropic_quantization_threshold",
    "training_sample_size",
    "seed",
)
_UPSERT_BATCH = 256
# Manifest history keeps the most recent operations only, so live updates cannot grow it forever.
_HISTORY = 100
# What build_searcher was asked for; recorded so add/remove/rebuild tune the same way.
DEFAULT_SETTINGS: dict[str, Any] = {
    "exact_below": 20_000,
    "num_neighbors": 10,
    "target_recall": 0.95,
    "large_k": 1_000,
    "seed": 0,
}


# --------------------------------------------------------------------------- embeddings store


def _stream_to_npy(path: Path, shape: tuple[int, int], blocks: Iterable[np.ndarray]) -> None:
    """Write consecutive row blocks into a float32 .npy, holding one block in memory at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    start = 0
    for block in blocks:
        out[start : start + len(block)] = block
        start += len(block)
    if start != shape[0]:
        raise ValueError(f"{path}: wrote {start} rows, expected {shape[0]}")
    out.flush()


class EmbeddingStore:
    """Embeddings written chunk by chunk, so a killed indexing job resumes where it stopped.

    Each chunk file appears atomically, so a chunk listed by ``done_chunks`` is complete.
    ``rows`` are the caller's row numbers (e.g. gallery CSV rows), kept next to each vector
    because images that fail to load are skipped.
    """

    _CHUNK_RE = re.compile(r"chunk-(\d+)\.npz")

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def chunk_path(self, i: int) -> Path:
        return self.dir / f"chunk-{i:05d}.npz"

    def write_chunk(
        self, i: int, embeddings: np.ndarray, rows: np.ndarray, fallbacks: np.ndarray = ()
    ) -> None:
        """Atomically write chunk ``i``: float32 ``(n, D)`` embeddings and int64 ``(n,)`` rows, and
        the rows whose box fell back to the whole image (so a resumed job still reports them)."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        if embeddings.ndim != 2 or rows.shape != (embeddings.shape[0],):
            raise ValueError(
                f"chunk {i}: need (n, D) embeddings and (n,) rows, got {embeddings.shape} "
                f"and {rows.shape}"
            )
        with atomic_path(self.chunk_path(i)) as tmp, open(tmp, "wb") as f:
            np.savez(
                f, embeddings=embeddings, rows=rows, fallbacks=np.asarray(fallbacks, dtype=np.int64)
            )

    def done_chunks(self) -> set[int]:
        """Indices of the chunks already on disk."""
        found = (self._CHUNK_RE.fullmatch(p.name) for p in self.dir.iterdir())
        return {int(m.group(1)) for m in found if m}

    def assemble(self, n_chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate the chunks, in chunk order, into ``embeddings.npy`` and ``rows.npy``.

        Vectors are streamed into a memmap one chunk at a time, so peak memory is one chunk,
        not twice the data. Returns a read-only memmap of the embeddings and the rows.
        Gaps in the chunk numbers (or fewer than ``n_chunks``) are a ``VSearchError``.
        """
        done = sorted(self.done_chunks())
        expected = n_chunks if n_chunks is not None else (done[-1] + 1 if done else 0)
        missing = sorted(set(range(expected)) - set(done))
        if missing or not done:
            raise VSearchError(
                f"{self.dir}: embedding chunks missing: {missing[:10] or 'all'}; rerun indexing "
                "to resume"
            )
        paths = [self.chunk_path(i) for i in range(expected)]
        rows = [self._load(p, "rows") for p in paths]
        # A chunk whose every image was unreadable holds (0, 0) embeddings: skip it.
        paths, rows = [p for p, r in zip(paths, rows) if r.size], [r for r in rows if r.size]
        if not paths:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        dim = self._load(paths[0], "embeddings").shape[1]

        def blocks() -> Iterator[np.ndarray]:
            for path, chunk_rows in zip(paths, rows):
                chunk = self._load(path, "embeddings")
                if chunk.shape != (chunk_rows.size, dim):
                    raise VSearchError(
                        f"{path}: embeddings are {chunk.shape}, expected ({chunk_rows.size}, {dim})"
                    )
                yield chunk

        out_path = self.dir / EMBEDDINGS
        with atomic_path(out_path) as tmp:
            _stream_to_npy(tmp, (sum(r.size for r in rows), dim), blocks())
        all_rows = np.concatenate(rows)
        with atomic_path(self.dir / "rows.npy") as tmp:
            np.save(tmp, all_rows)
        return np.load(out_path, mmap_mode="r"), all_rows

    def fallback_rows(self) -> np.ndarray:
        """The box-fallback rows recorded by every chunk on disk."""
        found = []
        for i in sorted(self.done_chunks()):
            with np.load(self.chunk_path(i)) as z:
                found.append(z["fallbacks"] if "fallbacks" in z.files else np.zeros(0, np.int64))
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    @staticmethod
    def _load(path: Path, key: str) -> np.ndarray:
        try:
            with np.load(path) as z:
                return z[key]
        except (OSError, ValueError, KeyError) as err:
            raise VSearchError(f"{path}: unreadable embedding chunk ({one_line(err)})") from err


# --------------------------------------------------------------------------------- searchers


def _as_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}), got {queries.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return queries


class ExactSearcher:
    """Brute-force inner-product search: exact, and fast enough for small galleries.

    Queries are scored in blocks so the score matrix stays ~64 MiB for any gallery size;
    ``embeddings`` may be a memmap. ``settings`` are what ``build_searcher`` was asked for,
    kept so that a later rebuild of a grown gallery tunes ScaNN the same way.
    """

    backend = "exact"
    measured_recall: float | None = None

    def __init__(self, embeddings: np.ndarray, settings: dict[str, Any] | None = None) -> None:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got {embeddings.shape}")
        self.embeddings = embeddings
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}

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
        queries = _as_queries(queries, self.dim, k)
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


def _largest(scores: np.ndarray, k: int) -> np.ndarray:
    """Column positions of each row's ``k`` largest scores, unordered (all columns if fewer)."""
    cols = scores.shape[1]
    if k >= cols:
        return np.broadcast_to(np.arange(cols), scores.shape)
    return np.argpartition(scores, cols - k, axis=1)[:, cols - k :]


def _scann() -> Any:
    """Import ScaNN lazily: it pulls in TensorFlow (~5 s), which exact search never needs."""
    from scann.scann_ops.py import scann_ops_pybind

    return scann_ops_pybind


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
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.searcher = searcher
        self._params = dict(params)
        self.dim = dim
        self.measured_recall = measured_recall
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}

    @property
    def count(self) -> int:
        return int(self.searcher.size())

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``min(k, N)`` by descending approximate-then-reordered score."""
        p = self._params
        large = p.get("large_k")
        if large is not None and k > p["recall_k"]:
            return self._search(queries, k, large["leaves_to_search"], large["reorder_factor"])
        return self._search(queries, k, p["leaves_to_search"], p["reorder_factor"])

    def _search(
        self,
        queries: np.ndarray,
        k: int,
        leaves_to_search: int,
        reorder_factor: int,
        plus_self: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``plus_self``: the queries are gallery rows; return k + 1 results, giving the extra
        one (the query itself) one extra reorder slot, so the other k are searched exactly as a
        fresh query's k would be (a budget of reorder_factor x (k + 1) would flatter recall)."""
        queries = _as_queries(queries, self.dim, k)
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

    def save(self, directory: Path) -> None:
        """Serialise with relative asset paths, so the folder can be moved (atomic rename)."""
        directory.mkdir(parents=True)
        self.searcher.serialize(str(directory), relative_path=True)

    @classmethod
    def load(
        cls,
        directory: Path,
        params: dict[str, Any],
        dim: int,
        measured_recall: float | None,
        settings: dict[str, Any] | None,
    ) -> ScannSearcher:
        raw = _scann().load_searcher(str(directory))
        raw.set_num_threads(os.cpu_count() or 1)
        return cls(raw, params, dim, measured_recall, settings)


Searcher = Union[ExactSearcher, ScannSearcher]


def _not_self(idx: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Mask keeping r of each row of (Q, r+1) results: all but the query itself (or the last)."""
    keep = idx != sample[:, None]
    keep[keep.all(axis=1), -1] = False
    return keep


def _true_scores(queries: np.ndarray, embeddings: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Exact scores of (Q, r) neighbours, gathered a few queries at a time (r may be 1000)."""
    out = np.empty(neighbours.shape, np.float32)
    block = max(1, _BLOCK_ELEMENTS // 16 // max(neighbours.shape[1] * queries.shape[1], 1))
    for start in range(0, len(queries), block):
        rows = neighbours[start : start + block]
        gathered = np.asarray(embeddings[rows.ravel()]).reshape(*rows.shape, -1)
        out[start : start + block] = np.einsum(
            "qd,qkd->qk", queries[start : start + block], gathered
        )
    return out


def _recall_at(
    searcher: ScannSearcher,
    embeddings: np.ndarray,
    sample: np.ndarray,
    truth_kth: np.ndarray,
    r: int,
    leaves_to_search: int,
    reorder_factor: int,
) -> tuple[float, float]:
    """Recall@r of gallery vectors used as queries, leaving each query's own vector out, and
    its one-sided 95% lower confidence bound (over queries).

    A returned neighbour counts as found if its true score reaches the exact r-th best score
    (minus float noise), so ties and duplicate images are not counted as misses.
    """
    queries = np.asarray(embeddings[sample])
    idx, _ = searcher._search(queries, r, leaves_to_search, reorder_factor, plus_self=True)
    neighbours = idx[_not_self(idx, sample)].reshape(len(sample), r)
    found = _true_scores(queries, embeddings, neighbours) >= truth_kth[:, None] - 1e-5
    per_query = found.mean(axis=1)
    mean = float(per_query.mean())
    return mean, mean - 1.645 * float(per_query.std()) / math.sqrt(len(sample))


def _cheapest_knobs(
    searcher: ScannSearcher,
    embeddings: np.ndarray,
    sample: np.ndarray,
    truth_kth: np.ndarray,
    r: int,
    target: float,
    start: tuple[int, int],
) -> tuple[int, int, float, float]:
    """Grow (leaves_to_search, reorder_factor) from ``start`` until recall@r reaches ``target``.

    "Reaches" means its 95% lower confidence bound does, so that fresh queries from the
    gallery's distribution meet the target too, not only the sample that chose the knobs.
    Each step doubles whichever knob gains more recall; the last doubling is then bisected
    back to the smallest value that still reaches the target, since doubling overshoots.
    Returns the knobs, recall and bound.
    """

    def recall(knobs: tuple[int, int]) -> tuple[float, float]:
        return _recall_at(searcher, embeddings, sample, truth_kth, r, *knobs)

    num_leaves = searcher.params()["num_leaves"]
    max_factor = math.ceil(searcher.count / (r + 1))
    leaves, factor = start
    previous = None
    measured, bound = recall(start)
    while bound < target:
        previous = (leaves, factor)
        steps = []
        if leaves < num_leaves:
            steps.append((min(num_leaves, 2 * leaves), factor))
        if factor < max_factor:
            steps.append((leaves, min(max_factor, 2 * factor)))
        if not steps:
            raise VSearchError(
                f"ScaNN reached recall@{r} {measured:.4f} < target {target} even when searching "
                "every leaf; lower --target-recall or use exact search"
            )
        results = [(recall(step), step) for step in steps]
        (measured, bound), (leaves, factor) = max(results, key=lambda t: t[0])
    if previous is not None:
        grown = 0 if leaves != previous[0] else 1
        low, high = previous[grown], (leaves, factor)[grown]  # low misses the target, high meets it
        while high - low > max(1, low // 4):
            middle = (low + high) // 2
            knobs = (middle, factor) if grown == 0 else (leaves, middle)
            result = recall(knobs)
            if result[1] >= target:
                high, (leaves, factor), (measured, bound) = middle, knobs, result
            else:
                low = middle
    return leaves, factor, measured, bound


def _tune(searcher: ScannSearcher, embeddings: np.ndarray) -> ScannSearcher:
    """Set the search knobs for the gallery ``searcher`` now holds (``embeddings``, row-aligned).

    With a ``target_recall`` setting, recall is measured leave-one-out: up to 1,000 gallery
    vectors are used as queries with their own row ignored, against exact search. The knobs
    grow from a cheap start until recall@``num_neighbors`` meets the target (its 95% lower
    confidence bound does); a second pair is
    grown from there until recall@``large_k`` (on 300 of the queries) meets it too, so that
    evaluation at k=1000 is as faithful as top-10 search. Without a target, ScaNN's usual
    defaults are used (5% of leaves, reorder 10 x k) and recall is not measured.
    """
    settings = searcher.settings
    params = {k: v for k, v in searcher.params().items() if k in _TRAINED_PARAMS}
    num_leaves, n, target = params["num_leaves"], searcher.count, settings["target_recall"]
    if target is None:
        params.update(leaves_to_search=max(1, math.ceil(num_leaves * 0.05)), reorder_factor=10)
        return ScannSearcher(searcher.searcher, params, searcher.dim, None, settings)

    r = min(settings["num_neighbors"], n - 1)
    big = min(settings["large_k"] or 0, n - 1)
    rng = np.random.default_rng(settings["seed"])
    sample = np.sort(rng.choice(n, size=min(_RECALL_SAMPLE, n), replace=False))
    truth_idx, truth_scores = ExactSearcher(embeddings).search(
        np.asarray(embeddings[sample]), max(r, big) + 1
    )
    truth = truth_scores[_not_self(truth_idx, sample)].reshape(len(sample), -1)
    leaves, factor, measured, bound = _cheapest_knobs(
        searcher,
        embeddings,
        sample,
        truth[:, r - 1],
        r,
        target,
        (max(1, math.ceil(num_leaves * 0.01)), 2),
    )
    params.update(
        leaves_to_search=leaves,
        reorder_factor=factor,
        target_recall=target,
        recall_k=r,
        recall_sample=int(sample.size),
        recall_lower_bound=bound,
    )
    if big > r:
        sub = np.linspace(0, len(sample) - 1, min(_LARGE_K_SAMPLE, len(sample))).round().astype(int)
        big_leaves, big_factor, big_measured, big_bound = _cheapest_knobs(
            searcher, embeddings, sample[sub], truth[sub, big - 1], big, target, (leaves, 1)
        )
        params["large_k"] = {
            "k": big,
            "leaves_to_search": big_leaves,
            "reorder_factor": big_factor,
            "measured_recall": big_measured,
            "recall_lower_bound": big_bound,
            "recall_sample": int(sub.size),
        }
    return ScannSearcher(searcher.searcher, params, searcher.dim, measured, settings)


def build_searcher(
    embeddings: np.ndarray,
    *,
    exact_below: int = 20_000,
    num_neighbors: int = 10,
    target_recall: float | None = None,
    large_k: int | None = 1_000,
    seed: int = 0,
) -> Searcher:
    """Pick and build the searcher for a gallery of L2-normalised float32 embeddings.

    Fewer than ``exact_below`` vectors (and never fewer than 1,000): exact search, which is
    both fast and perfect there. Otherwise ScaNN with ~sqrt(N) leaves, its search knobs set by
    ``_tune`` for ``target_recall`` at k = ``num_neighbors`` and k = ``large_k``.
    """
    embeddings = embeddings if isinstance(embeddings, np.memmap) else np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise VSearchError(f"nothing to index: embeddings have shape {embeddings.shape}")
    if target_recall is not None and not 0 < target_recall <= 1:
        raise VSearchError(f"target recall {target_recall} is not in (0, 1]")
    settings = {
        "exact_below": exact_below,
        "num_neighbors": num_neighbors,
        "target_recall": target_recall,
        "large_k": large_k,
        "seed": seed,
    }
    n, dim = embeddings.shape
    if n < max(exact_below, _SCANN_MIN_POINTS):
        return ExactSearcher(embeddings, settings)

    num_leaves = int(max(2, min(round(math.sqrt(n)), n // 50, _MAX_LEAVES)))
    train_sample = min(n, 100_000)
    scann = _scann()
    config = (
        scann.builder(embeddings, num_neighbors, "dot_product")
        .tree(num_leaves, max(1, math.ceil(num_leaves * 0.05)), training_sample_size=train_sample)
        .score_ah(2, anisotropic_quantization_threshold=0.2, training_sample_size=train_sample)
        .reorder(10 * num_neighbors)
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
    params: dict[str, Any] = {
        "metric": "dot_product",
        "num_leaves": num_leaves,
        "dims_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "training_sample_size": train_sample,
        "seed": seed,
    }
    return _tune(ScannSearcher(raw, params, dim, settings=settings), embeddings)


# ------------------------------------------------------------------------------ saved index


class Index:
    """A loaded index folder: search it, map result rows to ``ids``, read its ``manifest``.

    Row i of ``ids``, ``embeddings`` and the searcher are the same gallery image. Rows are
    positions, not identities: removing images moves others (ScaNN fills holes with its last
    row), so refer to images by ``seller_img_id``, which never changes.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        ids: pd.DataFrame,
        embeddings: np.ndarray,
        searcher: Searcher,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.ids = ids
        self.embeddings = embeddings
        self.searcher = searcher

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def search(
        self, queries: np.ndarray, k: int, *, qe_k: int = 0, qe_alpha: float = 3.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Row indices into ``ids`` (int64) and scores (float32), both ``(Q, min(k, N))``.

        ``qe_k > 0`` re-searches with each query averaged with its top ``qe_k`` results
        (alpha query expansion, :mod:`vsearch_tf.rerank`).
        """
        queries = np.asarray(queries)
        if queries.ndim != 2:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {queries.shape}")
        if queries.shape[1] != self.dim:
            raise VSearchError(
                f"model gives {queries.shape[1]}-d embeddings but index {self.path} holds "
                f"{self.dim}-d: query with the model the index was built with"
            )
        return expanded_search(self.searcher.search, self.embeddings, queries, k, qe_k, qe_alpha)

    def with_dba(self, k: int, alpha: float) -> Index:
        """This index, in memory, with every gallery vector replaced by its DBA average.

        The neighbours come from this index's searcher; a ScaNN index is re-trained over the
        new vectors with its recorded settings, so on a large gallery this takes a while.
        """
        if not 0 < k < self.count:
            raise VSearchError(f"--dba {k}: needs 0 < k < the index's {self.count} vectors")
        vectors = augment_gallery(self.embeddings, self.searcher.search, k, alpha)
        settings = self.searcher.settings
        searcher: Searcher
        if isinstance(self.searcher, ExactSearcher):
            searcher = ExactSearcher(vectors, settings)
        else:
            searcher = build_searcher(vectors, **settings)
        return Index(self.path, self.manifest, self.ids, vectors, searcher)

    def ann_recall(self, queries: np.ndarray, ks: Sequence[int]) -> dict[int, float] | None:
        """Recall@k of the searcher against exact search on up to 1,000 of ``queries``.

        ``None`` for exact indexes. Tuning measures recall with gallery vectors as queries;
        this measures it on real queries, whose distribution may differ.
        """
        if isinstance(self.searcher, ExactSearcher) or len(queries) == 0:
            return None
        ks = sorted({min(k, self.count) for k in ks})
        pick = (
            np.linspace(0, len(queries) - 1, min(_RECALL_SAMPLE, len(queries))).round().astype(int)
        )
        queries = np.ascontiguousarray(np.asarray(queries)[pick], dtype=np.float32)
        _, truth = ExactSearcher(self.embeddings).search(queries, ks[-1])
        recall = {}
        for k in ks:
            found, _ = self.searcher.search(queries, k)
            true = _true_scores(queries, self.embeddings, found)
            recall[k] = float(np.mean(true >= truth[:, k - 1 : k] - 1e-5))
        return recall


def _csv_dtype(dtype: Any) -> str:
    """The dtype to read an ids.csv column back with, so ids keep their type (007 != 7)."""
    types = pd.api.types
    if types.is_bool_dtype(dtype):
        return "bool"
    if types.is_integer_dtype(dtype):
        return "int64"
    if types.is_float_dtype(dtype):
        return "float64"
    return "str"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Siblings that ``atomic_path`` leaves when killed: ``.NAME.tmp-*`` or ``.NAME.old-*``."""
    return sorted(
        Path(p) for p in glob.glob(str(path.parent / f".{glob.escape(path.name)}.{kind}-*"))
    )


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """Be the only writer of index ``path``, and first repair what a killed writer left.

    ``atomic_path`` moves the old folder aside before moving the new one in; a writer
    killed between the two renames leaves no folder at ``path``, only ``.NAME.old-PID``.
    That old folder is put back (readers already fall back to it), and half-written
    temporaries are deleted -- safe only here, where no other writer can be running.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.parent / f".{path.name}.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VSearchError(
                f"{path}: another vsearch job is writing this index ({lock_path} is locked)"
            ) from None
        olds = sorted(_leftovers(path, "old"), key=lambda p: p.stat().st_mtime)
        if olds and not path.exists():
            os.replace(olds.pop(), path)
        for leftover in olds + _leftovers(path, "tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        yield


def _copy_blocks(embeddings: np.ndarray, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """``embeddings`` (or its rows ``order``) in blocks, so a memmap is never read whole."""
    n = len(embeddings) if order is None else len(order)
    for start in range(0, n, _COPY_ROWS):
        rows = (
            slice(start, start + _COPY_ROWS) if order is None else order[start : start + _COPY_ROWS]
        )
        yield np.asarray(embeddings[rows])


def _write(
    path: Path,
    ids: pd.DataFrame,
    vectors: Iterable[np.ndarray],
    dim: int,
    make_searcher: Callable[[np.ndarray], Searcher],
    carried: dict[str, Any],
) -> dict[str, Any]:
    """Write an index folder atomically: vectors first (the searcher is built or tuned on the
    written copy), then the searcher and ids, and the manifest last. Call under the lock."""
    n = len(ids)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        _stream_to_npy(tmp / EMBEDDINGS, (n, dim), vectors)
        searcher = make_searcher(np.load(tmp / EMBEDDINGS, mmap_mode="r"))
        if searcher.count != n:
            raise ValueError(f"searcher holds {searcher.count} vectors, ids {n}")
        ids.reset_index(drop=True).to_csv(tmp / IDS, index=False)
        if isinstance(searcher, ScannSearcher):
            searcher.save(tmp / SCANN_DIR)
        manifest = {
            "format_version": FORMAT_VERSION,
            "backend": searcher.backend,
            "dim": dim,
            "count": n,
            "params": searcher.params(),
            "measured_recall": searcher.measured_recall,
            "tuning": searcher.settings,
            "updated": _now(),
            "ids_dtypes": {str(c): _csv_dtype(t) for c, t in ids.dtypes.items()},
            **carried,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _carried(
    manifest: dict[str, Any], entry: dict[str, Any], unreadable: list[dict[str, str]]
) -> dict[str, Any]:
    """Manifest keys an update keeps, plus ``entry`` appended to the (bounded) history."""
    history = [*manifest.get("history", []), {"time": _now(), **entry}][-_HISTORY:]
    return {
        "created": manifest.get("created"),
        "extra": manifest.get("extra", {}),
        "unreadable": unreadable,
        "history": history,
    }


def save_index(
    out_dir: str | os.PathLike,
    searcher: Searcher,
    embeddings: np.ndarray,
    ids: pd.DataFrame,
    extra: dict[str, Any],
    *,
    unreadable: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Write a new index folder atomically (an old one stays until the new one is complete).

    ``ids`` row i describes vector i and needs at least ``seller_img_id`` and ``product_id``;
    ``extra`` (model path, fingerprint...) is stored in the manifest as is. ``unreadable``
    lists gallery images that could not be embedded (``seller_img_id``, ``product_id``,
    ``img_path``): they still count as relevant images when evaluating.
    """
    missing = [c for c in ID_COLUMNS if c not in ids.columns]
    if missing:
        raise ValueError(f"ids lacks columns {missing}")
    if embeddings.ndim != 2 or not len(ids) == embeddings.shape[0] == searcher.count:
        raise ValueError(
            f"ids ({len(ids)}), embeddings {embeddings.shape} and searcher ({searcher.count}) "
            "disagree on the number of vectors"
        )
    path = Path(out_dir)
    now = _now()
    carried = {
        "created": now,
        "extra": extra,
        "unreadable": list(unreadable),
        "history": [{"time": now, "op": "build", "count": len(ids)}],
    }
    with _writer_lock(path):
        return _write(
            path, ids, _copy_blocks(embeddings), embeddings.shape[1], lambda _: searcher, carried
        )


def load_index(directory: str | os.PathLike) -> Index:
    """Open an index folder, checking it is complete and consistent (else ``VSearchError``).

    If the folder is missing because a writer was killed mid-swap, the previous index it
    moved aside is opened instead.
    """
    path = Path(directory)
    folder = path
    if not path.is_dir():
        olds = [p for p in _leftovers(path, "old") if (p / MANIFEST).is_file()]
        if not olds:
            raise VSearchError(f"{path}: index folder not found")
        folder = max(olds, key=lambda p: p.stat().st_mtime)
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise VSearchError(f"{manifest_path}: missing; is {path} an index folder?") from None
    except (OSError, ValueError) as err:
        raise VSearchError(f"{manifest_path}: unreadable ({one_line(err)})") from err
    if not isinstance(manifest, dict):
        raise VSearchError(f"{manifest_path}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise VSearchError(
            f"{manifest_path}: format_version {version!r} is not supported (this vsearch reads "
            f"{FORMAT_VERSION}); rebuild the index"
        )
    for key in ("backend", "dim", "count", "params"):
        if key not in manifest:
            raise VSearchError(f"{manifest_path}: missing key {key!r}")
    backend, dim, count = manifest["backend"], manifest["dim"], manifest["count"]
    if backend not in ("exact", "scann"):
        raise VSearchError(f"{manifest_path}: unknown backend {backend!r}")
    settings = manifest.get("tuning")

    emb_path = folder / EMBEDDINGS
    try:
        embeddings = np.load(emb_path, mmap_mode="r")
    except FileNotFoundError:
        raise VSearchError(f"{emb_path}: missing") from None
    except (OSError, ValueError) as err:
        raise VSearchError(f"{emb_path}: unreadable or truncated ({one_line(err)})") from err
    if embeddings.dtype != np.float32 or embeddings.shape != (count, dim):
        raise VSearchError(
            f"{emb_path}: holds {embeddings.dtype} {embeddings.shape}, manifest says "
            f"float32 ({count}, {dim})"
        )

    ids_path = folder / IDS
    dtypes = manifest.get("ids_dtypes", {})
    try:
        ids = pd.read_csv(ids_path, dtype=dtypes or None, keep_default_na=False)
    except FileNotFoundError:
        raise VSearchError(f"{ids_path}: missing") from None
    except (OSError, ValueError) as err:
        raise VSearchError(f"{ids_path}: unreadable ({one_line(err)})") from err
    missing = [c for c in ID_COLUMNS if c not in ids.columns]
    if missing:
        raise VSearchError(f"{ids_path}: missing columns {missing}")
    if len(ids) != count:
        raise VSearchError(f"{ids_path}: {len(ids)} rows, manifest says {count}")

    searcher: Searcher
    if backend == "exact":
        searcher = ExactSearcher(embeddings, settings)
    else:
        scann_path = folder / SCANN_DIR
        if not scann_path.is_dir():
            raise VSearchError(f"{scann_path}: missing ScaNN folder")
        absent = [p for p in _SCANN_SEARCH_PARAMS if p not in manifest["params"]]
        if absent:
            raise VSearchError(f"{manifest_path}: params lack {absent}")
        try:
            searcher = ScannSearcher.load(
                scann_path, manifest["params"], dim, manifest.get("measured_recall"), settings
            )
        except (RuntimeError, ValueError, OSError) as err:
            raise VSearchError(
                f"{scann_path}: cannot load ScaNN searcher ({one_line(err)})"
            ) from err
        if searcher.count != count:
            raise VSearchError(
                f"{scann_path}: holds {searcher.count} vectors, manifest says {count}"
            )
    return Index(path, manifest, ids, embeddings, searcher)


# ----------------------------------------------------------------------------- live updates


def _preview(values: Sequence[str]) -> str:
    shown = ", ".join(values[:5])
    return shown + (f" and {len(values) - 5} more" if len(values) > 5 else "")


def check_new_ids(index: Index, seller_img_ids: Sequence[str], source: str) -> None:
    """``VSearchError`` if any id is already in the index or repeated: ids must stay unique."""
    new = pd.Series([str(i) for i in seller_img_ids])
    clash = sorted(set(new[new.isin(index.ids["seller_img_id"].astype(str))]))
    if clash:
        raise VSearchError(
            f"{source}: seller_img_id already in index {index.path}: {_preview(clash)}; "
            "remove them first"
        )
    repeated = sorted(set(new[new.duplicated()]))
    if repeated:
        raise VSearchError(f"{source}: seller_img_id repeated: {_preview(repeated)}")


def add_to_index(
    directory: str | os.PathLike,
    embeddings: np.ndarray,
    ids: pd.DataFrame,
    *,
    source: str,
    unreadable: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Add gallery images to an index without retraining it.

    ``ids`` must have the index's id columns. ScaNN gets the vectors by upsert (each goes to
    its nearest existing leaf) and its knobs are re-tuned, so ``measured_recall`` stays a
    measurement of the index as it now is. An exact index that grows past ``exact_below``
    stays exact until ``rebuild_index``; ``rebuild_suggested`` in the result says so.
    Returns ``{"added", "unreadable", "rebuild_suggested", "manifest"}``.
    """
    path = Path(directory)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    with _writer_lock(path):
        index = load_index(path)
        if sorted(ids.columns) != sorted(index.ids.columns):
            raise ValueError(
                f"ids have columns {list(ids.columns)}, the index {list(index.ids.columns)}"
            )
        if embeddings.shape != (len(ids), index.dim):
            raise VSearchError(
                f"{source}: {embeddings.shape[1:]} embeddings for an index of {index.dim}-d vectors"
                if embeddings.ndim == 2 and len(ids) == len(embeddings)
                else f"{source}: {len(ids)} ids for embeddings of shape {embeddings.shape}"
            )
        check_new_ids(index, ids["seller_img_id"].tolist(), source)
        new_ids = ids[list(index.ids.columns)].astype(index.ids.dtypes.to_dict())
        all_ids = pd.concat([index.ids, new_ids], ignore_index=True)
        searcher = index.searcher
        make: Callable[[np.ndarray], Searcher]
        if isinstance(searcher, ScannSearcher):
            searcher.append(embeddings)
            make = lambda vectors: _tune(searcher, vectors)  # noqa: E731
        else:
            make = lambda vectors: ExactSearcher(vectors, searcher.settings)  # noqa: E731
        entry = {
            "op": "add",
            "source": source,
            "added": len(ids),
            "unreadable": len(unreadable),
            "count": len(all_ids),
        }
        carried = _carried(
            index.manifest, entry, [*index.manifest.get("unreadable", []), *unreadable]
        )
        manifest = _write(
            path,
            all_ids,
            itertools.chain(_copy_blocks(index.embeddings), [embeddings]),
            index.dim,
            make,
            carried,
        )
    return {
        "added": len(ids),
        "unreadable": len(unreadable),
        "rebuild_suggested": _rebuild_suggested(manifest),
        "manifest": manifest,
    }


def remove_from_index(
    directory: str | os.PathLike,
    *,
    ids: Sequence[str] = (),
    products: Sequence[str] = (),
    missing_ok: bool = False,
) -> dict[str, Any]:
    """Remove gallery images by ``seller_img_id`` and/or every image of ``products``.

    ScaNN deletes in place (no retraining) and its knobs are re-tuned; a ScaNN index that
    shrinks below ``exact_below`` becomes exact, which is free to build and perfect. Ids or
    products not in the index are a ``VSearchError`` unless ``missing_ok`` (for retries).
    Unreadable images of the removed ids/products leave the manifest too. Returns
    ``{"removed", "rebuild_suggested", "manifest"}``; nothing is written if nothing matched.
    """
    path = Path(directory)
    want_ids, want_products = {str(i) for i in ids}, {str(p) for p in products}
    with _writer_lock(path):
        index = load_index(path)
        seller = index.ids["seller_img_id"].astype(str)
        product = index.ids["product_id"].astype(str)
        old_unreadable = index.manifest.get("unreadable", [])
        known_ids = set(seller) | {str(u["seller_img_id"]) for u in old_unreadable}
        known_products = set(product) | {str(u["product_id"]) for u in old_unreadable}
        unknown = [f"seller_img_id {i}" for i in sorted(want_ids - known_ids)]
        unknown += [f"product_id {p}" for p in sorted(want_products - known_products)]
        if unknown and not missing_ok:
            raise VSearchError(
                f"{path}: not in the index: {_preview(unknown)} (pass --missing-ok to ignore)"
            )
        drop = np.flatnonzero((seller.isin(want_ids) | product.isin(want_products)).to_numpy())
        unreadable = [
            u
            for u in old_unreadable
            if str(u["seller_img_id"]) not in want_ids and str(u["product_id"]) not in want_products
        ]
        if drop.size == 0 and len(unreadable) == len(old_unreadable):
            return {
                "removed": 0,
                "rebuild_suggested": _rebuild_suggested(index.manifest),
                "manifest": index.manifest,
            }
        if drop.size == index.count:
            raise VSearchError(
                f"{path}: removing all {index.count} images would leave the index empty"
            )

        searcher = index.searcher
        settings = searcher.settings
        make: Callable[[np.ndarray], Searcher]
        if isinstance(searcher, ScannSearcher) and index.count - drop.size >= _exact_threshold(
            settings
        ):
            order = searcher.remove_rows(drop)
            make = lambda vectors: _tune(searcher, vectors)  # noqa: E731
        else:
            order = np.setdiff1d(np.arange(index.count), drop)
            make = lambda vectors: ExactSearcher(vectors, settings)  # noqa: E731
        entry = {
            "op": "remove",
            "removed": int(drop.size),
            "count": int(order.size),
            "ids": sorted(want_ids),
            "products": sorted(want_products),
        }
        manifest = _write(
            path,
            index.ids.iloc[order],
            _copy_blocks(index.embeddings, order),
            index.dim,
            make,
            _carried(index.manifest, entry, unreadable),
        )
    return {
        "removed": int(drop.size),
        "rebuild_suggested": _rebuild_suggested(manifest),
        "manifest": manifest,
    }


def rebuild_index(
    directory: str | os.PathLike,
    *,
    target_recall: float | None = None,
    exact_below: int | None = None,
) -> dict[str, Any]:
    """Re-choose the backend and retrain ScaNN over the index's current vectors.

    After many additions ScaNN's leaves and codebooks no longer fit the data as well (each
    added vector went to the nearest old leaf); rebuilding restores that. The recorded
    settings are kept unless overridden. Returns the new manifest.
    """
    path = Path(directory)
    with _writer_lock(path):
        index = load_index(path)
        settings = dict(index.searcher.settings)
        if target_recall is not None:
            settings["target_recall"] = target_recall
        if exact_below is not None:
            settings["exact_below"] = exact_below
        entry = {"op": "rebuild", "count": index.count}
        return _write(
            path,
            index.ids,
            _copy_blocks(index.embeddings),
            index.dim,
            lambda vectors: build_searcher(vectors, **settings),
            _carried(index.manifest, entry, index.manifest.get("unreadable", [])),
        )


def _exact_threshold(settings: dict[str, Any]) -> int:
    return max(settings["exact_below"], _SCANN_MIN_POINTS)


def _rebuild_suggested(manifest: dict[str, Any]) -> bool:
    """Whether ``build_searcher`` would now pick another backend than the index has."""
    settings = {**DEFAULT_SETTINGS, **manifest.get("tuning", {})}
    wants = "exact" if manifest["count"] < _exact_threshold(settings) else "scann"
    return wants != manifest["backend"]


def read_withdrawn(csv: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The ``seller_img_id`` and ``product_id`` values of a withdrawn-items CSV (either column)."""
    path = Path(csv)
    if not path.is_file():
        raise VSearchError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise VSearchError(f"{path}: not a readable CSV ({one_line(err)})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    columns = [c for c in ID_COLUMNS if c in frame.columns]
    if not columns:
        raise VSearchError(
            f"{path}: needs a seller_img_id or product_id column; found {', '.join(frame.columns)}"
        )
    values = {c: [v.strip() for v in frame[c] if v.strip()] for c in columns}
    return values.get("seller_img_id", []), values.get("product_id", [])
