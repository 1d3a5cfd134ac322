"""SavedModel export that TF Serving loads as is, the fresh-process check, and the loader the rest
of the tool uses.

Layout: ``saved_models/NAME/<integer version>/`` (TF Serving serves the highest integer). The
version folder is written under a dot-prefixed temporary name and renamed when complete, so a
killed export never leaves a folder TF Serving would try to load.

Signatures (method ``tensorflow/serving/predict``):

- ``serving_default``: ``image_bytes`` (string [-1], JPEG/PNG) and ``bbox`` (float [-1, 4], pixels
  x, y, w, h; all -1 = whole image; optional: the SignatureDef carries a default, which TF Serving
  fills in) -> ``embedding`` (float [-1, D], L2-normalised). Over REST, string inputs take
  ``{"b64": ...}`` values; ``_bytes`` is the REST naming convention for binary strings.
- ``serve_pixels``: ``pixels`` (float [-1, S, S, 3], RGB in [0, 255], decoded and cropped) ->
  ``embedding``. Indexing and evaluation use it behind the same tf.data decoding code, and
  ``serving_default`` calls it after decoding, so both run one embedder graph. An export made
  with ``flip=True`` embeds each crop and its mirror image and returns their normalised mean
  (test-time flip averaging: in the graph, so serving, indexing and evaluation all get it).
- ``serve_text`` (``--text``, CLIP / SigLIP runs with ``embedding_dim: 0``): ``text`` (string
  [-1]) -> ``embedding`` in the image embedding's space, the preset's tokenizer in the graph. Its
  ops come from TensorFlow Text: a loader imports ``tensorflow_text`` first (TF Serving's model
  server links them in).
- ``localize`` (exported with ``--localizer RUN_DIR`` only): ``image_bytes`` -> ``box`` (float
  [-1, 4], pixels x, y, w, h of the image as displayed) and ``confidence`` (float [-1], the
  localizer's predicted IoU of its box). ``serving_default`` then crops a row whose ``bbox`` is
  all -1 (or left out) at that predicted box, through the same crop as a given box.

``assets.extra/vsearch.json`` records image size, embedding size and the run it came from;
``assets.extra/tf_serving_warmup_requests`` holds PredictionLog warm-up records.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vsearch_tf import io
from vsearch_tf.config import run_config
from vsearch_tf.data import DEFAULT_MAX_PIXELS
from vsearch_tf.data.images import (
    FORMATS,
    NO_BOX,
    displayed_size,
    image_format,
    load_crop_resize,
)
from vsearch_tf.errors import VSearchError, error_cause, one_line
from vsearch_tf.models import layers as _layers  # noqa: F401  (registers the custom layers for load_model)
from vsearch_tf.models import localizer as _localizer  # noqa: F401  (its BoxOutput layer, likewise)

METADATA = "assets.extra/vsearch.json"
WARMUP = "assets.extra/tf_serving_warmup_requests"
TEXT_CHECK = "assets.extra/vsearch_text_check.json"  # texts and the Keras text tower's vectors
_CHECK_TEXTS = ["red sneaker", "a black leather handbag with a gold chain", "", "T-SHIRT, blue!"]


class ServingModule(tf.Module):
    """The exported object: the embedder's variables plus the in-graph preprocessing.

    Only the variables are tracked (as Keras' own ``ExportArchive`` does), not the Keras model
    object: saving its layer objects made export ~2.5x and loading ~3x slower here, and TF
    Serving uses none of them.
    """

    def __init__(
        self,
        embedder: keras.Model,
        image_size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        flip: bool = False,
        localizer: keras.Model | None = None,
        text_encoder: Any = None,
    ):
        super().__init__()
        self.embedder_variables = list(embedder.variables)
        self.image_size = size = image_size
        localize = None
        if localizer is not None:
            self.localizer_variables = list(localizer.variables)
            localize = _localize_function(localizer, max_pixels)
        self.serve_text = None
        if text_encoder is not None:
            # Tracked so the SavedModel carries the tokenizer's tables and the text tower.
            self.text_preprocessor = text_encoder.preprocessor
            self.text_variables = list(text_encoder.model.variables)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
            def serve_text(text):
                return {"embedding": tf.cast(text_encoder(text), tf.float32)}

            self.serve_text = serve_text

        @tf.function(
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")]
        )
        def serve_pixels(pixels):
            embed = lambda x: embedder(x, training=False)  # noqa: E731
            return {"embedding": flip_average(embed, pixels) if flip else embed(pixels)}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.string, name="image_bytes"),
                tf.TensorSpec([None, 4], tf.float32, name="bbox"),
            ]
        )
        def serve_bytes(image_bytes, bbox=tf.constant([NO_BOX], tf.float32)):
            n = tf.shape(image_bytes)[0]
            # A decoder error cannot say which image it was; a wrong format can, before decoding.
            known = image_format(image_bytes) > 0
            tf.debugging.Assert(
                tf.reduce_all(known),
                [
                    f"image_bytes: not a {FORMATS} image at batch index",
                    tf.where(tf.logical_not(known))[:, 0],
                ],
                summarize=32,
            )
            # The default (or a single box) applies to every image of the batch.
            bbox = tf.cond(
                tf.equal(tf.shape(bbox)[0], 1), lambda: tf.tile(bbox, [n, 1]), lambda: bbox
            )
            tf.debugging.assert_equal(
                tf.shape(bbox)[0],
                n,
                message="bbox must have one row per image (or one row for all)",
            )
            if localize is not None:  # "no box" rows take the localizer's box
                bbox = _predicted_where_no_box(localize, image_bytes, bbox)
            pixels = tf.map_fn(
                lambda args: load_crop_resize(args[0], args[1], size, max_pixels)[0],
                (image_bytes, bbox),
                fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
                parallel_iterations=16,
            )
            return serve_pixels(pixels)

        self.serve_bytes = serve_bytes
        self.serve_pixels = serve_pixels
        self.localize = localize

    def signatures(self) -> dict[str, Any]:
        """The SignatureDefs to save: ``localize`` only with a localizer, ``serve_text`` only
        with a text encoder."""
        found = {"serving_default": self.serve_bytes, "serve_pixels": self.serve_pixels}
        if self.localize is not None:
            found["localize"] = self.localize
        if self.serve_text is not None:
            found["serve_text"] = self.serve_text
        return found


def _localize_function(localizer: keras.Model, max_pixels: int) -> Any:
    """The ``localize`` signature: each whole image through :func:`load_crop_resize` (no box) at
    the localizer's size, the localizer, its normalised box scaled to the image's pixels."""
    size = int(localizer.input_shape[1])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def localize(image_bytes):
        pixels = tf.map_fn(
            lambda b: load_crop_resize(b, tf.constant(NO_BOX), size, max_pixels)[0],
            image_bytes,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
            parallel_iterations=16,
        )
        hw = tf.map_fn(
            lambda b: displayed_size(b, image_format(b)),
            image_bytes,
            fn_output_signature=tf.TensorSpec([2], tf.int32),
        )
        out = localizer(pixels, training=False)
        wh = tf.cast(hw[:, ::-1], tf.float32)
        return {"box": out[:, :4] * tf.concat([wh, wh], 1), "confidence": out[:, 4]}

    return localize


def _predicted_where_no_box(localize: Any, image_bytes: tf.Tensor, bbox: tf.Tensor) -> tf.Tensor:
    """``bbox`` with each all -1 row replaced by the localizer's box (run only if there is one)."""
    no_box = tf.reduce_all(tf.equal(bbox, -1.0), axis=1)
    return tf.cond(
        tf.reduce_any(no_box),
        lambda: tf.where(no_box[:, None], localize(image_bytes)["box"], bbox),
        lambda: bbox,
    )


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


@contextlib.contextmanager
def _export_lock(model_dir: Path) -> Iterator[None]:
    """Serialise exports of one model name: two concurrent exports must not both pick the same
    "next free" version, since the atomic rename would then swap one over the other."""
    with io.file_lock(model_dir.parent / f".{model_dir.name}.lock", wait=True):
        yield


def _sample_jpeg(size: int) -> bytes:
    gradient = tf.cast(tf.linspace(0.0, 255.0, size), tf.uint8)
    image = tf.stack([tf.tile(gradient[None, :], [size, 1])] * 3, axis=-1)
    return tf.io.encode_jpeg(image).numpy()


def _write_warmup(path: Path, model_name: str, image_size: int) -> None:
    """TF Serving replays these PredictionLog records at load, so the first request is not slow."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in (1, 8):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
            )
            request.inputs["image_bytes"].CopyFrom(
                tf.make_tensor_proto([_sample_jpeg(image_size)] * batch, dtype=tf.string)
            )
            request.inputs["bbox"].CopyFrom(
                tf.make_tensor_proto([list(NO_BOX)] * batch, dtype=tf.float32)
            )
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def flip_average(embed: Any, pixels: Any) -> Any:
    """The L2-normalised sum of the embeddings of ``pixels`` ([N, S, S, 3]) and their mirror
    images: one batch of 2N through ``embed``, which returns unit vectors."""
    both = embed(tf.concat([pixels, tf.reverse(pixels, [2])], 0))
    n = tf.shape(pixels)[0]
    return tf.math.l2_normalize(both[:n] + both[n:], axis=-1)


def export_run(
    run_dir: str | Path,
    name: str,
    *,
    root: str | Path = "saved_models",
    version: int | None = None,
    overwrite: bool = False,
    flip: bool = False,
    localizer: str | Path | None = None,
    text: bool = False,
) -> Path:
    """Export ``run_dir``'s embedder as ``root/name/<version>``; returns the version folder.
    ``flip``: test-time flip averaging (:func:`flip_average`) in the graph, at twice the
    embedding cost. With ``localizer`` (a ``vsearch train-localizer`` run directory) the
    localizer is in the graph too: the ``localize`` signature, and ``serving_default`` crops its
    box when given none. ``text`` adds the ``serve_text`` signature (CLIP / SigLIP runs with
    ``embedding_dim: 0``)."""
    run_dir = Path(run_dir)
    localizer_model, localizer_meta = _load_localizer(localizer) if localizer else (None, None)
    keras_path = run_dir / "embedder.keras"
    if not keras_path.is_file():
        raise VSearchError(f"{run_dir}: not a finished training run (no embedder.keras)")
    if version is not None and version < 1:
        raise VSearchError(f"--version must be a positive integer, got {version}")
    # Without a config.yml (an embedder saved there by hand): the default image-size bound.
    config = run_config(run_dir) if (run_dir / "config.yml").is_file() else None
    max_pixels = config.data.max_pixels if config else DEFAULT_MAX_PIXELS
    model_dir = Path(root) / name
    with _export_lock(model_dir):
        existing = _versions(model_dir)
        if version is None:
            version = (existing[-1] + 1) if existing else 1
        elif version in existing and not overwrite:
            raise VSearchError(
                f"{model_dir / str(version)} exists; use --overwrite or another --version"
            )
        try:
            embedder = keras.saving.load_model(keras_path, compile=False)
        except Exception as err:  # a truncated or foreign file: zipfile, h5py or Keras errors alike
            raise VSearchError(
                f"{keras_path}: cannot load the embedder ({one_line(err)})"
            ) from None
        image_size = int(embedder.input_shape[1])
        text_encoder = _text_encoder(run_dir, config, embedder) if text else None
        module = ServingModule(
            embedder, image_size, max_pixels, flip, localizer_model, text_encoder
        )
        target = model_dir / str(version)
        with io.atomic_path(target) as tmp:
            tf.saved_model.save(module, str(tmp), signatures=module.signatures())
            _write_warmup(tmp / WARMUP, name, image_size)
            if text_encoder is not None:
                check = {
                    "texts": _CHECK_TEXTS,
                    # eager Keras (not the traced signature): what --check compares against
                    "embedding": np.asarray(text_encoder(tf.constant(_CHECK_TEXTS))).tolist(),
                }
                (tmp / TEXT_CHECK).write_text(json.dumps(check))
            metadata = {
                "image_size": image_size,
                "max_pixels": max_pixels,
                "embedding_dim": int(embedder.output_shape[-1]),
                "run_dir": str(run_dir.resolve()),
                "backbone": config.model.backbone if config else None,
                "flip": flip,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "name": name,
                "version": version,
                "localizer": localizer_meta,
                "text": text_encoder is not None,
            }
            (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
    return target


def _text_encoder(run_dir: Path, config: Any, embedder: keras.Model):
    """The run's CLIP / SigLIP text tower, refused in one line when its vectors would not live in
    the image embedding's space."""
    from vsearch_tf.models.backbones import get_spec
    from vsearch_tf.models.transformers import build_text_encoder

    if config is None:
        raise VSearchError(f"{run_dir}: --text needs the run's config.yml (which backbone)")
    m = config.model
    if not get_spec(m.backbone).text:
        raise VSearchError(
            f"--text: backbone {m.backbone} has no text tower (CLIP and SigLIP backbones have one)"
        )
    if m.embedding_dim != 0:
        raise VSearchError(
            "--text: config key model.embedding_dim is "
            f"{m.embedding_dim}; the run's own projection has no text twin, so only a run with "
            "embedding_dim: 0 (the pretrained joint image-text space) can search by text"
        )
    if m.weights not in ("imagenet", "none"):
        raise VSearchError(
            f"--text: config key model.weights is a file ({m.weights}); the text tower comes "
            "from the keras-hub preset (weights: imagenet)"
        )
    encoder = build_text_encoder(m.backbone, config.data.image_size, m.weights, m.text_tokenizer)
    width, image_width = int(encoder.model.output.shape[-1]), int(embedder.output_shape[-1])
    if width != image_width:
        raise VSearchError(
            f"--text: the text tower's embedding has {width} dimensions, the image's {image_width}"
        )
    return encoder


def _load_localizer(run_dir: str | Path) -> tuple[keras.Model, dict[str, Any]]:
    """A finished localizer run's model and what the manifest records of it."""
    run_dir = Path(run_dir)
    path = run_dir / "localizer.keras"
    if not path.is_file() or not (run_dir / "summary.json").is_file():
        raise VSearchError(f"--localizer {run_dir}: not a finished localizer run (no {path.name})")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as err:
        raise VSearchError(f"{path}: cannot load the localizer ({one_line(err)})") from None
    summary = json.loads((run_dir / "summary.json").read_text())
    return model, {
        "run_dir": str(run_dir.resolve()),
        "image_size": int(model.input_shape[1]),
        "backbone": summary.get("backbone"),
        "val_iou": summary.get("val_iou"),
    }


class ModelMetadata:
    """What index, eval and query read of any exported model's ``metadata`` (a SavedModel's
    manifest or a ``.tflite``'s JSON): one reading of the keys for every model kind."""

    metadata: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def max_pixels(self) -> int:
        """The decompression-bomb bound the export decodes with; index and eval use the same."""
        return int(self.metadata.get("max_pixels", DEFAULT_MAX_PIXELS))

    @property
    def embedding_dim(self) -> int:
        return int(self.metadata["embedding_dim"])

    @property
    def has_text(self) -> bool:
        """Whether :meth:`embed_text` works (a SavedModel exported with ``--text``)."""
        return False

    def embed_text(self, texts: list[str]) -> Any:
        raise VSearchError(
            f"{getattr(self, 'path', 'this model')}: no serve_text signature (export a CLIP / "
            "SigLIP run with --text and search by text with the SavedModel)"
        )


@dataclass
class ExportedModel(ModelMetadata):
    """A loaded export: its folder, metadata, fingerprint and the signatures."""

    path: Path
    metadata: dict[str, Any]
    fingerprint: str
    serving: Any  # the loaded SavedModel

    @property
    def has_text(self) -> bool:
        return "serve_text" in self.serving.signatures

    def embed_text(self, texts: list[str]) -> tf.Tensor:
        """Embed texts through ``serve_text`` (an export made with ``--text``)."""
        if not self.has_text:
            raise VSearchError(
                f"{self.path}: no serve_text signature (export a CLIP / SigLIP run with --text)"
            )
        return self.serving.signatures["serve_text"](text=tf.constant(texts, tf.string))[
            "embedding"
        ]

    def embed_pixels(self, pixels: tf.Tensor) -> tf.Tensor:
        return self.serving.signatures["serve_pixels"](pixels=pixels)["embedding"]

    def embed_bytes(
        self, image_bytes: list[bytes], bbox: list[list[float]] | None = None
    ) -> tf.Tensor:
        """Embed encoded images through ``serving_default``; a corrupt image fails the whole batch
        with a ``VSearchError`` naming the cause, never a wrong embedding."""
        boxes = bbox if bbox is not None else [list(NO_BOX)] * len(image_bytes)
        try:
            return self.serving.signatures["serving_default"](
                image_bytes=tf.constant(image_bytes, tf.string), bbox=tf.constant(boxes, tf.float32)
            )["embedding"]
        except tf.errors.InvalidArgumentError as err:
            raise VSearchError(f"image batch rejected: {error_cause(err.message)}") from None

    @property
    def localizer(self) -> dict[str, Any] | None:
        """What the manifest records of the localizer exported with the model, or None."""
        return self.metadata.get("localizer")

    def localize(self, image_bytes: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """The ``localize`` signature: ``(boxes [n, 4] pixels x, y, w, h, confidences [n])``."""
        if self.localizer is None:
            raise VSearchError(
                f"{self.path}: exported without a localizer (vsearch export --localizer)"
            )
        try:
            out = self.serving.signatures["localize"](
                image_bytes=tf.constant(image_bytes, tf.string)
            )
        except tf.errors.InvalidArgumentError as err:
            raise VSearchError(f"image batch rejected: {error_cause(err.message)}") from None
        return out["box"].numpy(), out["confidence"].numpy()


def resolve_version(path: str | Path) -> Path:
    """``saved_models/NAME`` -> its newest version folder; a version folder is returned as is."""
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    versions = _versions(path)
    if not versions:
        raise VSearchError(
            f"{path}: no SavedModel here (expected saved_model.pb or integer version folders)"
        )
    return path / str(versions[-1])


def fingerprint_of(version_dir: Path) -> str:
    """The SavedModel's own fingerprint (from ``fingerprint.pb``): changes whenever the graph or
    the weights change, so an index can tell which model built it."""
    return str(tf.saved_model.experimental.read_fingerprint(str(version_dir)).singleprint())


def _text_ops() -> None:
    """Register TensorFlow Text's ops, which a ``serve_text`` signature's tokenizer uses."""
    with contextlib.suppress(ImportError):
        import tensorflow_text  # noqa: F401


def load_exported(path: str | Path) -> ExportedModel:
    """Load an export (a model folder or one version) with its metadata."""
    version_dir = resolve_version(path)
    meta_path = version_dir / METADATA
    if not meta_path.is_file():
        raise VSearchError(f"{version_dir}: not exported by vsearch (no {METADATA})")
    _text_ops()
    try:
        serving = tf.saved_model.load(str(version_dir))
    except Exception as err:
        raise VSearchError(f"{version_dir}: cannot load SavedModel ({one_line(err)})") from None
    return ExportedModel(
        version_dir, json.loads(meta_path.read_text()), fingerprint_of(version_dir), serving
    )


def signature_table(version_dir: str | Path) -> list[dict[str, Any]]:
    """The SignatureDefs as TF Serving reads them from ``saved_model.pb``: what ``saved_model_cli
    show --all`` prints, plus the input defaults it leaves out (TF Serving fills those in)."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString(
        (Path(version_dir) / "saved_model.pb").read_bytes()
    )
    meta_graph = next(mg for mg in proto.meta_graphs if "serve" in mg.meta_info_def.tags)
    rows = []
    for key in sorted(meta_graph.signature_def, key=lambda k: (k != "serving_default", k)):
        signature = meta_graph.signature_def[key]
        if key.startswith("__"):  # __saved_model_init_op is not a signature clients call
            continue
        for kind, infos in (("input", signature.inputs), ("output", signature.outputs)):
            for alias in sorted(infos):
                info = infos[alias]
                default = signature.defaults.get(alias) if kind == "input" else None
                rows.append(
                    {
                        "signature": key,
                        "method": signature.method_name,
                        "kind": kind,
                        "name": alias,
                        "dtype": types_pb2.DataType.Name(info.dtype),
                        "shape": [d.size for d in info.tensor_shape.dim],
                        "default": None if default is None else tf.make_ndarray(default).tolist(),
                    }
                )
    return rows


# Run by ``check_export`` in a fresh interpreter: TensorFlow, the serving protos and the SavedModel
# only, no vsearch code, so anything the export forgot to carry fails here as it would in TF
# Serving. Each ``*.request`` file is a serialised PredictRequest; inputs it leaves out are filled
# from the SignatureDef ``defaults`` as TF Serving's Predict does.
_SERVE_SCRIPT = r"""
import pathlib, sys
import numpy as np, tensorflow as tf
try:
    import tensorflow_text  # the ops of a serve_text signature's tokenizer
except ImportError:
    pass
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2

model_dir, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
proto = saved_model_pb2.SavedModel.FromString((model_dir / "saved_model.pb").read_bytes())
serve = next(mg for mg in proto.meta_graphs if "serve" in mg.meta_info_def.tags)
signature_defs = serve.signature_def
model = tf.saved_model.load(str(model_dir))
for path in sorted(work.glob("*.request")):
    request = predict_pb2.PredictRequest.FromString(path.read_bytes())
    name = request.model_spec.signature_name or "serving_default"
    inputs = {**signature_defs[name].defaults, **request.inputs}
    try:
        tensors = {k: tf.constant(tf.make_ndarray(v)) for k, v in inputs.items()}
        outputs = model.signatures[name](**tensors)
        np.savez(path.with_suffix(".npz"), **{k: v.numpy() for k, v in outputs.items()})
    except tf.errors.InvalidArgumentError as err:
        path.with_suffix(".err").write_text(err.message)
"""


def _check_images() -> tuple[bytes, bytes, tuple[float, float, float, float]]:
    """A deterministic non-square test photo as JPEG and PNG, and a box inside it."""
    yy, xx = np.mgrid[0:90, 0:120].astype(np.float32)
    noise = np.random.default_rng(0).normal(0.0, 12.0, (90, 120, 3))
    image = (
        np.stack([2.0 * xx, 2.5 * yy, 127.0 + 100.0 * np.sin(xx / 6.0 + yy / 9.0)], axis=-1) + noise
    )
    image = tf.constant(np.clip(image, 0, 255).astype(np.uint8))
    return (
        tf.io.encode_jpeg(image, quality=90).numpy(),
        tf.io.encode_png(image).numpy(),
        (20.0, 15.0, 60.0, 50.0),
    )


def _predict_request(signature: str, **inputs: Any):
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def _keras_localize(
    localizer: dict[str, Any], images: list[bytes], max_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """The Keras localizer of an export's manifest on ``images``: its ``[n, 5]`` output (box as
    fractions, confidence) and each image's ``[width, height]``, by the export's own path."""
    model_path = Path(localizer["run_dir"]) / "localizer.keras"
    if not model_path.is_file():
        raise VSearchError(
            f"{model_path}: not found; the check compares with the localizer the model was "
            "exported with"
        )
    size = int(localizer["image_size"])
    pixels = tf.stack(
        [load_crop_resize(tf.constant(b), tf.constant(NO_BOX), size, max_pixels)[0] for b in images]
    )
    frames = np.array(
        [
            displayed_size(tf.constant(b), image_format(tf.constant(b))).numpy()[::-1]
            for b in images
        ],
        np.float32,
    )
    model = keras.saving.load_model(model_path, compile=False)
    return model.predict(pixels, verbose=0), frames


def check_export(path: str | Path, *, tolerance: float = 1e-5) -> dict[str, Any]:
    """Serve the newest version of ``path`` from a fresh Python process, as TF Serving would, and
    compare every signature's embeddings with the Keras embedder of the run it was exported from.

    Covers JPEG and PNG, with and without a box, ``bbox`` left to its SignatureDef default,
    ``serve_pixels``, and a replay of the warm-up records. With a localizer (the manifest's
    ``localizer``): ``localize``'s boxes and confidences against the Keras localizer, and
    "no box" cropped at the box the Keras localizer predicts.
    """
    from tensorflow_serving.apis import prediction_log_pb2

    version_dir = resolve_version(path)
    meta_path = version_dir / METADATA
    if not meta_path.is_file():
        raise VSearchError(f"{version_dir}: not exported by vsearch (no {METADATA})")
    metadata = json.loads(meta_path.read_text())
    keras_path = Path(metadata["run_dir"]) / "embedder.keras"
    if not keras_path.is_file():
        raise VSearchError(
            f"{keras_path}: not found; the check compares with the run the model was exported from"
        )
    size = int(metadata["image_size"])
    max_pixels = int(metadata.get("max_pixels", DEFAULT_MAX_PIXELS))
    jpeg, png, box = _check_images()
    cases = [(jpeg, NO_BOX), (png, NO_BOX), (jpeg, box), (png, box), (_sample_jpeg(size), NO_BOX)]
    localizer = metadata.get("localizer")
    located = None
    if localizer is not None:  # "no box" means the predicted box: the reference crops there
        located, frames = _keras_localize(localizer, [b for b, _ in cases], max_pixels)
        boxes = located[:, :4] * np.concatenate([frames, frames], 1)
        cases = [(b, tuple(boxes[i]) if bb == NO_BOX else bb) for i, (b, bb) in enumerate(cases)]
    pixels = tf.stack(
        [load_crop_resize(tf.constant(b), tf.constant(bb, tf.float32), size)[0] for b, bb in cases]
    )
    # (label, request, output, rows of ``cases`` its answer must equal)
    checks = [
        (
            "serving_default: JPEG, PNG, JPEG+bbox, PNG+bbox",
            _predict_request(
                "serving_default",
                image_bytes=[b for b, _ in cases[:4]],
                bbox=np.array(
                    [bb if i > 1 else NO_BOX for i, (_, bb) in enumerate(cases[:4])], np.float32
                ),
            ),
            "embedding",
            [0, 1, 2, 3],
        ),
        (
            "serving_default: bbox omitted (SignatureDef default)",
            _predict_request("serving_default", image_bytes=[jpeg, png]),
            "embedding",
            [0, 1],
        ),
        (
            "serve_pixels: the same four crops",
            _predict_request("serve_pixels", pixels=pixels.numpy()[:4]),
            "embedding",
            [0, 1, 2, 3],
        ),
    ]
    if located is not None:
        request = _predict_request("localize", image_bytes=[jpeg, png])
        checks.append(
            ("localize: box (fraction of the image) vs Keras localizer", request, "box", [0, 1])
        )
        checks.append(("localize: confidence vs Keras localizer", request, "confidence", [0, 1]))
    for i, record in enumerate(tf.data.TFRecordDataset(str(version_dir / WARMUP))):
        warm = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        batch = len(warm.inputs["image_bytes"].string_val)
        checks.append((f"warm-up record {i + 1} (batch {batch})", warm, "embedding", [4] * batch))
    text_reference = None
    if (version_dir / TEXT_CHECK).is_file():
        text_check = json.loads((version_dir / TEXT_CHECK).read_text())
        text_reference = np.asarray(text_check["embedding"], np.float32)
        checks.append(  # rows None: compared with the text tower's vectors, not ``cases``
            (
                "serve_text: the export's check texts (vs the Keras text tower)",
                _predict_request("serve_text", text=np.array(text_check["texts"], object)),
                "embedding",
                None,
            )
        )

    with tempfile.TemporaryDirectory(prefix="vsearch-check-") as work:
        for i, (_, request, _, _) in enumerate(checks):
            Path(work, f"{i:02d}.request").write_bytes(request.SerializeToString())
        server = subprocess.Popen(
            [sys.executable, "-c", _SERVE_SCRIPT, str(version_dir), work],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        # The reference, while the fresh process imports TensorFlow: the evaluation path
        # (load_crop_resize, then the Keras embedder). ``predict`` runs the embedder as a graph like
        # the SavedModel does; eager Keras picks other kernels and differs by ~1e-5.
        embedder = keras.saving.load_model(keras_path, compile=False)
        embed = lambda x: embedder.predict(x, verbose=0)  # noqa: E731
        reference = {
            "embedding": np.asarray(
                flip_average(embed, pixels) if metadata.get("flip") else embed(pixels)
            )
        }
        if located is not None:
            reference["box"], reference["confidence"] = located[:, :4], located[:, 4]
        _, stderr = server.communicate()
        if server.returncode != 0:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            raise VSearchError(f"{version_dir}: loading in a fresh process failed ({last})")
        results = []
        for i, (label, _, output, rows) in enumerate(checks):
            answer, error = Path(work, f"{i:02d}.npz"), Path(work, f"{i:02d}.err")
            if error.is_file():
                results.append(
                    {
                        "check": label,
                        "max_abs_diff": None,
                        "ok": False,
                        "error": error_cause(error.read_text()),
                    }
                )
                continue
            with np.load(answer) as saved:
                value = saved[output]
            if output == "box":  # pixels -> fractions of the image, as the localizer gives them
                value = value / np.concatenate([frames[rows], frames[rows]], 1)
            expected = text_reference if rows is None else reference[output][rows]
            diff = float(np.abs(value - expected).max())
            results.append(
                {"check": label, "max_abs_diff": diff, "ok": diff <= tolerance, "error": None}
            )
    return {
        "path": str(version_dir),
        "fingerprint": fingerprint_of(version_dir),
        "run_dir": metadata["run_dir"],
        "tolerance": tolerance,
        "signatures": signature_table(version_dir),
        "checks": results,
        "ok": all(r["ok"] for r in results),
    }
