import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vsearch_tf import io as io_mod
from vsearch_tf.config import IndexSettings
from vsearch_tf.errors import VSearchError
from vsearch_tf.index import (
    EmbeddingStore,
    ExactSearcher,
    ScannSearcher,
    Searcher,
    add_to_index,
    build_searcher,
    exact,
    folder,
    load_index,
    read_withdrawn,
    rebuild_index,
    remove_from_index,
    save_index,
)


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int, n_clusters: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    return normalised(centres[rng.integers(0, n_clusters, n)] + 0.9 * rng.normal(size=(n, dim)))


def make_ids(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"seller_img_id": [f"{i:05d}.jpg" for i in range(n)], "product_id": np.arange(n) // 3}
    )


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    return normalised(np.random.default_rng(0).normal(size=(500, 16)))


@pytest.fixture(scope="module")
def big_and_held_out() -> tuple[np.ndarray, np.ndarray]:
    data = clustered(31_000, 32, seed=1)
    return data[:30_000], data[30_000:]


@pytest.fixture(scope="module")
def big(big_and_held_out) -> np.ndarray:
    return big_and_held_out[0]


@pytest.fixture(scope="module")
def scann_searcher(big: np.ndarray) -> ScannSearcher:
    searcher = build_searcher(big, IndexSettings(target_recall=0.95))
    assert isinstance(searcher, ScannSearcher)
    return searcher


@pytest.fixture(scope="module")
def exact_index_dir(tmp_path_factory, small):
    out = tmp_path_factory.mktemp("idx") / "exact"
    save_index(out, build_searcher(small), small, make_ids(len(small)), {"model": "m.keras"})
    return out


def test_exact_matches_brute_force_across_blocks(small, monkeypatch):
    monkeypatch.setattr(exact, "_GALLERY_ROWS", 64)  # 8 gallery tiles, the last one short
    monkeypatch.setattr(exact, "_BLOCK_ELEMENTS", 7 * 64)  # 7 queries per block
    queries = normalised(np.random.default_rng(2).normal(size=(30, 16)))
    searcher = ExactSearcher(small)
    idx, scores = searcher.search(queries, 10)
    np.testing.assert_array_equal(idx, brute_force(small, queries, 10))
    assert idx.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ small.T, idx, 1), rtol=1e-6)
    np.testing.assert_array_equal(
        searcher.search(queries, 100)[0], brute_force(small, queries, 100)
    )
    all_idx, _ = searcher.search(queries, 10_000)  # k > N returns all N
    np.testing.assert_array_equal(all_idx, brute_force(small, queries, len(small)))


def test_small_gallery_gets_exact_searcher(small):
    assert isinstance(build_searcher(small, IndexSettings(target_recall=0.99)), ExactSearcher)


def test_every_backend_is_a_searcher(small, scann_searcher):
    for searcher in (ExactSearcher(small), scann_searcher):
        assert isinstance(searcher, Searcher) and isinstance(searcher.settings, IndexSettings)


def test_build_searcher_defaults_to_the_settings_recall_target(mid):
    """Without settings, ScaNN is tuned to IndexSettings' target (0.95), not left untuned."""
    searcher = build_searcher(mid, IndexSettings(exact_below=2_000))
    assert searcher.settings == IndexSettings(exact_below=2_000)
    assert searcher.params()["target_recall"] == 0.95 and searcher.measured_recall >= 0.95
    with pytest.raises(VSearchError, match="target_recall 1.5 is not in"):
        build_searcher(mid, IndexSettings(target_recall=1.5))


def test_tuned_recall_holds_on_held_out_queries(scann_searcher, big_and_held_out):
    """Tuning measures recall leave-one-out on gallery rows; fresh draws from the same
    clusters must meet the target too (1,000 queries: standard error ~0.003)."""
    gallery, held_out = big_and_held_out
    idx, _ = scann_searcher.search(held_out, 10)
    truth = ExactSearcher(gallery).search(held_out, 10)[1]
    found = np.einsum("qd,qkd->qk", held_out, gallery[idx]) >= truth[:, -1:] - 1e-5
    assert found.mean() >= 0.945


def test_scann_meets_recall_target(scann_searcher, big):
    params = scann_searcher.params()
    assert scann_searcher.measured_recall >= 0.95
    assert params["target_recall"] == 0.95 and params["recall_sample"] == 1000
    # Fresh queries near the data (cosine ~0.96 to their nearest), not used for tuning.
    rng = np.random.default_rng(3)
    queries = normalised(big[rng.integers(0, len(big), 300)] + 0.05 * rng.normal(size=(300, 32)))
    idx, scores = scann_searcher.search(queries, 10)
    assert idx.shape == (300, 10) and idx.dtype == np.int64 and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    truth = ExactSearcher(big).search(queries, 10)[0]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, truth)])
    assert recall >= 0.93


def test_scann_large_k_is_complete(scann_searcher, big):
    queries = big[:20]
    idx, scores = scann_searcher.search(queries, 1000)
    assert idx.shape == (20, 1000) and not np.isnan(scores).any()
    assert all(len(set(row)) == 1000 for row in idx)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_round_trip_exact(exact_index_dir, small):
    index = load_index(exact_index_dir)
    queries = small[:5]
    np.testing.assert_array_equal(
        index.search(queries, 7)[0], ExactSearcher(small).search(queries, 7)[0]
    )
    assert index.manifest["backend"] == "exact" and index.manifest["extra"] == {"model": "m.keras"}
    assert index.dim == 16 and index.count == 500
    pd.testing.assert_frame_equal(index.ids, make_ids(500), check_dtype=False)
    assert index.ids["product_id"].dtype == np.int64
    assert index.ids["seller_img_id"][7] == "00007.jpg"


def test_round_trip_scann(tmp_path, scann_searcher, big):
    manifest = save_index(tmp_path / "idx", scann_searcher, big, make_ids(len(big)), {"x": 1})
    index = load_index(tmp_path / "idx")
    assert isinstance(index.searcher, ScannSearcher)
    assert manifest["measured_recall"] == index.manifest["measured_recall"] >= 0.95
    assert index.manifest["params"] == scann_searcher.params()
    before = scann_searcher.search(big[:50], 10)
    after = index.search(big[:50], 10)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1])


def test_embedding_store_resumes_in_chunk_order(tmp_path):
    store = EmbeddingStore(tmp_path / "emb")
    chunks = {i: (np.full((i + 2, 4), i, np.float32), np.arange(i + 2) + 10 * i) for i in range(3)}
    store.write_chunk(0, *chunks[0])
    store.write_chunk(2, *chunks[2])
    assert store.done_chunks() == {0, 2}
    with pytest.raises(VSearchError, match=r"missing: \[1\]"):
        store.assemble()
    store.write_chunk(1, *chunks[1])
    embeddings, rows = store.assemble(n_chunks=3)
    np.testing.assert_array_equal(embeddings, np.concatenate([chunks[i][0] for i in range(3)]))
    np.testing.assert_array_equal(rows, np.concatenate([chunks[i][1] for i in range(3)]))
    assert isinstance(embeddings, np.memmap) and not embeddings.flags.writeable


def edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: (d / "ids.csv").unlink(), "ids.csv: missing"),
        (lambda d: (d / "ids.csv").write_text("seller_img_id,product_id\na.jpg,1\n"), "ids.csv"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{oops"), "manifest.json"),
        (
            lambda d: (d / "manifest.json").write_text(
                json.dumps({**json.loads((d / "manifest.json").read_text()), "format_version": 99})
            ),
            "manifest.json: format_version 99",
        ),
        (
            lambda d: (d / "embeddings.npy").write_bytes(
                (d / "embeddings.npy").read_bytes()[:1000]
            ),
            "embeddings.npy",
        ),
        (lambda d: shutil.rmtree(d), "index folder not found"),
        (lambda d: edit_manifest(d, backend="faiss"), "manifest.json: unknown backend 'faiss'"),
        (
            lambda d: edit_manifest(d, tuning={"exact_belw": 5}),
            "manifest.json: unknown index setting 'exact_belw'; did you mean 'exact_below'",
        ),
    ],
)
def test_corrupt_index_is_a_clear_error(tmp_path, exact_index_dir, corrupt, match):
    broken = tmp_path / "broken"
    shutil.copytree(exact_index_dir, broken)
    corrupt(broken)
    with pytest.raises(VSearchError, match=match):
        load_index(broken)


def test_dim_mismatch_is_a_clear_error(exact_index_dir):
    index = load_index(exact_index_dir)
    with pytest.raises(VSearchError, match="model gives 32-d embeddings but index .* holds 16-d"):
        index.search(np.zeros((2, 32), np.float32), 5)


# ----------------------------------------------------------------------------- k = 1000


def test_scann_large_k_meets_the_target_too(scann_searcher, big):
    large = scann_searcher.params()["large_k"]
    assert large["k"] == 1000 and large["measured_recall"] >= 0.95
    rng = np.random.default_rng(4)
    queries = normalised(big[rng.integers(0, len(big), 50)] + 0.05 * rng.normal(size=(50, 32)))
    idx, _ = scann_searcher.search(queries, 1000)
    truth = ExactSearcher(big).search(queries, 1000)[1]
    found = np.einsum("qd,qkd->qk", queries, big[idx]) >= truth[:, -1:] - 1e-5
    assert found.mean() >= 0.93


def test_round_trip_scann_reports_ann_recall_on_queries(tmp_path, scann_searcher, big):
    save_index(tmp_path / "idx", scann_searcher, big, make_ids(len(big)), {})
    index = load_index(tmp_path / "idx")
    rng = np.random.default_rng(8)
    queries = normalised(big[rng.integers(0, len(big), 200)] + 0.05 * rng.normal(size=(200, 32)))
    recall = index.ann_recall(queries, (10, 1000))
    assert sorted(recall) == [10, 1000] and min(recall.values()) >= 0.93


def test_exact_index_reports_no_ann_recall(exact_index_dir, small):
    assert load_index(exact_index_dir).ann_recall(small[:5], (10, 1000)) is None


# -------------------------------------------------------------------------- live updates


@pytest.fixture(scope="module")
def mid() -> np.ndarray:
    """Enough vectors for ScaNN with exact_below=2000, few enough to build and tune in ~1 s."""
    return clustered(4_000, 16, seed=5, n_clusters=40)


@pytest.fixture
def scann_dir(tmp_path, mid):
    searcher = build_searcher(mid, IndexSettings(exact_below=2_000, target_recall=0.9))
    assert isinstance(searcher, ScannSearcher)
    save_index(tmp_path / "idx", searcher, mid, make_ids(len(mid)), {"model": "m"})
    return tmp_path / "idx"


def vector_of(index, seller_img_id: str) -> np.ndarray:
    row = np.flatnonzero(index.ids["seller_img_id"].to_numpy() == seller_img_id)
    assert row.size == 1
    return np.asarray(index.embeddings[row[0]])


def test_scann_remove_then_add_round_trip(scann_dir, mid):
    ids = make_ids(len(mid))
    gone = ["03999.jpg", "00000.jpg", "01234.jpg", "03998.jpg"]  # includes the last rows
    result = remove_from_index(scann_dir, ids=gone, products=["7"])  # product 7 = rows 21-23
    assert result["removed"] == 7 and not result["rebuild_suggested"]
    index = load_index(scann_dir)
    assert isinstance(index.searcher, ScannSearcher) and index.count == len(index.ids) == 3993
    assert index.manifest["count"] == 3993 == index.manifest["history"][-1]["count"]
    assert index.manifest["measured_recall"] >= 0.9
    survivors = index.ids["seller_img_id"].to_numpy()
    assert not set(gone) & set(survivors) and "7" not in set(index.ids["product_id"].astype(str))
    # Ids are stable: every surviving id still has its own vector, and search finds it.
    original = dict(zip(ids["seller_img_id"], mid))
    for sid in survivors[::97]:
        np.testing.assert_array_equal(vector_of(index, sid), original[sid])
    rows, _ = index.search(mid[:100], 1)
    expected = ids["seller_img_id"][:100]
    kept = ~expected.isin(gone + ["00021.jpg", "00022.jpg", "00023.jpg"]).to_numpy()
    assert (
        np.mean(survivors[rows[kept, 0]] == expected[kept]) >= 0.97
    )  # approximate search: top-1 is itself
    # Removed items are never returned, even for their own vector at a large k.
    removed_vectors = mid[[3999, 0, 1234, 3998, 21, 22, 23]]
    rows, _ = index.search(removed_vectors, 1000)
    assert not set(survivors[rows.ravel()]) & set(gone)

    new = clustered(300, 16, seed=6, n_clusters=40)
    new_ids = pd.DataFrame(
        {"seller_img_id": [f"new{i}" for i in range(300)], "product_id": 5000 + np.arange(300)}
    )
    result = add_to_index(scann_dir, new, new_ids, source="new.csv")
    assert result["added"] == 300
    index = load_index(scann_dir)
    assert index.count == len(index.ids) == 4293 and index.manifest["measured_recall"] >= 0.9
    assert [h["op"] for h in index.manifest["history"]] == ["build", "remove", "add"]
    rows, _ = index.search(new, 1)
    assert (
        np.mean(index.ids["seller_img_id"].to_numpy()[rows[:, 0]] == new_ids["seller_img_id"])
        >= 0.97
    )
    rows, _ = ExactSearcher(index.embeddings).search(new, 1)  # and each is stored under its own id
    np.testing.assert_array_equal(
        index.ids["seller_img_id"].to_numpy()[rows[:, 0]], new_ids["seller_img_id"]
    )
    assert index.ids["product_id"].dtype == np.int64  # dtypes survive the update
    for sid in ("00001.jpg", "new17"):
        np.testing.assert_array_equal(
            vector_of(index, sid), dict(zip(ids["seller_img_id"], mid)).get(sid, new[17])
        )


def test_exact_add_and_remove_keep_order_and_suggest_rebuild(tmp_path, small):
    out = tmp_path / "exact"
    save_index(
        out, build_searcher(small, IndexSettings(exact_below=1_000)), small, make_ids(500), {}
    )
    more = normalised(np.random.default_rng(7).normal(size=(600, 16)))
    result = add_to_index(out, more, make_ids(1100)[500:], source="more.csv")
    assert result["rebuild_suggested"]  # 1100 vectors >= exact_below
    result = remove_from_index(out, ids=["00003.jpg"])
    assert result["removed"] == 1 and result["rebuild_suggested"]
    index = load_index(out)
    assert index.manifest["backend"] == "exact" and index.count == 1099
    assert index.ids["seller_img_id"].tolist() == [f"{i:05d}.jpg" for i in range(1100) if i != 3]
    np.testing.assert_array_equal(index.embeddings[3], small[4])


def test_scann_that_shrinks_below_the_threshold_becomes_exact(scann_dir):
    result = remove_from_index(scann_dir, ids=[f"{i:05d}.jpg" for i in range(2_500)])
    index = load_index(scann_dir)
    assert result["manifest"]["backend"] == "exact" and isinstance(index.searcher, ExactSearcher)
    assert index.count == 1500 and index.manifest["measured_recall"] is None
    assert not (scann_dir / "scann").exists()


def test_rebuild_retrains_with_recorded_settings(tmp_path, small, mid):
    out = tmp_path / "grow"
    save_index(
        out,
        build_searcher(mid[:1500], IndexSettings(exact_below=2_000, target_recall=0.9)),
        mid[:1500],
        make_ids(1500),
        {"model": "m"},
    )
    add_to_index(out, mid[1500:], make_ids(4000)[1500:], source="more.csv")
    manifest = rebuild_index(out)
    assert manifest["backend"] == "scann" and manifest["measured_recall"] >= 0.9
    assert manifest["tuning"]["target_recall"] == 0.9 and manifest["extra"] == {"model": "m"}
    assert load_index(out).count == 4000


def test_readding_an_unreadable_image_counts_it_once(tmp_path, small):
    """An image unreadable at build time, added once fixed, leaves the manifest's unreadable
    list (else evaluation counts it twice as a relevant image); one still unreadable on a
    retry is listed once."""
    out = tmp_path / "idx"
    fixed = {"seller_img_id": "fixed.jpg", "product_id": "7", "img_path": "fixed.jpg"}
    broken = {"seller_img_id": "broken.jpg", "product_id": "8", "img_path": "broken.jpg"}
    save_index(out, ExactSearcher(small), small, make_ids(500), {}, unreadable=[fixed, broken])
    ids = pd.DataFrame({"seller_img_id": ["fixed.jpg"], "product_id": [7]})
    result = add_to_index(out, small[:1], ids, source="retry.csv", unreadable=[broken])
    assert result["manifest"]["unreadable"] == [broken]
    assert load_index(out).manifest["unreadable"] == [broken]


def test_dba_keeps_the_recorded_settings(scann_dir):
    index = load_index(scann_dir)
    dba = index.with_dba(3, 3.0)
    assert isinstance(dba.searcher, ScannSearcher)
    assert (
        dba.searcher.settings == index.searcher.settings == IndexSettings(2_000, target_recall=0.9)
    )
    assert dba.searcher.params()["target_recall"] == 0.9 and dba.searcher.measured_recall >= 0.9
    assert not np.allclose(dba.embeddings, index.embeddings)


def test_update_errors_are_one_line(exact_index_dir, tmp_path, small):
    with pytest.raises(
        VSearchError, match=r"not in the index: seller_img_id nope\.jpg, product_id 999"
    ):
        remove_from_index(exact_index_dir, ids=["nope.jpg"], products=["999"])
    before = (exact_index_dir / "manifest.json").read_text()
    assert remove_from_index(exact_index_dir, ids=["nope.jpg"], missing_ok=True)["removed"] == 0
    assert (
        exact_index_dir / "manifest.json"
    ).read_text() == before  # nothing matched: nothing written
    with pytest.raises(VSearchError, match="would leave the index empty"):
        remove_from_index(exact_index_dir, products=[str(p) for p in range(167)])
    with pytest.raises(
        VSearchError, match=r"new\.csv: seller_img_id already in index .*: 00001\.jpg"
    ):
        add_to_index(exact_index_dir, small[:1], make_ids(2)[1:], source="new.csv")
    with pytest.raises(VSearchError, match=r"new\.csv: \(8,\) embeddings for an index of 16-d"):
        add_to_index(
            exact_index_dir,
            np.zeros((1, 8), np.float32),
            pd.DataFrame({"seller_img_id": ["x"], "product_id": [1]}),
            source="new.csv",
        )
    csv = tmp_path / "withdrawn.csv"
    csv.write_text("sku\n1\n")
    with pytest.raises(
        VSearchError, match="withdrawn.csv: needs a seller_img_id or product_id column"
    ):
        read_withdrawn(csv)
    csv.write_text("product_id,seller_img_id\n4,\n,a.jpg\n")
    assert read_withdrawn(csv) == (["a.jpg"], ["4"])


# ----------------------------------------------------------------------------- atomicity


def test_failure_mid_write_keeps_the_previous_index(scann_dir, mid, monkeypatch):
    before = load_index(scann_dir).manifest

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ScannSearcher, "save", crash)  # after vectors and ids are written
    with pytest.raises(OSError, match="disk full"):
        remove_from_index(scann_dir, ids=["00005.jpg"])
    monkeypatch.undo()
    index = load_index(scann_dir)
    assert index.manifest == before and "00005.jpg" in set(index.ids["seller_img_id"])
    assert index.search(mid[5:6], 1)[0][0, 0] == 5
    assert [p.name for p in scann_dir.parent.iterdir() if p.name.startswith(".idx.tmp")] == []


def test_writer_killed_between_renames_leaves_previous_index_loadable(tmp_path, small, monkeypatch):
    out = tmp_path / "idx"
    save_index(out, build_searcher(small), small, make_ids(500), {})
    real_replace = os.replace

    def killed_after_first_rename(src, dst):
        if Path(dst) == out:  # the old folder went aside; the new one never arrives
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        remove_from_index(out, ids=["00001.jpg"])
    monkeypatch.undo()
    assert not out.exists()
    index = load_index(out)  # readers fall back to the folder the writer moved aside
    assert index.count == 500
    # The next writer puts it back before doing its own work.
    remove_from_index(out, ids=["00002.jpg"])
    index = load_index(out)
    assert index.count == 499 and "00001.jpg" in set(index.ids["seller_img_id"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock", "idx"]


def test_one_writer_at_a_time(exact_index_dir):
    with folder.writer_lock(exact_index_dir):
        with pytest.raises(VSearchError, match="another vsearch job is writing this index"):
            remove_from_index(exact_index_dir, ids=["00001.jpg"])


def test_a_waiting_lock_waits_for_the_holder(tmp_path):
    """``wait=True`` (exports of one model name) blocks until the holder lets go."""
    lock, events = tmp_path / ".x.lock", []

    def waiter() -> None:
        with io_mod.file_lock(lock, wait=True):
            events.append("waiter")

    with io_mod.file_lock(lock, wait=False):
        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(0.5)
        events.append("holder done")
    thread.join(10)
    assert events == ["holder done", "waiter"]


# --------------------------------------------------------------------------------- the cli


def test_cli_remove_and_rebuild(scann_dir, tmp_path):
    from typer.testing import CliRunner

    from vsearch_tf.cli import app

    csv = tmp_path / "withdrawn.csv"
    csv.write_text("product_id\n3\n")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "index",
            "remove",
            "--index",
            str(scann_dir),
            "--ids",
            "00001.jpg,00002.jpg",
            "--csv",
            str(csv),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed"] == 5  # product 3 = rows 9-11
    result = runner.invoke(
        app, ["index", "remove", "--index", str(scann_dir), "--ids", "00001.jpg"]
    )
    assert result.exit_code == 2 and "not in the index: seller_img_id 00001.jpg" in result.stderr
    result = runner.invoke(
        app, ["index", "rebuild", "--index", str(scann_dir), "--target-recall", "0.8", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tuning"]["target_recall"] == 0.8
    result = runner.invoke(app, ["index", "--model", "m"])
    assert result.exit_code == 2 and "missing --gallery, --out" in result.stderr
