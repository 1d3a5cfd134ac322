"""Staged training recipes: a sequence of configs, each starting from the previous stage.

``pipeline.yml``::

    out_dir: runs/mcs2023            # every stage's run.out_dir
    set: [data.root=data/mcs2023]    # overrides applied to every stage
    stages:
      - {name: baseline, config: configs/baseline.yml}
      - {name: arcface_1st, config: configs/arcface_1st.yml, set: [train.epochs=8]}
    eval:                            # optional: export + index + eval after each stage
      gallery: data/mcs2023/gallery.csv
      queries: data/mcs2023/queries.csv
      root: data/mcs2023

Stage i > 0 gets ``run.init_from`` = stage i-1's run directory. A stage whose run directory
already has ``summary.json`` (and whose eval report exists) is skipped, so an interrupted
pipeline resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from vsearch_tf import io
from vsearch_tf.config import load_config
from vsearch_tf.errors import VSearchError

_KEYS = {"out_dir", "set", "stages", "eval"}
_STAGE_KEYS = {"name", "config", "set"}
_EVAL_KEYS = {"gallery", "queries", "root", "k"}


def _check_keys(source: str, where: str, data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise VSearchError(
            f"{source}: unknown key {unknown[0]!r} in {where}; expected {', '.join(sorted(allowed))}"
        )


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and check a pipeline file (stage configs are validated up front, before any training)."""
    path = Path(path)
    if not path.is_file():
        raise VSearchError(f"{path}: pipeline file not found")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict) or not recipe.get("stages"):
        raise VSearchError(f"{path}: expected a mapping with a non-empty 'stages' list")
    _check_keys(str(path), "the pipeline", recipe, _KEYS)
    names = set()
    for i, stage in enumerate(recipe["stages"]):
        if not isinstance(stage, dict) or "config" not in stage or "name" not in stage:
            raise VSearchError(f"{path}: stage {i + 1} needs 'name' and 'config'")
        _check_keys(str(path), f"stage {stage['name']!r}", stage, _STAGE_KEYS)
        if stage["name"] in names:
            raise VSearchError(f"{path}: stage name {stage['name']!r} is used twice")
        names.add(stage["name"])
    if "eval" in recipe:
        _check_keys(str(path), "eval", recipe["eval"], _EVAL_KEYS)
    return recipe


def _overrides(recipe: dict, stage: dict, previous: Path | None) -> list[str]:
    sets = [f"run.name={stage['name']}"]
    if recipe.get("out_dir"):
        sets.append(f"run.out_dir={recipe['out_dir']}")
    sets += list(recipe.get("set", [])) + list(stage.get("set", []))
    sets.append(f"run.init_from={previous}" if previous else "run.init_from=null")
    return sets


def run_recipe(
    path: str | Path,
    *,
    extra_sets: list[str] = (),
    log: Callable[[str], None] = print,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or resume) every stage; returns one row per stage: name, mAP@1000, Recall@1, time."""
    from vsearch_tf import workflows
    from vsearch_tf.train import train

    recipe = load_recipe(path)
    rows, previous = [], None
    for stage in recipe["stages"]:
        sets = _overrides(recipe, stage, previous) + list(extra_sets)
        cfg = load_config(stage["config"], sets)  # here, not up front: init_from must exist
        run_dir = cfg.run_dir
        report_path = run_dir / "eval.json"
        row: dict[str, Any] = {"stage": stage["name"], "run_dir": str(run_dir)}
        if (run_dir / "summary.json").is_file() and (report_path.is_file() or "eval" not in recipe):
            log(f"stage {stage['name']}: already finished in {run_dir}, skipped")
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            log(
                f"stage {stage['name']}: training ({cfg.model.backbone} @ {cfg.data.image_size}px, "
                f"{cfg.head.type} head, {cfg.train.epochs} epochs)"
            )
            summary = train(
                cfg,
                resume=(run_dir / "checkpoints").is_dir()
                and not (run_dir / "summary.json").is_file(),
                show_progress=show_progress,
            )
        row["train_seconds"] = summary["seconds"]
        if "eval" in recipe:
            if not report_path.is_file():
                ev = recipe["eval"]
                start = time.time()
                model = workflows.export(run_dir, "model", root=run_dir / "export")
                index_dir = run_dir / "index"
                workflows.index_build(model["path"], ev["gallery"], ev.get("root"), index_dir)
                report = workflows.evaluate(
                    index_dir, ev["queries"], ev.get("root"), k=int(ev.get("k", 1000))
                )
                report["eval_seconds"] = round(time.time() - start, 1)
                io.write_json(report_path, report)
            report = json.loads(report_path.read_text())
            row.update(map=report["map_at_k"], recall_at_1=report["recall"]["1"])
        else:
            best = summary.get("best", {})
            row.update(map=best.get("val_map"), recall_at_1=best.get("val_recall@1"))
        rows.append(row)
        previous = run_dir
    return rows
