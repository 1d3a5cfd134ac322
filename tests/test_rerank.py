import numpy as np
import pytest

from vsearch_tf import rerank
from vsearch_tf.index import ExactSearcher
from vsearch_tf.metrics import evaluate
from vsearch_tf.rerank import (
    Rerank,
    augment_gallery,
    expanded_search,
    neighbour_average,
    query_expansion,
    without_self,
)


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference_average(vectors, pool, neighbours, scores, alpha):
    """One row at a time, straight from the formula."""
    out = []
    for v, ids, sims in zip(vectors, neighbours, scores):
        total = v.astype(np.float64).copy()
        for j, s in zip(ids, sims):
            total += max(float(s), 0.0) ** alpha * pool[j]
        out.append(total / np.linalg.norm(total))
    return np.array(out)


def reference_dba(gallery, k, alpha):
    sims = gallery @ gallery.T
    neighbours, scores = [], []
    for i, row in enumerate(sims):
        order = [j for j in np.argsort(-row, kind="stable") if j != i][:k]
        neighbours.append(order)
        scores.append(row[order])
    return reference_average(gallery, gallery, np.array(neighbours), np.array(scores), alpha)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return normalised(rng.normal(size=(40, 8))), normalised(rng.normal(size=(7, 8)))


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_neighbour_average_matches_reference_across_blocks(data, alpha, monkeypatch):
    gallery, queries = data
    monkeypatch.setattr(rerank, "_BLOCK_ELEMENTS", 2 * 3 * 8)  # two rows per block
    idx, sims = ExactSearcher(gallery).search(queries, 3)
    sims[0, 2] = -0.5  # negative similarities weigh nothing (unless alpha is 0)
    got = neighbour_average(queries, gallery, idx, sims, alpha)
    np.testing.assert_allclose(
        got, reference_average(queries, gallery, idx, sims, alpha), atol=1e-6
    )
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(
        neighbour_average(queries, gallery, idx[:, :0], sims[:, :0], alpha), queries
    )


def test_query_expansion_uses_the_top_k(data):
    gallery, queries = data
    idx, sims = ExactSearcher(gallery).search(queries, 10)
    np.testing.assert_allclose(
        query_expansion(queries, gallery, idx, sims, 2, 3.0),
        reference_average(queries, gallery, idx[:, :2], sims[:, :2], 3.0),
        atol=1e-6,
    )


def test_database_augmentation_matches_reference_and_skips_self(data):
    gallery, _ = data
    np.testing.assert_allclose(
        augment_gallery(gallery, ExactSearcher(gallery).search, 3, 3.0),
        reference_dba(gallery, 3, 3.0),
        atol=1e-6,
    )
    # A duplicate may outrank a row's own vector; the row's own is still skipped.
    twins = np.concatenate([gallery, gallery[:1]])
    idx, sims = ExactSearcher(twins).search(twins, 3)
    idx[0, :2] = [40, 0]
    out = neighbour_average(twins, twins, *without_self(idx, sims, np.arange(41), 2), 1.0)
    np.testing.assert_allclose(
        out[0],
        reference_average(twins[:1], twins, idx[:1, [0, 2]], sims[:1, [0, 2]], 1.0)[0],
        atol=1e-6,
    )
    # A row that does not find itself at all drops its last neighbour instead.
    kept, scores = without_self(
        np.array([[5, 6, 7]]), np.array([[0.9, 0.8, 0.7]]), np.array([9]), 2
    )
    assert kept.tolist() == [[5, 6]] and scores.tolist() == [[0.9, 0.8]]


def test_augment_gallery_blocks_agree_with_one_shot(data, monkeypatch):
    gallery, _ = data
    monkeypatch.setattr(rerank, "_SEARCH_ROWS", 6)
    got = augment_gallery(gallery, ExactSearcher(gallery).search, 3, 3.0)
    np.testing.assert_allclose(got, reference_dba(gallery, 3, 3.0), atol=1e-6)
    with pytest.raises(ValueError, match="0 < k < 40"):
        augment_gallery(gallery, ExactSearcher(gallery).search, 40, 3.0)


def test_expanded_search_searches_again_with_the_expanded_query(data):
    gallery, queries = data
    search = ExactSearcher(gallery).search
    np.testing.assert_array_equal(
        expanded_search(search, gallery, queries, 5, 0, 3.0)[0], search(queries, 5)[0]
    )
    idx, sims = search(queries, 2)
    expected = search(reference_average(queries, gallery, idx, sims, 3.0).astype(np.float32), 5)[0]
    np.testing.assert_array_equal(expanded_search(search, gallery, queries, 5, 2, 3.0)[0], expected)


def test_rerank_settings_are_checked():
    assert Rerank().to_dict() == {"qe_k": 0, "qe_alpha": 3.0, "dba_k": 0, "dba_alpha": 3.0}
    with pytest.raises(ValueError, match="qe_k=-1"):
        Rerank(qe_k=-1)


def test_qe_and_dba_help_when_products_have_several_gallery_images():
    """60 products x 4 gallery images, 3 noisy queries each: neighbours of the same product
    are there to average with, so both steps (and both together) raise mAP."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(60, 32))
    gallery_products = np.repeat(np.arange(60), 4)
    gallery = normalised(centres[gallery_products] + 0.8 * rng.normal(size=(240, 32)))
    query_products = np.repeat(np.arange(60), 3)
    queries = normalised(centres[query_products] + 1.1 * rng.normal(size=(180, 32)))

    def map_at_100(qe: int, dba: int) -> float:
        vectors = (
            augment_gallery(gallery, ExactSearcher(gallery).search, dba, 3.0) if dba else gallery
        )
        idx, _ = expanded_search(ExactSearcher(vectors).search, vectors, queries, 100, qe, 3.0)
        return evaluate(gallery_products[idx], query_products, gallery_products, k=100).map_at_k

    none, qe, dba, both = map_at_100(0, 0), map_at_100(2, 0), map_at_100(0, 3), map_at_100(2, 3)
    assert qe > none + 0.02 and dba > none + 0.04 and both > max(qe, dba)
