"""Milvus as the search backend: an index folder's vectors served by a Milvus collection (a
cluster, Zilliz Cloud, or Milvus Lite in-process on a local ``.db`` file).

The index folder stays the source of truth -- manifest, ``ids.csv``, ``embeddings.npy``, loadable
and searchable without Milvus -- and ``manifest.extra.milvus`` records the URI, the collection,
its index type and a checksum of the ids. Milvus primary keys are row numbers of ``ids.csv``, so
:class:`MilvusSearcher` is a :class:`~vsearch_tf.index.base.Searcher` like the folder's own
(rows int64, scores float32) and query / eval / rerank are unchanged. It is not a stored
backend: the manifest keeps naming the folder's own, and :func:`attach` swaps Milvus in. An
index changed after publishing (live ``add`` / ``remove``) no longer matches the checksum and is
refused until published again.

Credentials are never stored: a server that needs a token gets it from ``MILVUS_TOKEN``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vsearch_tf.config import IndexSettings
from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.index.base import as_queries
from vsearch_tf.index.folder import MANIFEST, Index, load_index, writer_lock
from vsearch_tf.io import write_json

KEY = "milvus"  # manifest["extra"] key
INDEX_TYPES = ("FLAT", "HNSW", "AUTOINDEX")
_INSERT_ROWS = 5_000
_QUERY_ROWS = 256
_HNSW = {"M": 16, "efConstruction": 200}


def _pymilvus() -> Any:
    """Import pymilvus lazily: it is an optional extra (``pip install vsearch-tf[milvus]``)."""
    try:
        import pymilvus
    except ImportError:
        raise VSearchError(
            "the milvus backend needs pymilvus: pip install 'vsearch-tf[milvus]'"
        ) from None
    return pymilvus


def _is_lite(uri: str) -> bool:
    """Milvus Lite takes a local file path; servers take http(s):// or tcp:// URIs."""
    return "://" not in uri


def _resolve(uri: str, index_dir: Path) -> str:
    """A Lite path recorded relative to the index folder (the folder can be moved) made usable."""
    return str(index_dir / uri) if _is_lite(uri) and not os.path.isabs(uri) else uri


def _client(uri: str) -> Any:
    if _is_lite(uri):
        # pymilvus asks the in-process Lite server for a timestamp service it does not have, and
        # the server logs each refusal as an error with a traceback; nothing fails.
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    try:
        return _pymilvus().MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""))
    except Exception as err:  # connection errors come in several pymilvus and gRPC types
        raise VSearchError(f"cannot connect to Milvus at {uri}: {one_line(err)}") from None


def ids_checksum(index: Index) -> str:
    """sha256 of the seller_img_ids in row order: what ties Milvus primary keys to ``ids.csv``."""
    return hashlib.sha256("\n".join(index.ids["seller_img_id"].astype(str)).encode()).hexdigest()


def default_collection(index_dir: str | os.PathLike) -> str:
    """A valid collection name (letters, digits, underscores) from the index folder's name."""
    return "vsearch_" + re.sub(r"\W", "_", Path(index_dir).resolve().name)


class MilvusSearcher:
    """Inner-product search in a Milvus collection: top ``min(k, N)`` rows by descending score,
    equal scores ordered by row, as :class:`~vsearch_tf.index.exact.ExactSearcher` gives them."""

    backend = "milvus"
    measured_recall: float | None = None

    def __init__(
        self, client: Any, info: dict[str, Any], dim: int, settings: IndexSettings
    ) -> None:
        self.client = client
        self.info = dict(info)
        self.dim = dim
        self.settings = settings  # the folder searcher's tuning, used if a rerank rebuilds locally

    @property
    def count(self) -> int:
        return int(self.info["count"])

    def params(self) -> dict[str, Any]:
        return {"metric": "dot_product", **self.info}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = as_queries(queries, self.dim, k)
        kk = min(k, self.count)
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.info["index_type"] == "HNSW":
            params["params"] = {"ef": max(kk, 64)}  # HNSW returns at most ef results
        rows = np.empty((len(queries), kk), np.int64)
        scores = np.empty((len(queries), kk), np.float32)
        for start in range(0, len(queries), _QUERY_ROWS):
            block = queries[start : start + _QUERY_ROWS]
            hits = self.client.search(
                self.info["collection"],
                data=block.tolist(),
                limit=kk,
                output_fields=[],
                search_params=params,
            )
            for i, found in enumerate(hits, start):
                if len(found) != kk:
                    raise VSearchError(
                        f"Milvus collection {self.info['collection']} returned {len(found)} of "
                        f"{kk} results for a query; use --milvus-index FLAT or HNSW"
                    )
                ids = np.array([h["id"] for h in found], np.int64)
                dist = np.array([h["distance"] for h in found], np.float32)
                order = np.lexsort((ids, -dist))
                rows[i], scores[i] = ids[order], dist[order]
        return rows, scores


def publish(
    index_dir: str | os.PathLike,
    uri: str | None = None,
    collection: str | None = None,
    index_type: str = "FLAT",
) -> dict[str, Any]:
    """Load the folder's vectors into a (re-created) Milvus collection and record it in the
    manifest; returns the manifest. ``uri`` defaults to Milvus Lite at ``INDEX_DIR/milvus.db``.

    Runs as the index's writer, so that no ``index add`` / ``remove`` changes the folder between
    reading the vectors and recording them (nor drops the record by replacing the manifest)."""
    if index_type not in INDEX_TYPES:
        raise VSearchError(f"--milvus-index {index_type}: choose from {', '.join(INDEX_TYPES)}")
    index_dir = Path(index_dir)
    recorded = uri or "milvus.db"
    if (
        _is_lite(recorded)
        and os.path.isabs(recorded)
        and Path(recorded).resolve().is_relative_to(index_dir.resolve())
    ):
        recorded = str(Path(recorded).resolve().relative_to(index_dir.resolve()))
    collection = collection or default_collection(index_dir)
    with writer_lock(index_dir):
        index = load_index(index_dir)
        _fill(_client(_resolve(recorded, index_dir)), collection, index, index_type)
        info = {
            "uri": recorded,
            "collection": collection,
            "index_type": index_type,
            "count": index.count,
            "ids_sha256": ids_checksum(index),
        }
        manifest = {**index.manifest, "extra": {**index.manifest.get("extra", {}), KEY: info}}
        write_json(index_dir / MANIFEST, manifest)
    return manifest


def _fill(client: Any, collection: str, index: Index, index_type: str) -> None:
    """(Re-)create ``collection`` holding ``index``'s vectors under their row numbers."""
    try:
        if client.has_collection(collection):
            client.drop_collection(collection)
        data_type = _pymilvus().DataType
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", data_type.INT64, is_primary=True)
        schema.add_field("vector", data_type.FLOAT_VECTOR, dim=index.dim)
        index_params = client.prepare_index_params()
        index_params.add_index(
            field_name="vector",
            index_type=index_type,
            metric_type="IP",
            params=_HNSW if index_type == "HNSW" else {},
        )
        client.create_collection(
            collection, schema=schema, index_params=index_params, consistency_level="Strong"
        )
        for start in range(0, index.count, _INSERT_ROWS):
            block = np.asarray(index.embeddings[start : start + _INSERT_ROWS], np.float32)
            client.insert(
                collection, [{"id": start + i, "vector": v} for i, v in enumerate(block.tolist())]
            )
        client.flush(collection)
        client.load_collection(collection)
    finally:
        client.close()


def attach(index: Index, backend: str | None = None) -> None:
    """Route ``index``'s searches to Milvus when ``backend`` is ``"milvus"``, or when it is
    ``None`` and the index was published to Milvus; ``"scann"`` keeps the folder's own searcher."""
    if backend not in (None, "scann", "milvus"):
        raise VSearchError(f"--backend {backend}: choose scann or milvus")
    info = index.manifest.get("extra", {}).get(KEY)
    if backend == "scann" or (backend is None and info is None):
        return
    if info is None:
        raise VSearchError(
            f"{index.path}: not published to Milvus; build it with `vsearch index --backend milvus`"
        )
    if info["count"] != index.count or info["ids_sha256"] != ids_checksum(index):
        raise VSearchError(
            f"{index.path}: the index changed after it was loaded into Milvus collection "
            f"{info['collection']}; run `vsearch index ... --backend milvus` again"
        )
    client = _client(_resolve(info["uri"], index.path))
    if not client.has_collection(info["collection"]):
        raise VSearchError(
            f"Milvus at {info['uri']} has no collection {info['collection']}; "
            "run `vsearch index ... --backend milvus` again"
        )
    client.load_collection(info["collection"])
    index.searcher = MilvusSearcher(client, info, index.dim, index.searcher.settings)
