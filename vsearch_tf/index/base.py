"""What every search backend is, and the registry ``load_index`` reopens stored ones from.

A backend is one module with one class. Every backend is a :class:`Searcher`; the ones an index
folder stores (exact, ScaNN) are also :class:`StoredSearcher` and ``@register`` themselves under
their ``backend`` name, which the manifest records. A backend that serves a folder's vectors from
elsewhere (Milvus) is only a ``Searcher``: the folder never records it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from vsearch_tf.config import IndexSettings
from vsearch_tf.errors import VSearchError


@runtime_checkable
class Searcher(Protocol):
    """Inner-product search over a gallery of L2-normalised vectors (so: cosine)."""

    backend: str  # the manifest's name for it
    settings: IndexSettings  # how the index was built and tuned; rebuilds reuse them
    measured_recall: float | None  # recall@num_neighbors vs exact search; None: not measured

    @property
    def count(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def params(self) -> dict[str, Any]:
        """What the manifest records as ``params``: enough to reopen and explain the searcher."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Gallery rows (int64) and scores (float32), both ``(Q, min(k, N))``, best first."""
        ...


class StoredSearcher(Searcher, Protocol):
    """A searcher an index folder holds: it saves its own files beside the folder's vectors."""

    def save(self, folder: Path) -> None:
        """Write whatever besides ``embeddings.npy`` this backend needs into index ``folder``."""
        ...

    @classmethod
    def load(
        cls, folder: Path, manifest: dict[str, Any], embeddings: np.ndarray, settings: IndexSettings
    ) -> StoredSearcher:
        """Reopen from ``folder``, whose ``manifest`` and ``embeddings`` are already checked; a
        broken backend file is a ``VSearchError`` naming it."""
        ...


_Stored = TypeVar("_Stored", bound=type)
BACKENDS: dict[str, type[StoredSearcher]] = {}


def register(cls: _Stored) -> _Stored:
    """Class decorator: ``load_index`` opens a folder whose manifest names ``cls.backend`` with
    ``cls.load``."""
    BACKENDS[cls.backend] = cls
    return cls


def backend_class(name: Any, source: str) -> type[StoredSearcher]:
    """The registered class of backend ``name``; an unknown one is a ``VSearchError``."""
    if not isinstance(name, str) or name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise VSearchError(f"{source}: unknown backend {name!r} (this vsearch reads {known})")
    return BACKENDS[name]


def as_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    """``queries`` as contiguous float32 ``(Q, dim)``, checked, with ``k >= 1``."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}), got {queries.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return queries
