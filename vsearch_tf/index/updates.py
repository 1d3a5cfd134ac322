"""Live updates of an index folder: add and remove gallery images without retraining ScaNN, and
rebuild it when many additions have worn its leaves. Each runs under the folder's writer lock
and replaces the folder whole."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vsearch_tf.config import IndexSettings
from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.index.base import StoredSearcher
from vsearch_tf.index.build import build_searcher, wants_exact
from vsearch_tf.index.exact import ExactSearcher
from vsearch_tf.index.folder import (
    ID_COLUMNS,
    Index,
    carry_over,
    load_index,
    write_folder,
    writer_lock,
)
from vsearch_tf.index.scann import ScannSearcher
from vsearch_tf.index.store import copy_blocks
from vsearch_tf.index.tuning import tune


def _preview(values: Sequence[str]) -> str:
    shown = ", ".join(values[:5])
    return shown + (f" and {len(values) - 5} more" if len(values) > 5 else "")


def check_new_ids(index: Index, seller_img_ids: Sequence[str], source: str) -> None:
    """``VSearchError`` if any id is already in the index or repeated: ids must stay unique."""
    new = pd.Series([str(i) for i in seller_img_ids])
    clash = sorted(set(new[new.isin(index.ids["seller_img_id"].astype(str))]))
    if clash:
        raise VSearchError(
            f"{source}: seller_img_id already in index {index.path}: {_preview(clash)}; "
            "remove them first"
        )
    repeated = sorted(set(new[new.duplicated()]))
    if repeated:
        raise VSearchError(f"{source}: seller_img_id repeated: {_preview(repeated)}")


def add_to_index(
    directory: str | os.PathLike,
    embeddings: np.ndarray,
    ids: pd.DataFrame,
    *,
    source: str,
    unreadable: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Add gallery images to an index without retraining it.

    ``ids`` must have the index's id columns. ScaNN gets the vectors by upsert (each goes to
    its nearest existing leaf) and its knobs are re-tuned, so ``measured_recall`` stays a
    measurement of the index as it now is. An exact index that grows past ``exact_below``
    stays exact until ``rebuild_index``; ``rebuild_suggested`` in the result says so.
    ``unreadable`` images replace the manifest's record of the same ids, and added ids leave
    it, so that evaluation counts every gallery image once. Returns ``{"added",
    "unreadable", "rebuild_suggested", "manifest"}``.
    """
    path = Path(directory)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    with writer_lock(path):
        index = load_index(path)
        if sorted(ids.columns) != sorted(index.ids.columns):
            raise ValueError(
                f"ids have columns {list(ids.columns)}, the index {list(index.ids.columns)}"
            )
        if embeddings.shape != (len(ids), index.dim):
            raise VSearchError(
                f"{source}: {embeddings.shape[1:]} embeddings for an index of {index.dim}-d vectors"
                if embeddings.ndim == 2 and len(ids) == len(embeddings)
                else f"{source}: {len(ids)} ids for embeddings of shape {embeddings.shape}"
            )
        check_new_ids(index, ids["seller_img_id"].tolist(), source)
        new_ids = ids[list(index.ids.columns)].astype(index.ids.dtypes.to_dict())
        all_ids = pd.concat([index.ids, new_ids], ignore_index=True)
        searcher = index.searcher
        make: Callable[[np.ndarray], StoredSearcher]
        if isinstance(searcher, ScannSearcher):
            searcher.append(embeddings)
            make = lambda vectors: tune(searcher, vectors)  # noqa: E731
        else:
            make = lambda vectors: ExactSearcher(vectors, searcher.settings)  # noqa: E731
        entry = {
            "op": "add",
            "source": source,
            "added": len(ids),
            "unreadable": len(unreadable),
            "count": len(all_ids),
        }
        still_unreadable = _unreadable_after_add(index.manifest, ids["seller_img_id"], unreadable)
        manifest = write_folder(
            path,
            all_ids,
            itertools.chain(copy_blocks(index.embeddings), [embeddings]),
            index.dim,
            make,
            carry_over(index.manifest, entry, still_unreadable),
        )
    return {
        "added": len(ids),
        "unreadable": len(unreadable),
        "rebuild_suggested": _rebuild_suggested(manifest, searcher.settings),
        "manifest": manifest,
    }


def _unreadable_after_add(
    manifest: dict[str, Any], added: Iterable[str], unreadable: Sequence[dict[str, str]]
) -> list[dict[str, str]]:
    """The manifest's unreadable images once ``added`` are in the index and ``unreadable`` were
    tried again: evaluation counts each gallery image once (as a relevant image, GTP)."""
    tried = {str(i) for i in added} | {str(u["seller_img_id"]) for u in unreadable}
    kept = [u for u in manifest.get("unreadable", []) if str(u["seller_img_id"]) not in tried]
    return [*kept, *unreadable]


def remove_from_index(
    directory: str | os.PathLike,
    *,
    ids: Sequence[str] = (),
    products: Sequence[str] = (),
    missing_ok: bool = False,
) -> dict[str, Any]:
    """Remove gallery images by ``seller_img_id`` and/or every image of ``products``.

    ScaNN deletes in place (no retraining) and its knobs are re-tuned; a ScaNN index that
    shrinks below ``exact_below`` becomes exact, which is free to build and perfect. Ids or
    products not in the index are a ``VSearchError`` unless ``missing_ok`` (for retries).
    Unreadable images of the removed ids/products leave the manifest too. Returns
    ``{"removed", "rebuild_suggested", "manifest"}``; nothing is written if nothing matched.
    """
    path = Path(directory)
    want_ids, want_products = {str(i) for i in ids}, {str(p) for p in products}
    with writer_lock(path):
        index = load_index(path)
        settings = index.searcher.settings
        seller = index.ids["seller_img_id"].astype(str)
        product = index.ids["product_id"].astype(str)
        old_unreadable = index.manifest.get("unreadable", [])
        known_ids = set(seller) | {str(u["seller_img_id"]) for u in old_unreadable}
        known_products = set(product) | {str(u["product_id"]) for u in old_unreadable}
        unknown = [f"seller_img_id {i}" for i in sorted(want_ids - known_ids)]
        unknown += [f"product_id {p}" for p in sorted(want_products - known_products)]
        if unknown and not missing_ok:
            raise VSearchError(
                f"{path}: not in the index: {_preview(unknown)} (pass --missing-ok to ignore)"
            )
        drop = np.flatnonzero((seller.isin(want_ids) | product.isin(want_products)).to_numpy())
        unreadable = [
            u
            for u in old_unreadable
            if str(u["seller_img_id"]) not in want_ids and str(u["product_id"]) not in want_products
        ]
        if drop.size == 0 and len(unreadable) == len(old_unreadable):
            return {
                "removed": 0,
                "rebuild_suggested": _rebuild_suggested(index.manifest, settings),
                "manifest": index.manifest,
            }
        if drop.size == index.count:
            raise VSearchError(
                f"{path}: removing all {index.count} images would leave the index empty"
            )

        searcher = index.searcher
        make: Callable[[np.ndarray], StoredSearcher]
        if isinstance(searcher, ScannSearcher) and not wants_exact(
            index.count - drop.size, settings
        ):
            order = searcher.remove_rows(drop)
            make = lambda vectors: tune(searcher, vectors)  # noqa: E731
        else:
            order = np.setdiff1d(np.arange(index.count), drop)
            make = lambda vectors: ExactSearcher(vectors, settings)  # noqa: E731
        entry = {
            "op": "remove",
            "removed": int(drop.size),
            "count": int(order.size),
            "ids": sorted(want_ids),
            "products": sorted(want_products),
        }
        manifest = write_folder(
            path,
            index.ids.iloc[order],
            copy_blocks(index.embeddings, order),
            index.dim,
            make,
            carry_over(index.manifest, entry, unreadable),
        )
    return {
        "removed": int(drop.size),
        "rebuild_suggested": _rebuild_suggested(manifest, settings),
        "manifest": manifest,
    }


def rebuild_index(
    directory: str | os.PathLike,
    *,
    target_recall: float | None = None,
    exact_below: int | None = None,
) -> dict[str, Any]:
    """Re-choose the backend and retrain ScaNN over the index's current vectors.

    After many additions ScaNN's leaves and codebooks no longer fit the data as well (each
    added vector went to the nearest old leaf); rebuilding restores that. The recorded
    settings are kept unless overridden. Returns the new manifest.
    """
    path = Path(directory)
    with writer_lock(path):
        index = load_index(path)
        asked = {"target_recall": target_recall, "exact_below": exact_below}
        settings = dataclasses.replace(
            index.searcher.settings, **{k: v for k, v in asked.items() if v is not None}
        )
        entry = {"op": "rebuild", "count": index.count}
        return write_folder(
            path,
            index.ids,
            copy_blocks(index.embeddings),
            index.dim,
            lambda vectors: build_searcher(vectors, settings),
            carry_over(index.manifest, entry, index.manifest.get("unreadable", [])),
        )


def _rebuild_suggested(manifest: dict[str, Any], settings: IndexSettings) -> bool:
    """Whether ``build_searcher`` would now pick another backend than the index has."""
    wants = "exact" if wants_exact(manifest["count"], settings) else "scann"
    return wants != manifest["backend"]


def read_withdrawn(csv: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The ``seller_img_id`` and ``product_id`` values of a withdrawn-items CSV (either column)."""
    path = Path(csv)
    if not path.is_file():
        raise VSearchError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise VSearchError(f"{path}: not a readable CSV ({one_line(err)})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    columns = [c for c in ID_COLUMNS if c in frame.columns]
    if not columns:
        raise VSearchError(
            f"{path}: needs a seller_img_id or product_id column; found {', '.join(frame.columns)}"
        )
    values = {c: [v.strip() for v in frame[c] if v.strip()] for c in columns}
    return values.get("seller_img_id", []), values.get("product_id", [])
