import json
import math
import time

import numpy as np
import pytest

from vsearch_tf.errors import VSearchError
from vsearch_tf.metrics import evaluate, evaluate_self


def reference_ap(ranked: list, product, gallery: list, k: int) -> float | None:
    """Plain-Python MCS2023 AP@k, written straight from the definition."""
    gtp = sum(1 for g in gallery if g == product)
    if gtp == 0:
        return None
    hits, total = 0, 0.0
    for i, item in enumerate(ranked[:k], start=1):
        if item == product:
            hits += 1
            total += hits / i
    return total / gtp


def test_gtp_greater_than_one_counts_all_gallery_images():
    gallery = ["a", "a", "a", "b", "c"]
    res = evaluate(np.array([["a", "b", "a", "c"]]), np.array(["a"]), np.array(gallery), k=4)
    assert res.map_at_k == pytest.approx((1 / 1 + 2 / 3) / 3)


def test_gtp_beyond_k_still_divides_by_all_images():
    gallery = [7] * 5 + [1, 2]
    res = evaluate(np.array([[7, 7]]), np.array([7]), np.array(gallery), k=2)
    assert res.map_at_k == pytest.approx((1 + 1) / 5)


def test_match_beyond_rank_k_contributes_nothing():
    gallery = np.array([1, 2, 3, 4])
    res = evaluate(np.array([[2, 3, 1]]), np.array([1]), gallery, k=2, recall_ks=(1, 2))
    assert res.map_at_k == 0.0
    assert res.recall == {1: 0.0, 2: 0.0}


def test_int_ids_and_recall():
    gallery = np.array([10, 10, 20, 30, 40])
    retrieved = np.array([[10, 20, 10], [30, 40, 20], [20, 10, 30]])
    queries = np.array([10, 20, 40])
    res = evaluate(retrieved, queries, gallery, k=3, recall_ks=(1, 2, 3))
    expected = [(1 + 2 / 3) / 2, 1 / 3, 0.0]
    np.testing.assert_allclose(res.per_query_ap, expected)
    assert res.map_at_k == pytest.approx(np.mean(expected))
    assert res.recall == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}


def test_excluded_queries_are_reported_not_scored():
    gallery = np.array(["p1", "p2"])
    retrieved = np.array([["p1", "p2"], ["p2", "p1"], ["p1", "p2"]], dtype=object)
    res = evaluate(retrieved, ["p1", "zz", "p2"], gallery, k=2, recall_ks=(1,))
    assert res.n_queries == 3 and res.n_scored == 2
    assert res.excluded.tolist() == [1]
    assert math.isnan(res.per_query_ap[1])
    assert res.map_at_k == pytest.approx((1 + 1 / 2) / 2)
    assert res.recall[1] == pytest.approx(0.5)
    summary = json.loads(json.dumps(res.to_dict()))
    assert summary["n_excluded"] == 1 and summary["excluded"] == [1]
    assert summary["recall"] == {"1": 0.5}


def test_nothing_scorable_gives_nan_not_crash():
    res = evaluate(np.array([[1, 2]]), np.array([9]), np.array([1, 2]), k=2, recall_ks=(1,))
    assert res.n_scored == 0 and math.isnan(res.map_at_k)
    assert res.to_dict()["map_at_k"] is None


def test_padding_by_mask_and_sentinel():
    gallery = np.array([1, 1, 2])
    retrieved = np.array([[2, 1, -1], [1, -1, -1]])
    by_pad = evaluate(retrieved, np.array([1, 1]), gallery, k=3, pad=-1)
    by_mask = evaluate(retrieved, np.array([1, 1]), gallery, k=3, valid=retrieved != -1)
    np.testing.assert_allclose(by_pad.per_query_ap, [(1 / 2) / 2, 1 / 2])
    np.testing.assert_allclose(by_mask.per_query_ap, by_pad.per_query_ap)


def test_mixed_str_and_int_ids_are_refused():
    with pytest.raises(VSearchError, match="mixed types"):
        evaluate(np.array([["1"]]), np.array([1]), np.array(["1"]), k=1, recall_ks=(1,))


def test_mcs_by_hand_recall_at_several_k_first_ranks_and_the_json_report():
    # GTP: a 2, b 1, c 1; e has no gallery image.
    gallery = ["a", "a", "b", "c", "d"]
    retrieved = [["b", "a", "a"], ["b", "c", "d"], ["a", "b", "d"], ["a", "b", "c"]]
    res = evaluate(np.array(retrieved), ["a", "b", "c", "e"], gallery, k=3, recall_ks=(1, 2, 3, 5))
    # q0: hits at ranks 2 and 3 -> (1/2 + 2/3) / 2; q1: rank 1 -> 1; q2: none -> 0; q3 excluded.
    np.testing.assert_allclose(res.per_query_ap[:3], [7 / 12, 1.0, 0.0])
    assert res.map_at_k == pytest.approx(19 / 36) and res.map_at_r is None
    assert res.recall == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3)}
    assert res.first_rank.tolist() == [2, 1, 0, 0]
    assert res.first_correct() == {"rank 1": 1, "rank 2-3": 1, "not in top 3": 1}
    report = json.loads(json.dumps(res.to_dict()))
    assert report["protocol"] == "mcs" and "map_at_r" not in report
    assert report["per_query_ap"][:3] == pytest.approx([7 / 12, 1.0, 0.0])
    assert report["per_query_ap"][3] is None


def test_self_protocol_by_hand_recall_at_k_and_map_at_r():
    # Indexed images 0..4 of products a a a b c, plus one unreadable b image: no query, in R.
    products = np.array(["a", "a", "a", "b", "c"])
    gallery = np.append(products, "b")
    # Each image's three nearest others (itself left out), as rows into ``products``.
    neighbours = np.array([[3, 1, 2], [0, 2, 4], [4, 3, 0], [0, 1, 2], [0, 1, 2]])
    res = evaluate_self(products[neighbours], products, gallery, recall_ks=(1, 2, 3))
    # R = 2, 2, 2, 1 (the unreadable b), 0 (c: excluded).
    # Image 0: [b a a], hit at rank 2 within R=2 -> (1/2) / 2. Image 1: [a a c] -> (1 + 1) / 2.
    # Image 2: [c b a], no hit within R=2 -> 0. Image 3: its only other b is unreadable -> 0.
    np.testing.assert_allclose(res.per_query_ap[:4], [0.25, 1.0, 0.0, 0.0])
    assert res.excluded.tolist() == [4] and res.n_scored == 4
    assert res.map_at_r == pytest.approx(1.25 / 4) and res.map_at_k is None
    # Recall@K: first correct at ranks 2, 1, 3, none.
    assert res.recall == {1: 0.25, 2: 0.5, 3: 0.75}
    assert res.first_rank.tolist() == [2, 1, 3, 0, 0]
    assert res.first_correct() == {"rank 1": 1, "rank 2-3": 2, "not in top 3": 1}
    report = res.to_dict()
    assert report["protocol"] == "self" and report["map_at_r"] == pytest.approx(0.3125)
    assert "map_at_k" not in report and report["n_excluded"] == 1


def test_self_protocol_map_at_r_ignores_hits_past_r_but_recall_counts_them():
    products = np.array(["a", "a", "b", "b", "b"])
    # Image 0 (R=1): its other a at rank 3. Image 2 (R=2): its b images at ranks 1 and 3.
    retrieved = np.array([["b", "b", "a"], ["a", "b", "b"], ["b", "a", "b"]])
    res = evaluate_self(retrieved, products[[0, 1, 2]], products, recall_ks=(1, 3))
    np.testing.assert_allclose(res.per_query_ap, [0.0, 1.0, 0.5])
    assert res.recall == {1: pytest.approx(2 / 3), 3: 1.0}


@pytest.mark.parametrize("as_text", [False, True])
def test_random_against_reference(as_text):
    rng = np.random.default_rng(0)
    gallery = rng.integers(0, 30, 200)
    queries = rng.integers(0, 35, 60)  # some products absent from the gallery
    retrieved = gallery[np.argsort(rng.random((60, 200)), axis=1)[:, :25]]
    if as_text:
        gallery, queries, retrieved = (a.astype(str) for a in (gallery, queries, retrieved))
    res = evaluate(retrieved, queries, gallery, k=20, recall_ks=(1, 5, 20))
    ref = [reference_ap(list(r), q, list(gallery), 20) for r, q in zip(retrieved, queries)]
    scored = [i for i, ap in enumerate(ref) if ap is not None]
    assert res.excluded.tolist() == [i for i, ap in enumerate(ref) if ap is None]
    np.testing.assert_allclose(res.per_query_ap[scored], [ref[i] for i in scored])
    assert res.map_at_k == pytest.approx(np.mean([ref[i] for i in scored]))
    for rk in (1, 5, 20):
        expect = np.mean([queries[i] in list(retrieved[i, :rk]) for i in scored])
        assert res.recall[rk] == pytest.approx(expect)


def test_ten_thousand_queries_top_1000_is_fast():
    rng = np.random.default_rng(1)
    gallery = rng.integers(0, 20_000, 100_000)
    retrieved = gallery[rng.integers(0, gallery.size, (10_000, 1000))]
    queries = rng.integers(0, 20_000, 10_000)
    start = time.perf_counter()
    evaluate(retrieved, queries, gallery)
    assert time.perf_counter() - start < 1.0
