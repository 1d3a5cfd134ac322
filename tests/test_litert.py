"""LiteRT export (``vsearch export --format litert``), checked from the outside: each
quantization converts, loads in a fresh process (the LiteRT runtime alone, no TensorFlow, no
vsearch code), matches the SavedModel it came from, and indexes and evaluates through the CLI.

The embedder is tiny but has the real head's ops: pixel scaling, a ReLU6 convolution, GeM
pooling (POW, which TFLite cannot run in int8: it stays float between a dequantize and a
quantize), a projection with BatchNorm and the L2 norm. Tolerances (cosine per image against
the SavedModel on held-out images):

- ``none``: 0.99999. The same float32 graph on XNNPACK instead of Eigen: the sums run in another
  order, ~1e-7 relative.
- ``float16``: 0.999. Every weight rounded to 11 significant bits (relative error <= 2^-11 ~
  5e-4); over two layers the embedding's direction moves by well under 1e-3.
- ``int8``: 0.95. Every activation rounded to one of 256 levels of its calibrated range, so each
  layer adds ~1/256 of its range as noise; with 8 dimensions and two layers that is a few
  degrees, while a broken conversion (wrong scale, a lost layer) gives ~0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import invoke

from vsearch_tf.demo import generate

SIZE, DIM = 32, 8
MIN_COSINE = {"none": 0.99999, "float16": 0.999, "int8": 0.95}
FORMATS = tuple(MIN_COSINE)


def _embedder():
    import keras

    from vsearch_tf.models.layers import GeMPooling, L2Normalize

    keras.utils.set_random_seed(0)
    pixels = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(pixels)
    x = keras.layers.Conv2D(64, 5, strides=2)(x)  # enough weights for sizes to tell apart
    x = keras.layers.ReLU(6.0)(x)
    x = GeMPooling()(x)
    x = keras.layers.Dense(DIM, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(pixels, L2Normalize()(x), name="embedder")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tiny run (embedder + config.yml naming its training csv), its SavedModel export and
    the three LiteRT exports beside it, converted by the CLI."""
    root = tmp_path_factory.mktemp("litert")
    data = root / "data"
    generate(data, n_train=6, n_val=4, n_test=10, users_per_product=3, seed=5)
    run = root / "run"
    run.mkdir()
    _embedder().save(run / "embedder.keras")
    config = {
        "run": {"name": "run", "out_dir": str(root)},
        "data": {
            "root": str(data),
            "train_csv": str(data / "train.csv"),
            "val_queries_csv": str(data / "val_queries.csv"),
            "val_gallery_csv": str(data / "val_gallery.csv"),
            "image_size": SIZE,
        },
        "model": {"backbone": "mobilenet", "weights": "none", "embedding_dim": DIM},
    }
    (run / "config.yml").write_text(yaml.safe_dump(config))
    models = root / "models"
    result = invoke("export", run, "--name", "tiny", "--root", models)
    assert result.exit_code == 0, result.output
    paths = {"run": run, "data": data, "root": root, "saved": models / "tiny" / "1"}
    for quantize in FORMATS:
        result = invoke(
            "export", run, "--name", "tiny", "--root", models, "--format", "litert",
            "--quantize", quantize, "--calibration", 40, "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        paths[quantize] = Path(json.loads(result.output)["path"])
    return paths


@pytest.mark.parametrize("quantize", FORMATS)
def test_converts_with_metadata_and_matches_the_savedmodel_in_a_fresh_process(env, quantize):
    tflite = env[quantize]
    assert tflite == env["saved"].parent / "litert" / f"tiny-{quantize}.tflite"
    meta = json.loads(tflite.with_suffix(".json").read_text())
    from vsearch_tf.export import fingerprint_of

    assert meta["saved_model"] == str(env["saved"].resolve())  # the existing export, reused
    assert meta["saved_model_fingerprint"] == fingerprint_of(env["saved"])
    assert (meta["image_size"], meta["embedding_dim"], meta["quantize"]) == (SIZE, DIM, quantize)
    assert meta["input"]["shape"] == [-1, SIZE, SIZE, 3] and meta["output"]["l2_normalised"]
    assert meta["normalisation"]["in_model"] == "x / 127.5 - 1"  # mobilenet's, from config.yml
    assert meta["bytes"] == tflite.stat().st_size
    if quantize == "int8":
        assert meta["calibration"]["requested"] == 40 and meta["calibration"]["images"] > 20
    else:
        assert meta["calibration"] is None
    result = invoke("export", "--check", tflite, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["images"] >= 8, report
    assert "val_queries.csv" in report["images_from"]  # held-out photos, not calibration ones
    assert report["cosine_min"] >= MIN_COSINE[quantize], report
    assert report["norm_max_abs_diff"] < 0.02  # still unit length, after int8's output scale


def test_sizes_shrink_with_quantization(env):
    sizes = {q: env[q].stat().st_size for q in FORMATS}
    assert sizes["int8"] < sizes["float16"] < sizes["none"], sizes


@pytest.fixture(scope="module")
def evaluated(env) -> dict[str, dict]:
    """Each model (SavedModel and the three .tflite) indexes the gallery and evaluates the
    queries through the CLI; eval takes the model from the index's manifest."""
    reports = {}
    for kind in ("saved", *FORMATS):
        out = env["root"] / f"index-{kind}"
        result = invoke(
            "index", "--model", env[kind], "--gallery", env["data"] / "gallery.csv",
            "--out", out, "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        manifest = json.loads(result.output)
        result = invoke("eval", "--index", out, "--queries", env["data"] / "queries.csv", "--json")
        assert result.exit_code == 0, result.output
        reports[kind] = {"manifest": manifest, "eval": json.loads(result.output), "index": out}
    return reports


@pytest.mark.parametrize("quantize", FORMATS)
def test_indexes_and_evaluates_end_to_end(env, evaluated, quantize):
    import hashlib

    manifest, report = evaluated[quantize]["manifest"], evaluated[quantize]["eval"]
    digest = hashlib.sha256(env[quantize].read_bytes()).hexdigest()
    assert manifest["extra"]["model"] == str(env[quantize].resolve())
    assert manifest["extra"]["model_fingerprint"] == digest  # its own, not the SavedModel's
    assert report["model"] == str(env[quantize])
    assert report["n_queries"] == report["embedded"] == 30
    baseline = evaluated["saved"]["eval"]["map_at_k"]
    allowed = {"none": 1e-6, "float16": 0.02, "int8": 0.15}[quantize]
    assert abs(report["map_at_k"] - baseline) <= allowed, (report["map_at_k"], baseline)


def test_an_int8_index_refuses_the_float_model(env, evaluated):
    queries = env["data"] / "queries.csv"
    result = invoke(
        "eval", "--index", evaluated["int8"]["index"], "--queries", queries, "--model", env["saved"]
    )
    assert result.exit_code == 2 and "rebuild the index or pass --force" in result.output


def _copy(env, tmp_path: Path, quantize: str = "float16") -> Path:
    target = tmp_path / env[quantize].name
    shutil.copy(env[quantize], target)
    shutil.copy(env[quantize].with_suffix(".json"), target.with_suffix(".json"))
    return target


def _edit(path: Path, **changes) -> None:
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, **changes}))


def test_check_refuses_a_file_whose_metadata_does_not_match(env, tmp_path):
    tflite = _copy(env, tmp_path)
    result = invoke("export", "--check", tflite)
    assert result.exit_code == 0, result.output  # a faithful copy passes

    cases = {
        "image_size": ({"image_size": SIZE * 2}, "metadata image_size 64"),
        "fingerprint": ({"saved_model_fingerprint": "1234"}, "SavedModel fingerprint 1234"),
        "sha256": ({"sha256": "0" * 64}, "does not match its metadata"),
    }
    for changes, message in cases.values():
        _edit(tflite, **changes)
        result = invoke("export", "--check", tflite)
        assert result.exit_code == 2 and message in result.output, result.output
        shutil.copy(env["float16"].with_suffix(".json"), tflite.with_suffix(".json"))

    with open(tflite, "ab") as handle:  # the file changed after export
        handle.write(b"\0")
    result = invoke("export", "--check", tflite)
    assert result.exit_code == 2 and "does not match its metadata" in result.output

    tflite.with_suffix(".json").unlink()
    result = invoke("index", "--model", tflite, "--gallery", env["data"] / "gallery.csv", "--out",
                    tmp_path / "i")  # fmt: skip
    assert result.exit_code == 2 and "not exported by vsearch" in result.output


def test_loading_refuses_metadata_that_does_not_fit_the_model(env, tmp_path):
    from vsearch_tf.errors import VSearchError
    from vsearch_tf.litert import load_litert

    tflite = _copy(env, tmp_path, "int8")
    _edit(tflite, embedding_dim=DIM + 1)
    with pytest.raises(VSearchError, match=r"gives 8-d, but its metadata says .* and 9-d"):
        load_litert(tflite)


def test_litert_options_are_checked(env):
    run = env["run"]
    result = invoke("export", run, "--name", "x", "--format", "litert", "--quantize", "int4")
    assert result.exit_code == 2 and "choose one of none, float16, int8" in result.output
    result = invoke("export", run, "--name", "x", "--quantize", "int8")
    assert result.exit_code == 2 and "apply to --format litert only" in result.output
    result = invoke("export", run, "--name", "x", "--format", "onnx")
    assert result.exit_code == 2 and "choose savedmodel or litert" in result.output
    models = env["saved"].parent.parent
    result = invoke("export", run, "--name", "tiny", "--root", models, "--format", "litert")
    assert result.exit_code == 2 and "exists; use --overwrite" in result.output


def test_embeddings_are_unit_length_and_batch_independent(env):
    """The loader resizes the interpreter to each batch; a batch of 5 gives what 5 batches of 1
    give."""
    from vsearch_tf.litert import load_litert

    model = load_litert(env["int8"])
    pixels = np.random.default_rng(0).uniform(0, 255, (5, SIZE, SIZE, 3)).astype(np.float32)
    together = model.embed_pixels(pixels)
    alone = np.concatenate([model.embed_pixels(pixels[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=0.02)
