"""The Milvus backend (tested on Milvus Lite, in-process on a local .db file) returns what exact
search returns, through the library and through `vsearch index / query / eval --backend milvus`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip(
    "pymilvus", reason="optional extra 'milvus' not installed: pip install -e '.[milvus]'"
)
pytest.importorskip(
    "milvus_lite", reason="optional extra 'milvus' not installed: pip install -e '.[milvus]'"
)

from helpers import invoke, tiny_embedder  # noqa: E402

from vsearch_tf.errors import VSearchError  # noqa: E402
from vsearch_tf.index import ExactSearcher, Searcher, load_index, save_index  # noqa: E402
from vsearch_tf.index.folder import writer_lock  # noqa: E402
from vsearch_tf.index.milvus import MilvusSearcher, attach, publish  # noqa: E402


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors_index(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("milvus") / "index"
    gallery = _unit(1500, 16, 0)
    ids = pd.DataFrame(
        {
            "seller_img_id": [f"s{i:05d}" for i in range(len(gallery))],
            "product_id": [f"p{i // 3}" for i in range(len(gallery))],
        }
    )
    save_index(out, ExactSearcher(gallery), gallery, ids, {})
    return out


def test_flat_collection_returns_the_exact_top_k(vectors_index):
    manifest = publish(vectors_index)  # default: Milvus Lite at INDEX/milvus.db, FLAT
    info = manifest["extra"]["milvus"]
    assert info["uri"] == "milvus.db" and info["index_type"] == "FLAT" and info["count"] == 1500
    index = load_index(vectors_index)
    exact = index.searcher
    attach(index)
    assert isinstance(index.searcher, MilvusSearcher) and isinstance(index.searcher, Searcher)
    assert index.searcher.settings == exact.settings
    queries = _unit(200, 16, 1)
    for k in (1, 10, 100):
        rows, scores = index.search(queries, k)
        want_rows, want_scores = exact.search(queries, k)
        assert rows.dtype == np.int64 and scores.dtype == np.float32 and rows.shape == (200, k)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)


def test_hnsw_collection_reaches_high_recall(vectors_index):
    publish(vectors_index, collection="hnsw", index_type="HNSW")
    index = load_index(vectors_index)
    exact = index.searcher
    attach(index, "milvus")
    queries = _unit(200, 16, 2)
    rows, _ = index.search(queries, 10)
    truth, _ = exact.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
    assert recall >= 0.95


def test_a_changed_index_is_refused_until_published_again(vectors_index):
    publish(vectors_index)
    index = load_index(vectors_index)
    index.ids = index.ids.iloc[::-1].reset_index(drop=True)  # rows no longer match the primary keys
    with pytest.raises(VSearchError, match="changed after it was loaded into Milvus"):
        attach(index)
    attach(index, "scann")  # the folder's own search still works
    assert isinstance(index.searcher, ExactSearcher)


def test_publish_waits_for_no_writer(vectors_index):
    """Publishing rewrites the manifest: it is a writer, refused while another one (an
    ``index add``) holds the folder, whose replaced manifest would drop the Milvus record."""
    before = (vectors_index / "manifest.json").read_text()
    with writer_lock(vectors_index):
        with pytest.raises(VSearchError, match="another vsearch job is writing this index"):
            publish(vectors_index, collection="locked")
    assert (vectors_index / "manifest.json").read_text() == before


def test_cli_backend_milvus_gives_the_same_results(tmp_path):
    from vsearch_tf.demo import generate
    from vsearch_tf.export import export_run

    data = tmp_path / "data"
    generate(data, n_train=4, n_val=2, n_test=12, users_per_product=2, seed=4)
    run = tmp_path / "run"
    run.mkdir()
    tiny_embedder().save(run / "embedder.keras")
    export_run(run, "tiny", root=tmp_path / "sm")
    out = tmp_path / "index"
    built = invoke(
        "index",
        "--model",
        tmp_path / "sm" / "tiny",
        "--gallery",
        data / "gallery.csv",
        "--out",
        out,
        "--backend",
        "milvus",
        "--milvus-uri",
        tmp_path / "vectors.db",
        "--json",
    )
    assert built.exit_code == 0, built.output
    info = json.loads(built.stdout)["extra"]["milvus"]
    assert info["uri"] == str(tmp_path / "vectors.db") and info["collection"] == "vsearch_index"

    reports = {}
    for backend in ("milvus", "scann"):
        result = invoke(
            "eval",
            "--index",
            out,
            "--queries",
            data / "queries.csv",
            "--backend",
            backend,
            "--json",
        )
        assert result.exit_code == 0, result.output
        reports[backend] = json.loads(result.stdout)
    assert reports["milvus"]["map_at_k"] == pytest.approx(reports["scann"]["map_at_k"], abs=1e-9)
    assert reports["milvus"]["recall"] == reports["scann"]["recall"]

    image = next((data / "images" / "user").iterdir())
    hits = {}
    for backend in ("milvus", "scann"):
        result = invoke(
            "query", "--index", out, image, "--top-k", "5", "--backend", backend, "--json"
        )
        assert result.exit_code == 0, result.output
        hits[backend] = [
            (h["seller_img_id"], h["score"])
            for h in json.loads(result.stdout)["queries"][0]["results"]
        ]
    assert [h[0] for h in hits["milvus"]] == [h[0] for h in hits["scann"]]
    np.testing.assert_allclose(
        [h[1] for h in hits["milvus"]], [h[1] for h in hits["scann"]], atol=1e-5
    )
