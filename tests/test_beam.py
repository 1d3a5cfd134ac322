"""`vsearch embed` (Apache Beam, DirectRunner with two worker processes) gives the vectors, ids and
unreadable images that `vsearch index` computes itself, and `vsearch index --embeddings` turns
them into the same index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip(
    "apache_beam", reason="optional extra 'beam' not installed: pip install -e '.[beam]'"
)

from helpers import invoke, tiny_embedder  # noqa: E402

from vsearch_tf.demo import generate  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A small gallery with one corrupt image, split into two csv shards, and a tiny export."""
    from vsearch_tf.export import export_run

    root = tmp_path_factory.mktemp("beam")
    data = root / "data"
    generate(data, n_train=4, n_val=2, n_test=14, users_per_product=1, seed=2)
    (data / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    gallery = pd.read_csv(data / "gallery.csv", dtype=str)
    broken = pd.DataFrame(
        [
            {
                "seller_img_id": "broken",
                "img_path": "images/broken.jpg",
                "product_id": gallery.product_id[0],
            }
        ]
    )
    gallery = pd.concat([gallery.iloc[:5], broken, gallery.iloc[5:]], ignore_index=True)
    gallery.to_csv(data / "gallery.csv", index=False)
    gallery.iloc[:8].to_csv(data / "gallery-0.csv", index=False)
    gallery.iloc[8:].to_csv(data / "gallery-1.csv", index=False)
    run = root / "run"
    run.mkdir()
    tiny_embedder().save(run / "embedder.keras")
    export_run(run, "tiny", root=root / "sm")
    return root


@pytest.fixture(scope="module")
def embedded(workspace) -> tuple[Path, dict]:
    out = workspace / "embedded"
    result = invoke(
        "embed",
        "--model",
        workspace / "sm" / "tiny",
        "--gallery",
        workspace / "data" / "gallery-*.csv",
        "--out",
        out,
        "--format",
        "tfrecord",
        "--format",
        "vertex-jsonl",
        "--batch-size",
        "4",
        "--json",
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def direct_index(workspace) -> Path:
    out = workspace / "index-direct"
    result = invoke(
        "index",
        "--model",
        workspace / "sm" / "tiny",
        "--gallery",
        workspace / "data" / "gallery.csv",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    return out


def test_beam_embeddings_equal_what_index_computes(workspace, embedded, direct_index):
    out, info = embedded
    readable = len(pd.read_csv(workspace / "data" / "gallery.csv")) - 1
    assert (
        info["embedded"] == readable
        and info["unreadable"] == 1
        and info["runner"] == "DirectRunner"
    )
    assert len(info["gallery_csvs"]) == 2
    beam_index = workspace / "index-beam"
    result = invoke("index", "--embeddings", out, "--out", beam_index, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    direct = json.loads((direct_index / "manifest.json").read_text())
    assert (
        manifest["count"] == direct["count"] == readable
        and manifest["backend"] == direct["backend"]
    )
    assert manifest["extra"]["model_fingerprint"] == direct["extra"]["model_fingerprint"]
    assert manifest["extra"]["skipped"] == direct["extra"]["skipped"] != []
    pd.testing.assert_frame_equal(
        pd.read_csv(beam_index / "ids.csv"), pd.read_csv(direct_index / "ids.csv")
    )
    vectors = np.load(direct_index / "embeddings.npy")
    assert (vectors @ vectors.T)[
        np.triu_indices(len(vectors), 1)
    ].max() < 0.9999  # distinct images, distinct vectors
    np.testing.assert_allclose(np.load(beam_index / "embeddings.npy"), vectors, rtol=0, atol=1e-5)
    unreadable = [
        json.loads(line)
        for f in sorted(out.glob("unreadable-*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    assert [u["seller_img_id"] for u in unreadable] == ["broken"] and "JPEG" in unreadable[0][
        "error"
    ]


def test_vertex_records_hold_the_same_vectors(embedded, direct_index):
    out, _ = embedded
    records = [
        json.loads(line)
        for f in sorted((out / "vertex").glob("part-*.json"))
        for line in f.read_text().splitlines()
    ]
    ids = pd.read_csv(direct_index / "ids.csv", dtype=str)
    vectors = np.load(direct_index / "embeddings.npy")
    by_id = {r["id"]: r for r in records}
    assert sorted(by_id) == sorted(ids.seller_img_id)
    for row, (sid, product) in enumerate(zip(ids.seller_img_id, ids.product_id)):
        assert by_id[sid]["restricts"] == [{"namespace": "product_id", "allow": [product]}]
        np.testing.assert_allclose(by_id[sid]["embedding"], vectors[row], rtol=0, atol=1e-5)


def test_index_refuses_an_unfinished_embed_folder(workspace, tmp_path):
    result = invoke("index", "--embeddings", tmp_path, "--out", tmp_path / "index")
    assert result.exit_code == 2 and "not the output of a finished `vsearch embed`" in result.stderr
    both = invoke(
        "index",
        "--embeddings",
        tmp_path,
        "--model",
        workspace / "sm" / "tiny",
        "--out",
        tmp_path / "i",
    )
    assert both.exit_code == 2 and "replaces --model" in both.stderr


def test_a_missing_image_is_skipped_by_beam_as_by_index(workspace, tmp_path):
    data = workspace / "data"
    gallery = pd.read_csv(data / "gallery.csv", dtype=str).iloc[:3]
    missing = {"seller_img_id": "gone", "img_path": "images/gone.jpg", "product_id": "p"}
    pd.concat([gallery, pd.DataFrame([missing])]).to_csv(data / "stale.csv", index=False)
    model = workspace / "sm" / "tiny"
    embedded = invoke("embed", "--model", model, "--gallery", data / "stale.csv", "--out", tmp_path)
    assert embedded.exit_code == 0, embedded.output
    beam = invoke("index", "--embeddings", tmp_path, "--out", tmp_path / "beam", "--json")
    direct = invoke(
        "index", "--model", model, "--gallery", data / "stale.csv", "--out", tmp_path / "direct"
    )
    assert beam.exit_code == 0 and direct.exit_code == 0, beam.output + direct.output
    skipped = json.loads(beam.stdout)["extra"]["skipped"]
    assert [(s["id"], s["reason"]) for s in skipped] == [("gone", "image not found")]
    assert (
        json.loads((tmp_path / "direct" / "manifest.json").read_text())["extra"]["skipped"]
        == skipped
    )
