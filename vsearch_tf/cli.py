"""The ``vsearch`` command line: a thin typer layer over the library.

Every command prints a rich table (or ``--json`` for scripts) and turns a ``VSearchError`` into
one red line and exit code 2.
"""

from __future__ import annotations

import os

# Before TensorFlow is imported. 3: a corrupt image is reported once, by us, not also by TF's logging.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from vsearch_tf.errors import VSearchError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Image-based product search: train, export, index, query, eval.",
)
console = Console()
err_console = Console(stderr=True)


def _user_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VSearchError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _progress(description: str, total: int):
    progress = Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    task = progress.add_task(description, total=total)
    return progress, lambda n: progress.advance(task, n)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


_SHOWN_SKIPS = 20


def _print_skipped(skipped: list[dict[str, str]], where: str) -> None:
    """One yellow line per skipped image (the first few), on stderr so --json stays parseable."""
    for s in skipped[:_SHOWN_SKIPS]:
        err_console.print(
            f"[yellow]skipped[/] {s['path']}: {s['reason']}", highlight=False, soft_wrap=True
        )
    if len(skipped) > _SHOWN_SKIPS:
        err_console.print(
            f"[yellow]... and {len(skipped) - _SHOWN_SKIPS} more skipped images, listed in {where}[/]",
            highlight=False,
        )


def _strict_option() -> Any:
    return typer.Option(
        False,
        "--strict",
        help="Fail if any image is unreadable (default: skip, count and list it).",
    )


_RERANK_HELP = (
    "Re-ranking is off by default, which is best on emoji-shop (one gallery image per product); "
    "see vsearch_tf/rerank.py."
)


def _rerank_options(qe: int, qe_alpha: float, dba: int, dba_alpha: float):
    from vsearch_tf.rerank import Rerank

    return Rerank(qe_k=qe, qe_alpha=qe_alpha, dba_k=dba, dba_alpha=dba_alpha)


def _qe_option() -> Any:
    return typer.Option(
        0,
        "--qe",
        min=0,
        help="Query expansion: average each query with its top K results and "
        "search again (0 = off). " + _RERANK_HELP,
    )


def _dba_option() -> Any:
    return typer.Option(
        0,
        "--dba",
        min=0,
        help="Database-side augmentation: average each gallery vector with its "
        "K nearest gallery vectors, in memory (0 = off). " + _RERANK_HELP,
    )


def _alpha_option(flag: str) -> Any:
    return typer.Option(
        3.0, flag, min=0.0, help="Neighbour weight = similarity ** alpha (0 = plain average)."
    )


def _parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VSearchError(f"--bbox {text!r}: expected four numbers x,y,w,h") from None
    if len(values) != 4:
        raise VSearchError(f"--bbox {text!r}: expected four numbers x,y,w,h")
    return values  # type: ignore[return-value]


@app.command()
@_user_errors
def train(
    config: Path = typer.Option(..., "--config", "-c", help="YAML run config (see configs/)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config key: --set train.lr=3e-4 (repeatable)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run from its last checkpoint."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train an embedder; writes a run directory (config, checkpoints, metrics, embedder)."""
    from vsearch_tf.config import load_config
    from vsearch_tf.train import train as run_training

    cfg = load_config(config, set_)
    summary = run_training(cfg, resume=resume, show_progress=not as_json)
    _print_skipped(summary["skipped_images"], f"{cfg.run_dir / 'summary.json'}")
    if as_json:
        _print_json({"run_dir": str(cfg.run_dir), **summary})
        return
    table = Table(title=f"run {cfg.run_dir}")
    for col in ("epochs", "classes", "best epoch", "val mAP@1000", "val R@1", "seconds"):
        table.add_column(col, justify="right")
    best = summary.get("best", {})
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    table.add_row(
        str(summary["epochs"]),
        str(summary["classes"]),
        fmt(best.get("epoch")),
        fmt(best.get("val_map")),
        fmt(best.get("val_recall@1")),
        f"{summary['seconds']:.0f}",
    )
    console.print(table)


@app.command()
@_user_errors
def pipeline(
    recipe: Path = typer.Argument(
        ..., help="Pipeline YAML: a list of stage configs (see configs/pipeline.yml)."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config key in every stage (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json"),
):
    """Run a staged recipe (each stage starts from the previous one's weights); resumes finished stages."""
    from vsearch_tf.recipe import run_recipe

    rows = run_recipe(
        recipe, extra_sets=set_, log=lambda m: err_console.print(m), show_progress=not as_json
    )
    if as_json:
        _print_json(rows)
        return
    t = Table(title=f"pipeline {recipe}")
    for col in ("stage", "mAP@1000", "Recall@1", "train time"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        t.add_row(
            r["stage"], fmt(r["map"]), fmt(r["recall_at_1"]), f"{r['train_seconds'] / 60:.1f} min"
        )
    console.print(t)


@app.command("export")
@_user_errors
def export_cmd(
    run_dir: Path | None = typer.Argument(
        None, help="A finished training run directory (not with --check)."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Model name: the export goes to ROOT/NAME/<version>."
    ),
    root: Path = typer.Option(Path("saved_models"), "--root", help="Folder of exported models."),
    version: int | None = typer.Option(
        None, "--version", help="Integer version (default: next free)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing version."),
    check: Path | None = typer.Option(
        None,
        "--check",
        metavar="MODEL_DIR",
        help="Instead of exporting: serve MODEL_DIR's newest version from a fresh "
        "process and compare it with the Keras embedder.",
    ),
    as_json: bool = typer.Option(False, "--json"),
):
    """Export a run's embedder as a TF Serving SavedModel (image bytes + optional box -> embedding),
    or check an export: `vsearch export RUN_DIR --name NAME` | `vsearch export --check saved_models/NAME`."""
    from rich.markup import escape

    from vsearch_tf.export import check_export, export_run, fingerprint_of

    if check is not None:
        if run_dir is not None or name is not None or version is not None or overwrite:
            raise VSearchError(
                "--check MODEL_DIR takes no RUN_DIR, --name, --version or --overwrite"
            )
        report = check_export(check)
        if as_json:
            _print_json(report)
        else:
            console.print(
                f"[bold]{report['path']}[/] (fingerprint {report['fingerprint'][:16]}...)"
            )
            for signature in dict.fromkeys(r["signature"] for r in report["signatures"]):
                rows = [r for r in report["signatures"] if r["signature"] == signature]
                console.print(
                    f"signature_def['{signature}']  method: {rows[0]['method']}", highlight=False
                )
                sig = Table()
                for col in ("", "name", "dtype", "shape", "default"):
                    sig.add_column(col)
                for r in rows:
                    sig.add_row(
                        r["kind"],
                        r["name"],
                        r["dtype"],
                        "(" + ", ".join(map(str, r["shape"])) + ")",
                        "" if r["default"] is None else json.dumps(r["default"]),
                    )
                console.print(sig)
            checks = Table(title=f"fresh-process serving vs Keras embedder of {report['run_dir']}")
            for col in ("check", "max |diff|", "result"):
                checks.add_column(col, justify="right" if col == "max |diff|" else "left")
            for c in report["checks"]:
                checks.add_row(
                    c["check"],
                    "-" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.2e}",
                    "ok" if c["ok"] else f"[red]FAIL[/] {escape(c['error'] or '')}",
                )
            console.print(checks)
        failed = [c["check"] for c in report["checks"] if not c["ok"]]
        if failed:
            raise VSearchError(
                f"{len(failed)} of {len(report['checks'])} checks failed (tolerance {report['tolerance']:g}): "
                + "; ".join(failed)
            )
        return
    if run_dir is None or name is None:
        raise VSearchError(
            "usage: vsearch export RUN_DIR --name NAME, or vsearch export --check saved_models/NAME"
        )
    path = export_run(run_dir, name, root=root, version=version, overwrite=overwrite)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    info = {
        "path": str(path),
        "version": int(path.name),
        "fingerprint": fingerprint_of(path),
        "bytes": size,
    }
    if as_json:
        _print_json(info)
    else:
        console.print(
            f"exported [bold]{path}[/] ({size / 1e6:.1f} MB, fingerprint {info['fingerprint'][:16]}...)"
        )


index_app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Build an index: `vsearch index --model M --gallery G --out DIR`; update it in place with the "
        "subcommands add, remove and rebuild."
    ),
)
app.add_typer(index_app, name="index")


def _index_table(
    title: str,
    manifest: dict[str, Any],
    extra_columns: dict[str, str],
    rebuild_suggested: bool = False,
) -> None:
    table = Table(title=title)
    columns = {
        "vectors": str(manifest["count"]),
        "dim": str(manifest["dim"]),
        "backend": manifest["backend"],
    }
    recall = manifest.get("measured_recall")
    large = manifest["params"].get("large_k")
    columns["measured recall@10"] = "exact" if recall is None else f"{recall:.3f}"
    if large:
        columns[f"recall@{large['k']}"] = f"{large['measured_recall']:.3f}"
    for col in {**columns, **extra_columns}:
        table.add_column(col, justify="right")
    table.add_row(*columns.values(), *extra_columns.values())
    console.print(table)
    if rebuild_suggested:
        err_console.print(
            f"[yellow]the index has {manifest['count']} vectors: `vsearch index rebuild` would switch "
            f"it from {manifest['backend']} search[/]",
            highlight=False,
        )


@index_app.callback(invoke_without_command=True)
@_user_errors
def index(
    ctx: typer.Context,
    model: Path | None = typer.Option(
        None,
        "--model",
        help="Exported model: saved_models/NAME (newest version) or a version folder.",
    ),
    gallery: Path | None = typer.Option(
        None, "--gallery", help="gallery.csv: seller_img_id, img_path, product_id."
    ),
    root: Path | None = typer.Option(
        None, "--root", help="Data root of the csv's img_path (default: the csv's folder)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Index folder to write (replaced atomically)."
    ),
    target_recall: float = typer.Option(
        0.95,
        "--target-recall",
        help="ScaNN is tuned until recall@10 and recall@1000 vs exact reach this.",
    ),
    exact_below: int = typer.Option(
        20_000, "--exact-below", help="Galleries smaller than this use exact search."
    ),
    batch_size: int = typer.Option(64, "--batch-size"),
    chunk_rows: int = typer.Option(
        8192,
        "--chunk-rows",
        min=1,
        help="Images per resumable chunk: a killed job resumes from the last chunk written.",
    ),
    strict: bool = _strict_option(),
    as_json: bool = typer.Option(False, "--json"),
    embeddings: str | None = typer.Option(
        None,
        "--embeddings",
        metavar="DIR",
        help="Index the output of `vsearch embed` (instead of --model/--gallery).",
    ),
    backend: str = typer.Option(
        "scann",
        "--backend",
        help="scann (the folder's own ScaNN/exact search) or milvus "
        "(also load the vectors into a Milvus collection).",
    ),
    milvus_uri: str | None = typer.Option(
        None,
        "--milvus-uri",
        help="Milvus server URI, or a local .db file "
        "for Milvus Lite (default: OUT/milvus.db). Token: $MILVUS_TOKEN.",
    ),
    milvus_collection: str | None = typer.Option(
        None, "--milvus-collection", help="Default: vsearch_<OUT name>."
    ),
    milvus_index: str = typer.Option(
        "FLAT", "--milvus-index", help="Milvus index type: FLAT (exact), HNSW, AUTOINDEX."
    ),
):
    """Embed a gallery with an exported model and build a ScaNN (or exact) index."""
    if ctx.invoked_subcommand is not None:
        if any(v is not None for v in (model, gallery, root, out, embeddings)):
            raise VSearchError(
                f"`vsearch index {ctx.invoked_subcommand}` takes its options after the subcommand"
            )
        return
    if backend not in ("scann", "milvus"):
        raise VSearchError(f"--backend {backend}: choose scann or milvus")
    if embeddings is not None and (model is not None or gallery is not None or root is not None):
        raise VSearchError(
            "--embeddings DIR replaces --model, --gallery and --root (they are recorded in DIR)"
        )
    required = (
        (("--out", out),)
        if embeddings is not None
        else (("--model", model), ("--gallery", gallery), ("--out", out))
    )
    missing = [flag for flag, value in required if value is None]
    if missing:
        raise VSearchError(
            f"vsearch index: missing {', '.join(missing)} (or use a subcommand: add, remove, rebuild)"
        )
    if embeddings is not None:
        from vsearch_tf.beam import index_from_embeddings

        manifest = index_from_embeddings(
            embeddings, str(out), exact_below=exact_below, target_recall=target_recall
        )
    else:
        from vsearch_tf.data.tables import read_gallery
        from vsearch_tf.search import build_index

        total = len(read_gallery(gallery, root, check_files=False))
        progress, advance = _progress("embedding gallery", total)
        with progress:
            manifest = build_index(
                model,
                gallery,
                root,
                out,
                batch_size=batch_size,
                exact_below=exact_below,
                target_recall=target_recall,
                chunk_rows=chunk_rows,
                strict=strict,
                progress=advance,
            )
        _print_skipped(manifest["extra"]["skipped"], f"{out}/manifest.json")
    if backend == "milvus":
        from vsearch_tf.milvus import publish

        manifest = publish(out, milvus_uri, milvus_collection, milvus_index)
    if as_json:
        _print_json(manifest)
        return
    extra = manifest["extra"]
    _index_table(
        f"index {out}",
        manifest,
        {
            "skipped images": str(len(extra["skipped"])),
            "box fallbacks": str(len(extra["box_fallbacks"])),
        },
    )


@index_app.command("add")
@_user_errors
def index_add(
    index_dir: Path = typer.Option(..., "--index", help="Index folder to update."),
    gallery: Path = typer.Option(
        ..., "--gallery", help="CSV of the new images only: seller_img_id, img_path, product_id."
    ),
    root: Path | None = typer.Option(
        None, "--root", help="Data root of the csv's img_path (default: the csv's folder)."
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="Where the index's model now lives, if it moved "
        "(it must be the same model: fingerprints are checked).",
    ),
    batch_size: int = typer.Option(64, "--batch-size"),
    strict: bool = _strict_option(),
    as_json: bool = typer.Option(False, "--json"),
):
    """Add new gallery images: embeds only them, with the index's model; no ScaNN retraining."""
    from vsearch_tf.data.tables import read_gallery
    from vsearch_tf.search import add_gallery

    progress, advance = _progress("embedding new images", len(read_gallery(gallery, root)))
    with progress:
        result = add_gallery(
            index_dir,
            gallery,
            root,
            model_path=model,
            batch_size=batch_size,
            strict=strict,
            progress=advance,
        )
    _print_skipped(result["skipped"], f"{index_dir}/manifest.json")
    if as_json:
        _print_json(result)
        return
    _index_table(
        f"index {index_dir}",
        result["manifest"],
        {"added": str(result["added"]), "unreadable": str(result["unreadable"])},
        result["rebuild_suggested"],
    )


@index_app.command("remove")
@_user_errors
def index_remove(
    index_dir: Path = typer.Option(..., "--index", help="Index folder to update."),
    ids: str | None = typer.Option(
        None, "--ids", help="Comma-separated seller_img_id values to remove."
    ),
    products: str | None = typer.Option(
        None, "--products", help="Comma-separated product_id values: all their images go."
    ),
    csv: Path | None = typer.Option(
        None, "--csv", help="CSV with a seller_img_id and/or product_id column."
    ),
    missing_ok: bool = typer.Option(
        False, "--missing-ok", help="Ignore ids/products not in the index (safe retries)."
    ),
    as_json: bool = typer.Option(False, "--json"),
):
    """Remove withdrawn images or products; no ScaNN retraining."""
    from vsearch_tf.index import read_withdrawn, remove_from_index

    split = lambda text: [v.strip() for v in (text or "").split(",") if v.strip()]  # noqa: E731
    seller_ids, product_ids = split(ids), split(products)
    if csv is not None:
        csv_ids, csv_products = read_withdrawn(csv)
        seller_ids, product_ids = seller_ids + csv_ids, product_ids + csv_products
    if not seller_ids and not product_ids:
        raise VSearchError(
            "vsearch index remove: nothing to remove; give --ids, --products or --csv"
        )
    result = remove_from_index(
        index_dir, ids=seller_ids, products=product_ids, missing_ok=missing_ok
    )
    if as_json:
        _print_json(result)
        return
    _index_table(
        f"index {index_dir}",
        result["manifest"],
        {"removed": str(result["removed"])},
        result["rebuild_suggested"],
    )


@index_app.command("rebuild")
@_user_errors
def index_rebuild(
    index_dir: Path = typer.Option(..., "--index", help="Index folder to rebuild in place."),
    target_recall: float | None = typer.Option(
        None, "--target-recall", help="New recall target (default: the recorded one)."
    ),
    exact_below: int | None = typer.Option(
        None, "--exact-below", help="New exact-search threshold (default: recorded)."
    ),
    as_json: bool = typer.Option(False, "--json"),
):
    """Retrain ScaNN (or switch backend) over the index's current vectors, e.g. after many additions."""
    from vsearch_tf.index import rebuild_index

    manifest = rebuild_index(index_dir, target_recall=target_recall, exact_below=exact_below)
    if as_json:
        _print_json(manifest)
        return
    _index_table(f"index {index_dir}", manifest, {})


@app.command()
@_user_errors
def query(
    images: list[Path] = typer.Argument(..., help="Query image files."),
    index_dir: Path = typer.Option(..., "--index", help="Index folder from `vsearch index`."),
    bbox: list[str] = typer.Option(
        [], "--bbox", help="x,y,w,h box in pixels; one for all images or one per image."
    ),
    top_k: int = typer.Option(10, "--top-k", min=1),
    model: Path | None = typer.Option(
        None, "--model", help="Model (default: the one the index was built with)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Query even if the model is not the one that built the index."
    ),
    backend: str | None = typer.Option(
        None,
        "--backend",
        help="scann or milvus (default: milvus if the index "
        "was loaded into Milvus, else its own search).",
    ),
    as_json: bool = typer.Option(False, "--json"),
    show: Path | None = typer.Option(
        None, "--show", help="Write a montage PNG of the queries and results."
    ),
    qe: int = _qe_option(),
    qe_alpha: float = _alpha_option("--qe-alpha"),
    dba: int = _dba_option(),
    dba_alpha: float = _alpha_option("--dba-alpha"),
):
    """Find the products shown in IMAGES."""
    from vsearch_tf.search import open_index, query_table, run_queries

    boxes = [_parse_box(b) for b in bbox]
    if len(boxes) not in (0, 1, len(images)):
        raise VSearchError(
            f"got {len(boxes)} --bbox for {len(images)} images: give one for all or one per image"
        )
    boxes = boxes * len(images) if len(boxes) == 1 else (boxes or [None] * len(images))
    target = open_index(index_dir, model, force=force)
    _attach_backend(target, backend)
    table = query_table([str(p) for p in images], boxes)
    rows, scores, report = run_queries(
        target, table, top_k, rerank=_rerank_options(qe, qe_alpha, dba, dba_alpha)
    )
    ids = target.index.ids
    results = []
    for qi, r in enumerate(report.rows):
        hits = [
            {
                "rank": j + 1,
                "seller_img_id": str(ids["seller_img_id"].iat[g]),
                "product_id": str(ids["product_id"].iat[g]),
                "score": round(float(scores[qi, j]), 6),
                "img_path": str(ids["img_path"].iat[g]) if "img_path" in ids else None,
            }
            for j, g in enumerate(rows[qi])
        ]
        results.append({"image": str(images[r]), "bbox": boxes[r], "results": hits})
    skipped = [
        {"path": str(images[r]), "reason": why} for r, why in zip(report.skipped, report.reasons)
    ]
    fallbacks = [str(images[r]) for r in report.fallback_rows]
    if show is not None:
        from vsearch_tf.viz import MontageRow, montage

        montage(
            [
                MontageRow(
                    str(images[r]),
                    boxes[r],
                    [h["img_path"] for h in res["results"][:5]],
                    [h["product_id"] for h in res["results"][:5]],
                    [None] * min(5, len(res["results"])),
                )
                for r, res in zip(report.rows, results)
            ],
            show,
        )
    if as_json:
        _print_json({"queries": results, "skipped": skipped, "box_fallbacks": fallbacks})
        return
    for res in results:
        t = Table(title=f"{res['image']}" + (f"  box {res['bbox']}" if res["bbox"] else ""))
        for col in ("rank", "product_id", "seller_img_id", "score"):
            t.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for h in res["results"]:
            t.add_row(str(h["rank"]), h["product_id"], h["seller_img_id"], f"{h['score']:.4f}")
        console.print(t)
    _print_skipped(skipped, "--json output")
    for f in fallbacks:
        err_console.print(
            f"[yellow]box empty or outside the image, used the whole image:[/] {f}", highlight=False
        )
    if show is not None:
        console.print(f"montage written to {show}")


@app.command("eval")
@_user_errors
def eval_cmd(
    index_dir: Path = typer.Option(..., "--index", help="Index folder from `vsearch index`."),
    queries: Path = typer.Option(
        ..., "--queries", help="queries.csv: user_img_id, img_path, product_id, bbox_*."
    ),
    root: Path | None = typer.Option(None, "--root", help="Data root (default: the csv's folder)."),
    k: int = typer.Option(1000, "--k", min=1, help="mAP@k cut-off (MCS2023: 1000)."),
    model: Path | None = typer.Option(None, "--model"),
    force: bool = typer.Option(False, "--force"),
    backend: str | None = typer.Option(
        None,
        "--backend",
        help="scann or milvus (default: milvus if the index "
        "was loaded into Milvus, else its own search).",
    ),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON report here."),
    montage_path: Path | None = typer.Option(
        None, "--montage", help="PNG of the first queries and their top 5."
    ),
    montage_rows: int = typer.Option(8, "--montage-rows"),
    batch_size: int = typer.Option(64, "--batch-size"),
    strict: bool = _strict_option(),
    as_json: bool = typer.Option(False, "--json"),
    qe: int = _qe_option(),
    qe_alpha: float = _alpha_option("--qe-alpha"),
    dba: int = _dba_option(),
    dba_alpha: float = _alpha_option("--dba-alpha"),
):
    """Score queries against an index: mAP@1000 as MCS2023 defines it, and Recall@1/5/10."""
    from vsearch_tf import io
    from vsearch_tf.data.tables import read_queries
    from vsearch_tf.search import evaluate_index, open_index

    total = len(read_queries(queries, root))  # a bad csv fails before the model is loaded
    target = open_index(index_dir, model, force=force)
    _attach_backend(target, backend)
    progress, advance = _progress("embedding queries", total)
    with progress:
        result, details, table, rows = evaluate_index(
            target,
            queries,
            root,
            k=k,
            batch_size=batch_size,
            progress=advance,
            rerank=_rerank_options(qe, qe_alpha, dba, dba_alpha),
            strict=strict,
        )
    _print_skipped(details["skipped"], str(out) if out is not None else "--json output")
    report = {
        **result.to_dict(),
        **details,
        "index": str(index_dir),
        "model": str(target.model.path),
    }
    report.pop("per_query_ap", None)
    if out is not None:
        io.write_json(out, report)
    if montage_path is not None:
        from vsearch_tf.viz import MontageRow, montage

        ids = target.index.ids
        picks = [i for i in range(len(table)) if rows[i, 0] >= 0][:montage_rows]
        montage(
            [
                MontageRow(
                    table.paths[i],
                    tuple(table.boxes[i]) if table.boxes[i][2] > 0 else None,
                    [ids["img_path"].iat[g] for g in rows[i, :5]],
                    [str(ids["product_id"].iat[g]) for g in rows[i, :5]],
                    [str(ids["product_id"].iat[g]) == table.products[i] for g in rows[i, :5]],
                )
                for i in picks
            ],
            montage_path,
        )
    if as_json:
        _print_json(report)
        return
    t = Table(title=f"eval {queries} against {index_dir}")
    for col in (
        f"mAP@{k}",
        "R@1",
        "R@5",
        "R@10",
        "scored",
        "excluded (no gallery image)",
        "unreadable",
        "box fallbacks",
    ):
        t.add_column(col, justify="right")
    t.add_row(
        f"{result.map_at_k:.4f}",
        *(f"{result.recall.get(r, float('nan')):.4f}" for r in (1, 5, 10)),
        str(result.n_scored),
        str(len(result.excluded)),
        str(len(details["skipped"])),
        str(len(details["box_fallbacks"])),
    )
    console.print(t)
    if details["ann_recall"]:
        console.print(
            "ScaNN recall vs exact search on these queries: "
            + ", ".join(f"@{r} {v:.3f}" for r, v in details["ann_recall"].items()),
            highlight=False,
        )
    if montage_path is not None:
        console.print(f"montage written to {montage_path}")


def _attach_backend(target: Any, backend: str | None) -> None:
    """Route the index's searches to Milvus when asked or when it was built with --backend milvus."""
    from vsearch_tf.milvus import attach

    attach(target.index, backend)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_user_errors
def embed(
    ctx: typer.Context,
    model: str = typer.Option(
        ..., "--model", help="Exported model: saved_models/NAME or a version folder (or gs://)."
    ),
    gallery: str = typer.Option(
        ..., "--gallery", help="gallery.csv, or a glob of csv shards: 'gallery-*.csv'."
    ),
    root: str | None = typer.Option(
        None, "--root", help="Data root of img_path (default: each csv's folder)."
    ),
    out: str = typer.Option(..., "--out", help="Output folder (local or gs://)."),
    runner: str = typer.Option(
        "DirectRunner", "--runner", help="DirectRunner, DataflowRunner, FlinkRunner, SparkRunner."
    ),
    formats: list[str] = typer.Option(
        ["tfrecord"],
        "--format",
        help="tfrecord (for `vsearch index --embeddings`) "
        "and/or vertex-jsonl (Vertex AI Vector Search); repeatable.",
    ),
    batch_size: int = typer.Option(
        64, "--batch-size", min=1, help="Largest batch a worker embeds at once."
    ),
    as_json: bool = typer.Option(False, "--json"),
):
    """Embed a gallery with Apache Beam; other options go to Beam (--direct_num_workers=2, --project...)."""
    from vsearch_tf.beam import embed_gallery

    info = embed_gallery(
        model,
        gallery,
        out,
        root=root,
        runner=runner,
        formats=formats,
        batch_size=batch_size,
        pipeline_args=ctx.args,
    )
    if as_json:
        _print_json(info)
        return
    table = Table(title=f"embed {out} ({runner})")
    for col in ("embedded", "unreadable", "seconds", "images/s", "formats"):
        table.add_column(col, justify="right")
    table.add_row(
        str(info["embedded"]),
        str(info["unreadable"]),
        f"{info['seconds']:.1f}",
        f"{info['images_per_second']:.1f}",
        ", ".join(info["formats"]),
    )
    console.print(table)


@app.command()
@_user_errors
def serve(
    index_dir: Path = typer.Option(..., "--index", help="Index folder from `vsearch index`."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind; other than loopback needs --api-key-file."
    ),
    port: int = typer.Option(8080, "--port", min=0, max=65535),
    max_batch: int = typer.Option(
        32, "--max-batch", min=1, help="Most queries per model call (1 = no micro-batching)."
    ),
    batch_wait_ms: float = typer.Option(
        5.0, "--batch-wait-ms", min=0.0, help="Longest wait for a batch to fill."
    ),
    api_key_file: Path | None = typer.Option(
        None, "--api-key-file", help="File holding the key requests must send (X-API-Key)."
    ),
):
    """Serve search over HTTP: the API under /v1, and a search page at /."""
    from vsearch_tf.serving import serve as run_server

    run_server(
        index_dir,
        host=host,
        port=port,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        api_key_file=api_key_file,
    )
