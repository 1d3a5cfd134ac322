"""Proof on real data: run the staged recipe on an MCS2023-layout benchmark and print per-stage
validation and test figures next to the untrained ImageNet model, all measured in this one run.

    python tools/bench_recipe.py --data ../shared/data/emoji-shop \\
        --weights ../shared/weights/mobilenet_v1_1.0_imagenet_notop.weights.h5 \\
        --out runs/bench-recipe

Every stage trains on a validation split of the data's ``train.csv`` (10% of the products, seed
0: ``vsearch data split``) and keeps its best epoch by validation mAP@1000; the test queries are
scored once per stage, after training, for this report only. The split is made in the data
folder when it may be written and holds no validation csvs of its own, else in ``OUT/split``
(paths in the csvs stay relative to the data folder, which is never written then).

Re-running resumes: finished stages are skipped (their eval.json is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from vsearch_tf.data.split import VAL_GALLERY, VAL_QUERIES, split_validation  # noqa: E402
from vsearch_tf.data.synth import synthesize  # noqa: E402
from vsearch_tf.recipe import run_recipe  # noqa: E402

STAGES = ["baseline", "arcface_1st", "arcface_2nd", "xbm_1st"]
TRAIN_SPLIT = "train_split.csv"
#: The config key of each file of the split.
SPLIT = {"train_csv": TRAIN_SPLIT, "val_gallery_csv": VAL_GALLERY, "val_queries_csv": VAL_QUERIES}


def _may_write(folder: Path) -> bool:
    """Writable, and not marked read-only: root may write into a folder without write
    permission (a read-only share), and must not."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def validation_split(data: Path, out: Path, log: Callable[[str], None] = print) -> list[str]:
    """The ``--set`` overrides that train on a validation split of ``data/train.csv``.

    A complete split already in ``data`` (this bench's, or ``vsearch data split``'s) is used as
    it is. Otherwise one is written into ``data`` if it may be written and holds none of the
    split's files, else into ``out/split`` (rewritten each run: seeded, so the same files and
    the same stage configs, and a re-run resumes), named by absolute path."""
    if all((data / name).is_file() for name in SPLIT.values()):
        log(f"validation split: the one in {data}")
        folder = data
    else:
        into_data = _may_write(data) and not any((data / n).exists() for n in SPLIT.values())
        summary = split_validation(
            data, out=None if into_data else out / "split", overwrite=not into_data
        )
        log(f"validation split written to {summary.out}")
        folder = summary.out
    prefix = "" if folder == data else f"{folder.resolve()}/"
    return [f"data.{key}={prefix}{name}" for key, name in SPLIT.items()]


def synthetic_photos(
    data: Path, out: Path, split: list[str], per_product: int, log: Callable[[str], None] = print
) -> list[str]:
    """The ``--set`` overrides that train on the split's training csv plus ``per_product``
    synthetic shopper photos of each product (``vsearch data synth``), written into ``data``
    when it may be written, else into ``out/view``: a folder of symlinks to ``data``'s entries
    (the csvs' paths stay valid) that holds the synthetic photos."""
    train_csv = dict(s.split("=", 1) for s in split)["data.train_csv"]
    root = data
    if not _may_write(data):
        root = out / "view"
        root.mkdir(parents=True, exist_ok=True)
        for entry in data.iterdir():
            link = root / entry.name
            if not link.is_symlink():
                link.symlink_to(entry)
    folder = f"synth{per_product}"
    if not (root / folder / "train.csv").is_file():
        synthesize(root, train_csv=train_csv, out=folder, per_product=per_product)
    log(f"synthetic shopper photos: {root / folder}")
    return [f"data.root={root.resolve()}", f"data.train_csv={folder}/train.csv"]


def write_recipes(
    data: Path,
    out: Path,
    weights: str,
    stages: Sequence[str],
    sets: Sequence[str],
    prepared: bool = False,
) -> tuple[Path, Path]:
    """``out/untrained.yml`` (the ImageNet model, not trained) and ``out/stages.yml`` (the
    stages): two recipes, so that the untrained row is not the first stage's ``init_from``.
    ``prepared``: the stages train from shards in ``out/prepared``."""
    untrained = {
        "name": "untrained",
        "config": "configs/arcface_1st.yml",
        "set": [
            "train.epochs=0",
            "model.embedding_dim=0",
            "model.pooling=avg",
            "head.type=softmax",
        ],
    }
    recipe = {
        "out_dir": str(out),
        "set": [f"data.root={data}", f"model.weights={weights}", *sets],
        "eval": {
            "gallery": str(data / "gallery.csv"),
            "queries": str(data / "queries.csv"),
            "root": str(data),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "untrained.yml", out / "stages.yml"
    chosen = [{"name": s, "config": f"configs/{s}.yml"} for s in stages]
    shards = {"prepared": str(out / "prepared")} if prepared else {}
    for path, part, extra in zip(paths, ([untrained], chosen), ({}, shards)):
        path.write_text(yaml.safe_dump({**recipe, **extra, "stages": part}, sort_keys=False))
    return paths


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    """Validation (the best epoch's, which chose it) beside test (scored once), mAP@1000."""
    table = Table(title=title)
    table.add_column("stage", no_wrap=True)
    for col in ("val mAP", "val R@1", "test mAP", "test R@1", "train", "vs untrained"):
        table.add_column(col, justify="right")
    keys = ("val_map", "val_recall_at_1", "map", "recall_at_1")
    for r in rows:
        figures = ["-" if r[key] is None else f"{r[key]:.4f}" for key in keys]
        minutes = f"{r['train_seconds'] / 60:.1f} min"
        table.add_row(r["stage"], *figures, minutes, f"{r['map'] / rows[0]['map']:.2f}x")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="MCS2023-layout folder (train/gallery/queries csv)"
    )
    parser.add_argument(
        "--weights", default="imagenet", help="backbone weights: imagenet or a .weights.h5 file"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-recipe"))
    parser.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES)
    )
    parser.add_argument(
        "--set", action="append", default=[], help="extra key=value for every stage"
    )
    parser.add_argument(
        "--synth",
        type=int,
        default=0,
        metavar="N",
        help="add N synthetic shopper photos per training product (vsearch data synth)",
    )
    parser.add_argument(
        "--prepared",
        action="store_true",
        help="train every stage from prepared shards (written once into OUT/prepared)",
    )
    args = parser.parse_args(argv)

    data = args.data.resolve()
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    start = time.time()
    sets = validation_split(data, args.out, log)
    if args.synth:
        sets += synthetic_photos(data, args.out, sets, args.synth, log)
    sets += args.set
    chosen = [s for s in args.stages.split(",") if s]
    recipes = write_recipes(data, args.out, args.weights, chosen, sets, args.prepared)
    rows = [row for path in recipes for row in run_recipe(path, log=log, show_progress=False)]
    title = f"staged recipe on {data.name} ({time.time() - start:.0f} s this run)"
    Console().print(_table(rows, title))
    total = sum(r["train_seconds"] for r in rows)
    print(json.dumps({"rows": rows, "train_minutes_total": round(total / 60, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
