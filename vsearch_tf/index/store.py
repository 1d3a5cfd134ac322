"""Embeddings on disk: the resumable chunk store an indexing job writes, and streaming between
``.npy`` files, so no step ever holds a whole gallery in memory."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.io import atomic_path

# Rows copied at a time when streaming embeddings between .npy files.
_COPY_ROWS = 1 << 16


def stream_to_npy(path: Path, shape: tuple[int, int], blocks: Iterable[np.ndarray]) -> None:
    """Write consecutive row blocks into a float32 .npy, holding one block in memory at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    start = 0
    for block in blocks:
        out[start : start + len(block)] = block
        start += len(block)
    if start != shape[0]:
        raise ValueError(f"{path}: wrote {start} rows, expected {shape[0]}")
    out.flush()


def copy_blocks(embeddings: np.ndarray, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """``embeddings`` (or its rows ``order``) in blocks, so a memmap is never read whole."""
    n = len(embeddings) if order is None else len(order)
    for start in range(0, n, _COPY_ROWS):
        rows = (
            slice(start, start + _COPY_ROWS) if order is None else order[start : start + _COPY_ROWS]
        )
        yield np.asarray(embeddings[rows])


class EmbeddingStore:
    """Embeddings written chunk by chunk, so a killed indexing job resumes where it stopped.

    Each chunk file appears atomically, so a chunk listed by ``done_chunks`` is complete.
    ``rows`` are the caller's row numbers (e.g. gallery CSV rows), kept next to each vector
    because images that fail to load are skipped.
    """

    _CHUNK_RE = re.compile(r"chunk-(\d+)\.npz")

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def chunk_path(self, i: int) -> Path:
        return self.dir / f"chunk-{i:05d}.npz"

    def write_chunk(
        self, i: int, embeddings: np.ndarray, rows: np.ndarray, fallbacks: np.ndarray = ()
    ) -> None:
        """Atomically write chunk ``i``: float32 ``(n, D)`` embeddings and int64 ``(n,)`` rows, and
        the rows whose box fell back to the whole image (so a resumed job still reports them)."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        if embeddings.ndim != 2 or rows.shape != (embeddings.shape[0],):
            raise ValueError(
                f"chunk {i}: need (n, D) embeddings and (n,) rows, got {embeddings.shape} "
                f"and {rows.shape}"
            )
        with atomic_path(self.chunk_path(i)) as tmp, open(tmp, "wb") as f:
            np.savez(
                f, embeddings=embeddings, rows=rows, fallbacks=np.asarray(fallbacks, dtype=np.int64)
            )

    def done_chunks(self) -> set[int]:
        """Indices of the chunks already on disk."""
        found = (self._CHUNK_RE.fullmatch(p.name) for p in self.dir.iterdir())
        return {int(m.group(1)) for m in found if m}

    def assemble(self, n_chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate the chunks, in chunk order, into ``embeddings.npy`` and ``rows.npy``.

        Vectors are streamed into a memmap one chunk at a time, so peak memory is one chunk,
        not twice the data. Returns a read-only memmap of the embeddings and the rows.
        Gaps in the chunk numbers (or fewer than ``n_chunks``) are a ``VSearchError``.
        """
        done = sorted(self.done_chunks())
        expected = n_chunks if n_chunks is not None else (done[-1] + 1 if done else 0)
        missing = sorted(set(range(expected)) - set(done))
        if missing or not done:
            raise VSearchError(
                f"{self.dir}: embedding chunks missing: {missing[:10] or 'all'}; rerun indexing "
                "to resume"
            )
        paths = [self.chunk_path(i) for i in range(expected)]
        rows = [self._load(p, "rows") for p in paths]
        # A chunk whose every image was unreadable holds (0, 0) embeddings: skip it.
        paths, rows = [p for p, r in zip(paths, rows) if r.size], [r for r in rows if r.size]
        if not paths:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        dim = self._load(paths[0], "embeddings").shape[1]

        def blocks() -> Iterator[np.ndarray]:
            for path, chunk_rows in zip(paths, rows):
                chunk = self._load(path, "embeddings")
                if chunk.shape != (chunk_rows.size, dim):
                    raise VSearchError(
                        f"{path}: embeddings are {chunk.shape}, expected ({chunk_rows.size}, {dim})"
                    )
                yield chunk

        out_path = self.dir / "embeddings.npy"
        with atomic_path(out_path) as tmp:
            stream_to_npy(tmp, (sum(r.size for r in rows), dim), blocks())
        all_rows = np.concatenate(rows)
        with atomic_path(self.dir / "rows.npy") as tmp:
            np.save(tmp, all_rows)
        return np.load(out_path, mmap_mode="r"), all_rows

    def fallback_rows(self) -> np.ndarray:
        """The box-fallback rows recorded by every chunk on disk."""
        found = []
        for i in sorted(self.done_chunks()):
            with np.load(self.chunk_path(i)) as z:
                found.append(z["fallbacks"] if "fallbacks" in z.files else np.zeros(0, np.int64))
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    @staticmethod
    def _load(path: Path, key: str) -> np.ndarray:
        try:
            with np.load(path) as z:
                return z[key]
        except (OSError, ValueError, KeyError) as err:
            raise VSearchError(f"{path}: unreadable embedding chunk ({one_line(err)})") from err
