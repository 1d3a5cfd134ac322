"""How ``vsearch eval`` scores an index: the machinery behind the verb
:func:`vsearch_tf.workflows.evaluate`, which embeds the queries with the index's model and calls
it (tying a model to an index stays there; nothing here loads a model).

Two protocols (:data:`PROTOCOLS`) rank into one :class:`Ranked`. ``mcs`` searches the embedded
queries in the (re-ranked) index and scores them by :func:`vsearch_tf.inference.score_queries`,
MCS2023 mAP@k and Recall@K: unreadable queries score AP 0. ``self`` lets every indexed image
query the others from its stored vector, itself left out (Recall@K and mAP@R, as SOP, CUB and
Cars are scored). Under both, gallery images unreadable at indexing count as relevant and are
never found. A ``Ranked`` gives the failure report: :func:`per_query_table`,
:func:`per_product_table` and the worst queries' montage (:func:`failure_report`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vsearch_tf import io
from vsearch_tf.data.tables import ImageTable, read_gallery
from vsearch_tf.errors import VSearchError
from vsearch_tf.index import Index, load_index
from vsearch_tf.index.milvus import attach
from vsearch_tf.inference import EmbedReport, score_queries
from vsearch_tf.metrics import EvalResult, evaluate_self
from vsearch_tf.rerank import Rerank, without_self

# The verbs' progress convention; here, below workflows, as the self protocol reports progress.
Advance = Callable[[int], None]
#: ``progress(what, total)`` shows a progress bar and returns the function that advances it.
ProgressBar = Callable[[str, int], Advance]


#: ``vsearch eval --protocol``: queries against the gallery (MCS2023), or every indexed image
#: against the others (SOP, CUB, Cars).
PROTOCOLS = ("mcs", "self")
_WORST_SHOWN = 5  # results per row in worst.png and per_query.csv
_SELF_BLOCK = 1 << 14  # indexed images searched at a time by the self protocol


@dataclass
class Ranked:
    """Every query's ranked gallery rows (-1: none) and scores (NaN: none), and their result.

    ``query_rows`` are the queries' own rows in the index under the self protocol (query i is
    index row i), ``None`` under mcs."""

    result: EvalResult
    queries: ImageTable
    rows: np.ndarray  # int64 (Q, depth), rows into index.ids
    scores: np.ndarray  # float32 (Q, depth)
    index: Index
    query_rows: np.ndarray | None = None


def check_recall_ks(recall_at: Sequence[int] | None, k: int, protocol: str) -> tuple[int, ...]:
    """``recall_at`` checked (positive integers; under mcs, none past ``k``), sorted, unique;
    by default 1, 5 and 10 (under mcs, those up to ``k``)."""
    if protocol not in PROTOCOLS:
        raise VSearchError(f"--protocol {protocol!r}: choose {' or '.join(PROTOCOLS)}")
    if recall_at is None:
        return tuple(r for r in (1, 5, 10) if protocol == "self" or r <= k)
    shown = ",".join(map(str, recall_at))
    if not recall_at or any(
        isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in recall_at
    ):
        raise VSearchError(f"--recall-at {shown!r}: expected positive integers, e.g. 1,5,10")
    ks = tuple(sorted({int(r) for r in recall_at}))
    if protocol == "mcs" and ks[-1] > k:
        raise VSearchError(
            f"--recall-at {ks[-1]} is past --k {k}: ranks after k are not searched; raise --k"
        )
    return ks


def refuse_for_self(
    queries_csv: str | Path | None, model_path: str | Path | None, rerank: Rerank
) -> None:
    """What the self protocol would silently ignore is an error instead."""
    unused = {
        "--queries (the index's images are the queries)": queries_csv is not None,
        "--model (the index's stored vectors are the queries)": model_path is not None,
        "--qe / --dba": rerank != Rerank(),
    }
    given = [flag for flag, used in unused.items() if used]
    if given:
        raise VSearchError(f"--protocol self takes no {given[0]}")


def reranked(index: Index, rerank: Rerank) -> Index:
    """``index`` with DBA applied in memory when asked for."""
    return index.with_dba(rerank.dba_k, rerank.dba_alpha) if rerank.dba_k else index


def _unindexed_products(index: Index) -> np.ndarray:
    """Products of the gallery images the index could not read: relevant, never found."""
    unreadable = index.manifest.get("unreadable")
    extra = index.manifest.get("extra", {})
    if unreadable is None and extra.get("skipped") and Path(extra.get("gallery_csv", "")).is_file():
        # An index from before the manifest listed them: they are the csv's rows not indexed.
        gallery = read_gallery(extra["gallery_csv"], extra.get("gallery_root"))
        indexed = set(index.ids["seller_img_id"].astype(str))
        return gallery.products[[i not in indexed for i in gallery.ids]]
    return np.array([u["product_id"] for u in unreadable or []], dtype=str)


def merge_neighbours(
    rows_a: np.ndarray, sims_a: np.ndarray, rows_b: np.ndarray, sims_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two searches of the same queries -> one: each gallery row at its better score, ranked by
    score, as deep as the deeper input. Row -1 (none) never displaces a real row."""
    rows = np.concatenate([rows_a, rows_b], 1)
    sims = np.where(rows >= 0, np.concatenate([sims_a, sims_b], 1), -np.inf)
    depth = max(rows_a.shape[1], rows_b.shape[1])
    out_rows = np.full((len(rows), depth), -1, np.int64)
    out_sims = np.full((len(rows), depth), np.nan, np.float32)
    for q in range(len(rows)):
        order = np.argsort(-sims[q], kind="stable")
        kept, first = np.unique(rows[q, order], return_index=True)
        best = order[np.sort(first[kept >= 0])][:depth]  # first (best) sighting of each row
        out_rows[q, : len(best)], out_sims[q, : len(best)] = rows[q, best], sims[q, best]
    return out_rows, out_sims


def rank_queries(
    index: Index,
    queries: ImageTable,
    embeddings: np.ndarray,
    report: EmbedReport,
    k: int,
    recall_ks: Sequence[int],
    rerank: Rerank,
    second: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Ranked, dict[int, float] | None]:
    """The mcs protocol: the embedded queries searched in the (re-ranked) index and scored by
    :func:`score_queries`; also ScaNN's recall against exact search on them.

    ``second``: ``(embeddings, mask)``, a second embedding of the same queries (row-aligned with
    ``embeddings``) and which of them to use: those queries keep the better-scoring neighbours
    of both searches (:func:`merge_neighbours`), the multi-crop fallback."""
    searched = reranked(index, rerank)
    found, sims, ann_recall = np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32), None
    if len(report.rows):
        found, sims = searched.search(embeddings, k, qe_k=rerank.qe_k, qe_alpha=rerank.qe_alpha)
        ann_recall = searched.ann_recall(embeddings, (10, k))
    if second is not None and second[1].any():  # the multi-crop fallback
        also, mask = second
        more, more_sims = searched.search(also[mask], k, qe_k=rerank.qe_k, qe_alpha=rerank.qe_alpha)
        found, sims = found.copy(), sims.copy()
        found[mask], sims[mask] = merge_neighbours(found[mask], sims[mask], more, more_sims)
    result, rows = score_queries(
        found,
        report,
        queries.products,
        index.ids["product_id"].astype(str).to_numpy(),
        _unindexed_products(index),
        k,
        recall_ks,
    )
    scores = np.full(rows.shape, np.nan, np.float32)
    scores[report.rows, : sims.shape[1]] = sims
    return Ranked(result, queries, rows, scores, index), ann_recall


def _search_others(index: Index, depth: int, progress: Advance) -> tuple[np.ndarray, np.ndarray]:
    """Each indexed image's ``depth`` nearest other indexed images (rows, scores), its stored
    vector as the query, searched in blocks."""
    n = index.count
    rows, scores = np.empty((n, depth), np.int64), np.empty((n, depth), np.float32)
    for start in range(0, n, _SELF_BLOCK):
        stop = min(n, start + _SELF_BLOCK)
        found, sims = index.search(np.asarray(index.embeddings[start:stop]), depth + 1)
        rows[start:stop], scores[start:stop] = without_self(
            found, sims, np.arange(start, stop), depth
        )
        progress(stop - start)
    return rows, scores


def _rank_self(
    index: Index, unindexed: np.ndarray, recall_ks: Sequence[int], progress: ProgressBar
) -> tuple[Ranked, dict[int, float] | None]:
    """The self protocol: every indexed image queries the others, itself left out, scored by
    :func:`evaluate_self`. Gallery images unreadable at indexing are no queries (they have no
    vector) but count in their product's R, as they count in GTP under mcs: the one rule of
    :func:`score_queries`. Searched as deep as the largest R and Recall@K need."""
    n = index.count
    ids = index.ids
    products = ids["product_id"].astype(str).to_numpy()
    _, codes = np.unique(np.concatenate([products, unindexed]), return_inverse=True)
    codes = codes.astype(np.int32)  # (n, depth) of them: SOP's 60k x 1000 in 240 MB
    query_codes = codes[:n]
    depth = min(n - 1, max(int(np.bincount(codes)[query_codes].max()) - 1, max(recall_ks)))
    if depth < 1:
        raise VSearchError(f"{index.path}: the index holds one image, there is nothing to query")
    rows, scores = _search_others(index, depth, progress("searching the index", n))
    result = evaluate_self(query_codes[rows], query_codes, codes, recall_ks)
    paths = ids["img_path"] if "img_path" in ids else pd.Series([""] * n)
    queries = ImageTable(
        index.path / "ids.csv",
        ids["seller_img_id"].astype(str).to_numpy(),
        paths.astype(str).to_numpy(),
        products,
        np.full((n, 4), -1.0, np.float32),
    )
    ranked = Ranked(result, queries, rows, scores, index, query_rows=np.arange(n))
    return ranked, index.ann_recall(index.embeddings, (10, depth))


def self_protocol(
    index_dir: str | Path,
    recall_ks: Sequence[int],
    backend: str | None,
    strict: bool,
    progress: ProgressBar,
) -> tuple[Ranked, dict[int, float] | None, dict[str, Any]]:
    """The self protocol on the index at ``index_dir``: its ranking, ANN recall and report."""
    index = load_index(index_dir)
    attach(index, backend)
    unindexed = _unindexed_products(index)
    if strict and len(unindexed):
        raise VSearchError(
            f"{index_dir}: {len(unindexed)} gallery images could not be read when it was indexed "
            "(manifest 'unreadable'); --strict allows none"
        )
    ranked, ann_recall = _rank_self(index, unindexed, recall_ks, progress)
    details = {
        "queries": index.count,
        "unreadable_gallery": len(unindexed),
        "model": index.manifest.get("extra", {}).get("model"),
    }
    return ranked, ann_recall, details


def per_query_table(ranked: Ranked) -> pd.DataFrame:
    """``per_query.csv``: each query's id, product, AP, rank of the first correct item (empty
    when none is in the top k) and top-5 ids and scores."""
    result, top = ranked.result, ranked.rows[:, :_WORST_SHOWN]
    found = result.first_rank > 0
    frame = pd.DataFrame(
        {
            "query_id": ranked.queries.ids,
            "product_id": ranked.queries.products,
            "ap": result.per_query_ap.round(6),
            "first_rank": pd.Series(result.first_rank, dtype="Int64").mask(~found),
        }
    )
    ids = ranked.index.ids["seller_img_id"].astype(str).to_numpy()
    for j in range(top.shape[1]):
        has = top[:, j] >= 0
        frame[f"top{j + 1}_id"] = np.where(has, ids[top[:, j]], "")
        frame[f"top{j + 1}_score"] = np.where(has, ranked.scores[:, j], np.nan).round(6)
    return frame


def per_product_table(per_query: pd.DataFrame) -> pd.DataFrame:
    """``per_product.csv``: each product's number of queries, mean AP and Recall@1 (empty for a
    product that cannot be scored), worst first."""
    hit = per_query["first_rank"].eq(1).fillna(False).astype(float).where(per_query["ap"].notna())
    table = (
        per_query.assign(hit=hit)
        .groupby("product_id", sort=False)
        .agg(queries=("ap", "size"), mean_ap=("ap", "mean"), recall_at_1=("hit", "mean"))
        .reset_index()
    )
    return table.sort_values(["mean_ap", "product_id"], na_position="last", kind="stable")


def failure_report(report_dir: str | Path, ranked: Ranked, worst: int) -> dict[str, str]:
    """``per_query.csv``, ``per_product.csv`` and ``worst.png`` (the ``worst`` lowest-AP queries
    that retrieved something) in ``report_dir``, each written atomically; returns their paths."""
    folder = Path(report_dir)
    per_query = per_query_table(ranked)
    files = {name: folder / name for name in ("per_query.csv", "per_product.csv", "worst.png")}
    io.write_text(files["per_query.csv"], per_query.to_csv(index=False))
    io.write_text(files["per_product.csv"], per_product_table(per_query).to_csv(index=False))
    ap = ranked.result.per_query_ap
    usable = np.intersect1d(with_results(ranked), np.flatnonzero(np.isfinite(ap)))
    picks = usable[np.argsort(ap[usable], kind="stable")][:worst]
    eval_montage(files["worst.png"], ranked, picks, expected=True)
    return {name: str(path) for name, path in files.items()}


def _catalogue_image(ranked: Ranked, products: np.ndarray, i: int) -> tuple[str | None, str]:
    """An indexed image of query ``i``'s product (not the query itself), and the product;
    ``products`` are the index's, as str."""
    same = np.flatnonzero(products == ranked.queries.products[i])
    if ranked.query_rows is not None:
        same = same[same != ranked.query_rows[i]]
    ids = ranked.index.ids
    path = str(ids["img_path"].iat[same[0]]) if len(same) and "img_path" in ids else None
    return path, str(ranked.queries.products[i])


def eval_montage(path: str | Path, ranked: Ranked, picks: Sequence[int], expected: bool) -> None:
    """Queries ``picks`` with their top results, and with ``expected`` the right product's
    catalogue image last in each row."""
    from vsearch_tf.viz import MontageRow, montage

    queries, paths = ranked.queries, ranked.index.ids["img_path"]
    products = ranked.index.ids["product_id"].astype(str).to_numpy()
    rows = []
    for i in picks:
        top = ranked.rows[i, :_WORST_SHOWN]
        rows.append(
            MontageRow(
                queries.paths[i],
                tuple(queries.boxes[i]) if queries.boxes[i][2] > 0 else None,
                [paths.iat[g] for g in top],
                products[top].tolist(),
                (products[top] == queries.products[i]).tolist(),
                _catalogue_image(ranked, products, i) if expected else None,
            )
        )
    montage(rows, path)


def with_results(ranked: Ranked) -> np.ndarray:
    """The queries that retrieved something (not the unreadable ones)."""
    return np.flatnonzero(ranked.rows[:, 0] >= 0)
