"""Embed a table of images with any embedding function, in streamed chunks, and score the
search results of embedded queries.

Used by validation during training (the Keras embedder) and by ``index`` / ``eval`` (the exported
SavedModel's ``serve_pixels``), so all of them decode, crop, batch -- and count images that could
not be read -- identically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from vsearch_tf.data import DEFAULT_MAX_PIXELS
from vsearch_tf.data.pipeline import embedding_dataset, why_unreadable
from vsearch_tf.data.tables import ImageTable
from vsearch_tf.errors import VSearchError
from vsearch_tf.index import EmbeddingStore
from vsearch_tf.metrics import EvalResult, evaluate

EmbedFn = Callable[[tf.Tensor], tf.Tensor]
Progress = Callable[[int], None]
#: Encoded images -> (boxes [n, 4] in pixels x, y, w, h, confidences [n]): a ``localize`` signature.
LocalizeFn = Callable[[list[bytes]], tuple[np.ndarray, np.ndarray]]


@dataclass
class EmbedReport:
    """What happened to the rows: which were embedded, which were skipped, which boxes fell back."""

    rows: np.ndarray  # int64 rows of the table that were embedded, in order
    skipped: np.ndarray  # int64 rows that could not be read or decoded
    fallback_rows: np.ndarray = field(
        default_factory=lambda: np.zeros(0, np.int64)
    )  # box empty/outside
    reasons: list[str] = field(default_factory=list)  # one line per skipped row
    resumed_chunks: int = 0  # chunks a killed job had already written (embed_to_store)

    def to_dict(self, table: ImageTable) -> dict:
        return {
            "embedded": int(len(self.rows)),
            "skipped": [
                {"id": str(table.ids[r]), "path": str(table.paths[r]), "reason": why}
                for r, why in zip(self.skipped, self.reasons)
            ],
            "box_fallbacks": [str(table.ids[r]) for r in self.fallback_rows],
        }

    def check_strict(self, table: ImageTable, strict: bool) -> None:
        """With ``strict`` (``--strict``) any skipped image is an error naming the first."""
        if strict and len(self.skipped):
            r = self.skipped[0]
            more = f" (and {len(self.skipped) - 1} more)" if len(self.skipped) > 1 else ""
            raise VSearchError(
                f"{table.source}: unreadable image {table.ids[r]} {table.paths[r]}: "
                f"{self.reasons[0]}{more}; --strict allows none"
            )


def _embed_rows(
    fn: EmbedFn,
    table: ImageTable,
    rows: np.ndarray,
    image_size: int,
    batch_size: int,
    progress: Progress | None,
    max_pixels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    chunks, done, fallbacks = [], [], []
    for pixels, fallback, row in embedding_dataset(table, image_size, batch_size, rows, max_pixels):
        chunks.append(np.asarray(fn(pixels), np.float32))
        done.append(row.numpy())
        fallbacks.append(row.numpy()[fallback.numpy()])
        if progress:
            progress(len(row))
    if not chunks:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(chunks), np.concatenate(done), np.concatenate(fallbacks)


def _report(
    table: ImageTable, rows: np.ndarray, fallbacks: np.ndarray, max_pixels: int
) -> EmbedReport:
    skipped = np.setdiff1d(np.arange(len(table)), rows)
    return EmbedReport(
        np.asarray(rows), skipped, fallbacks, why_unreadable(table, skipped, max_pixels)
    )


def embed_table(
    fn: EmbedFn,
    table: ImageTable,
    image_size: int,
    batch_size: int = 64,
    progress: Progress | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, EmbedReport]:
    """Embed every readable row in memory (validation, queries). Returns (embeddings, report)."""
    embeddings, rows, fallbacks = _embed_rows(
        fn, table, np.arange(len(table)), image_size, batch_size, progress, max_pixels
    )
    return embeddings, _report(table, rows, fallbacks, max_pixels)


def embed_to_store(
    fn: EmbedFn,
    table: ImageTable,
    image_size: int,
    store: EmbeddingStore,
    *,
    batch_size: int = 64,
    chunk_rows: int = 8192,
    progress: Progress | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, EmbedReport]:
    """Embed a gallery chunk by chunk into ``store``; chunks already on disk are kept, so a killed
    job resumes where it stopped and memory does not grow with the gallery."""
    done = store.done_chunks()
    n_chunks = -(-len(table) // chunk_rows)
    for i in range(n_chunks):
        rows = np.arange(i * chunk_rows, min((i + 1) * chunk_rows, len(table)), dtype=np.int64)
        if i in done:
            if progress:
                progress(len(rows))
            continue
        embeddings, embedded, fallbacks = _embed_rows(
            fn, table, rows, image_size, batch_size, progress, max_pixels
        )
        store.write_chunk(i, embeddings, embedded, fallbacks)
    embeddings, rows = store.assemble(n_chunks)
    report = _report(table, rows, store.fallback_rows(), max_pixels)
    report.resumed_chunks = len(done & set(range(n_chunks)))
    return embeddings, report


def localize_table(
    fn: LocalizeFn, table: ImageTable, batch_size: int = 64, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A predicted box and confidence for every row of ``table`` (``vsearch eval --box-source
    predicted``): ``(boxes [N, 4], confidences [N])``. A row that cannot be read keeps the "no
    box" sentinel and confidence NaN; embedding it then skips and reports it as usual."""
    boxes = np.full((len(table), 4), -1.0, np.float32)
    confidence = np.full(len(table), np.nan, np.float32)
    for start in range(0, len(table), batch_size):
        rows = range(start, min(start + batch_size, len(table)))
        batch = {r: _read_bytes(table.paths[r]) for r in rows}
        readable = [r for r, data in batch.items() if data]
        try:
            found = [(readable, fn([batch[r] for r in readable]))] if readable else []
        except VSearchError:  # one bad image rejects its batch: the others one by one
            found = []
            for r in readable:
                try:
                    found.append(([r], fn([batch[r]])))
                except VSearchError:
                    pass
        for where, (b, c) in found:
            boxes[where], confidence[where] = b, c
        if progress:
            progress(len(rows))
    return boxes, confidence


def _read_bytes(path: str) -> bytes:
    try:
        return tf.io.gfile.GFile(path, "rb").read()
    except tf.errors.OpError:
        return b""


def score_queries(
    found: np.ndarray,
    query_report: EmbedReport,
    query_products: np.ndarray,
    indexed_products: np.ndarray,
    unindexed_products: np.ndarray,
    k: int,
    recall_ks: Sequence[int] = (1, 5, 10),
) -> tuple[EvalResult, np.ndarray]:
    """MCS2023 mAP@k and Recall@K of search results, with the one rule for unreadable images
    that validation during training and ``vsearch eval`` share: an unreadable query retrieves
    nothing and scores AP 0 (dropping it would flatter the model); an unreadable gallery image
    (``unindexed_products``) still counts as relevant (GTP), though it can never be found.

    ``found`` holds the rows (into ``indexed_products``) found for the embedded queries,
    ``query_report.rows`` in order. Returns the result and every query's rows, -1 for none.
    """
    rows = np.full((len(query_products), max(found.shape[1], 1)), -1, np.int64)
    rows[query_report.rows, : found.shape[1]] = found
    indexed = np.asarray(indexed_products).astype(str)
    retrieved = np.append(indexed, "")[rows]  # row -1 is the "" sentinel, masked by ``valid``
    gallery = np.concatenate([indexed, np.asarray(unindexed_products).astype(str)])
    result = evaluate(
        retrieved,
        np.asarray(query_products).astype(str),
        gallery,
        k=k,
        recall_ks=recall_ks,
        valid=rows >= 0,
    )
    return result, rows
