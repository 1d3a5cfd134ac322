"""The search service behind the HTTP routes: decode in a thread pool, embed and search in
micro-batches, answer from the index version a request started with."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from vsearch_tf.data.images import NO_BOX
from vsearch_tf.errors import error_cause
from vsearch_tf.serving.batcher import MicroBatcher
from vsearch_tf.serving.metrics import ServiceMetrics
from vsearch_tf.serving.state import IndexHolder, Snapshot

Box = tuple[float, float, float, float]


class BadRequest(Exception):
    """A request the service cannot answer; its message is the one-line reason for the client."""


@dataclass(frozen=True)
class _Query:
    snapshot: Snapshot
    pixels: np.ndarray  # (S, S, 3) float32, decoded and cropped
    k: int


@dataclass(frozen=True)
class Answer:
    """The top rows of ``snapshot``'s index for one query, best first, with their scores."""

    snapshot: Snapshot
    rows: np.ndarray
    scores: np.ndarray


class SearchService:
    """An index folder served: hot-reloaded (:class:`IndexHolder`), searched in micro-batches
    (:class:`MicroBatcher`), measured (:class:`ServiceMetrics`)."""

    def __init__(
        self,
        index_dir: str | Path,
        *,
        max_batch: int = 32,
        batch_wait_ms: float = 5.0,
        poll_s: float = 0.5,
    ) -> None:
        self.metrics = ServiceMetrics()
        self.holder = IndexHolder(index_dir, poll_s, on_swap=self.metrics.index_loaded)
        self._decoding = 0  # requests between arrival and the batcher's queue
        self.batcher: MicroBatcher[_Query, tuple[np.ndarray, np.ndarray]] = MicroBatcher(
            self._process, max_batch, batch_wait_ms / 1000, arriving=lambda: self._decoding
        )
        # TensorFlow releases the GIL while it decodes, so decoding runs beside the model call.
        self._decoders = ThreadPoolExecutor(thread_name_prefix="decode")

    def start(self) -> None:
        """Load the index (unless already loaded), then start batching and watching for new
        versions."""
        if not self.holder.loaded:
            self.holder.load()
        self.batcher.start()
        self.holder.start()

    def stop(self) -> None:
        self.holder.stop()
        self.batcher.stop()
        self._decoders.shutdown()

    @property
    def ready(self) -> bool:
        return self.holder.loaded and self.batcher.alive

    async def search(self, image_bytes: bytes, box: Box | None, k: int) -> Answer:
        snapshot = self.holder.current
        loop = asyncio.get_running_loop()
        # Counted in the event loop's thread only; queued before it stops counting as arriving.
        self._decoding += 1
        try:
            pixels = await loop.run_in_executor(self._decoders, _decode, snapshot, image_bytes, box)
            future = self.batcher.submit(_Query(snapshot, pixels, k))
        finally:
            self._decoding -= 1
        rows, scores = await asyncio.wrap_future(future)
        return Answer(snapshot, rows, scores)

    def _process(self, queries: list[_Query]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One model call and one search per index version in the batch (one, except around a
        swap)."""
        answers: list[tuple[np.ndarray, np.ndarray]] = [None] * len(queries)  # type: ignore[list-item]
        groups: dict[Snapshot, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(query.snapshot, []).append(i)
        for snapshot, members in groups.items():
            self.metrics.batch_size.observe(len(members))
            pixels = np.stack([queries[i].pixels for i in members])
            rows, scores = snapshot.embed_and_search(pixels, max(queries[i].k for i in members))
            for j, i in enumerate(members):
                answers[i] = rows[j, : queries[i].k], scores[j, : queries[i].k]
        return answers


def _decode(snapshot: Snapshot, image_bytes: bytes, box: Box | None) -> np.ndarray:
    """The query crop as the index's model sees it; a bad image or a box off the image is a
    :class:`BadRequest`."""
    try:
        pixels, fallback = snapshot.decoder(
            tf.constant(image_bytes, tf.string), tf.constant(box or NO_BOX, tf.float32)
        )
    except tf.errors.OpError as err:
        raise BadRequest(f"image: {error_cause(err.message)}") from None
    if box is not None and bool(fallback):
        raise BadRequest(f"bbox {','.join(f'{v:g}' for v in box)}: empty or outside the image")
    return pixels.numpy()
