"""The ``vsearch`` command line: it parses arguments, calls :mod:`vsearch_tf.workflows` (one
function per command; ``data convert`` and ``data split`` call :mod:`vsearch_tf.data`, which
needs no TensorFlow) and prints the result as a rich table, or JSON with ``--json``.

A ``VSearchError`` becomes one red line and exit code 2. The library, and with it TensorFlow,
is imported only when a command runs (``--help`` stays instant), and quietly: see
:func:`_library`. No work is done here; the length is fifteen commands' eighty-odd options with
their help text, and the printing of each result.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from vsearch_tf.config import IndexSettings, index_settings
from vsearch_tf.errors import VSearchError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Image-based product search: train, export, index, query, eval.",
)
console = Console()
err_console = Console(stderr=True)
_verbose = False

# A TensorFlow C++ log line: TF's own format, absl's (XLA, CUDA plugins), absl's notice that it
# prints before being initialised, and the second line of the CPU-feature notice.
_TF_LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] "
    r"|[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\)"
    r"|To enable the following instructions: .* rebuild TensorFlow"
)


@app.callback()
def _global_options(
    verbose: bool = typer.Option(
        False, "--verbose", help="Show TensorFlow's start-up and log lines (hidden by default)."
    ),
) -> None:
    global _verbose
    _verbose = verbose


@contextlib.contextmanager
def _tf_log_lines_dropped() -> Iterator[None]:
    """Send fd 2 to a file for the block, then write back every line that is not a TensorFlow
    C++ log line (Python warnings, anything unexpected)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _TF_LOG_LINE.match(line)))


def _library() -> ModuleType:
    """:mod:`vsearch_tf.workflows`, imported with TensorFlow on first use.

    TensorFlow greets a machine without a GPU with C++ log lines (a failed ``cuInit``, CUDA
    plugins registered twice, oneDNN and CPU-feature notices). ``TF_CPP_MIN_LOG_LEVEL`` hides
    TensorFlow's own, not those XLA and the CUDA plugins log through absl, which prints
    everything to stderr before it is initialised. So, unless ``--verbose`` or the user set
    ``TF_CPP_MIN_LOG_LEVEL``, the level is 3 (a corrupt image is reported once, by us) and
    TensorFlow is imported and finds its devices with those lines dropped. libjpeg's own
    messages later on are not TensorFlow logging and still show.
    """
    if _verbose or "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        from vsearch_tf import workflows

        return workflows
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with _tf_log_lines_dropped():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the GPU platform starts (and fails) here
        from vsearch_tf import workflows
    return workflows


def _user_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VSearchError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Progress bars on stderr for the block; yields ``start(what, total) -> advance``."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )

    def start(what: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(what, total=total)
        return lambda n: progress.advance(task, n)

    with progress:
        yield start


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 0
) -> None:
    """A table whose first ``left`` columns are text (left-aligned), the others numbers."""
    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*map(str, row))
    console.print(table)


def _num(value: Any) -> str:
    """A score with four decimals, a count as it is, ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


_SHOWN_SKIPS = 20


def _print_skipped(skipped: list[dict[str, str]], where: str) -> None:
    """One yellow line per skipped image (the first few), on stderr so --json stays parseable."""
    for s in skipped[:_SHOWN_SKIPS]:
        err_console.print(
            f"[yellow]skipped[/] {s['path']}: {s['reason']}", highlight=False, soft_wrap=True
        )
    if len(skipped) > _SHOWN_SKIPS:
        err_console.print(
            f"[yellow]... and {len(skipped) - _SHOWN_SKIPS} more skipped images, listed in "
            f"{where}[/]",
            highlight=False,
        )


# Options several commands share (typer names an option after its parameter: model -> --model).
_RERANK = "Re-ranking is off by default, best on emoji-shop (one gallery image per product)."
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Strict = Annotated[
    bool,
    typer.Option("--strict", help="Fail on any missing or unreadable image (default: skip it)."),
]
Root = Annotated[Path | None, typer.Option(help="Data root of img_path (default: csv's folder).")]
BatchSize = Annotated[int, typer.Option(min=1)]
IndexDir = Annotated[Path, typer.Option("--index", help="Index folder.")]
Model = Annotated[Path | None, typer.Option(help="Model (default: the one that built the index).")]
Force = Annotated[bool, typer.Option("--force", help="Use a model that did not build the index.")]
Backend = Annotated[
    str | None, typer.Option(help="scann or milvus (default: milvus if the index is loaded there).")
]
Qe = Annotated[
    int,
    typer.Option(
        min=0, help=f"Query expansion: average each query with its top K, search again. {_RERANK}"
    ),
]
Dba = Annotated[
    int,
    typer.Option(
        min=0,
        help=f"Database-side augmentation: average each gallery vector with its K nearest. "
        f"{_RERANK}",
    ),
]
Alpha = Annotated[float, typer.Option(min=0.0, help="Neighbour weight = similarity ** alpha.")]


def _rerank(qe: int, qe_alpha: float, dba: int, dba_alpha: float) -> Any:
    from vsearch_tf.rerank import Rerank

    return Rerank(qe_k=qe, qe_alpha=qe_alpha, dba_k=dba, dba_alpha=dba_alpha)


# ----------------------------------------------------------------------------- train, export


@app.command()
@_user_errors
def train(
    config: Path = typer.Option(..., "--config", "-c", help="YAML run config (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=3e-4."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    as_json: Json = False,
):
    """Train an embedder; writes a run directory (config, checkpoints, metrics, embedder)."""
    summary = _library().train(config, set_, resume=resume, show_progress=not as_json)
    _print_skipped(summary["skipped_images"], f"{summary['run_dir']}/summary.json")
    if as_json:
        return _print_json(summary)
    best, seconds = summary.get("best", {}), f"{summary['seconds']:.0f}"
    scores = [_num(best.get(key)) for key in ("epoch", "val_map", "val_recall@1")]
    header = ("epochs", "classes", "best epoch", "val mAP@1000", "val R@1", "seconds")
    row = (summary["epochs"], summary["classes"], *scores, seconds)
    _print_table(f"run {summary['run_dir']}", header, [row])


@app.command("train-localizer")
@_user_errors
def train_localizer(
    config: Path = typer.Option(
        ..., "--config", "-c", help="YAML config with a localizer: section (see configs/)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set localizer.epochs=5."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    as_json: Json = False,
):
    """Train the product localizer on the training csv's boxed photos; writes a run directory
    (for `vsearch export --localizer RUN_DIR`)."""
    summary = _library().train_localizer(config, set_, resume=resume, show_progress=not as_json)
    if as_json:
        return _print_json(summary)
    header = ("epochs", "photos", "val IoU", "mean-box IoU", "seconds")
    keys = ("val_iou", "val_mean_box_iou")
    row = (summary["epochs"], summary["train_photos"], *(_num(summary.get(k)) for k in keys))
    _print_table(f"run {summary['run_dir']}", header, [(*row, f"{summary['seconds']:.0f}")])


@app.command()
@_user_errors
def pipeline(
    recipe: Path = typer.Argument(..., help="Pipeline YAML (see configs/pipeline.yml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key in every stage."),
    as_json: Json = False,
):
    """Run a staged recipe (each stage starts from the previous one's weights); resumes."""
    _library()
    from vsearch_tf.recipe import run_recipe

    rows = run_recipe(recipe, extra_sets=set_, log=err_console.print, show_progress=not as_json)
    if as_json:
        return _print_json(rows)
    header = ("stage", "val mAP", "val R@1", "test mAP", "test R@1", "train time")
    keys = ("val_map", "val_recall_at_1", "map", "recall_at_1")
    table = [
        (r["stage"], *(_num(r[key]) for key in keys), f"{r['train_seconds'] / 60:.1f} min")
        for r in rows
    ]
    _print_table(f"pipeline {recipe}", header, table, left=1)


def _print_check(report: dict[str, Any]) -> None:
    from rich.markup import escape

    console.print(f"[bold]{report['path']}[/] (fingerprint {report['fingerprint'][:16]}...)")
    for signature in dict.fromkeys(r["signature"] for r in report["signatures"]):
        rows = [r for r in report["signatures"] if r["signature"] == signature]
        console.print(f"signature_def['{signature}']  method: {rows[0]['method']}", highlight=False)
        _print_table(
            "",
            ("", "name", "dtype", "shape", "default"),
            [
                (r["kind"], r["name"], r["dtype"], "(" + ", ".join(map(str, r["shape"])) + ")")
                + ("" if r["default"] is None else json.dumps(r["default"]),)
                for r in rows
            ],
            left=5,
        )
    _print_table(
        f"fresh-process serving vs Keras embedder of {report['run_dir']}",
        ("check", "max |diff|", "result"),
        [
            (c["check"], "-" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.2e}")
            + ("ok" if c["ok"] else f"[red]FAIL[/] {escape(c['error'] or '')}",)
            for c in report["checks"]
        ],
        left=1,
    )


def _print_litert_check(report: dict[str, Any]) -> None:
    console.print(f"[bold]{report['path']}[/] vs SavedModel {report['saved_model']}")
    _print_table(
        f"fresh-process LiteRT on {report['images']} images of {report['images_from']}",
        ("quantize", "cosine min", "cosine mean", "allowed min", "allowed mean", "result"),
        [
            (
                report["quantize"],
                f"{report['cosine_min']:.5f}",
                f"{report['cosine_mean']:.5f}",
                report["min_cosine"],
                report["min_mean_cosine"],
                "ok" if report["ok"] else "[red]FAIL[/]",
            )
        ],
        left=1,
    )


@app.command("export")
@_user_errors
def export_cmd(
    run_dir: Path | None = typer.Argument(None, help="A finished training run directory."),
    name: str | None = typer.Option(None, help="Model name: exported to ROOT/NAME/<version>."),
    root: Path = typer.Option(Path("saved_models"), help="Folder of exported models."),
    version: int | None = typer.Option(None, help="Integer version (default: the next)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing version."),
    flip: bool = typer.Option(
        False,
        "--flip",
        help="Test-time flip averaging in the graph: each crop and its mirror image, averaged "
        "(twice the embedding cost).",
    ),
    check: Path | None = typer.Option(
        None,
        metavar="MODEL_DIR",
        help="Instead of exporting: serve MODEL_DIR's newest version from a fresh process and "
        "compare it with the Keras embedder (a .tflite: with its SavedModel, cosine per image).",
    ),
    format: str = typer.Option(
        "savedmodel", "--format", help="savedmodel (TF Serving) or litert (a .tflite beside it)."
    ),
    quantize: str = typer.Option("none", help="litert: none (float32), float16 or int8."),
    calibration: int = typer.Option(
        300, min=1, help="litert int8: training images calibrating the activation ranges."
    ),
    keep_float: str | None = typer.Option(
        None,
        metavar="OPS",
        help="litert int8: TFLite ops kept in float (default MEAN,MAXIMUM,POW: GeM pooling's; "
        "'none' for none).",
    ),
    localizer: Path | None = typer.Option(
        None,
        metavar="RUN_DIR",
        help="A `vsearch train-localizer` run: put its localizer in the SavedModel (a `localize` "
        "signature; serving_default crops its box when given none).",
    ),
    text: bool = typer.Option(
        False,
        "--text",
        help="Add the serve_text signature (string in, embedding in the image space out): "
        "CLIP / SigLIP runs with model.embedding_dim: 0.",
    ),
    as_json: Json = False,
):
    """Export a run's embedder as a TF Serving SavedModel or a LiteRT model, or check an export.

    Export: `vsearch export RUN_DIR --name NAME` (serves image bytes and an optional box);
    `--format litert --quantize int8` adds ROOT/NAME/litert/NAME-int8.tflite (cropped pixels in).
    Check: `vsearch export --check saved_models/NAME` (or a .tflite).
    """
    if check is not None:
        if (
            run_dir is not None
            or name is not None
            or version is not None
            or overwrite
            or flip
            or text
        ):
            raise VSearchError(
                "--check MODEL_DIR takes no RUN_DIR, --name, --version, --overwrite, --flip or "
                "--text"
            )
        report = _library().check_model(check)
        if as_json:
            _print_json(report)
        elif "cosine_min" in report:
            _print_litert_check(report)
        else:
            _print_check(report)
        if report["problem"]:
            raise VSearchError(report["problem"])
        return
    if run_dir is None or name is None:
        raise VSearchError(
            "usage: vsearch export RUN_DIR --name NAME, or vsearch export --check saved_models/NAME"
        )
    floats = None  # the default: GeM's ops in float for int8 (litert.GEM_FLOAT_OPS)
    if keep_float is not None:
        floats = [op.strip().upper() for op in keep_float.split(",") if op.strip() != "none"]
    info = _library().export(
        run_dir,
        name,
        root=root,
        version=version,
        overwrite=overwrite,
        flip=flip,
        localizer=localizer,
        text=text,
        format=format,
        quantize=quantize,
        calibration=calibration,
        keep_float=floats,
    )
    if as_json:
        return _print_json(info)
    if format == "litert":
        size, saved = info["bytes"] / 1e6, info["saved_model"]
        return console.print(f"exported [bold]{info['path']}[/] ({size:.1f} MB, from {saved})")
    size, fingerprint = info["bytes"] / 1e6, info["fingerprint"][:16]
    console.print(f"exported [bold]{info['path']}[/] ({size:.1f} MB, fingerprint {fingerprint}...)")


# ------------------------------------------------------------------------------------ index

index_app = typer.Typer(
    no_args_is_help=True,
    help="Build an index: `vsearch index --model M --gallery G --out DIR`; update it in place "
    "with the subcommands add, remove and rebuild.",
)
app.add_typer(index_app, name="index")
_DEFAULTS = IndexSettings()


def _print_index(
    where: Path, manifest: dict[str, Any], more: dict[str, Any], rebuild_suggested: bool = False
) -> None:
    columns = {"vectors": manifest["count"], "dim": manifest["dim"], "backend": manifest["backend"]}
    recall = manifest.get("measured_recall")
    columns["recall@10"] = "exact" if recall is None else f"{recall:.3f}"
    large = manifest["params"].get("large_k")
    if large:
        columns[f"recall@{large['k']}"] = f"{large['measured_recall']:.3f}"
    columns.update(more)
    _print_table(f"index {where}", list(columns), [list(columns.values())])
    if rebuild_suggested:
        err_console.print(
            f"[yellow]the index has {manifest['count']} vectors: `vsearch index rebuild` would "
            f"switch it from {manifest['backend']} search[/]",
            highlight=False,
        )


@index_app.callback(invoke_without_command=True)
@_user_errors
def index(
    ctx: typer.Context,
    model: Path | None = typer.Option(
        None, help="Exported model: saved_models/NAME, a version, or a LiteRT .tflite."
    ),
    gallery: Path | None = typer.Option(None, help="CSV: seller_img_id, img_path, product_id."),
    root: Root = None,
    out: Path | None = typer.Option(None, help="Index folder to write (replaced atomically)."),
    target_recall: float = typer.Option(
        _DEFAULTS.target_recall, help="ScaNN is tuned until recall@10 and @1000 reach this."
    ),
    exact_below: int = typer.Option(_DEFAULTS.exact_below, help="Smaller: exact search."),
    batch_size: BatchSize = 64,
    chunk_rows: int = typer.Option(8192, min=1, help="Images per resumable chunk."),
    strict: Strict = False,
    as_json: Json = False,
    embeddings: str | None = typer.Option(
        None, metavar="DIR", help="Index the output of `vsearch embed` (not --model/--gallery)."
    ),
    backend: str = typer.Option(
        "scann", help="scann (the folder's own search) or milvus (also load it into Milvus)."
    ),
    milvus_uri: str | None = typer.Option(
        None, help="Milvus URI or Milvus Lite .db (default: OUT/milvus.db); token: $MILVUS_TOKEN."
    ),
    milvus_collection: str | None = typer.Option(None, help="Default: vsearch_<OUT name>."),
    milvus_index: str = typer.Option("FLAT", help="FLAT (exact), HNSW or AUTOINDEX."),
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
    needed = (
        {"--out": out} if embeddings else {"--model": model, "--gallery": gallery, "--out": out}
    )
    missing = [flag for flag, value in needed.items() if value is None]
    if missing:
        raise VSearchError(
            f"vsearch index: missing {', '.join(missing)} (or use a subcommand: add, remove, "
            "rebuild)"
        )
    settings = index_settings(
        {"target_recall": target_recall, "exact_below": exact_below}, "vsearch index"
    )
    wf = _library()
    milvus = wf.MilvusTarget(milvus_uri, milvus_collection, milvus_index)
    milvus = milvus if backend == "milvus" else None
    if embeddings is not None:
        manifest = wf.index_embedded(embeddings, out, settings=settings, milvus=milvus)
    else:
        with _progress() as progress:
            manifest = wf.index_build(
                model,
                gallery,
                root,
                out,
                settings=settings,
                batch_size=batch_size,
                chunk_rows=chunk_rows,
                strict=strict,
                progress=progress,
                milvus=milvus,
            )
    extra = manifest["extra"]
    _print_skipped(extra["skipped"], f"{out}/manifest.json")
    if as_json:
        return _print_json(manifest)
    counts = {"skipped": len(extra["skipped"]), "box fallbacks": len(extra["box_fallbacks"])}
    _print_index(out, manifest, counts)


@index_app.command("add")
@_user_errors
def index_add(
    index_dir: IndexDir,
    gallery: Path = typer.Option(..., help="CSV of the new images only (as gallery.csv)."),
    root: Root = None,
    model: Path | None = typer.Option(None, help="The index's model, if it moved (checked)."),
    batch_size: BatchSize = 64,
    strict: Strict = False,
    as_json: Json = False,
):
    """Add new gallery images: embeds only them, with the index's model; no ScaNN retraining."""
    wf = _library()
    with _progress() as progress:
        result = wf.index_add(
            index_dir,
            gallery,
            root,
            model_path=model,
            batch_size=batch_size,
            strict=strict,
            progress=progress,
        )
    _print_skipped(result["skipped"], f"{index_dir}/manifest.json")
    if as_json:
        return _print_json(result)
    counts = {"added": result["added"], "unreadable": result["unreadable"]}
    _print_index(index_dir, result["manifest"], counts, result["rebuild_suggested"])


@index_app.command("remove")
@_user_errors
def index_remove(
    index_dir: IndexDir,
    ids: str | None = typer.Option(None, help="Comma-separated seller_img_id values."),
    products: str | None = typer.Option(None, help="Comma-separated product_id values."),
    csv: Path | None = typer.Option(
        None, help="CSV with a seller_img_id and/or product_id column."
    ),
    missing_ok: bool = typer.Option(False, "--missing-ok", help="Ignore ids not in the index."),
    as_json: Json = False,
):
    """Remove withdrawn images or products (all their images); no ScaNN retraining."""
    split = lambda text: [v.strip() for v in (text or "").split(",") if v.strip()]  # noqa: E731
    result = _library().index_remove(
        index_dir, ids=split(ids), products=split(products), csv=csv, missing_ok=missing_ok
    )
    if as_json:
        return _print_json(result)
    removed = {"removed": result["removed"]}
    _print_index(index_dir, result["manifest"], removed, result["rebuild_suggested"])


@index_app.command("rebuild")
@_user_errors
def index_rebuild(
    index_dir: IndexDir,
    target_recall: float | None = typer.Option(None, help="New recall target (default: same)."),
    exact_below: int | None = typer.Option(None, help="New exact-search threshold."),
    as_json: Json = False,
):
    """Retrain ScaNN (or switch backend) over the index's vectors, e.g. after many additions."""
    wf = _library()
    manifest = wf.index_rebuild(index_dir, target_recall=target_recall, exact_below=exact_below)
    if as_json:
        return _print_json(manifest)
    _print_index(index_dir, manifest, {})


# ------------------------------------------------------------------------------ query, eval


def _parse_boxes(texts: list[str], images: int) -> list[tuple[float, float, float, float] | None]:
    """``--bbox x,y,w,h`` values: one for all images or one per image."""
    boxes = []
    for text in texts:
        try:
            boxes.append(tuple(float(v) for v in text.split(",")))
        except ValueError:
            boxes.append(())
        if len(boxes[-1]) != 4:
            raise VSearchError(f"--bbox {text!r}: expected four numbers x,y,w,h")
    if len(boxes) not in (0, 1, images):
        raise VSearchError(
            f"got {len(boxes)} --bbox for {images} images: give one for all or one per image"
        )
    return boxes * images if len(boxes) == 1 else (boxes or [None] * images)


@app.command()
@_user_errors
def query(
    images: Annotated[list[Path] | None, typer.Argument(help="Query image files.")] = None,
    index_dir: IndexDir = ...,
    text: list[str] = typer.Option(
        [], "--text", help="Query by text instead (a model exported with --text); repeatable."
    ),
    bbox: list[str] = typer.Option(
        [],
        help="x,y,w,h box in pixels, for all images or each; without one, an export with a "
        "localizer finds the product (the box is printed, and drawn by --show).",
    ),
    top_k: int = typer.Option(10, min=1),
    model: Model = None,
    force: Force = False,
    backend: Backend = None,
    as_json: Json = False,
    show: Path | None = typer.Option(None, help="Write a montage PNG of queries and results."),
    qe: Qe = 0,
    qe_alpha: Alpha = 3.0,
    dba: Dba = 0,
    dba_alpha: Alpha = 3.0,
):
    """Find the products shown in IMAGES (or described by --text)."""
    images = images or []
    if bool(images) == bool(text):
        raise VSearchError("give query IMAGES or --text, not both and not neither")
    if text and (bbox or show is not None):
        raise VSearchError("--text queries take no --bbox or --show")
    if text:
        found = _library().query_text(
            index_dir,
            text,
            top_k=top_k,
            model_path=model,
            force=force,
            backend=backend,
            rerank=_rerank(qe, qe_alpha, dba, dba_alpha),
        )
    else:
        found = _library().query(
            index_dir,
            images,
            _parse_boxes(bbox, len(images)),
            top_k=top_k,
            model_path=model,
            force=force,
            backend=backend,
            rerank=_rerank(qe, qe_alpha, dba, dba_alpha),
            montage_path=show,
        )
    if as_json:
        return _print_json(found)
    header = ("rank", "product_id", "seller_img_id", "score")
    for res in found["queries"]:
        if "text" in res:
            title = f"text {res['text']!r}"
        elif res.get("box_source") == "predicted":
            box = ", ".join(f"{v:.0f}" for v in res["bbox"])
            title = f"{res['image']}  predicted box {box} (confidence {res['confidence']:.2f})"
        else:
            title = res["image"] + (f"  box {res['bbox']}" if res["bbox"] else "")
        hits = [
            (h["rank"], h["product_id"], h["seller_img_id"], f"{h['score']:.4f}")
            for h in res["results"]
        ]
        _print_table(title, header, hits)
    _print_skipped(found["skipped"], "--json output")
    for f in found["box_fallbacks"]:
        err_console.print(
            f"[yellow]box empty or outside the image, used the whole image:[/] {f}", highlight=False
        )
    if show is not None:
        console.print(f"montage written to {show}")


def _print_eval(report: dict[str, Any], title: str) -> None:
    """One measure per row, so the table fits an 80-column terminal."""
    recall, k = report["recall"], report["k"]
    if report["protocol"] == "mcs":
        rows = [(f"mAP@{k}", _num(report["map_at_k"]))]
    else:
        rows = [("mAP@R", _num(report["map_at_r"]))]
    rows += [(f"Recall@{r}", _num(value)) for r, value in recall.items()]
    rows += [("queries scored", report["n_scored"])]
    if report["protocol"] == "mcs":
        rows += [
            ("excluded (no gallery image)", report["n_excluded"]),
            ("unreadable queries (AP 0)", len(report["skipped"])),
            ("box fallbacks", len(report["box_fallbacks"])),
        ]
    else:
        rows += [
            ("excluded (no other image)", report["n_excluded"]),
            ("unreadable gallery (in R)", report["unreadable_gallery"]),
        ]
    rows += [(f"first correct: {where}", n) for where, n in report["first_correct"].items()]
    ann = (report["ann_recall"] or {}).items()
    rows += [(f"ScaNN recall@{depth} vs exact search", f"{v:.3f}") for depth, v in ann]
    _print_table(title, ("measure", "value"), rows, left=1)


def _parse_recall_at(text: str) -> list[int]:
    """``--recall-at 1,5,10``: the integers (their range is checked by ``workflows.evaluate``)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VSearchError(
            f"--recall-at {text!r}: expected positive integers, e.g. 1,5,10"
        ) from None


@app.command("eval")
@_user_errors
def eval_cmd(
    index_dir: IndexDir,
    queries: Path | None = typer.Option(
        None, help="CSV: user_img_id, img_path, product_id, bbox_* (protocol mcs)."
    ),
    root: Root = None,
    protocol: str = typer.Option(
        "mcs",
        help="mcs: the queries against the gallery (mAP@k); self: every indexed image queries "
        "the others, itself excluded (SOP, CUB, Cars: Recall@K, mAP@R).",
    ),
    recall_at: str | None = typer.Option(
        None, help="Recall@K for these K, e.g. 1,10,100,1000 (default: 1,5,10)."
    ),
    k: int = typer.Option(1000, min=1, help="mAP@k cut-off (MCS2023: 1000; protocol mcs)."),
    model: Model = None,
    force: Force = False,
    backend: Backend = None,
    out: Path | None = typer.Option(None, help="Also write the JSON report here."),
    montage_path: Path | None = typer.Option(None, "--montage", help="PNG of the first queries."),
    montage_rows: int = typer.Option(8),
    report: Path | None = typer.Option(
        None,
        metavar="DIR",
        help="Failure report: per_query.csv, per_product.csv, worst.png (the worst queries, "
        "their top 5 and the right product's catalogue image).",
    ),
    worst: int = typer.Option(20, min=1, help="Queries in worst.png."),
    box_source: str = typer.Option(
        "given",
        help="Query boxes: given (the csv's), predicted (the export's localizer) or none (whole "
        "images).",
    ),
    fallback_below: float | None = typer.Option(
        None,
        help="With --box-source predicted: a query whose localizer confidence is below this is "
        "also embedded whole and keeps the better-scoring neighbours of both (multi-crop).",
    ),
    batch_size: BatchSize = 64,
    strict: Strict = False,
    as_json: Json = False,
    qe: Qe = 0,
    qe_alpha: Alpha = 3.0,
    dba: Dba = 0,
    dba_alpha: Alpha = 3.0,
):
    """Score an index: queries against it (mAP@1000 as MCS2023 defines it, Recall@K), or each
    indexed image against the others (--protocol self: Recall@K, mAP@R)."""
    recall_ks = None if recall_at is None else _parse_recall_at(recall_at)
    wf = _library()
    with _progress() as progress:
        result = wf.evaluate(
            index_dir,
            queries,
            root,
            protocol=protocol,
            recall_at=recall_ks,
            k=k,
            model_path=model,
            force=force,
            backend=backend,
            rerank=_rerank(qe, qe_alpha, dba, dba_alpha),
            batch_size=batch_size,
            strict=strict,
            progress=progress,
            out=out,
            montage_path=montage_path,
            montage_rows=montage_rows,
            report_dir=report,
            worst=worst,
            box_source=box_source,
            fallback_below=fallback_below,
        )
    _print_skipped(result.get("skipped", []), str(out) if out is not None else "--json output")
    if as_json:
        return _print_json(result)
    title = f"eval {queries} against {index_dir}"
    if result.get("box_source", "given") != "given":
        title += f" (boxes: {result['box_source']})"
    _print_eval(result, title if protocol == "mcs" else f"eval --protocol self on {index_dir}")
    if montage_path is not None:
        console.print(f"montage written to {montage_path}")
    if report is not None:
        files = ", ".join(Path(f).name for f in result["report_files"].values())
        console.print(f"report written to {report}: {files}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------- data

data_app = typer.Typer(
    no_args_is_help=True,
    help="Datasets: convert one to the MCS2023 layout, split a validation set off its training "
    "products, prepare training shards.",
)
app.add_typer(data_app, name="data")


def _print_summary(summary: Any, title: str, as_json: bool) -> None:
    """A conversion's or split's csvs as a table (or JSON), then its notes."""
    if as_json:
        return _print_json(
            {"out": str(summary.out), "tables": summary.rows(), "notes": summary.notes}
        )
    header = ("file", "rows", "products", "boxes", "missing")
    _print_table(title, header, [[t[c] for c in header] for t in summary.rows()], left=1)
    for note in summary.notes:
        console.print(note, highlight=False, soft_wrap=True)


@data_app.command("convert")
@_user_errors
def data_convert(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="sop, inshop, consumer2shop, folders."),
    src: Path = typer.Argument(..., help="The dataset as distributed (see docs/datasets.md)."),
    out: Path = typer.Option(..., help="Folder to write the csvs into (the new data.root)."),
    val: float | None = typer.Option(None, help="folders: fraction of classes for validation."),
    test: float | None = typer.Option(None, help="folders: fraction of classes for the test."),
    seed: int | None = typer.Option(None, help="folders: seed of the class split."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing csvs."),
    as_json: Json = False,
):
    """Write a dataset's train/gallery/queries csvs in the MCS2023 layout."""
    from vsearch_tf.data.convert import convert

    summary = convert(fmt, src, out, overwrite=overwrite, val=val, test=test, seed=seed)
    _print_summary(summary, f"{fmt} {src} -> {out}", as_json)


@data_app.command("split")
@_user_errors
def data_split(
    data_dir: Path = typer.Argument(..., metavar="DIR", help="Data root holding train.csv."),
    val_products: float = typer.Option(0.1, help="Fraction of the products for validation."),
    seed: int = typer.Option(0, help="Seed of the product draw."),
    out: Path | None = typer.Option(None, help="Write the csvs here (default: DIR)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing split."),
    no_distractors: bool = typer.Option(
        False,
        "--no-distractors",
        help="Leave the training products' seller photos out of the validation gallery.",
    ),
    as_json: Json = False,
):
    """Split validation products off train.csv: train_split.csv, val_gallery.csv,
    val_queries.csv."""
    from vsearch_tf.data.split import split_validation

    summary = split_validation(
        data_dir,
        val_products=val_products,
        seed=seed,
        out=out,
        overwrite=overwrite,
        distractors=not no_distractors,
    )
    _print_summary(summary, f"validation split of {data_dir / 'train.csv'}", as_json)


@data_app.command("synth")
@_user_errors
def data_synth(
    data_dir: Path = typer.Argument(..., metavar="DIR", help="Data root holding the train csv."),
    train_csv: str = typer.Option("train.csv", help="Training csv, relative to DIR."),
    out: str = typer.Option("synth", help="Folder inside DIR for the photos and train.csv."),
    per_product: int = typer.Option(4, help="Synthetic shopper photos per product."),
    restyle: float = typer.Option(
        1.0, help="Fraction restyled (palette, strokes, detail): 0 if shoppers see the same art."
    ),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    as_json: Json = False,
):
    """Synthetic shopper photos: each training product's catalogue photo cut out and pasted,
    restyled, re-lit and occluded, into the csv's own scenes; writes DIR/OUT/train.csv."""
    from vsearch_tf.data.synth import synthesize

    with _progress() as progress:
        bar: dict[str, Callable[[int], None]] = {}

        def report(done: int, total: int) -> None:
            if "advance" not in bar:
                bar["advance"] = progress("synth", total)
            bar["advance"](1)

        summary = synthesize(
            data_dir,
            train_csv=train_csv,
            out=out,
            per_product=per_product,
            restyle=restyle,
            seed=seed,
            overwrite=overwrite,
            progress=report,
        )
    _print_summary(summary, f"synthetic shopper photos of {data_dir / train_csv}", as_json)


@data_app.command("prepare")
@_user_errors
def data_prepare(
    config: Path = typer.Option(..., "--config", "-c", help="The training config to prepare for."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set data.image_size=160."),
    out: Path | None = typer.Option(
        None, help="Shard folder (default: the config's data.prepared)."
    ),
    as_json: Json = False,
):
    """Decode the training photos once into TFRecord shards (box crop with a context margin);
    train reads them with data.prepared. Resumes shard by shard."""
    with _progress() as progress:
        manifest = _library().prepare(config, set_, out=out, progress=progress)
    _print_skipped(manifest["skipped"], f"{manifest['dir']}/manifest.json")
    if as_json:
        return _print_json(manifest)
    header = ("images", "skipped", "shards", "size", "margin", "encoding")
    row = [manifest["count"], len(manifest["skipped"]), manifest["shards"]]
    row += [manifest["image_size"], manifest["margin"], manifest["encoding"]]
    _print_table(f"prepared {manifest['dir']}", header, [row])


# ------------------------------------------------------------------------------------ embed


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_user_errors
def embed(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Exported model: saved_models/NAME, a version, gs://..."),
    gallery: str = typer.Option(..., help="gallery.csv, or a glob of shards: 'gallery-*.csv'."),
    root: str | None = typer.Option(None, help="Data root of img_path (default: csv's folder)."),
    out: str = typer.Option(..., help="Output folder (local or gs://)."),
    runner: str = typer.Option("DirectRunner", help="DirectRunner, DataflowRunner, FlinkRunner..."),
    formats: list[str] = typer.Option(
        ["tfrecord"], "--format", help="tfrecord (for `vsearch index --embeddings`), vertex-jsonl."
    ),
    batch_size: int = typer.Option(64, min=1, help="Largest batch a worker embeds at once."),
    as_json: Json = False,
):
    """Embed a gallery with Apache Beam; other options go to Beam (--direct_num_workers=2...)."""
    info = _library().embed(
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
        return _print_json(info)
    header = ("embedded", "unreadable", "seconds", "images/s", "formats")
    speed = f"{info['images_per_second']:.1f}"
    row = (info["embedded"], info["unreadable"], f"{info['seconds']:.1f}", speed)
    _print_table(f"embed {out} ({runner})", header, [(*row, ", ".join(info["formats"]))])


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
