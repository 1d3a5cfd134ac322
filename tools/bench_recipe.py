"""Proof on real data: run the staged recipe on an MCS2023-layout benchmark and print per-stage
mAP@1000 / Recall@1 next to the untrained ImageNet model, all measured in this one run.

    python tools/bench_recipe.py --data ../shared/data/emoji-shop \\
        --weights ../shared/weights/mobilenet_v1_1.0_imagenet_notop.weights.h5 \\
        --out runs/bench-recipe

Re-running resumes: finished stages are skipped (their eval.json is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from vsearch_tf.recipe import run_recipe  # noqa: E402

STAGES = ["baseline", "arcface_1st", "arcface_2nd", "xbm_1st"]


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
    args = parser.parse_args(argv)

    data = args.data.resolve()
    chosen = [s for s in args.stages.split(",") if s]
    stages = [
        {
            "name": "untrained",
            "config": "configs/arcface_1st.yml",
            "set": [
                "train.epochs=0",
                "model.embedding_dim=0",
                "model.pooling=avg",
                "head.type=softmax",
            ],
        }
    ]
    stages += [{"name": s, "config": f"configs/{s}.yml"} for s in chosen]
    recipe = {
        "out_dir": str(args.out),
        "set": [f"data.root={data}", f"model.weights={args.weights}", *args.set],
        "stages": stages,
        "eval": {
            "gallery": str(data / "gallery.csv"),
            "queries": str(data / "queries.csv"),
            "root": str(data),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # The untrained row must not become the first trained stage's init_from: two recipes.
    first = {**recipe, "stages": stages[:1]}
    rest = {**recipe, "stages": stages[1:]}
    (args.out / "untrained.yml").write_text(yaml.safe_dump(first, sort_keys=False))
    (args.out / "stages.yml").write_text(yaml.safe_dump(rest, sort_keys=False))
    rows = run_recipe(
        args.out / "untrained.yml", log=lambda m: print(m, file=sys.stderr), show_progress=False
    )
    rows += run_recipe(
        args.out / "stages.yml", log=lambda m: print(m, file=sys.stderr), show_progress=False
    )
    table = Table(title=f"staged recipe on {data.name} ({time.time() - start:.0f} s this run)")
    for col in ("stage", "mAP@1000", "Recall@1", "train time", "vs untrained"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    base = rows[0]["map"]
    for r in rows:
        table.add_row(
            r["stage"],
            f"{r['map']:.4f}",
            f"{r['recall_at_1']:.4f}",
            f"{r['train_seconds'] / 60:.1f} min",
            f"{r['map'] / base:.2f}x",
        )
    Console().print(table)
    total = sum(r["train_seconds"] for r in rows)
    print(json.dumps({"rows": rows, "train_minutes_total": round(total / 60, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
