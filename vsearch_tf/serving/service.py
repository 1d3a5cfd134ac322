"""The search service behind the HTTP routes: requests are decoded, embedded and searched in
micro-batches, each answered from the index version it started with.

Decoding is batched too: one call decodes a whole batch in parallel inside the graph, which on
CPU costs a third of decoding the same images one call each (~0.6 vs ~2 CPU ms per shopper photo
at 64 px: a graph call has a fixed cost). A batch holding a bad image is decoded again one image
at a time, so only that request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
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
Hits = tuple[np.ndarray, np.ndarray]  # result rows and scores of one query


class BadRequest(Exception):
    """A request the service cannot answer; its message is the one-line reason for the client."""


@dataclass(frozen=True)
class _Query:
    snapshot: Snapshot
    image: bytes
    box: Box | None
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
        self._arriving = 0  # requests received whose query is not queued yet
        self.batcher: MicroBatcher[_Query, Hits] = MicroBatcher(
            self._process, max_batch, batch_wait_ms / 1000, arriving=lambda: self._arriving
        )

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

    @property
    def ready(self) -> bool:
        return self.holder.loaded and self.batcher.alive

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Count a request as on its way to the batcher while it is read and parsed (the batcher
        waits for such requests, and for no others). Used in the event loop's thread only."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def search(self, image: bytes, box: Box | None, k: int) -> Answer:
        snapshot = self.holder.current
        future = self.batcher.submit(_Query(snapshot, image, box, k))
        rows, scores = await asyncio.wrap_future(future)
        return Answer(snapshot, rows, scores)

    async def search_text(self, text: str, k: int) -> Answer:
        """A text query (an export with ``serve_text``), outside the image micro-batches: one
        model call in a worker thread."""
        snapshot = self.holder.current
        if not snapshot.model.has_text:
            raise BadRequest("text: this model has no text tower (export a CLIP / SigLIP --text)")
        rows, scores = await asyncio.to_thread(snapshot.embed_text_and_search, text, k)
        return Answer(snapshot, rows, scores)

    def _process(self, queries: list[_Query]) -> list[Hits | BadRequest]:
        """The batcher's work: the queries of each index version in the batch (one, except
        around a swap) answered together."""
        answers: list[Hits | BadRequest] = [BadRequest("not answered")] * len(queries)
        groups: dict[Snapshot, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(query.snapshot, []).append(i)
        for snapshot, members in groups.items():
            group = self._answer(snapshot, [queries[i] for i in members])
            for i, answer in zip(members, group):
                answers[i] = answer
        return answers

    def _answer(self, snapshot: Snapshot, queries: list[_Query]) -> list[Hits | BadRequest]:
        """One decoding call, one model call and one search for queries of one version."""
        crops = _decode(snapshot, queries)
        answers: list[Hits | BadRequest] = [BadRequest("not answered")] * len(queries)
        good = []
        for i, crop in enumerate(crops):
            if isinstance(crop, BadRequest):
                answers[i] = crop
            else:
                good.append(i)
        if good:
            self.metrics.batch_size.observe(len(good))
            pixels = np.stack([crops[i] for i in good])
            rows, scores = snapshot.embed_and_search(pixels, max(queries[i].k for i in good))
            for n, i in enumerate(good):
                answers[i] = rows[n, : queries[i].k], scores[n, : queries[i].k]
        return answers


def _decode(snapshot: Snapshot, queries: list[_Query]) -> list[np.ndarray | BadRequest]:
    """Each query's crop as the index's model sees it, or why it has none: a bad image, or a box
    that misses the image. One call for the batch; one per image if the batch fails."""
    boxes = np.array([q.box or NO_BOX for q in queries], np.float32)
    try:
        pixels, fallbacks = snapshot.decoder(tf.constant([q.image for q in queries]), boxes)
    except tf.errors.OpError as err:
        if len(queries) == 1:
            return [BadRequest(f"image: {error_cause(err.message)}")]
        return [_decode(snapshot, [q])[0] for q in queries]
    return [
        BadRequest(f"bbox {','.join(f'{v:g}' for v in q.box)}: empty or outside the image")
        if q.box is not None and fallback
        else crop
        for q, crop, fallback in zip(queries, pixels.numpy(), fallbacks.numpy())
    ]
