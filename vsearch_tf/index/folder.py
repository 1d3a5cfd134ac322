"""The index folder: ``manifest.json``, ``ids.csv``, ``embeddings.npy`` and the backend's own
files, written whole by one writer at a time, and :class:`Index`, a folder opened for search.

A folder is only ever replaced whole (``atomic_path``), under the writer lock, so a job killed at
any point leaves the previous index loadable. The manifest names the backend; ``load_index``
reopens it through the backend registry (:mod:`vsearch_tf.index.base`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vsearch_tf.config import index_settings
from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.index.base import Searcher, StoredSearcher, backend_class
from vsearch_tf.index.build import build_searcher
from vsearch_tf.index.exact import ExactSearcher
from vsearch_tf.index.store import copy_blocks, stream_to_npy
from vsearch_tf.index.tuning import ann_recall
from vsearch_tf.io import atomic_path, file_lock, write_json
from vsearch_tf.rerank import augment_gallery, expanded_search

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS = "ids.csv"
EMBEDDINGS = "embeddings.npy"
ID_COLUMNS = ("seller_img_id", "product_id")
# Manifest history keeps the most recent operations only, so live updates cannot grow it forever.
_HISTORY = 100


class Index:
    """A loaded index folder: search it, map result rows to ``ids``, read its ``manifest``.

    Row i of ``ids``, ``embeddings`` and the searcher are the same gallery image. Rows are
    positions, not identities: removing images moves others (ScaNN fills holes with its last
    row), so refer to images by ``seller_img_id``, which never changes.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        ids: pd.DataFrame,
        embeddings: np.ndarray,
        searcher: Searcher,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.ids = ids
        self.embeddings = embeddings
        self.searcher = searcher

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def search(
        self, queries: np.ndarray, k: int, *, qe_k: int = 0, qe_alpha: float = 3.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Row indices into ``ids`` (int64) and scores (float32), both ``(Q, min(k, N))``.

        ``qe_k > 0`` re-searches with each query averaged with its top ``qe_k`` results
        (alpha query expansion, :mod:`vsearch_tf.rerank`).
        """
        queries = np.asarray(queries)
        if queries.ndim != 2:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {queries.shape}")
        if queries.shape[1] != self.dim:
            raise VSearchError(
                f"model gives {queries.shape[1]}-d embeddings but index {self.path} holds "
                f"{self.dim}-d: query with the model the index was built with"
            )
        return expanded_search(self.searcher.search, self.embeddings, queries, k, qe_k, qe_alpha)

    def with_dba(self, k: int, alpha: float) -> Index:
        """This index, in memory, with every gallery vector replaced by its DBA average.

        The neighbours come from this index's searcher; a ScaNN index is re-trained over the
        new vectors with its recorded settings, so on a large gallery this takes a while.
        """
        if not 0 < k < self.count:
            raise VSearchError(f"--dba {k}: needs 0 < k < the index's {self.count} vectors")
        vectors = augment_gallery(self.embeddings, self.searcher.search, k, alpha)
        settings = self.searcher.settings
        searcher: Searcher
        if isinstance(self.searcher, ExactSearcher):
            searcher = ExactSearcher(vectors, settings)
        else:
            searcher = build_searcher(vectors, settings)
        return Index(self.path, self.manifest, self.ids, vectors, searcher)

    def ann_recall(self, queries: np.ndarray, ks: Sequence[int]) -> dict[int, float] | None:
        """Recall@k of the searcher against exact search on up to 1,000 of ``queries``; ``None``
        for exact indexes."""
        if isinstance(self.searcher, ExactSearcher) or len(queries) == 0:
            return None
        return ann_recall(self.searcher, self.embeddings, queries, ks)


def save_index(
    out_dir: str | os.PathLike,
    searcher: StoredSearcher,
    embeddings: np.ndarray,
    ids: pd.DataFrame,
    extra: dict[str, Any],
    *,
    unreadable: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Write a new index folder atomically (an old one stays until the new one is complete).

    ``ids`` row i describes vector i and needs at least ``seller_img_id`` and ``product_id``;
    ``extra`` (model path, fingerprint...) is stored in the manifest as is. ``unreadable``
    lists gallery images that could not be embedded (``seller_img_id``, ``product_id``,
    ``img_path``): they still count as relevant images when evaluating.
    """
    missing = [c for c in ID_COLUMNS if c not in ids.columns]
    if missing:
        raise ValueError(f"ids lacks columns {missing}")
    if embeddings.ndim != 2 or not len(ids) == embeddings.shape[0] == searcher.count:
        raise ValueError(
            f"ids ({len(ids)}), embeddings {embeddings.shape} and searcher ({searcher.count}) "
            "disagree on the number of vectors"
        )
    path = Path(out_dir)
    now = _now()
    carried = {
        "created": now,
        "extra": extra,
        "unreadable": list(unreadable),
        "history": [{"time": now, "op": "build", "count": len(ids)}],
    }
    with writer_lock(path):
        return write_folder(
            path, ids, copy_blocks(embeddings), embeddings.shape[1], lambda _: searcher, carried
        )


def load_index(directory: str | os.PathLike) -> Index:
    """Open an index folder, checking it is complete and consistent (else ``VSearchError``).

    If the folder is missing because a writer was killed mid-swap, the previous index it
    moved aside is opened instead.
    """
    path = Path(directory)
    folder = path
    if not path.is_dir():
        olds = [p for p in _leftovers(path, "old") if (p / MANIFEST).is_file()]
        if not olds:
            raise VSearchError(f"{path}: index folder not found")
        folder = max(olds, key=lambda p: p.stat().st_mtime)
    manifest, source = _read_manifest(folder)
    backend = backend_class(manifest["backend"], source)
    settings = index_settings(manifest.get("tuning"), source)
    embeddings = _read_embeddings(folder / EMBEDDINGS, manifest)
    ids = _read_ids(folder / IDS, manifest)
    searcher = backend.load(folder, manifest, embeddings, settings)
    if searcher.count != manifest["count"]:
        raise VSearchError(
            f"{folder}: the {backend.backend} searcher holds {searcher.count} vectors, manifest "
            f"says {manifest['count']}"
        )
    return Index(path, manifest, ids, embeddings, searcher)


def _read_manifest(folder: Path) -> tuple[dict[str, Any], str]:
    """The folder's manifest, checked for the keys every backend needs, and its path."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise VSearchError(f"{manifest_path}: missing; is {folder} an index folder?") from None
    except (OSError, ValueError) as err:
        raise VSearchError(f"{manifest_path}: unreadable ({one_line(err)})") from err
    if not isinstance(manifest, dict):
        raise VSearchError(f"{manifest_path}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise VSearchError(
            f"{manifest_path}: format_version {version!r} is not supported (this vsearch reads "
            f"{FORMAT_VERSION}); rebuild the index"
        )
    for key in ("backend", "dim", "count", "params"):
        if key not in manifest:
            raise VSearchError(f"{manifest_path}: missing key {key!r}")
    return manifest, str(manifest_path)


def _read_embeddings(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    """A read-only memmap of ``embeddings.npy``, checked against the manifest's shape."""
    try:
        embeddings = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise VSearchError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise VSearchError(f"{path}: unreadable or truncated ({one_line(err)})") from err
    shape = (manifest["count"], manifest["dim"])
    if embeddings.dtype != np.float32 or embeddings.shape != shape:
        raise VSearchError(
            f"{path}: holds {embeddings.dtype} {embeddings.shape}, manifest says float32 {shape}"
        )
    return embeddings


def _read_ids(path: Path, manifest: dict[str, Any]) -> pd.DataFrame:
    """``ids.csv`` with the column types the manifest recorded (so ids stay strings: 007)."""
    dtypes = manifest.get("ids_dtypes", {})
    try:
        ids = pd.read_csv(path, dtype=dtypes or None, keep_default_na=False)
    except FileNotFoundError:
        raise VSearchError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise VSearchError(f"{path}: unreadable ({one_line(err)})") from err
    missing = [c for c in ID_COLUMNS if c not in ids.columns]
    if missing:
        raise VSearchError(f"{path}: missing columns {missing}")
    if len(ids) != manifest["count"]:
        raise VSearchError(f"{path}: {len(ids)} rows, manifest says {manifest['count']}")
    return ids


def _csv_dtype(dtype: Any) -> str:
    """The dtype to read an ids.csv column back with, so ids keep their type (007 != 7)."""
    types = pd.api.types
    if types.is_bool_dtype(dtype):
        return "bool"
    if types.is_integer_dtype(dtype):
        return "int64"
    if types.is_float_dtype(dtype):
        return "float64"
    return "str"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Siblings that ``atomic_path`` leaves when killed: ``.NAME.tmp-*`` or ``.NAME.old-*``."""
    return sorted(
        Path(p) for p in glob.glob(str(path.parent / f".{glob.escape(path.name)}.{kind}-*"))
    )


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Be the only writer of index ``path``, and first repair what a killed writer left.

    ``atomic_path`` moves the old folder aside before moving the new one in; a writer
    killed between the two renames leaves no folder at ``path``, only ``.NAME.old-PID``.
    That old folder is put back (readers already fall back to it), and half-written
    temporaries are deleted -- safe only here, where no other writer can be running.
    """
    lock = path.parent / f".{path.name}.lock"
    with file_lock(lock, wait=False, busy=f"{path}: another vsearch job is writing this index"):
        olds = sorted(_leftovers(path, "old"), key=lambda p: p.stat().st_mtime)
        if olds and not path.exists():
            os.replace(olds.pop(), path)
        for leftover in olds + _leftovers(path, "tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        yield


def write_folder(
    path: Path,
    ids: pd.DataFrame,
    vectors: Iterable[np.ndarray],
    dim: int,
    make_searcher: Callable[[np.ndarray], StoredSearcher],
    carried: dict[str, Any],
) -> dict[str, Any]:
    """Write an index folder atomically: vectors first (the searcher is built or tuned on the
    written copy), then the searcher and ids, and the manifest last. Call under the lock."""
    n = len(ids)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        stream_to_npy(tmp / EMBEDDINGS, (n, dim), vectors)
        searcher = make_searcher(np.load(tmp / EMBEDDINGS, mmap_mode="r"))
        if searcher.count != n:
            raise ValueError(f"searcher holds {searcher.count} vectors, ids {n}")
        ids.reset_index(drop=True).to_csv(tmp / IDS, index=False)
        searcher.save(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "backend": searcher.backend,
            "dim": dim,
            "count": n,
            "params": searcher.params(),
            "measured_recall": searcher.measured_recall,
            "tuning": searcher.settings.to_dict(),
            "updated": _now(),
            "ids_dtypes": {str(c): _csv_dtype(t) for c, t in ids.dtypes.items()},
            **carried,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def carry_over(
    manifest: dict[str, Any], entry: dict[str, Any], unreadable: list[dict[str, str]]
) -> dict[str, Any]:
    """Manifest keys an update keeps, plus ``entry`` appended to the (bounded) history."""
    history = [*manifest.get("history", []), {"time": _now(), **entry}][-_HISTORY:]
    return {
        "created": manifest.get("created"),
        "extra": manifest.get("extra", {}),
        "unreadable": unreadable,
        "history": history,
    }
