"""The TF Serving export, checked from the outside: a fresh Python process loads the SavedModel
with ``tf.saved_model.load`` (no vsearch code) and its embeddings are compared with the Keras
embedder's on the evaluation path.

Docker cannot run here, so TF Serving's side is emulated: the REST JSON decoding of
``tensorflow_serving/util/json_tensor.cc`` (row and columnar forms, ``{"b64": ...}``) in
:func:`rest_to_request`, and the Predict handler's filling of missing inputs from the
SignatureDef ``defaults`` (``predict_util.cc``) in :data:`SERVER`.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import yaml
from PIL import Image
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
from typer.testing import CliRunner

from vsearch_tf.cli import app
from vsearch_tf.data.images import NO_BOX, load_crop_resize
from vsearch_tf.errors import VSearchError
from vsearch_tf.export import WARMUP, export_run, fingerprint_of, load_exported
from vsearch_tf.index import build_searcher, save_index
from vsearch_tf.models.embedder import build_embedder
from vsearch_tf.workflows import open_index

SIZE, DIM = 32, 16
BOX = (13.0, 9.0, 50.0, 41.0)  # x, y, w, h inside the 96 x 72 photo
TOL = 1e-5

# The fresh process: TensorFlow, the serving protos and the SavedModel, nothing else. Each
# ``*.pb`` is a PredictRequest; inputs it leaves out come from the SignatureDef defaults, as in
# TF Serving's predict_util.cc GetInputValues.
SERVER = r"""
import pathlib, sys
import numpy as np, tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2

model_dir, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
proto = saved_model_pb2.SavedModel.FromString((model_dir / "saved_model.pb").read_bytes())
signature_defs = proto.meta_graphs[0].signature_def
model = tf.saved_model.load(str(model_dir))
for path in sorted(work.glob("*.pb")):
    request = predict_pb2.PredictRequest.FromString(path.read_bytes())
    name = request.model_spec.signature_name or "serving_default"
    inputs = dict(signature_defs[name].defaults)
    inputs.update(request.inputs)
    try:
        tensors = {k: tf.constant(tf.make_ndarray(v)) for k, v in inputs.items()}
        outputs = model.signatures[name](**tensors)
        np.save(path.with_suffix(".npy"), outputs["embedding"].numpy())
    except tf.errors.InvalidArgumentError as err:
        path.with_suffix(".err").write_text(err.message)
"""


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, quality=90)
    return buffer.getvalue()


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def _json_to_array(value, dtype: int) -> np.ndarray:
    """One JSON value -> array of the SignatureDef dtype; ``{"b64": ...}`` is decoded for string
    tensors whatever the input's name (the ``_bytes`` suffix only matters for outputs)."""
    if dtype != types_pb2.DT_STRING:
        return np.array(value, dtype=tf.dtypes.as_dtype(dtype).as_numpy_dtype)

    def leaf(v):
        if isinstance(v, list):
            return [leaf(x) for x in v]
        if isinstance(v, dict):
            if list(v) != ["b64"] or not isinstance(v["b64"], str):
                raise ValueError(f"JSON Value: {v} not formatted correctly for base64 data")
            return base64.b64decode(v["b64"], validate=True)
        return v.encode()

    return np.array(leaf(value), dtype=object)


def rest_to_request(body: dict, signature_defs) -> predict_pb2.PredictRequest:
    """A ``:predict`` JSON body -> the PredictRequest TF Serving builds from it (json_tensor.cc).

    Row form: ``instances`` is a list of objects (a multi-input signature needs objects), one per
    example, all with the same keys; each input's values are stacked along a new batch axis.
    Columnar form: ``inputs`` maps each input to its whole batch. An input the body leaves out is
    filled later from the SignatureDef defaults (see :data:`SERVER`). The json_tensor.cc versions
    we could read refuse such a body before that step; docs/serving.md therefore always sends
    ``bbox`` over REST.
    """
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = body.get("signature_name", "")
    specs = signature_defs[request.model_spec.signature_name or "serving_default"].inputs
    if ("instances" in body) == ("inputs" in body):
        raise ValueError("expecting exactly one of 'inputs' or 'instances'")
    if "instances" in body:
        rows = body["instances"]
        if not all(isinstance(r, dict) and "b64" not in r for r in rows):
            raise ValueError(
                "instances is a plain list, but expecting list of objects as multiple input tensors"
            )
        if len({frozenset(r) for r in rows}) != 1:
            raise ValueError("every instance must have the same keys")
        columns = {k: [r[k] for r in rows] for k in rows[0]}
    else:
        columns = body["inputs"]
    for key, value in columns.items():
        if key not in specs:
            raise ValueError(f"JSON object: does not have named input: {key}")
        batch = np.stack([_json_to_array(v, specs[key].dtype) for v in value])
        request.inputs[key].CopyFrom(tf.make_tensor_proto(batch, dtype=specs[key].dtype))
    return request


def predict_request(signature: str = "serving_default", **inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    yy, xx = np.mgrid[0:72, 0:96].astype(np.float32)
    rgb = np.stack([2.5 * xx, 3.0 * yy, 127 + 100 * np.sin(xx / 5 + yy / 7)], axis=-1)
    rgb += np.random.default_rng(0).normal(0, 15, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(photo) -> dict[str, bytes]:
    x, y, w, h = (int(v) for v in BOX)
    jpeg = encode(photo, "JPEG")
    jpeg_pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    return {
        "jpeg": jpeg,
        "png": encode(photo, "PNG"),
        # Cropped first in numpy and stored losslessly: what a client cropping itself sends.
        "png_crop": encode(photo[y : y + h, x : x + w], "PNG"),
        "jpeg_crop": encode(jpeg_pixels[y : y + h, x : x + w], "PNG"),
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with all ``export_run`` reads. The backbone's BatchNorm statistics are set
    from one batch: with the initial ones a random MobileNet maps every image to the same vector,
    and every comparison below would pass vacuously."""
    run = tmp_path_factory.mktemp("run")
    embedder = build_embedder("mobilenet", SIZE, embedding_dim=DIM, weights="none", bn_momentum=0.0)
    embedder(
        np.random.default_rng(1).uniform(0, 255, (16, SIZE, SIZE, 3)).astype(np.float32),
        training=True,
    )
    embedder.save(run / "embedder.keras")
    (run / "config.yml").write_text(yaml.safe_dump({"model": {"backbone": "mobilenet"}}))
    return run, embedder


@pytest.fixture(scope="module")
def version_dir(run_dir, tmp_path_factory) -> Path:
    return export_run(run_dir[0], "tiny", root=tmp_path_factory.mktemp("saved_models"))


@pytest.fixture(scope="module")
def signature_defs(version_dir):
    return (
        saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
        .meta_graphs[0]
        .signature_def
    )


@pytest.fixture(scope="module")
def keras_embed(run_dir):
    """The evaluation path: load_crop_resize, then the Keras embedder (``predict`` runs it as a
    graph, as the SavedModel does; eager Keras uses other kernels and differs by ~1e-5)."""
    embedder = run_dir[1]

    def embed(items: list[tuple[bytes, tuple[float, ...]]]) -> np.ndarray:
        pixels = tf.stack(
            [
                load_crop_resize(tf.constant(b), tf.constant(box, tf.float32), SIZE)[0]
                for b, box in items
            ]
        )
        return embedder.predict(pixels, verbose=0)

    return embed


def warmup_requests(version_dir: Path) -> list[predict_pb2.PredictRequest]:
    return [
        prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request
        for r in tf.data.TFRecordDataset(str(version_dir / WARMUP))
    ]


@pytest.fixture(scope="module")
def served(version_dir, images, signature_defs, tmp_path_factory) -> dict[str, np.ndarray | str]:
    """Every request below, answered by one fresh process: label -> embeddings or error text."""
    jpeg, png = images["jpeg"], images["png"]
    requests = {
        "grpc": predict_request(
            image_bytes=[jpeg, png, jpeg, png],
            bbox=np.array([NO_BOX, NO_BOX, BOX, BOX], np.float32),
        ),
        "grpc_no_bbox": predict_request(
            image_bytes=[jpeg, png, images["jpeg_crop"], images["png_crop"]]
        ),
        "rest_row": rest_to_request(
            {"instances": [{"image_bytes": b64(jpeg)}, {"image_bytes": b64(png)}]}, signature_defs
        ),
        "rest_row_bbox": rest_to_request(
            {
                "instances": [
                    {"image_bytes": b64(jpeg), "bbox": list(BOX)},
                    {"image_bytes": b64(png), "bbox": list(NO_BOX)},
                ]
            },
            signature_defs,
        ),
        "rest_columnar": rest_to_request(
            {
                "signature_name": "serving_default",
                "inputs": {"image_bytes": [b64(jpeg), b64(png)], "bbox": [list(BOX)] * 2},
            },
            signature_defs,
        ),
        "corrupt": predict_request(image_bytes=[jpeg, b"<html>502 Bad Gateway</html>", png]),
        "truncated": predict_request(image_bytes=[jpeg, png[: len(png) // 2]]),
    }
    requests.update({f"warmup{i}": r for i, r in enumerate(warmup_requests(version_dir))})
    work = tmp_path_factory.mktemp("requests")
    for label, request in requests.items():
        (work / f"{label}.pb").write_bytes(request.SerializeToString())
    proc = subprocess.run(
        [sys.executable, "-c", SERVER, str(version_dir), str(work)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = {label: work / f"{label}.npy" for label in requests}
    return {
        label: np.load(a) if a.exists() else a.with_suffix(".err").read_text()
        for label, a in answers.items()
    }


def test_fresh_process_matches_keras_for_jpeg_and_png_with_and_without_bbox(
    served, images, keras_embed
):
    expected = keras_embed(
        [
            (images["jpeg"], NO_BOX),
            (images["png"], NO_BOX),
            (images["jpeg"], BOX),
            (images["png"], BOX),
        ]
    )
    np.testing.assert_allclose(served["grpc"], expected, rtol=0, atol=TOL)
    assert served["grpc"].shape == (4, DIM)
    np.testing.assert_allclose(np.linalg.norm(served["grpc"], axis=1), 1.0, atol=1e-6)
    # Whole image and crop embed far apart, so agreement within 1e-5 is not vacuous.
    assert np.abs(served["grpc"][0] - served["grpc"][2]).max() > 0.05


def test_bbox_equals_cropping_first_and_sending_the_crop(served):
    np.testing.assert_allclose(
        served["grpc"][2], served["grpc_no_bbox"][2], rtol=0, atol=TOL
    )  # JPEG
    np.testing.assert_allclose(
        served["grpc"][3], served["grpc_no_bbox"][3], rtol=0, atol=TOL
    )  # PNG


def test_missing_bbox_is_filled_from_the_signature_default(served, signature_defs):
    default = tf.make_ndarray(signature_defs["serving_default"].defaults["bbox"])
    np.testing.assert_array_equal(default, [NO_BOX])
    np.testing.assert_allclose(served["grpc_no_bbox"][:2], served["grpc"][:2], rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "label, expected",
    [
        ("rest_row", [("jpeg", NO_BOX), ("png", NO_BOX)]),
        ("rest_row_bbox", [("jpeg", BOX), ("png", NO_BOX)]),
        ("rest_columnar", [("jpeg", BOX), ("png", BOX)]),
    ],
)
def test_rest_json_bodies_feed_the_signature(served, images, keras_embed, label, expected):
    np.testing.assert_allclose(
        served[label], keras_embed([(images[k], box) for k, box in expected]), rtol=0, atol=TOL
    )


def test_rest_decoding_refuses_what_tf_serving_refuses(signature_defs, images):
    with pytest.raises(ValueError, match="plain list"):
        rest_to_request({"instances": [b64(images["png"])]}, signature_defs)
    with pytest.raises(ValueError, match="named input: image"):
        rest_to_request({"instances": [{"image": b64(images["png"])}]}, signature_defs)
    with pytest.raises(ValueError, match="base64"):
        rest_to_request(
            {"inputs": {"image_bytes": [{"b64": images["png"][:8].hex(), "x": 1}]}}, signature_defs
        )


def test_warmup_records_are_predict_logs_for_the_signature(
    version_dir, signature_defs, served, keras_embed
):
    records = warmup_requests(version_dir)
    assert len(records) >= 1
    inputs = signature_defs["serving_default"].inputs
    for i, request in enumerate(records):
        assert request.model_spec.signature_name == "serving_default"
        assert set(request.inputs) == set(inputs)
        assert {k: v.dtype for k, v in request.inputs.items()} == {
            k: inputs[k].dtype for k in inputs
        }
        items = list(
            zip(
                tf.make_ndarray(request.inputs["image_bytes"]),
                tf.make_ndarray(request.inputs["bbox"]),
            )
        )
        np.testing.assert_allclose(served[f"warmup{i}"], keras_embed(items), rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "label, message",
    [
        ("corrupt", r"not a JPEG, PNG, GIF, BMP or WebP image at batch index\] \[1\]"),
        ("truncated", "Invalid PNG data"),
    ],
)
def test_a_corrupt_image_fails_the_batch_with_a_clear_error(served, label, message):
    assert isinstance(served[label], str), f"{label}: the batch was embedded"
    assert re.search(message, served[label]), served[label]


def test_embed_bytes_turns_a_corrupt_batch_into_one_line(version_dir, images):
    model = load_exported(version_dir.parent)
    with pytest.raises(
        VSearchError, match=r"image batch rejected: assertion failed: .*batch index\] \[0\]"
    ):
        model.embed_bytes([b"GIF8", images["png"]])


def fake_save(token: str, seen: list[list[str]] | None = None):
    """Stand-in for tf.saved_model.save: the layout logic does not depend on the SavedModel's
    content, and the real save (seconds) is covered above."""

    def save(module, path, signatures):
        if seen is not None:  # what TF Serving would see if the process died right now
            seen.append(sorted(p.name for p in Path(path).parents[1].iterdir()))
            raise RuntimeError("simulated crash")
        Path(path).mkdir(parents=True)
        (Path(path) / "saved_model.pb").write_text(token)

    return save


def test_versions_increment_and_never_clobber_unless_overwrite(
    run_dir, version_dir, tmp_path, monkeypatch
):
    root = tmp_path / "saved_models"
    shutil.copytree(version_dir, root / "tiny" / "1")
    monkeypatch.setattr(tf.saved_model, "save", fake_save("second"))
    assert export_run(run_dir[0], "tiny", root=root).name == "2"
    with pytest.raises(VSearchError, match="exists; use --overwrite"):
        export_run(run_dir[0], "tiny", root=root, version=1)
    with pytest.raises(VSearchError, match="positive integer"):
        export_run(run_dir[0], "tiny", root=root, version=0)
    assert fingerprint_of(root / "tiny" / "1") == fingerprint_of(version_dir)
    monkeypatch.setattr(tf.saved_model, "save", fake_save("replaced"))
    assert export_run(run_dir[0], "tiny", root=root, version=1, overwrite=True).name == "1"
    assert (root / "tiny" / "1" / "saved_model.pb").read_text() == "replaced"
    assert (root / "tiny" / "2" / "saved_model.pb").read_text() == "second"
    assert (
        json.loads((root / "tiny" / "1" / "assets.extra" / "vsearch.json").read_text())["version"]
        == 1
    )
    assert sorted(p.name for p in (root / "tiny").iterdir()) == ["1", "2"]


def test_the_run_config_is_read_by_the_config_loader(run_dir, tmp_path, monkeypatch):
    """Its values reach the metadata, a wrong key is one line naming the file, and the run it
    started from (``run.init_from``) may be gone since."""
    monkeypatch.setattr(tf.saved_model, "save", fake_save("model"))
    run = tmp_path / "run"
    shutil.copytree(run_dir[0], run)
    config = {
        "run": {"init_from": str(tmp_path / "deleted_run")},
        "model": {"backbone": "mobilenet"},
        "data": {"max_pixels": 1234},
    }
    (run / "config.yml").write_text(yaml.safe_dump(config))
    version = export_run(run, "tiny", root=tmp_path / "saved_models")
    metadata = json.loads((version / "assets.extra" / "vsearch.json").read_text())
    assert metadata["max_pixels"] == 1234 and metadata["backbone"] == "mobilenet"
    (run / "config.yml").write_text("data:\n  max_pixel: 1234\n")
    with pytest.raises(VSearchError, match=r"config.yml: unknown config key 'data.max_pixel'"):
        export_run(run, "tiny", root=tmp_path / "saved_models")


def test_a_crash_inside_the_atomic_write_leaves_no_version(run_dir, tmp_path, monkeypatch):
    seen: list[list[str]] = []
    monkeypatch.setattr(tf.saved_model, "save", fake_save("", seen))
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_run(run_dir[0], "tiny", root=tmp_path)
    assert len(seen) == 1 and all(name.startswith(".") and not name.isdigit() for name in seen[0])
    assert list((tmp_path / "tiny").iterdir()) == []


def test_check_command_prints_the_signature_table_and_passes(version_dir):
    result = CliRunner().invoke(app, ["export", "--check", str(version_dir.parent)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "signature_def['serving_default']  method: tensorflow/serving/predict",
        "signature_def['serve_pixels']  method: tensorflow/serving/predict",
        "image_bytes",
        "DT_STRING",
        "(-1)",
        "(-1, 4)",
        "[[-1.0, -1.0, -1.0, -1.0]]",
        f"(-1, {SIZE}, {SIZE}, 3)",
        f"(-1, {DIM})",
        "bbox omitted",
        "warm-up record",
    ):
        assert text in out, text
    assert "FAIL" not in out


def test_flip_export_averages_each_crop_with_its_mirror_image(run_dir, photo, tmp_path):
    """``--flip``: serve_pixels is the normalised mean of the crop's and its mirror's Keras
    embeddings, so a mirrored photo embeds the same; the fresh-process check knows it."""
    result = CliRunner().invoke(
        app, ["export", str(run_dir[0]), "--name", "flip", "--root", str(tmp_path), "--flip"]
    )
    assert result.exit_code == 0, result.output
    model = load_exported(tmp_path / "flip")
    assert model.metadata["flip"] is True
    pixels = tf.image.resize(tf.constant(photo[None], tf.float32), [SIZE, SIZE])
    mirrored = tf.reverse(pixels, [2])
    keras_of = lambda x: run_dir[1].predict(x, verbose=0)  # noqa: E731
    expected = keras_of(pixels) + keras_of(mirrored)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = model.embed_pixels(tf.concat([pixels, mirrored], 0)).numpy()
    np.testing.assert_allclose(got, np.concatenate([expected, expected]), rtol=0, atol=TOL)
    assert np.abs(keras_of(pixels) - keras_of(mirrored)).max() > 0.05  # not flip-invariant alone
    check = CliRunner().invoke(app, ["export", "--check", str(tmp_path / "flip")])
    assert check.exit_code == 0 and "FAIL" not in check.stdout, check.output


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "usage: vsearch export RUN_DIR --name NAME"),
        (["RUN"], "usage: vsearch export RUN_DIR --name NAME"),
        (["RUN", "--check", "MODEL"], "--check MODEL_DIR takes no RUN_DIR"),
        (["--check", "MODEL", "--name", "x"], "--check MODEL_DIR takes no RUN_DIR"),
    ],
)
def test_export_command_misuse_is_one_line(args, message):
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.strip().count("\n") == 0


def tiny_index(out: Path, version_dir: Path, fingerprint: str) -> Path:
    embeddings = np.random.default_rng(0).normal(size=(20, DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    ids = pd.DataFrame(
        {"seller_img_id": [f"{i}.jpg" for i in range(20)], "product_id": np.arange(20) // 2}
    )
    extra = {"model": str(version_dir), "model_fingerprint": fingerprint}
    save_index(out, build_searcher(embeddings), embeddings, ids, extra)
    return out


def test_index_refuses_another_model_unless_forced(version_dir, tmp_path):
    other = tiny_index(tmp_path / "other", version_dir, "0" * 20)
    with pytest.raises(VSearchError, match="pass --force"):
        open_index(other)
    assert open_index(other, force=True).model.fingerprint == fingerprint_of(version_dir)
    same = tiny_index(tmp_path / "same", version_dir, fingerprint_of(version_dir))
    assert open_index(same).index.dim == DIM
