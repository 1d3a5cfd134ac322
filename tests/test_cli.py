"""Every CLI command end to end on tiny generated data: train, export, index, query, eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import invoke, write_tiny_config

from vsearch_tf.demo import generate


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    generate(root / "data", n_train=8, n_val=3, n_test=5, users_per_product=2, seed=1)
    write_tiny_config(
        root,
        {
            "root": str(root / "data"),
            "train_csv": "train.csv",
            "val_gallery_csv": "val_gallery.csv",
            "val_queries_csv": "val_queries.csv",
        },
        model={"embedding_dim": 16},
        head={"sub_centers": 2},
    )
    return root


@pytest.fixture(scope="module")
def trained(workspace) -> Path:
    result = invoke("train", "--config", workspace / "tiny.yml", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2 and summary["classes"] == 8
    assert 0.0 <= summary["best"]["val_map"] <= 1.0
    return Path(summary["run_dir"])


@pytest.fixture(scope="module")
def exported(workspace, trained) -> Path:
    result = invoke(
        "export", trained, "--name", "tiny", "--root", workspace / "saved_models", "--json"
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["version"] == 1 and Path(info["path"]).name == "1"
    return workspace / "saved_models" / "tiny"


@pytest.fixture(scope="module")
def index_dir(workspace, exported) -> Path:
    out = workspace / "index"
    result = invoke(
        "index",
        "--model",
        exported,
        "--gallery",
        workspace / "data" / "gallery.csv",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["count"] == 13 and manifest["dim"] == 16 and manifest["backend"] == "exact"
    assert manifest["extra"]["model_fingerprint"]
    return out


def test_train_writes_a_complete_run_directory(trained):
    for name in (
        "config.yml",
        "classes.json",
        "metrics.csv",
        "embedder.keras",
        "embedder.weights.h5",
        "head.weights.npz",
        "summary.json",
        "curves.png",
        "checkpoints",
        "logs",
    ):
        assert (trained / name).exists(), name
    metrics = (trained / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("epoch") and "val_map" in metrics[0] and len(metrics) == 3


def test_init_from_starts_from_the_previous_weights(workspace, trained):
    import keras

    result = invoke(
        "train",
        "--config",
        workspace / "tiny.yml",
        "--set",
        "run.name=stage2",
        "--set",
        f"run.init_from={trained}",
        "--set",
        "train.epochs=0",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loaded"] == "embedder and head"
    before = keras.saving.load_model(trained / "embedder.keras")
    after = keras.saving.load_model(workspace / "runs" / "stage2" / "embedder.keras")
    for a, b in zip(before.weights, after.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_train_config_errors_are_one_line(workspace):
    result = invoke("train", "--config", workspace / "tiny.yml", "--set", "train.lr=-1")
    assert result.exit_code == 2
    assert "train.lr: must be > 0" in result.stderr and "Traceback" not in result.output


def test_export_versions_increment(workspace, trained, exported):
    result = invoke(
        "export", trained, "--name", "tiny", "--root", workspace / "saved_models", "--json"
    )
    assert json.loads(result.stdout)["version"] == 2
    again = invoke(
        "export", trained, "--name", "tiny", "--root", workspace / "saved_models", "--version", "1"
    )
    assert again.exit_code == 2 and "exists" in again.stderr


def test_query_json_table_and_montage(workspace, index_dir):
    queries = (workspace / "data" / "queries.csv").read_text().splitlines()[1].split(",")
    image = workspace / "data" / queries[1]
    box = ",".join(queries[3:7])
    result = invoke(
        "query",
        "--index",
        index_dir,
        image,
        "--bbox",
        box,
        "--top-k",
        "3",
        "--json",
        "--show",
        workspace / "q.png",
        "--force",
    )
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["queries"][0]["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert (workspace / "q.png").stat().st_size > 0
    table = invoke("query", "--index", index_dir, image, "--force")
    assert table.exit_code == 0 and "product_id" in table.stdout


def test_eval_reports_map_and_recall(workspace, index_dir):
    out = workspace / "eval.json"
    result = invoke(
        "eval",
        "--index",
        index_dir,
        "--queries",
        workspace / "data" / "queries.csv",
        "--json",
        "--out",
        out,
        "--montage",
        workspace / "eval.png",
        "--force",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_queries"] == 10 and report["n_scored"] == 10
    assert 0.0 < report["map_at_k"] <= 1.0 and set(report["recall"]) == {"1", "5", "10"}
    assert report["recall"]["10"] >= report["recall"]["5"] >= report["recall"]["1"]
    assert json.loads(out.read_text())["map_at_k"] == report["map_at_k"]


def test_eval_table_fits_an_80_column_terminal(workspace, index_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    queries = workspace / "data" / "queries.csv"
    result = invoke("eval", "--index", index_dir, "--queries", queries, "--force")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.stdout
    for label in ("mAP@1000", "Recall@10", "excluded (no gallery image)", "box fallbacks"):
        assert any(label in line for line in lines), label


def test_commands_start_tensorflow_without_its_log_lines(tmp_path):
    """TensorFlow's C++ start-up lines (cuInit without a GPU, oneDNN, CPU features) are hidden
    unless --verbose; our one error line is all a failing command prints."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    image = tmp_path / "q.jpg"
    image.write_bytes(b"")
    args = ["query", "--index", str(tmp_path / "none"), str(image)]

    def run(*flags: str) -> list[str]:
        cmd = [sys.executable, "-m", "vsearch_tf", *flags, *args]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        return [line for line in done.stderr.splitlines() if line.strip()]

    quiet = run()
    assert quiet == [f"error: {tmp_path / 'none'}: index folder not found"], quiet
    noise = ("cuInit", "cpu_feature_guard", "oneDNN", "absl::InitializeLog", "cuda")
    assert not any(word in line for line in quiet for word in noise)
    verbose = run("--verbose")
    assert verbose[-1] == quiet[0] and len(verbose) > 1  # here TensorFlow has things to say


def test_tensorflow_log_lines_are_dropped_and_other_lines_kept(capfd):
    """What the quiet start-up drops, in the formats TensorFlow 2.20 prints them (its own, and
    absl's before it is initialised, as XLA and the CUDA plugins log), as they reach fd 2."""
    from vsearch_tf.cli import _tf_log_lines_dropped

    lines = [
        "2026-11-30 00:52:55.280353: E external/local_xla/xla/stream_executor/cuda/"
        "cuda_platform.cc:51] failed call to cuInit: INTERNAL: CUDA error: UNKNOWN ERROR (303)",
        "2026-11-30 00:52:57.559626: I tensorflow/core/platform/cpu_feature_guard.cc:210] This "
        "TensorFlow binary is optimized to use available CPU instructions",
        "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.",
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "E0000 00:00:1795999119.592048   16189 cuda_fft.cc:467] Unable to register cuFFT factory",
        "Premature end of JPEG file",
        "a Python warning",
    ]
    with _tf_log_lines_dropped():
        os.write(2, "".join(line + "\n" for line in lines).encode())
    assert capfd.readouterr().err == "Premature end of JPEG file\na Python warning\n"


def test_query_refuses_a_model_of_another_size(workspace, index_dir, tmp_path):
    from vsearch_tf.models.embedder import build_embedder

    run = tmp_path / "run"
    run.mkdir()
    build_embedder("mobilenet", 32, embedding_dim=8, weights="none").save(run / "embedder.keras")
    assert invoke("export", run, "--name", "other", "--root", tmp_path / "sm").exit_code == 0
    image = next((workspace / "data" / "images" / "user").iterdir())
    result = invoke("query", "--index", index_dir, image, "--model", tmp_path / "sm" / "other")
    assert result.exit_code == 2 and "gives 8-d embeddings but index" in result.stderr


def test_pipeline_chains_stages_and_resumes(workspace):
    data = workspace / "data"
    recipe = {
        "out_dir": str(workspace / "recipe"),
        "stages": [
            {
                "name": "first",
                "config": str(workspace / "tiny.yml"),
                "set": ["head.type=softmax", "train.epochs=1"],
            },
            {"name": "second", "config": str(workspace / "tiny.yml"), "set": ["train.epochs=1"]},
        ],
        "eval": {
            "gallery": str(data / "gallery.csv"),
            "queries": str(data / "queries.csv"),
            "root": str(data),
        },
    }
    path = workspace / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke("pipeline", path, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["stage"] for r in rows] == ["first", "second"]
    assert all(0.0 < r["map"] <= 1.0 for r in rows)
    second = json.loads((workspace / "recipe" / "second" / "summary.json").read_text())
    assert second["init_from"] == str(workspace / "recipe" / "first")
    again = invoke("pipeline", path, "--json")
    assert again.exit_code == 0 and "already finished" in again.stderr
    assert json.loads(again.stdout) == rows


def test_resume_continues_from_the_last_checkpoint(workspace, trained):
    result = invoke(
        "train", "--config", workspace / "tiny.yml", "--set", "train.epochs=3", "--resume", "--json"
    )
    assert result.exit_code == 0, result.output
    metrics = (trained / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == [
        "0",
        "1",
        "2",
    ]  # one more epoch, appended


def _self_gallery(data: Path) -> tuple[Path, str]:
    """A gallery where products have several images: the seller photos and the user photos,
    plus one unreadable image of a queried product; returns the csv and that product."""
    gallery = pd.read_csv(data / "gallery.csv", dtype=str)
    users = pd.read_csv(data / "queries.csv", dtype=str)
    product = users["product_id"].iloc[0]
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    broken = pd.DataFrame(
        {"seller_img_id": ["broken"], "img_path": ["broken.jpg"], "product_id": [product]}
    )
    users = users.rename(columns={"user_img_id": "seller_img_id"})[list(gallery.columns)]
    path = data / "self_gallery.csv"
    pd.concat([gallery, users, broken]).to_csv(path, index=False)
    return path, product


def _leave_one_out(index: Path, unreadable: str, ks: tuple[int, ...]) -> dict[str, object]:
    """Recall@K and mAP@R from the index's stored vectors, by a plain loop over a full score
    matrix: the reference the self protocol must agree with."""
    vectors = np.load(index / "embeddings.npy")
    products = pd.read_csv(index / "ids.csv", dtype=str)["product_id"].tolist()
    scores = vectors @ vectors.T
    recall_hits, aps = {k: 0 for k in ks}, []
    for q, product in enumerate(products):
        r = products.count(product) - 1 + (product == unreadable)
        if r == 0:
            continue
        others = [g for g in np.argsort(-scores[q], kind="stable") if g != q]
        relevant = [products[g] == product for g in others]
        hits = np.cumsum(relevant)
        aps.append(sum(hits[i] / (i + 1) for i in range(r) if relevant[i]) / r)
        for k in ks:
            recall_hits[k] += any(relevant[:k])
    return {
        "scored": len(aps),
        "map_at_r": float(np.mean(aps)),
        "recall": {str(k): hits / len(aps) for k, hits in recall_hits.items()},
    }


def test_eval_self_protocol_agrees_with_a_plain_leave_one_out(workspace, exported):
    gallery, product = _self_gallery(workspace / "data")
    index = workspace / "self_index"
    built = invoke("index", "--model", exported, "--gallery", gallery, "--out", index, "--json")
    assert built.exit_code == 0, built.output
    result = invoke(
        "eval", "--index", index, "--protocol", "self", "--recall-at", "1,2,100", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = _leave_one_out(index, product, (1, 2, 100))
    rows = pd.read_csv(gallery, dtype=str)
    singles = int((rows["product_id"].value_counts() == 1).sum())
    assert report["protocol"] == "self" and "map_at_k" not in report
    assert report["queries"] == report["n_queries"] == len(rows) - 1  # the broken one: no query
    assert report["unreadable_gallery"] == 1
    assert report["n_excluded"] == singles and report["n_scored"] == expected["scored"]
    assert report["map_at_r"] == pytest.approx(expected["map_at_r"])
    assert report["recall"] == pytest.approx(expected["recall"])
    assert report["recall"]["100"] == 1.0  # every other image ranked: each product is found

    table = invoke("eval", "--index", index, "--protocol", "self", "--recall-at", "1,10")
    assert table.exit_code == 0, table.output
    for label in ("mAP@R", "Recall@10", "excluded (no other image)", "unreadable gallery (in R)"):
        assert label in table.stdout, label


def test_eval_report_lists_every_query_each_product_and_shows_the_worst(workspace, index_dir):
    from PIL import Image

    folder = workspace / "report"
    args = ["eval", "--index", index_dir, "--queries", workspace / "data" / "queries.csv"]
    result = invoke(
        *args, "--force", "--recall-at", "1,5,10,100", "--report", folder, "--worst", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["recall"]) == {"1", "5", "10", "100"}
    per_query = pd.read_csv(folder / "per_query.csv", dtype={"query_id": str})
    queries = pd.read_csv(workspace / "data" / "queries.csv", dtype=str)
    assert per_query["query_id"].tolist() == queries["user_img_id"].tolist()
    assert per_query.columns[:4].tolist() == ["query_id", "product_id", "ap", "first_rank"]
    assert [c for c in per_query.columns if c.startswith("top")][:2] == ["top1_id", "top1_score"]
    np.testing.assert_allclose(per_query["ap"], report["per_query_ap"], atol=1e-6)
    assert per_query["ap"].mean() == pytest.approx(report["map_at_k"], abs=1e-6)
    at_one = per_query["first_rank"] == 1
    assert (per_query.loc[at_one, "ap"] > 0).all()
    assert at_one.mean() == pytest.approx(report["recall"]["1"])
    assert (per_query["top1_score"] >= per_query["top2_score"]).all()

    per_product = pd.read_csv(folder / "per_product.csv")
    assert per_product.columns.tolist() == ["product_id", "queries", "mean_ap", "recall_at_1"]
    assert per_product["queries"].sum() == 10 and per_product["mean_ap"].is_monotonic_increasing
    first = report["first_correct"]
    assert sum(first.values()) == report["n_scored"] and first["rank 1"] == at_one.sum()

    # Three rows: the query, its top 5 and, apart, the right product's catalogue image.
    assert Image.open(folder / "worst.png").size == (6 * 128 + 24 + 128, 3 * (128 + 16))
    table = invoke(*args, "--force", "--report", folder)
    assert table.exit_code == 0 and "first correct: rank 1" in table.stdout
    assert "report written to" in table.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--recall-at", "0,5"], "--recall-at '0,5': expected positive integers"),
        (["--recall-at", "one"], "--recall-at 'one': expected positive integers"),
        (["--recall-at", "1,2000"], "--recall-at 2000 is past --k 1000"),
        (["--protocol", "both"], "--protocol 'both': choose mcs or self"),
        (["--protocol", "self"], "--protocol self takes no --queries"),
    ],
)
def test_eval_refuses_bad_protocol_options_in_one_line(workspace, index_dir, flags, message):
    queries = workspace / "data" / "queries.csv"
    result = invoke("eval", "--index", index_dir, "--queries", queries, *flags)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in " ".join(result.stderr.split())


def test_eval_self_refuses_re_ranking(index_dir):
    result = invoke("eval", "--index", index_dir, "--protocol", "self", "--dba", "1")
    assert result.exit_code == 2 and "--protocol self takes no --qe / --dba" in result.stderr
