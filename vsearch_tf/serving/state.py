"""What the server answers with: one index version and the model that built it, swapped whole.

`vsearch index add/remove/rebuild` replace an index folder by renaming a complete new one over it
(:func:`vsearch_tf.io.atomic_path`). :class:`IndexHolder` polls the manifest; when its content
changes it loads the new folder in the background, warms it up and swaps one reference. A request
takes the current :class:`Snapshot` once and uses it to the end, so requests in flight finish on
the version they started with and none waits for or fails during a swap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from vsearch_tf.data.images import NO_BOX, load_crop_resize
from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.export import ExportedModel, load_exported
from vsearch_tf.index import MANIFEST, Index, load_index

log = logging.getLogger("vsearch_tf.serving")

Decoder = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
# Images decoded at once: one per core, since a PNG at max_pixels decodes to up to 16 bytes a pixel.
_PARALLEL_DECODES = min(16, len(os.sched_getaffinity(0)))


def make_decoder(image_size: int, max_pixels: int) -> Decoder:
    """Encoded images ``[B]`` and ``(x, y, w, h)`` boxes ``[B, 4]`` -> (pixels ``[B, S, S, 3]``,
    box fallback flags ``[B]``), each image through the one function indexing decodes the gallery
    with (``load_crop_resize``), so a served query is cropped and resized exactly as `vsearch
    query` and `vsearch index` do it. The images of a batch are decoded in parallel."""
    outputs = (tf.TensorSpec([image_size, image_size, 3], tf.float32), tf.TensorSpec([], tf.bool))

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([None, 4], tf.float32)]
    )
    def decode(image_bytes: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.map_fn(
            lambda args: load_crop_resize(args[0], args[1], image_size, max_pixels),
            (image_bytes, boxes),
            fn_output_signature=outputs,
            parallel_iterations=_PARALLEL_DECODES,
        )

    return decode


def manifest_version(manifest: dict) -> str:
    """A short id of an index version: a hash of its manifest, which every write rewrites (its
    ``updated`` time, count and history change), so two versions never share one."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]


def read_version(index_dir: Path) -> str | None:
    """The version on disk now; ``None`` while a writer is between its two renames."""
    try:
        return manifest_version(json.loads((index_dir / MANIFEST).read_text()))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One loaded index version with its model; never changed, only replaced."""

    index: Index
    model: ExportedModel
    decoder: Decoder
    version: str
    seller_ids: np.ndarray  # str, row-aligned with the index
    product_ids: np.ndarray  # str
    rows_by_id: dict[str, int]

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    def image_path(self, seller_img_id: str) -> Path | None:
        """The catalogue file of an indexed id, ``None`` for any other id (never a path the
        caller chose)."""
        row = self.rows_by_id.get(seller_img_id)
        if row is None or "img_path" not in self.index.ids:
            return None
        path = Path(str(self.index.ids["img_path"].iat[row]))
        root = self.index.manifest.get("extra", {}).get("gallery_root")
        return path if path.is_absolute() or not root else Path(root) / path

    def embed_and_search(self, pixels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One model call and one search for a batch of decoded crops ``(B, S, S, 3)``."""
        embeddings = self.model.embed_pixels(tf.constant(pixels, tf.float32)).numpy()
        return self.index.search(embeddings, min(k, self.index.count))

    def embed_text_and_search(self, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One text query through the model's ``serve_text`` signature (CLIP / SigLIP)."""
        embeddings = self.model.embed_text([text]).numpy()
        rows, scores = self.index.search(embeddings, min(k, self.index.count))
        return rows[0], scores[0]


def _model_for(index: Index, previous: Snapshot | None) -> tuple[ExportedModel, Decoder]:
    """The index's own model: the previous one when the fingerprint is unchanged, else loaded
    from the path the manifest records and checked to be the one that built the index."""
    extra = index.manifest.get("extra", {})
    built_with = extra.get("model_fingerprint")
    if previous is not None and built_with == previous.fingerprint:
        return previous.model, previous.decoder
    if not extra.get("model"):
        raise VSearchError(f"{index.path}: the manifest names no model to embed queries with")
    model = load_exported(extra["model"])
    if built_with and built_with != model.fingerprint:
        raise VSearchError(
            f"index {index.path} was built by model {built_with[:16]}..., but {model.path} is "
            f"now {model.fingerprint[:16]}...: rebuild the index"
        )
    if model.embedding_dim != index.dim:
        raise VSearchError(
            f"model {model.path} gives {model.embedding_dim}-d embeddings, index {index.path} "
            f"holds {index.dim}-d"
        )
    return model, make_decoder(model.image_size, model.max_pixels)


def load_snapshot(index_dir: Path, previous: Snapshot | None = None) -> Snapshot:
    """Load and warm up an index version (one tiny query traces the decoder and the model), so
    the first request after a swap is as fast as any other."""
    index = load_index(index_dir)
    if index.count == 0:
        raise VSearchError(f"{index_dir}: the index is empty")
    model, decoder = _model_for(index, previous)
    seller_ids = index.ids["seller_img_id"].astype(str).to_numpy()
    snapshot = Snapshot(
        index,
        model,
        decoder,
        manifest_version(index.manifest),
        seller_ids,
        index.ids["product_id"].astype(str).to_numpy(),
        {sid: row for row, sid in enumerate(seller_ids)},
    )
    blank = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8))
    pixels, _ = decoder(blank[None], tf.constant([NO_BOX]))
    snapshot.embed_and_search(pixels.numpy(), 1)
    return snapshot


class IndexHolder:
    """The current :class:`Snapshot` of an index folder, reloaded when the folder is replaced."""

    def __init__(
        self,
        index_dir: str | Path,
        poll_s: float = 0.5,
        on_swap: Callable[[Snapshot], None] | None = None,
    ) -> None:
        self.index_dir = Path(index_dir)
        self.poll_s = poll_s
        self.on_swap = on_swap
        self.last_error: str | None = None
        self._current: Snapshot | None = None
        self._failed: str | None = None  # a version that did not load; retried once it changes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Snapshot:
        if self._current is None:
            raise RuntimeError("IndexHolder.load() was not called")
        return self._current

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def load(self) -> Snapshot:
        """The first load, in the caller's thread: a broken index is the caller's error."""
        self._swap(load_snapshot(self.index_dir))
        return self.current

    def poll(self) -> bool:
        """Load and swap in the version on disk if it is new; True if it swapped. A version
        that fails to load is logged and skipped, and the server goes on with the one it has."""
        version = read_version(self.index_dir)
        if version is None or version in (self.current.version, self._failed):
            return False
        try:
            self._swap(load_snapshot(self.index_dir, self.current))
        except Exception as err:  # a broken new version must not stop the server
            self._failed, self.last_error = version, one_line(err)
            log.error("index %s: version %s not loaded: %s", self.index_dir, version, err)
            return False
        return True

    def _swap(self, snapshot: Snapshot) -> None:
        self._current, self._failed, self.last_error = snapshot, None, None
        log.info(
            "index %s: serving version %s (%d vectors, model %s)",
            self.index_dir,
            snapshot.version,
            snapshot.index.count,
            snapshot.fingerprint[:16],
        )
        if self.on_swap is not None:
            self.on_swap(snapshot)

    def start(self) -> None:
        """Poll every ``poll_s`` seconds in a background thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="index-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()
