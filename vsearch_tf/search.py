"""Index a gallery with an exported model, query it, and evaluate it: what the CLI calls.

The exported SavedModel is used for everything (its ``serve_pixels`` signature behind the shared
tf.data decoding), so what is served is what is indexed. The index manifest records the model's
fingerprint; ``query`` and ``eval`` refuse an index built by another model unless forced.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vsearch_tf.config import IndexSettings
from vsearch_tf.data.tables import ImageTable, read_gallery, read_queries
from vsearch_tf.errors import VSearchError
from vsearch_tf.export import ExportedModel, load_exported
from vsearch_tf.index import (
    EmbeddingStore,
    Index,
    add_to_index,
    build_searcher,
    check_new_ids,
    load_index,
    save_index,
)
from vsearch_tf.inference import EmbedReport, embed_table, embed_to_store
from vsearch_tf.metrics import EvalResult, evaluate
from vsearch_tf.rerank import Rerank

Progress = Callable[[int], None]


def build_index(
    model_path: str | Path,
    gallery_csv: str | Path,
    root: str | Path | None,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    exact_below: int = 20_000,
    target_recall: float = 0.95,
    chunk_rows: int = 8192,
    strict: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Embed the gallery in resumable chunks and write the index folder atomically. Unreadable
    images are skipped and listed in the manifest; with ``strict`` any is an error."""
    model = load_exported(model_path)
    gallery = read_gallery(gallery_csv, root)
    out_dir = Path(out_dir)
    # Chunks live beside the index (not inside: the index folder is replaced atomically), keyed
    # by the model fingerprint and the gallery's rows, so a resumed job never mixes two models'
    # embeddings or row numbers of an edited csv.
    rows_key = hashlib.sha256(
        f"{gallery.digest()} {chunk_rows} {model.max_pixels}".encode()
    ).hexdigest()[:12]
    work = out_dir.parent / f".{out_dir.name}.chunks-{model.fingerprint[:16]}-{rows_key}"
    store = EmbeddingStore(work)
    embeddings, report = embed_to_store(
        model.embed_pixels,
        gallery,
        model.image_size,
        store,
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        progress=progress,
        max_pixels=model.max_pixels,
    )
    report.check_strict(gallery, strict)
    if len(report.rows) == 0:
        raise VSearchError(f"{gallery.source}: no gallery image could be read")
    searcher = build_searcher(
        embeddings, IndexSettings(exact_below=exact_below, target_recall=target_recall)
    )
    ids = _gallery_ids(gallery, report.rows)
    extra = {
        "model": str(model.path.resolve()),
        "model_fingerprint": model.fingerprint,
        "image_size": model.image_size,
        "gallery_csv": str(Path(gallery_csv).resolve()),
        "gallery_root": str(Path(root if root is not None else Path(gallery_csv).parent).resolve()),
        "gallery_rows": len(gallery),
        "resumed_chunks": report.resumed_chunks,
        **report.to_dict(gallery),
    }
    manifest = save_index(
        out_dir, searcher, embeddings, ids, extra, unreadable=_unreadable(gallery, report)
    )
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _gallery_ids(gallery: ImageTable, rows: np.ndarray) -> pd.DataFrame:
    """The index's ids.csv rows for gallery ``rows``."""
    return pd.DataFrame(
        {
            "seller_img_id": gallery.ids[rows],
            "product_id": gallery.products[rows],
            "img_path": gallery.paths[rows],
        }
    )


def _unreadable(gallery: ImageTable, report: EmbedReport) -> list[dict[str, str]]:
    """Gallery images that could not be embedded: kept in the manifest because they still count
    as relevant images (GTP) when evaluating."""
    records = _gallery_ids(gallery, report.skipped).astype(str).to_dict("records")
    return [{**record, "reason": why} for record, why in zip(records, report.reasons)]


def add_gallery(
    index_dir: str | Path,
    gallery_csv: str | Path,
    root: str | Path | None,
    *,
    model_path: str | Path | None = None,
    batch_size: int = 64,
    strict: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Embed only the rows of ``gallery_csv`` with the index's model and add them to the index."""
    gallery = read_gallery(gallery_csv, root)
    target = open_index(index_dir, model_path)
    check_new_ids(target.index, list(gallery.ids), str(gallery_csv))
    embeddings, report = target.embed(gallery, batch_size, progress)
    report.check_strict(gallery, strict)
    if len(report.rows) == 0:
        raise VSearchError(f"{gallery.source}: no gallery image could be read")
    result = add_to_index(
        index_dir,
        embeddings,
        _gallery_ids(gallery, report.rows),
        source=str(Path(gallery_csv).resolve()),
        unreadable=_unreadable(gallery, report),
    )
    return {**result, "skipped": report.to_dict(gallery)["skipped"]}


@dataclass
class Searchable:
    """An index and the model that queries it, checked to belong together."""

    index: Index
    model: ExportedModel

    def embed(self, table: ImageTable, batch_size: int = 64, progress: Progress | None = None):
        return embed_table(
            self.model.embed_pixels,
            table,
            self.model.image_size,
            batch_size,
            progress,
            self.model.max_pixels,
        )


def open_index(
    index_dir: str | Path, model_path: str | Path | None = None, *, force: bool = False
) -> Searchable:
    """Load an index and its model (by default the one recorded in the manifest)."""
    index = load_index(index_dir)
    extra = index.manifest.get("extra", {})
    model_path = model_path or extra.get("model")
    if model_path is None:
        raise VSearchError(f"{index_dir}: the manifest names no model; pass --model")
    model = load_exported(model_path)
    if model.embedding_dim != index.dim:
        raise VSearchError(
            f"model {model.path} gives {model.embedding_dim}-d embeddings but index {index_dir} "
            f"holds {index.dim}-d: query with the model the index was built with"
        )
    built_with = extra.get("model_fingerprint")
    if built_with and built_with != model.fingerprint and not force:
        raise VSearchError(
            f"index {index_dir} was built by model {built_with[:16]}..., not {model.path} "
            f"({model.fingerprint[:16]}...); rebuild the index or pass --force"
        )
    return Searchable(index, model)


def query_table(
    paths: list[str], boxes: list[tuple[float, float, float, float] | None]
) -> ImageTable:
    """An ad-hoc table for images named on the command line."""
    for p in paths:
        if not Path(p).is_file():
            raise VSearchError(f"{p}: image not found")
    box_array = np.array([b if b is not None else (-1.0,) * 4 for b in boxes], np.float32).reshape(
        -1, 4
    )
    return ImageTable(
        Path("<command line>"),
        np.array(paths, dtype=str),
        np.array([str(Path(p).resolve()) for p in paths], dtype=str),
        np.array([""] * len(paths), dtype=str),
        box_array,
    )


def run_queries(
    target: Searchable,
    table: ImageTable,
    k: int,
    batch_size: int = 64,
    progress: Progress | None = None,
    rerank: Rerank = Rerank(),
):
    """Embed ``table`` and search: returns (result rows (Q, k), scores, embed report)."""
    embeddings, report = target.embed(table, batch_size, progress)
    if len(report.rows) == 0:
        more = f" (and {len(table) - 1} more unreadable)" if len(table) > 1 else ""
        raise VSearchError(f"{table.paths[0]}: {report.reasons[0]}{more}")
    rows, scores = _reranked(target.index, rerank).search(
        embeddings, k, qe_k=rerank.qe_k, qe_alpha=rerank.qe_alpha
    )
    return rows, scores, report


def _reranked(index: Index, rerank: Rerank) -> Index:
    """``index`` with DBA applied in memory when asked for."""
    return index.with_dba(rerank.dba_k, rerank.dba_alpha) if rerank.dba_k else index


def evaluate_index(
    target: Searchable,
    queries_csv: str | Path,
    root: str | Path | None,
    *,
    k: int = 1000,
    batch_size: int = 64,
    progress: Progress | None = None,
    rerank: Rerank = Rerank(),
    strict: bool = False,
) -> tuple[EvalResult, dict[str, Any], ImageTable, np.ndarray]:
    """MCS2023 mAP@k and Recall@K of ``queries_csv`` against the index; returns the result, a
    report, the queries table and the result rows (-1 where a query was unreadable). For a ScaNN
    index the report's ``ann_recall`` is its recall@10 and @k against exact search on these
    queries, so the approximation's cost to the score is visible."""
    queries = read_queries(queries_csv, root)
    embeddings, report = target.embed(queries, batch_size, progress)
    report.check_strict(queries, strict)
    index = _reranked(target.index, rerank)
    found = (
        index.search(embeddings, k, qe_k=rerank.qe_k, qe_alpha=rerank.qe_alpha)[0]
        if len(report.rows)
        else np.zeros((0, 0), np.int64)
    )
    ann_recall = index.ann_recall(embeddings, (10, k)) if len(report.rows) else None
    ids = target.index.ids
    gallery_products = ids["product_id"].astype(str).to_numpy()
    # An unreadable query retrieves nothing and scores 0: dropping it would inflate the score.
    rows = np.full((len(queries), max(found.shape[1] if found.ndim == 2 else 0, 1)), -1, np.int64)
    if len(report.rows):
        rows[report.rows, : found.shape[1]] = found
    valid = rows >= 0
    retrieved = np.where(valid, gallery_products[np.maximum(rows, 0)], "")
    unreadable = target.index.manifest.get("unreadable")
    if unreadable:
        gallery_products = np.concatenate(
            [gallery_products, np.array([u["product_id"] for u in unreadable], dtype=str)]
        )
    elif unreadable is None and target.index.manifest.get("extra", {}).get("skipped"):
        # GTP must also count the gallery images the index could not read.
        extra = target.index.manifest["extra"]
        if Path(extra.get("gallery_csv", "")).is_file():
            gallery_products = read_gallery(
                extra["gallery_csv"], extra.get("gallery_root"), check_files=False
            ).products
    result = evaluate(retrieved, queries.products, gallery_products, k=k, valid=valid)
    details = {
        "queries_csv": str(queries_csv),
        "queries": len(queries),
        **report.to_dict(queries),
        "rerank": rerank.to_dict(),
        "ann_recall": None if ann_recall is None else {str(r): v for r, v in ann_recall.items()},
    }
    return result, details, queries, rows
