"""The data path, top-down: train -> export -> index -> query -> eval, one function per verb of
the ``vsearch`` command. Each takes typed arguments, does the work (files written atomically,
Milvus published or attached) and returns plain results -- dicts that the CLI prints as tables
or JSON, and that scripts can use as they are.

After training, the exported SavedModel is used for everything (its ``serve_pixels`` signature
behind the shared tf.data decoding), so what is served is what is indexed. The index manifest
records the model's fingerprint; ``query`` and ``evaluate`` refuse an index built by another
model unless forced.

Images that cannot be used -- missing, empty, damaged, too large -- are one case everywhere:
skipped, counted and listed with their reason. With ``strict`` any of them is an error, and a
missing file is found before anything is embedded (the error names its CSV line).

One module, so that the whole path reads in one place, in its order; each function is one verb
or a short step of one. How an index is scored is :mod:`vsearch_tf.evaluation`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vsearch_tf import evaluation, io
from vsearch_tf.beam import embed_gallery, load_embeddings
from vsearch_tf.config import IndexSettings, load_config
from vsearch_tf.data.tables import ImageTable, read_gallery, read_queries
from vsearch_tf.errors import VSearchError
from vsearch_tf.evaluation import Advance, ProgressBar
from vsearch_tf.export import ExportedModel, check_export, export_run, fingerprint_of
from vsearch_tf.index import (
    EmbeddingStore,
    Index,
    add_to_index,
    build_searcher,
    check_new_ids,
    load_index,
    read_withdrawn,
    rebuild_index,
    remove_from_index,
    save_index,
)
from vsearch_tf.index.milvus import attach, publish
from vsearch_tf.inference import EmbedReport, embed_table, embed_to_store, localize_table
from vsearch_tf.litert import (
    DEFAULT_CALIBRATION,
    check_litert,
    export_litert,
    is_litert,
    load_model,
)
from vsearch_tf.models.localizer import box_iou
from vsearch_tf.rerank import Rerank

Box = tuple[float, float, float, float]


def no_progress(what: str, total: int) -> Advance:
    return lambda n: None


#: ``vsearch embed``: a gallery embedded by Apache Beam workers (:mod:`vsearch_tf.beam`).
embed = embed_gallery


# ------------------------------------------------------------------------------ train, export


def train_localizer(
    config: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """``vsearch train-localizer``: train the product localizer; returns the summary and
    ``run_dir``."""
    from vsearch_tf.config import load_localizer_config
    from vsearch_tf.localizer_train import train_localizer as run_training

    cfg = load_localizer_config(config, list(overrides))
    summary = run_training(cfg, resume=resume, show_progress=show_progress)
    return {"run_dir": str(cfg.run_dir), **summary}


def train(
    config: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train per a YAML config and ``key=value`` overrides; returns the summary and ``run_dir``."""
    from vsearch_tf.train import train as run_training  # Keras models and losses: only here

    cfg = load_config(config, list(overrides))
    summary = run_training(cfg, resume=resume, show_progress=show_progress)
    return {"run_dir": str(cfg.run_dir), **summary}


def prepare(
    config: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    out: str | Path | None = None,
    progress: ProgressBar = no_progress,
) -> dict[str, Any]:
    """``vsearch data prepare``: decode the config's training photos once into TFRecord shards
    (``data.prepared``, or ``out``) that ``train`` then reads; returns their manifest."""
    from vsearch_tf.data.prepared import prepare as write_shards  # TensorFlow: only here

    cfg = load_config(config, list(overrides))
    shown = {"done": 0}

    def report(done: int, total: int) -> None:
        if "advance" not in shown:
            shown["advance"] = progress("prepare", total)
        shown["advance"](done - shown["done"])
        shown["done"] = done

    manifest = write_shards(cfg, out=None if out is None else str(out), progress=report)
    return {"dir": str(out or cfg.data.prepared), **manifest}


def export(
    run_dir: str | Path,
    name: str,
    *,
    root: str | Path = "saved_models",
    version: int | None = None,
    overwrite: bool = False,
    flip: bool = False,
    format: str = "savedmodel",
    quantize: str = "none",
    calibration: int = DEFAULT_CALIBRATION,
    keep_float: Sequence[str] | None = None,
    localizer: str | Path | None = None,
    text: bool = False,
) -> dict[str, Any]:
    """Export a run's embedder as the TF Serving model ``ROOT/NAME/<version>`` (``flip``: with
    test-time flip averaging; ``text``: with the ``serve_text`` signature), or (``format``
    ``litert``) as ``ROOT/NAME/litert/NAME-QUANTIZE.tflite`` converted from it; ``localizer``: a
    localizer run's localizer inside the SavedModel."""
    if format == "litert":
        if flip or localizer or text:
            raise VSearchError(
                "--flip / --localizer / --text: export the SavedModel with them; --format litert "
                "converts the newest one (cropped pixels in)"
            )
        return export_litert(
            run_dir,
            name,
            root=root,
            quantize=quantize,
            calibration=calibration,
            version=version,
            overwrite=overwrite,
            keep_float=keep_float,
        )
    if format != "savedmodel":
        raise VSearchError(f"--format {format}: choose savedmodel or litert")
    if quantize != "none" or keep_float:
        raise VSearchError("--quantize and --keep-float apply to --format litert only")
    path = export_run(
        run_dir,
        name,
        root=root,
        version=version,
        overwrite=overwrite,
        flip=flip,
        localizer=localizer,
        text=text,
    )
    return {
        "path": str(path),
        "version": int(path.name),
        "fingerprint": fingerprint_of(path),
        "bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
    }


def check_model(model_dir: str | Path) -> dict[str, Any]:
    """Serve an export from a fresh process and compare it with its run's Keras embedder; the
    report's ``problem`` is the one-line verdict when any check failed, else ``None``. A
    ``.tflite`` is compared with its SavedModel instead (cosine per image)."""
    if is_litert(model_dir):
        report = check_litert(model_dir)
        report["problem"] = None
        if not report["ok"]:
            report["problem"] = (
                f"{model_dir}: cosine similarity to the SavedModel {report['cosine_min']:.4f} "
                f"(worst image), {report['cosine_mean']:.4f} (mean); {report['quantize']} allows "
                f"{report['min_cosine']} and {report['min_mean_cosine']}"
            )
        return report
    report = check_export(model_dir)
    failed = [c["check"] for c in report["checks"] if not c["ok"]]
    report["problem"] = None
    if failed:
        report["problem"] = (
            f"{len(failed)} of {len(report['checks'])} checks failed "
            f"(tolerance {report['tolerance']:g}): " + "; ".join(failed)
        )
    return report


# ------------------------------------------------------------------------------------ index


@dataclass(frozen=True)
class MilvusTarget:
    """Where ``--backend milvus`` loads an index's vectors (see :mod:`vsearch_tf.index.milvus`);
    ``uri`` None is Milvus Lite in the index folder."""

    uri: str | None = None
    collection: str | None = None
    index_type: str = "FLAT"


@dataclass
class GalleryVectors:
    """An embedded gallery, by this process or by ``vsearch embed``: what an index is made of."""

    embeddings: np.ndarray  # float32 (N, D)
    ids: pd.DataFrame  # seller_img_id, product_id, img_path of each vector
    unreadable: list[dict[str, str]]  # seller_img_id, product_id, img_path, reason
    fallbacks: list[str]  # seller_img_ids whose box fell back to the whole image
    source: dict[str, Any]  # model, model_fingerprint, image_size, gallery_csv, gallery_root...


def _save_gallery(
    out_dir: str | Path,
    gallery: GalleryVectors,
    settings: IndexSettings,
    milvus: MilvusTarget | None,
) -> dict[str, Any]:
    """Write the index folder of ``gallery``; returns its manifest. The manifest's ``extra`` is
    assembled here only, whichever way the gallery was embedded."""
    extra = {
        **gallery.source,
        "gallery_rows": len(gallery.ids) + len(gallery.unreadable),
        "embedded": len(gallery.ids),
        "skipped": [
            {"id": u["seller_img_id"], "path": u["img_path"], "reason": u["reason"]}
            for u in gallery.unreadable
        ],
        "box_fallbacks": gallery.fallbacks,
    }
    searcher = build_searcher(gallery.embeddings, settings)
    # Unreadable images stay in the manifest: they still count as relevant (GTP) in evaluation.
    manifest = save_index(
        out_dir, searcher, gallery.embeddings, gallery.ids, extra, unreadable=gallery.unreadable
    )
    if milvus is not None:
        manifest = publish(out_dir, milvus.uri, milvus.collection, milvus.index_type)
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
    records = _gallery_ids(gallery, report.skipped).astype(str).to_dict("records")
    return [{**record, "reason": why} for record, why in zip(records, report.reasons)]


def _chunk_dir(out_dir: Path, model: ExportedModel, gallery: ImageTable, chunk_rows: int) -> Path:
    """Where a gallery's resumable chunks live: beside the index (not inside: the index folder
    is replaced atomically), keyed by the model fingerprint and the gallery's rows, so a resumed
    job never mixes two models' embeddings or row numbers of an edited csv."""
    rows_key = hashlib.sha256(
        f"{gallery.digest()} {chunk_rows} {model.max_pixels}".encode()
    ).hexdigest()[:12]
    return out_dir.parent / f".{out_dir.name}.chunks-{model.fingerprint[:16]}-{rows_key}"


def index_build(
    model_path: str | Path,
    gallery_csv: str | Path,
    root: str | Path | None,
    out_dir: str | Path,
    *,
    settings: IndexSettings | None = None,
    batch_size: int = 64,
    chunk_rows: int = 8192,
    strict: bool = False,
    progress: ProgressBar = no_progress,
    milvus: MilvusTarget | None = None,
) -> dict[str, Any]:
    """``vsearch index``: embed the gallery in resumable chunks and write the index folder
    atomically; returns its manifest."""
    gallery = read_gallery(gallery_csv, root, check_files=strict)
    model = load_model(model_path)
    out_dir = Path(out_dir)
    work = _chunk_dir(out_dir, model, gallery, chunk_rows)
    embeddings, report = embed_to_store(
        model.embed_pixels,
        gallery,
        model.image_size,
        EmbeddingStore(work),
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        progress=progress("embedding gallery", len(gallery)),
        max_pixels=model.max_pixels,
    )
    report.check_strict(gallery, strict)
    if len(report.rows) == 0:
        raise VSearchError(f"{gallery.source}: no gallery image could be read")
    source = {
        "model": str(model.path.resolve()),
        "model_fingerprint": model.fingerprint,
        "image_size": model.image_size,
        "gallery_csv": str(Path(gallery_csv).resolve()),
        "gallery_root": str(Path(root if root is not None else Path(gallery_csv).parent).resolve()),
        "resumed_chunks": report.resumed_chunks,
    }
    vectors = GalleryVectors(
        embeddings,
        _gallery_ids(gallery, report.rows),
        _unreadable(gallery, report),
        [str(i) for i in gallery.ids[report.fallback_rows]],
        source,
    )
    manifest = _save_gallery(out_dir, vectors, settings or IndexSettings(), milvus)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def index_embedded(
    directory: str,
    out_dir: str | Path,
    *,
    settings: IndexSettings | None = None,
    milvus: MilvusTarget | None = None,
) -> dict[str, Any]:
    """``vsearch index --embeddings DIR``: the index ``index_build`` would make of the same
    gallery and model, from the output of ``vsearch embed`` (nothing is embedded again)."""
    embedded = load_embeddings(directory)
    if len(embedded.ids) == 0:
        raise VSearchError(f"{directory}: no gallery image could be read")
    info, csvs = embedded.info, embedded.info["gallery_csvs"]
    source = {
        "model": info["model"],
        "model_fingerprint": info["model_fingerprint"],
        "image_size": info["image_size"],
        "gallery_csv": csvs[0] if len(csvs) == 1 else csvs,
        "gallery_root": info["root"],
        "embeddings_dir": directory,
    }
    unreadable = [
        {
            **{k: str(u[k]) for k in ("seller_img_id", "product_id", "img_path")},
            "reason": u["error"],
        }
        for u in embedded.unreadable
    ]
    vectors = GalleryVectors(
        embedded.embeddings, embedded.ids, unreadable, embedded.fallbacks, source
    )
    return _save_gallery(out_dir, vectors, settings or IndexSettings(), milvus)


def index_add(
    index_dir: str | Path,
    gallery_csv: str | Path,
    root: str | Path | None,
    *,
    model_path: str | Path | None = None,
    batch_size: int = 64,
    strict: bool = False,
    progress: ProgressBar = no_progress,
) -> dict[str, Any]:
    """``vsearch index add``: embed only the rows of ``gallery_csv``, with the index's model,
    and add them to the index (no ScaNN retraining)."""
    gallery = read_gallery(gallery_csv, root, check_files=strict)
    target = open_index(index_dir, model_path)
    check_new_ids(target.index, list(gallery.ids), str(gallery_csv))
    embeddings, report = target.embed(
        gallery, batch_size, progress("embedding new images", len(gallery))
    )
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


def index_remove(
    index_dir: str | Path,
    *,
    ids: Sequence[str] = (),
    products: Sequence[str] = (),
    csv: str | Path | None = None,
    missing_ok: bool = False,
) -> dict[str, Any]:
    """``vsearch index remove``: remove withdrawn images (by ``seller_img_id``) and products,
    given directly and/or in a CSV (no ScaNN retraining)."""
    ids, products = list(ids), list(products)
    if csv is not None:
        csv_ids, csv_products = read_withdrawn(csv)
        ids, products = ids + csv_ids, products + csv_products
    if not ids and not products:
        raise VSearchError(
            "vsearch index remove: nothing to remove; give --ids, --products or --csv"
        )
    return remove_from_index(index_dir, ids=ids, products=products, missing_ok=missing_ok)


def index_rebuild(
    index_dir: str | Path,
    *,
    target_recall: float | None = None,
    exact_below: int | None = None,
) -> dict[str, Any]:
    """``vsearch index rebuild``: retrain ScaNN (or switch backend) over the current vectors,
    with the recorded settings unless overridden; returns the manifest."""
    return rebuild_index(index_dir, target_recall=target_recall, exact_below=exact_below)


# ------------------------------------------------------------------------------ query, eval


@dataclass
class Searchable:
    """An index and the model that queries it, checked to belong together."""

    index: Index
    model: ExportedModel

    def embed(
        self, table: ImageTable, batch_size: int = 64, progress: Advance | None = None
    ) -> tuple[np.ndarray, EmbedReport]:
        return embed_table(
            self.model.embed_pixels,
            table,
            self.model.image_size,
            batch_size,
            progress,
            self.model.max_pixels,
        )

    def locate(
        self,
        table: ImageTable,
        box_source: str,
        batch_size: int = 64,
        progress: Advance | None = None,
    ) -> tuple[ImageTable, np.ndarray | None]:
        """``table`` with the boxes ``box_source`` says: ``given`` (as it is), ``predicted`` (the
        model's localizer, with the confidences), ``none`` (whole images)."""
        if box_source not in BOX_SOURCES:
            raise VSearchError(f"--box-source {box_source!r}: choose {', '.join(BOX_SOURCES)}")
        if box_source == "given":
            return table, None
        if box_source == "none":
            return dataclasses.replace(table, boxes=np.full_like(table.boxes, -1.0)), None
        if self.model.localizer is None:
            raise VSearchError(
                f"--box-source predicted: {self.model.path} was exported without a localizer "
                "(vsearch export --localizer RUN_DIR)"
            )
        boxes, confidence = localize_table(self.model.localize, table, batch_size, progress)
        return dataclasses.replace(table, boxes=boxes), confidence


#: ``vsearch eval --box-source``: the csv's boxes, the localizer's, or none (whole images).
BOX_SOURCES = ("given", "predicted", "none")


def open_index(
    index_dir: str | Path,
    model_path: str | Path | None = None,
    *,
    force: bool = False,
    backend: str | None = None,
) -> Searchable:
    """Load an index and its model (by default the one recorded in the manifest). ``backend``
    ``milvus`` searches the index's Milvus collection, ``scann`` its own searcher; ``None``
    picks Milvus when the index was published there."""
    index = load_index(index_dir)
    extra = index.manifest.get("extra", {})
    model_path = model_path or extra.get("model")
    if model_path is None:
        raise VSearchError(f"{index_dir}: the manifest names no model; pass --model")
    model = load_model(model_path)
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
    attach(index, backend)
    return Searchable(index, model)


def query_table(paths: Sequence[str], boxes: Sequence[Box | None]) -> ImageTable:
    """An ad-hoc table for images named on the command line (a missing one is an error: it
    was typed, not read from a catalogue)."""
    for p in paths:
        if not Path(p).is_file():
            raise VSearchError(f"{p}: image not found")
    box_array = np.array([b if b is not None else (-1.0,) * 4 for b in boxes], np.float32)
    return ImageTable(
        Path("<command line>"),
        np.array(paths, dtype=str),
        np.array([str(Path(p).resolve()) for p in paths], dtype=str),
        np.array([""] * len(paths), dtype=str),
        box_array.reshape(-1, 4),
    )


def _hit(ids: pd.DataFrame, rank: int, row: int, score: float) -> dict[str, Any]:
    return {
        "rank": rank,
        "seller_img_id": str(ids["seller_img_id"].iat[row]),
        "product_id": str(ids["product_id"].iat[row]),
        "score": round(float(score), 6),
        "img_path": str(ids["img_path"].iat[row]) if "img_path" in ids else None,
    }


def query(
    index_dir: str | Path,
    images: Sequence[str | Path],
    boxes: Sequence[Box | None],
    *,
    top_k: int = 10,
    model_path: str | Path | None = None,
    force: bool = False,
    backend: str | None = None,
    rerank: Rerank = Rerank(),
    montage_path: str | Path | None = None,
) -> dict[str, Any]:
    """``vsearch query``: the ``top_k`` gallery images of each query image (one box or None per
    image); unreadable images are listed in ``skipped``, and are an error when all are."""
    target = open_index(index_dir, model_path, force=force, backend=backend)
    table = query_table([str(p) for p in images], boxes)
    confidence = np.full(len(table), np.nan)
    if target.model.localizer is not None and any(b is None for b in boxes):
        # No box given: the export's localizer finds the product (a given box is kept).
        predicted, confidence = target.locate(table, "predicted")
        given = np.array([b is not None for b in boxes])
        confidence[given] = np.nan
        table = dataclasses.replace(
            table, boxes=np.where(given[:, None], table.boxes, predicted.boxes)
        )
    embeddings, report = target.embed(table)
    if len(report.rows) == 0:
        more = f" (and {len(table) - 1} more unreadable)" if len(table) > 1 else ""
        raise VSearchError(f"{table.paths[0]}: {report.reasons[0]}{more}")
    rows, scores = evaluation.reranked(target.index, rerank).search(
        embeddings, top_k, qe_k=rerank.qe_k, qe_alpha=rerank.qe_alpha
    )
    ids = target.index.ids
    results = [
        {
            "image": str(images[r]),
            "bbox": boxes[r] if np.isnan(confidence[r]) else tuple(map(float, table.boxes[r])),
            "box_source": "given"
            if boxes[r]
            else "none"
            if np.isnan(confidence[r])
            else "predicted",
            "confidence": None if np.isnan(confidence[r]) else round(float(confidence[r]), 4),
            "results": [_hit(ids, j + 1, g, scores[qi, j]) for j, g in enumerate(rows[qi])],
        }
        for qi, r in enumerate(report.rows)
    ]
    if montage_path is not None:
        from vsearch_tf.viz import MontageRow, montage

        montage(
            [
                MontageRow(
                    res["image"],
                    res["bbox"],
                    [h["img_path"] for h in res["results"][:5]],
                    [h["product_id"] for h in res["results"][:5]],
                    [None] * min(5, len(res["results"])),
                )
                for res in results
            ],
            montage_path,
        )
    return {
        "queries": results,
        "skipped": [
            {"path": str(images[r]), "reason": why}
            for r, why in zip(report.skipped, report.reasons)
        ],
        "box_fallbacks": [str(images[r]) for r in report.fallback_rows],
    }


def query_text(
    index_dir: str | Path,
    texts: Sequence[str],
    *,
    top_k: int = 10,
    model_path: str | Path | None = None,
    force: bool = False,
    backend: str | None = None,
    rerank: Rerank = Rerank(),
) -> dict[str, Any]:
    """``vsearch query --text``: the ``top_k`` gallery images of each text, embedded by the
    model's ``serve_text`` signature (a CLIP / SigLIP export made with ``--text``)."""
    target = open_index(index_dir, model_path, force=force, backend=backend)
    embeddings = np.asarray(target.model.embed_text(list(texts)))
    rows, scores = evaluation.reranked(target.index, rerank).search(
        embeddings, top_k, qe_k=rerank.qe_k, qe_alpha=rerank.qe_alpha
    )
    ids = target.index.ids
    results = [
        {
            "text": text,
            "results": [_hit(ids, j + 1, g, scores[qi, j]) for j, g in enumerate(rows[qi])],
        }
        for qi, text in enumerate(texts)
    ]
    return {"queries": results, "skipped": [], "box_fallbacks": []}


def _whole_images(
    target: Searchable,
    queries: ImageTable,
    report: EmbedReport,
    unsure: np.ndarray,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The multi-crop fallback's second embedding: the ``unsure`` queries embedded whole, as
    ``(embeddings, mask)`` row-aligned with ``report.rows`` (zeros where not used)."""
    rows = np.flatnonzero(unsure)
    whole = dataclasses.replace(
        queries.subset(rows), boxes=np.full((len(rows), 4), -1.0, np.float32)
    )
    vectors, whole_report = target.embed(whole, batch_size)
    done = rows[whole_report.rows]  # rows of ``queries``
    position = {row: i for i, row in enumerate(report.rows)}
    second = np.zeros((len(report.rows), target.model.embedding_dim), np.float32)
    mask = np.zeros(len(report.rows), bool)
    for vector, row in zip(vectors, done):
        if row in position:
            second[position[row]], mask[position[row]] = vector, True
    return second, mask


def _localizer_report(
    given: ImageTable, predicted: ImageTable, confidence: np.ndarray, fallback_below: float | None
) -> dict[str, Any]:
    """How the predicted boxes did: their IoU with the csv's boxes where it has some, the
    confidences, and how many queries the fallback embedded whole."""
    has = np.any(given.boxes != -1.0, axis=1) & np.isfinite(confidence)
    iou = np.asarray(box_iou(predicted.boxes[has], given.boxes[has])) if has.any() else np.zeros(0)
    found = confidence[np.isfinite(confidence)]
    return {
        "mean_iou_with_given": float(iou.mean()) if len(iou) else None,
        "iou_at_0.5": float((iou >= 0.5).mean()) if len(iou) else None,
        "mean_confidence": float(found.mean()) if len(found) else None,
        "fallback_below": fallback_below,
        "fallback_queries": None
        if fallback_below is None
        else int((confidence < fallback_below).sum()),
    }


def evaluate(
    index_dir: str | Path,
    queries_csv: str | Path | None = None,
    root: str | Path | None = None,
    *,
    protocol: str = "mcs",
    recall_at: Sequence[int] | None = None,
    k: int = 1000,
    model_path: str | Path | None = None,
    force: bool = False,
    backend: str | None = None,
    rerank: Rerank = Rerank(),
    batch_size: int = 64,
    strict: bool = False,
    progress: ProgressBar = no_progress,
    out: str | Path | None = None,
    montage_path: str | Path | None = None,
    montage_rows: int = 8,
    report_dir: str | Path | None = None,
    worst: int = 20,
    box_source: str = "given",
    fallback_below: float | None = None,
) -> dict[str, Any]:
    """``vsearch eval``: score an index by ``protocol`` (:mod:`vsearch_tf.evaluation`) as a
    report (also written to ``out``): ``mcs`` embeds ``queries_csv`` with the index's model,
    ``self`` nothing. For a ScaNN index ``ann_recall`` is its recall against exact search on
    these queries, so the approximation's cost to the score is visible.

    ``box_source`` (mcs): the queries' boxes as given, predicted by the export's localizer, or
    none (whole images). ``fallback_below`` (with predicted): a query whose localizer confidence
    is below it is also embedded whole, and keeps the better-scoring neighbours of both."""
    recall_ks = evaluation.check_recall_ks(recall_at, k, protocol)
    if protocol == "self":
        evaluation.refuse_for_self(queries_csv, model_path, rerank)
        ranked, ann_recall, details = evaluation.self_protocol(
            index_dir, recall_ks, backend, strict, progress
        )
    else:
        if queries_csv is None:
            raise VSearchError("--protocol mcs needs --queries CSV")
        if fallback_below is not None and box_source != "predicted":
            raise VSearchError("--fallback-below needs --box-source predicted")
        given = read_queries(queries_csv, root, check_files=strict)  # before loading the model
        target = open_index(index_dir, model_path, force=force, backend=backend)
        queries, confidence = target.locate(
            given, box_source, batch_size, progress("localizing queries", len(given))
        )
        embeddings, report = target.embed(
            queries, batch_size, progress("embedding queries", len(queries))
        )
        report.check_strict(queries, strict)
        second = None
        if fallback_below is not None:
            second = _whole_images(target, queries, report, confidence < fallback_below, batch_size)
        ranked, ann_recall = evaluation.rank_queries(
            target.index, queries, embeddings, report, k, recall_ks, rerank, second
        )
        details = {
            "queries_csv": str(queries_csv),
            "queries": len(queries),
            **report.to_dict(queries),
            "rerank": rerank.to_dict(),
            "model": str(target.model.path),
            "box_source": box_source,
        }
        if confidence is not None:
            details["localizer"] = _localizer_report(given, queries, confidence, fallback_below)
    result = {
        **ranked.result.to_dict(),
        **details,
        "ann_recall": None if ann_recall is None else {str(r): v for r, v in ann_recall.items()},
        "index": str(index_dir),
    }
    if report_dir is not None:
        result["report_files"] = evaluation.failure_report(report_dir, ranked, worst)
    if out is not None:
        io.write_json(out, result)
    if montage_path is not None:
        evaluation.eval_montage(
            montage_path, ranked, evaluation.with_results(ranked)[:montage_rows], expected=False
        )
    return result
