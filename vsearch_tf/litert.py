"""LiteRT (TFLite) export for on-device search, the fresh-process check, and the loader that
``vsearch index`` / ``eval`` / ``query`` use for a ``.tflite`` path.

A LiteRT export is converted from a SavedModel export's ``serve_pixels`` signature (the same
graph TF Serving runs), so it takes what that signature takes: float32 RGB pixels in [0, 255],
already decoded, cropped to the product box and resized to the export's image size by
:mod:`vsearch_tf.data.images` (the one preprocessing path; on a phone, the app's own crop and
resize). The backbone's normalisation is inside the model. It returns the float32 L2-normalised
embedding. Quantizations:

- ``none``: float32, the SavedModel's graph as TFLite ops;
- ``float16``: float16 weights (half the bytes), computed in float32;
- ``int8``: weights and activations int8, calibrated on a representative set of the run's
  training images (through the same crop/resize), with float32 input and output: the converter
  puts the (de)quantisation at the edges, so callers need no scale or zero point.

Layout, beside the TF Serving versions (TF Serving only loads integer folders)::

    ROOT/NAME/<version>/                      the SavedModel it came from
    ROOT/NAME/litert/NAME-<quantize>.tflite
    ROOT/NAME/litert/NAME-<quantize>.json     metadata: input size, normalisation, embedding
                                              size, the SavedModel's fingerprint, the file's hash

:class:`LiteRTModel` has :class:`vsearch_tf.export.ExportedModel`'s interface (``image_size``,
``max_pixels``, ``embedding_dim``, ``fingerprint``, ``embed_pixels``), so indexing and
evaluation only differ in the model call. Its fingerprint is the ``.tflite`` file's SHA-256: an
index built with the int8 model is not silently queried with the float one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from vsearch_tf import io
from vsearch_tf.config import run_config
from vsearch_tf.data.images import NO_BOX, load_crop_resize
from vsearch_tf.data.pipeline import embedding_dataset
from vsearch_tf.data.tables import ImageTable, read_queries, read_training
from vsearch_tf.errors import VSearchError, error_cause, one_line
from vsearch_tf.export import (
    METADATA,
    ExportedModel,
    ModelMetadata,
    _check_images,
    _versions,
    export_run,
    fingerprint_of,
    load_exported,
)

QUANTIZATIONS = ("none", "float16", "int8")
DEFAULT_CALIBRATION = 300
SUFFIX = ".tflite"
FOLDER = "litert"
#: What ``--check`` accepts: the cosine similarity between the ``.tflite``'s and the
#: SavedModel's embedding of each sample image, (worst image, mean over the images).
#: float32: the same graph on other kernels (XNNPACK vs Eigen), ~1e-7 apart.
#: float16: weights rounded to 11 significant bits (relative error <= 2^-11 each); a trained
#: MobileNet measured >= 0.9989 per image on real photos, mean 0.9997.
#: int8: every activation rounded to one of 256 levels, layer after layer. A trained MobileNet
#: measured mean 0.91, worst 0.71 on 64 test photos, with test mAP@1000 unchanged (+0.001):
#: ranking survives noise of that size, so the bar only catches a broken conversion (wrong
#: input scale, a lost layer: cosine ~0 for 512-d vectors).
MIN_COSINE = {"none": (0.9999, 0.99999), "float16": (0.995, 0.999), "int8": (0.5, 0.85)}
#: How the backbone's pixel normalisation (inside the model) reads in the metadata.
_NORMALISATION = {
    "tf": "x / 127.5 - 1",
    "caffe": "RGB -> BGR, minus the ImageNet mean (caffe)",
    "torch": "x / 255, minus the ImageNet mean, over its std (torch)",
    "clip": "x / 255, minus OpenAI CLIP's mean, over its std (clip)",
    "none": "inside the backbone",
}


def litert_path(root: str | Path, name: str, quantize: str) -> Path:
    return Path(root) / name / FOLDER / f"{name}-{quantize}{SUFFIX}"


def metadata_path(tflite: str | Path) -> Path:
    return Path(tflite).with_suffix(".json")


def is_litert(path: str | Path) -> bool:
    return str(path).endswith(SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ export


def _saved_model_for(run_dir: Path, name: str, root: Path, version: int | None) -> Path:
    """The SavedModel version to convert: ``version`` if given and there; else the newest
    version exported from ``run_dir`` after its embedder was last written; else a new export.
    (``--overwrite`` replaces the ``.tflite`` only, never the SavedModel other files came from.)"""
    model_dir = root / name
    if version is not None and (model_dir / str(version)).is_dir():
        target = model_dir / str(version)
    else:
        target = None
        if version is None:
            trained = (run_dir / "embedder.keras").stat().st_mtime
            for v in reversed(_versions(model_dir)):
                meta = model_dir / str(v) / METADATA
                if not meta.is_file():
                    continue
                same_run = json.loads(meta.read_text()).get("run_dir") == str(run_dir.resolve())
                if same_run and meta.stat().st_mtime >= trained:
                    target = model_dir / str(v)
                    break
        if target is None:
            return export_run(run_dir, name, root=root, version=version)
    if not (target / METADATA).is_file():
        raise VSearchError(f"{target}: not exported by vsearch (no {METADATA})")
    recorded = json.loads((target / METADATA).read_text()).get("run_dir")
    if recorded != str(run_dir.resolve()):
        raise VSearchError(
            f"{target}: exported from {recorded}, not {run_dir}; pick another --version"
        )
    return target


def _pixels(table: ImageTable, rows: np.ndarray, size: int, max_pixels: int) -> np.ndarray:
    """Rows of ``table`` through the indexing path (decode, crop, resize); unreadable ones are
    left out."""
    batches = [p.numpy() for p, _, _ in embedding_dataset(table, size, 32, rows, max_pixels)]
    return np.concatenate(batches) if batches else np.zeros((0, size, size, 3), np.float32)


def _sample_rows(n_rows: int, n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n_rows, min(n, n_rows), replace=False))


def calibration_images(
    run_dir: Path, size: int, n: int, seed: int = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """``n`` training images of the run (a seeded random sample of its ``data.train_csv``),
    cropped and resized as for training and indexing: int8's representative set."""
    if not (run_dir / "config.yml").is_file():
        raise VSearchError(
            f"{run_dir}: no config.yml, so no training images to calibrate int8 with"
        )
    cfg = run_config(run_dir)
    table = read_training(cfg.data.train_csv, cfg.data.root)
    pixels = _pixels(table, _sample_rows(len(table), n, seed), size, cfg.data.max_pixels)
    if len(pixels) == 0:
        raise VSearchError(f"{cfg.data.train_csv}: no readable training image to calibrate with")
    calibrated = {"csv": str(cfg.data.train_csv), "requested": n, "images": len(pixels)}
    return pixels, {**calibrated, "seed": seed}


@contextlib.contextmanager
def _native_output_caught() -> Iterator[None]:
    """The converter's C++ prints its passes to fd 2 ("fully_quantize: 0, ...", MLIR notices),
    the interpreter its "Created TensorFlow Lite XNNPACK delegate": caught for the block, and
    written back only if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                caught.seek(0)
                sys.stderr.write(caught.read().decode(errors="replace"))


def _convert(
    serving: Any,
    quantize: str,
    calibration: np.ndarray | None,
    keep_float: Sequence[str],
) -> bytes:
    """The ``.tflite`` bytes of the SavedModel's ``serve_pixels``. From the loaded concrete
    function, not ``from_saved_model``: that path leaves the Keras variables as resource
    variables (READ_VARIABLE ops that fail at invoke) instead of freezing them."""
    function = serving.signatures["serve_pixels"]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], serving)
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        assert calibration is not None

        def representative() -> Iterator[list[np.ndarray]]:
            for i in range(len(calibration)):
                yield [calibration[i : i + 1]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        # Every op int8 where TFLite has an int8 kernel; the rest (GeM's POW) stays float32
        # between a dequantize and a quantize. Input and output stay float32 (the default).
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
        if keep_float:
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter,
                debug_dataset=representative,
                debug_options=tf.lite.experimental.QuantizationDebugOptions(
                    denylisted_ops=list(keep_float)
                ),
            )
            return bytes(debugger.get_nondebug_quantized_model())
    return bytes(converter.convert())


#: GeM pooling's ops, kept in float in int8 models by default: in int8 the mean of x^p loses
#: what the ranking needs (emoji-shop test mAP@1000 -0.0213 vs the SavedModel; -0.0169 with these
#: in float, at the same size; README "On the phone").
GEM_FLOAT_OPS = ("MEAN", "MAXIMUM", "POW")


def export_litert(
    run_dir: str | Path,
    name: str,
    *,
    root: str | Path = "saved_models",
    quantize: str = "none",
    calibration: int = DEFAULT_CALIBRATION,
    version: int | None = None,
    overwrite: bool = False,
    keep_float: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Convert ``run_dir``'s SavedModel export (made first if there is none) to
    ``ROOT/NAME/litert/NAME-QUANTIZE.tflite`` with its metadata; returns the metadata.
    ``keep_float``: TFLite ops left in float in an int8 model; by default GeM pooling's
    (:data:`GEM_FLOAT_OPS`), ``()`` for none."""
    run_dir, root = Path(run_dir), Path(root)
    if keep_float is None:
        keep_float = GEM_FLOAT_OPS if quantize == "int8" else ()
    if quantize not in QUANTIZATIONS:
        raise VSearchError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZATIONS)}")
    if calibration < 1:
        raise VSearchError(f"--calibration must be a positive integer, got {calibration}")
    if keep_float and quantize != "int8":
        raise VSearchError("--keep-float applies to --quantize int8 only")
    if not (run_dir / "embedder.keras").is_file():
        raise VSearchError(f"{run_dir}: not a finished training run (no embedder.keras)")
    target = litert_path(root, name, quantize)
    if target.exists() and not overwrite:
        raise VSearchError(f"{target} exists; use --overwrite")
    version_dir = _saved_model_for(run_dir, name, root, version)
    saved = load_exported(version_dir)
    pixels, calibrated = None, None
    if quantize == "int8":
        pixels, calibrated = calibration_images(run_dir, saved.image_size, calibration)
    started = time.monotonic()
    try:
        with _native_output_caught():
            content = _convert(saved.serving, quantize, pixels, keep_float)
    except Exception as err:  # the converter raises ConverterError and plain Exceptions alike
        raise VSearchError(f"{version_dir}: LiteRT conversion failed ({one_line(err)})") from None
    seconds = time.monotonic() - started
    backbone = saved.metadata.get("backbone")
    mode = None
    if backbone:
        from vsearch_tf.models.backbones import get_spec

        mode = get_spec(backbone).normalization
    size, dim = saved.image_size, saved.embedding_dim
    metadata = {
        "format": "litert",
        "quantize": quantize,
        "keep_float": list(keep_float),
        "image_size": size,
        "max_pixels": saved.max_pixels,
        "embedding_dim": dim,
        "input": {
            "dtype": "float32",
            "shape": [-1, size, size, 3],
            "pixels": f"RGB in [0, 255], cropped to the product box and resized to {size} x "
            f"{size} (vsearch_tf.data.images.load_crop_resize)",
        },
        "normalisation": {
            "backbone": backbone,
            "mode": mode,
            "in_model": _NORMALISATION.get(mode or "", "unknown (no backbone recorded)"),
        },
        "output": {"dtype": "float32", "shape": [-1, dim], "l2_normalised": True},
        "saved_model": str(version_dir.resolve()),
        "saved_model_fingerprint": saved.fingerprint,
        "run_dir": saved.metadata.get("run_dir"),
        "calibration": calibrated,
        "tensorflow": tf.__version__,
        "convert_seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "name": name,
        "bytes": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    with io.atomic_path(target) as tmp:
        tmp.write_bytes(content)
    io.write_json(metadata_path(target), metadata)
    return {"path": str(target), **metadata}


# ------------------------------------------------------------------------------------- load


def interpreter_class() -> type:
    """LiteRT's interpreter (``ai-edge-litert``); TensorFlow's deprecated ``tf.lite`` one only
    when that package is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    return Interpreter


def read_metadata(tflite: str | Path) -> dict[str, Any]:
    """The metadata beside ``tflite``, checked against the file: its hash, input size and
    embedding size. Anything that does not match is a ``VSearchError`` naming the file."""
    tflite = Path(tflite)
    if not tflite.is_file():
        raise VSearchError(f"{tflite}: no such LiteRT model")
    meta_path = metadata_path(tflite)
    if not meta_path.is_file():
        raise VSearchError(f"{tflite}: not exported by vsearch (no {meta_path.name} beside it)")
    try:
        metadata = json.loads(meta_path.read_text())
        wanted = {k: metadata[k] for k in ("sha256", "image_size", "embedding_dim")}
    except (ValueError, KeyError, TypeError) as err:
        raise VSearchError(f"{meta_path}: not LiteRT export metadata ({one_line(err)})") from None
    if _sha256(tflite) != wanted["sha256"]:
        raise VSearchError(
            f"{tflite}: does not match its metadata {meta_path.name} (SHA-256 differs): "
            "re-export it"
        )
    return metadata


@dataclass
class LiteRTModel(ModelMetadata):
    """A loaded ``.tflite`` export: :class:`ExportedModel`'s interface on a LiteRT interpreter."""

    path: Path
    metadata: dict[str, Any]
    fingerprint: str
    interpreter: Any
    _batch: int = field(default=-1, repr=False)

    def embed_pixels(self, pixels: tf.Tensor | np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, np.float32)
        it = self.interpreter
        inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        if len(pixels) != self._batch:  # resize only when the batch size changes
            it.resize_tensor_input(inp, list(pixels.shape), strict=True)
            it.allocate_tensors()
            self._batch = len(pixels)
        it.set_tensor(inp, pixels)
        it.invoke()
        return it.get_tensor(out).copy()

    def embed_bytes(
        self, image_bytes: list[bytes], bbox: list[list[float]] | None = None
    ) -> np.ndarray:
        """Decode and crop as ``serving_default`` does, then embed."""
        boxes = bbox if bbox is not None else [list(NO_BOX)] * len(image_bytes)
        try:
            pixels = [
                load_crop_resize(
                    tf.constant(b), tf.constant(box, tf.float32), self.image_size, self.max_pixels
                )[0]
                for b, box in zip(image_bytes, boxes)
            ]
        except tf.errors.InvalidArgumentError as err:
            raise VSearchError(f"image batch rejected: {error_cause(err.message)}") from None
        return self.embed_pixels(tf.stack(pixels))


def load_litert(path: str | Path, num_threads: int | None = None) -> LiteRTModel:
    """Load a ``.tflite`` export with its checked metadata. ``num_threads`` defaults to the
    machine's cores (up to 4), as TensorFlow uses them for the SavedModel."""
    path = Path(path)
    metadata = read_metadata(path)
    threads = num_threads or min(os.cpu_count() or 1, 4)
    try:
        with _native_output_caught():
            interpreter = interpreter_class()(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
    except Exception as err:
        raise VSearchError(f"{path}: cannot load the LiteRT model ({one_line(err)})") from None
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    size, dim = int(metadata["image_size"]), int(metadata["embedding_dim"])
    if list(inp["shape"][1:]) != [size, size, 3] or int(out["shape"][-1]) != dim:
        raise VSearchError(
            f"{path}: takes {list(inp['shape'][1:])} and gives {int(out['shape'][-1])}-d, but "
            f"its metadata says [{size}, {size}, 3] and {dim}-d"
        )
    return LiteRTModel(path, metadata, metadata["sha256"], interpreter)


def load_model(path: str | Path) -> ExportedModel | LiteRTModel:
    """What ``index``, ``eval`` and ``query`` embed with: a ``.tflite`` file or a SavedModel."""
    return load_litert(path) if is_litert(path) else load_exported(path)


def fingerprint(path: str | Path) -> str:
    return read_metadata(path)["sha256"] if is_litert(path) else fingerprint_of(Path(path))


# ------------------------------------------------------------------------------------ check

# Run by ``check_litert`` in a fresh interpreter with no vsearch code and no TensorFlow: the
# LiteRT runtime alone (as on a phone), batch 1, so nothing this process set up is relied on.
_LITERT_SCRIPT = r"""
import sys
import numpy as np
try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tensorflow.lite import Interpreter
model, pixels, out = sys.argv[1:4]
it = Interpreter(model_path=model, num_threads=1)
it.allocate_tensors()
inp, res = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
images = np.load(pixels)
embeddings = []
for i in range(len(images)):
    it.set_tensor(inp, images[i : i + 1])
    it.invoke()
    embeddings.append(it.get_tensor(res)[0].copy())
np.save(out, np.stack(embeddings))
"""


def _check_pixels(metadata: dict[str, Any], n: int) -> tuple[np.ndarray, str]:
    """Sample images for the check: held-out photos of the run (its validation queries, else
    training rows other than int8's calibration sample), else the export check's test photo."""
    size = int(metadata["image_size"])
    run_dir = Path(metadata.get("run_dir") or "")
    if (run_dir / "config.yml").is_file():
        cfg = run_config(run_dir)
        if cfg.data.val_queries_csv:
            table = read_queries(cfg.data.val_queries_csv, cfg.data.root)
            rows = _sample_rows(len(table), n, seed=1)
        else:
            table = read_training(cfg.data.train_csv, cfg.data.root)
            used = (metadata.get("calibration") or {}).get("requested", DEFAULT_CALIBRATION)
            calibrated = set(_sample_rows(len(table), used, seed=0).tolist())
            rest = np.array([r for r in range(len(table)) if r not in calibrated], np.int64)
            rows = rest[_sample_rows(len(rest), n, seed=1)] if len(rest) else rest
        if len(rows):
            pixels = _pixels(table, rows, size, cfg.data.max_pixels)
            if len(pixels):
                return pixels, str(table.source)
    jpeg, png, box = _check_images()
    cases = [(jpeg, NO_BOX), (png, NO_BOX), (jpeg, box), (png, box)]
    pixels = [
        load_crop_resize(tf.constant(b), tf.constant(bb, tf.float32), size)[0].numpy()
        for b, bb in cases
    ]
    return np.stack(pixels), "the export check's test photo"


def check_litert(path: str | Path, *, images: int = 32) -> dict[str, Any]:
    """Run ``path`` in a fresh process on sample images and compare its embeddings with the
    SavedModel it was converted from: cosine similarity per image (min, mean) against the
    quantization's bars in :data:`MIN_COSINE`. A file whose metadata does not match it, or whose
    SavedModel has changed since, is refused."""
    path = Path(path)
    metadata = read_metadata(path)
    saved_dir = Path(metadata.get("saved_model") or "")
    if not (saved_dir / "saved_model.pb").is_file():
        raise VSearchError(f"{path}: the SavedModel it came from ({saved_dir}) is gone")
    if fingerprint_of(saved_dir) != metadata.get("saved_model_fingerprint"):
        raise VSearchError(
            f"{path}: its metadata names SavedModel fingerprint "
            f"{str(metadata.get('saved_model_fingerprint'))[:16]}..., but {saved_dir} is "
            f"{fingerprint_of(saved_dir)[:16]}...: re-export it"
        )
    quantize = metadata.get("quantize")
    if quantize not in MIN_COSINE:
        raise VSearchError(f"{metadata_path(path)}: unknown quantize {quantize!r}")
    saved = load_exported(saved_dir)
    for key in ("image_size", "embedding_dim"):
        if int(metadata[key]) != int(saved.metadata[key]):
            raise VSearchError(
                f"{path}: metadata {key} {metadata[key]} but its SavedModel's is "
                f"{saved.metadata[key]}"
            )
    pixels, source = _check_pixels(metadata, images)
    with tempfile.TemporaryDirectory(prefix="vsearch-check-litert-") as work:
        np.save(Path(work, "pixels.npy"), pixels)
        runner = subprocess.Popen(
            [sys.executable, "-c", _LITERT_SCRIPT, str(path), f"{work}/pixels.npy", f"{work}/out"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        reference = saved.embed_pixels(tf.constant(pixels)).numpy()
        _, stderr = runner.communicate()
        if runner.returncode != 0:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            raise VSearchError(f"{path}: loading in a fresh process failed ({last})")
        embeddings = np.load(Path(work, "out.npy"))
    if embeddings.shape != reference.shape:
        raise VSearchError(
            f"{path}: gives embeddings of shape {embeddings.shape}, the SavedModel "
            f"{reference.shape}"
        )
    cosine = np.sum(embeddings * reference, axis=1) / np.maximum(
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1), 1e-12
    )
    worst, mean = MIN_COSINE[quantize]
    return {
        "path": str(path),
        "quantize": quantize,
        "fingerprint": metadata["sha256"],
        "saved_model": str(saved_dir),
        "saved_model_fingerprint": metadata["saved_model_fingerprint"],
        "images": len(pixels),
        "images_from": source,
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "cosine": [round(float(c), 6) for c in cosine],
        "norm_max_abs_diff": float(np.abs(np.linalg.norm(embeddings, axis=1) - 1.0).max()),
        "min_cosine": worst,
        "min_mean_cosine": mean,
        "ok": bool(cosine.min() >= worst and cosine.mean() >= mean),
    }
