"""Recall against exact search, and the ScaNN search knobs chosen by it.

Kept outside the searchers (as faiss keeps its ``contrib/evaluation.py``): exact search is the
ground truth, recall@k counts a returned neighbour as found if its true score reaches the exact
k-th best, and tuning grows ScaNN's knobs until recall meets ``IndexSettings.target_recall``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vsearch_tf.errors import VSearchError
from vsearch_tf.index.base import Searcher
from vsearch_tf.index.exact import ExactSearcher
from vsearch_tf.index.scann import ScannSearcher
from vsearch_tf.rerank import without_self

_RECALL_SAMPLE = 1_000
# Recall@1000 is averaged over 1,000 neighbours per query, so fewer queries measure it as well.
_LARGE_K_SAMPLE = 300
# Neighbour vectors gathered at a time to score them exactly: 1M float32 = 4 MiB.
_GATHER_ELEMENTS = 1 << 20
# Float noise allowed when comparing a neighbour's true score with the exact k-th best.
_TIE = 1e-5


def _true_scores(queries: np.ndarray, embeddings: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Exact scores of (Q, r) neighbours, gathered a few queries at a time (r may be 1000)."""
    out = np.empty(neighbours.shape, np.float32)
    block = max(1, _GATHER_ELEMENTS // max(neighbours.shape[1] * queries.shape[1], 1))
    for start in range(0, len(queries), block):
        rows = neighbours[start : start + block]
        gathered = np.asarray(embeddings[rows.ravel()]).reshape(*rows.shape, -1)
        out[start : start + block] = np.einsum(
            "qd,qkd->qk", queries[start : start + block], gathered
        )
    return out


def ann_recall(
    searcher: Searcher, embeddings: np.ndarray, queries: np.ndarray, ks: Sequence[int]
) -> dict[int, float]:
    """Recall@k of ``searcher`` over gallery ``embeddings``, against exact search, on up to
    1,000 of ``queries`` (tuning measures it on gallery vectors; real queries may differ)."""
    n = len(embeddings)
    ks = sorted({min(k, n) for k in ks})
    pick = np.linspace(0, len(queries) - 1, min(_RECALL_SAMPLE, len(queries))).round().astype(int)
    queries = np.ascontiguousarray(np.asarray(queries)[pick], dtype=np.float32)
    _, truth = ExactSearcher(embeddings).search(queries, ks[-1])
    recall = {}
    for k in ks:
        found, _ = searcher.search(queries, k)
        true = _true_scores(queries, embeddings, found)
        recall[k] = float(np.mean(true >= truth[:, k - 1 : k] - _TIE))
    return recall


def _recall_at(
    searcher: ScannSearcher,
    embeddings: np.ndarray,
    sample: np.ndarray,
    truth_kth: np.ndarray,
    r: int,
    knobs: tuple[int, int],
) -> tuple[float, float]:
    """Recall@r of gallery vectors used as queries, leaving each query's own vector out, and
    its one-sided 95% lower confidence bound (over queries).

    A returned neighbour counts as found if its true score reaches the exact r-th best score
    (minus float noise), so ties and duplicate images are not counted as misses.
    """
    queries = np.asarray(embeddings[sample])
    idx, scores = searcher.search_with(queries, r, *knobs, plus_self=True)
    neighbours, _ = without_self(idx, scores, sample, r)
    found = _true_scores(queries, embeddings, neighbours) >= truth_kth[:, None] - _TIE
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
        return _recall_at(searcher, embeddings, sample, truth_kth, r, knobs)

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


def tune(searcher: ScannSearcher, embeddings: np.ndarray) -> ScannSearcher:
    """Set the search knobs for the gallery ``searcher`` now holds (``embeddings``, row-aligned).

    With a ``target_recall`` setting, recall is measured leave-one-out: up to 1,000 gallery
    vectors are used as queries with their own row ignored, against exact search. The knobs
    grow from a cheap start until recall@``num_neighbors`` meets the target (its 95% lower
    confidence bound does); a second pair is grown from there until recall@``large_k`` (on 300
    of the queries) meets it too, so that evaluation at k=1000 is as faithful as top-10 search.
    Without a target, ScaNN's usual defaults are used (5% of leaves, reorder 10 x k) and recall
    is not measured.
    """
    settings = searcher.settings
    params = searcher.trained_params()
    num_leaves, n, target = params["num_leaves"], searcher.count, settings.target_recall
    if target is None:
        params.update(leaves_to_search=max(1, math.ceil(num_leaves * 0.05)), reorder_factor=10)
        return ScannSearcher(searcher.searcher, params, searcher.dim, None, settings)

    r = min(settings.num_neighbors, n - 1)
    big = min(settings.large_k or 0, n - 1)
    rng = np.random.default_rng(settings.seed)
    sample = np.sort(rng.choice(n, size=min(_RECALL_SAMPLE, n), replace=False))
    truth_idx, truth_scores = ExactSearcher(embeddings).search(
        np.asarray(embeddings[sample]), max(r, big) + 1
    )
    _, truth = without_self(truth_idx, truth_scores, sample, max(r, big))
    start = (max(1, math.ceil(num_leaves * 0.01)), 2)
    leaves, factor, measured, bound = _cheapest_knobs(
        searcher, embeddings, sample, truth[:, r - 1], r, target, start
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
