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
      k: 1000
    index: {target_recall: 0.95}     # optional: how eval's index is built (IndexSettings)
    prepared: data/prepared          # optional: every stage trains from prepared shards

Stage i > 0 gets ``run.init_from`` = stage i-1's run directory. With ``prepared``, each stage's
``data.prepared`` is a folder under it named by what the shards depend on (training csv, image
size, margin, encoding), so stages that agree on those share one set of shards; the first stage
that needs a folder writes it (``vsearch data prepare``, resumable) before it trains.

Everything is checked before the
first stage starts, so a typo in the last stage does not wait for an hour of training: every
stage's config with its overrides (``init_from`` aside: earlier stages have not run yet), the eval
CSVs and the ``index`` section.

Resuming: run the same command again. A finished stage is not trained again; a stage stopped
mid-training resumes from its checkpoint; one stopped between training and its eval report goes
straight to export, index and eval. The eval report is redone when ``eval`` or ``index`` changed.

A stage is keyed by its resolved config and the key of the stage it starts from (``stage.json``
in its run directory). A stage whose run directory holds a run of another config -- an edited
config file, other ``set`` / ``--set`` overrides, or an earlier stage re-run since -- is refused
with one line naming what changed, before anything runs, and nothing is deleted: an old result
is never reported for a config that did not produce it, and hours of training are not thrown
away silently because, say, the data moved. Delete that run directory (and those of the stages
after it) to re-run it, or give the stage a new name.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vsearch_tf import io
from vsearch_tf.config import (
    Config,
    IndexSettings,
    dump_config,
    index_settings,
    load_config,
    read_yaml,
)
from vsearch_tf.data.tables import read_gallery, read_queries
from vsearch_tf.errors import VSearchError
from vsearch_tf.models.backbones import check_backbone

_KEYS = {"out_dir", "set", "stages", "eval", "index", "prepared"}
_STAGE_KEYS = {"name", "config", "set"}
_EVAL_KEYS = {"gallery", "queries", "root", "k"}
STAGE_FILE = "stage.json"
EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class Stage:
    """One resolved stage: its config (``init_from`` set) and its key."""

    name: str
    cfg: Config
    key: str


@dataclass(frozen=True)
class Recipe:
    """A checked pipeline file with every stage resolved."""

    path: Path
    stages: list[Stage]
    eval: dict[str, Any] | None  # gallery, queries, root, k
    index: IndexSettings


def _check_keys(source: str, where: str, data: Any, allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise VSearchError(f"{source}: {where} must be a mapping, got {data!r}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise VSearchError(
            f"{source}: unknown key {unknown[0]!r} in {where}; "
            f"expected {', '.join(sorted(allowed))}"
        )


def _stage_config(path: Path, recipe: dict, stage: dict, extra_sets: Sequence[str]) -> Config:
    """The stage's config with every override, ``init_from`` unset (the caller chains it)."""
    sets = [f"run.name={stage['name']}"]
    if recipe.get("out_dir"):
        sets.append(f"run.out_dir={recipe['out_dir']}")
    sets += [*recipe.get("set", []), *stage.get("set", []), *extra_sets, "run.init_from=null"]
    try:
        cfg = load_config(stage["config"], sets)
        if recipe.get("prepared"):  # loaded again, so that the config's checks see the key
            cfg = load_config(stage["config"], [*sets, f"data.prepared={_shards(recipe, cfg)}"])
        check_backbone(
            cfg.model.backbone, cfg.data.image_size, cfg.model.pooling, cfg.model.weights
        )
        return cfg
    except VSearchError as err:
        raise VSearchError(f"{path}: stage {stage['name']!r}: {err}") from None


def _shards(recipe: dict, cfg: Config) -> Path:
    """The stage's shard folder under the recipe's ``prepared``: one per csv, size, margin and
    encoding, the settings a prepared manifest is checked against."""
    d = cfg.data
    name = (
        f"{Path(d.train_csv).stem}-{d.image_size}px-margin{d.prepared_margin}-{d.prepared_encoding}"
    )
    return Path(recipe["prepared"]) / name


def _eval_section(path: Path, section: dict) -> dict[str, Any]:
    """The eval section, its CSVs read (not their images) so a wrong path fails now."""
    _check_keys(str(path), "eval", section, _EVAL_KEYS)
    missing = sorted({"gallery", "queries"} - set(section))
    if missing:
        raise VSearchError(f"{path}: eval needs {' and '.join(missing)}")
    k = section.get("k", 1000)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise VSearchError(f"{path}: eval k must be an integer >= 1, got {k!r}")
    read_gallery(section["gallery"], section.get("root"))
    read_queries(section["queries"], section.get("root"))
    return {**section, "k": k}


def load_recipe(path: str | Path, extra_sets: Sequence[str] = ()) -> Recipe:
    """Read and check a pipeline file: every stage's config, the eval and index sections, all
    before any training."""
    path = Path(path)
    data = read_yaml(path, "pipeline file")
    if not data.get("stages"):
        raise VSearchError(f"{path}: expected a non-empty 'stages' list")
    _check_keys(str(path), "the pipeline", data, _KEYS)
    stages: list[Stage] = []
    for i, stage in enumerate(data["stages"]):
        if not isinstance(stage, dict) or "config" not in stage or "name" not in stage:
            raise VSearchError(f"{path}: stage {i + 1} needs 'name' and 'config'")
        _check_keys(str(path), f"stage {stage['name']!r}", stage, _STAGE_KEYS)
        if any(s.name == stage["name"] for s in stages):
            raise VSearchError(f"{path}: stage name {stage['name']!r} is used twice")
        cfg = _stage_config(path, data, stage, extra_sets)
        previous = stages[-1] if stages else None
        if previous is not None:
            cfg.run.init_from = str(previous.cfg.run_dir)
        text = dump_config(cfg) + (previous.key if previous else "")
        stages.append(Stage(stage["name"], cfg, hashlib.sha256(text.encode()).hexdigest()))
    return Recipe(
        path,
        stages,
        _eval_section(path, data["eval"]) if "eval" in data else None,
        index_settings(data.get("index"), f"{path}: index"),
    )


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _check_run_dir(recipe: Recipe, i: int) -> None:
    """Refuse a run directory that holds a run of another config or of another earlier stage."""
    stage = recipe.stages[i]
    run_dir = stage.cfg.run_dir
    if not (run_dir / "config.yml").is_file():
        return
    saved = _flat(yaml.safe_load((run_dir / "config.yml").read_text()) or {})
    wanted = _flat(stage.cfg.to_dict())
    changed = [
        f"{key}: {saved.get(key)!r} -> {wanted.get(key)!r}"
        for key in sorted(set(saved) | set(wanted))
        if saved.get(key) != wanted.get(key)
    ]
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    what = f"a run of another config ({'; '.join(changed[:3])}{more})"
    if not changed:
        recorded = run_dir / STAGE_FILE
        if not recorded.is_file() or json.loads(recorded.read_text())["key"] == stage.key:
            return
        what = f"a run started from another version of stage {recipe.stages[i - 1].name!r}"
    raise VSearchError(
        f"{recipe.path}: stage {stage.name!r}: {run_dir} holds {what}; delete that folder "
        "(and the later stages') to re-run it, or rename the stage"
    )


def _eval_stage(recipe: Recipe, stage: Stage, log: Callable[[str], None]) -> dict[str, Any]:
    """The stage's eval report: kept when made for this stage with these settings, else made
    (export, index, eval) and written to ``eval.json``."""
    from vsearch_tf import workflows

    run_dir, ev = stage.cfg.run_dir, recipe.eval or {}
    made_for = {"stage": stage.key, "eval": ev, "index": recipe.index.to_dict()}
    path = run_dir / EVAL_FILE
    if path.is_file():
        report = json.loads(path.read_text())
        if report.get("made_for") == json.loads(json.dumps(made_for)):
            return report
        log(f"stage {stage.name}: eval or index settings changed, evaluating again")
    start = time.time()
    model = workflows.export(run_dir, "model", root=run_dir / "export", version=1, overwrite=True)
    index_dir = run_dir / "index"
    workflows.index_build(
        model["path"], ev["gallery"], ev.get("root"), index_dir, settings=recipe.index
    )
    report = workflows.evaluate(index_dir, ev["queries"], ev.get("root"), k=ev["k"])
    report.update(eval_seconds=round(time.time() - start, 1), made_for=made_for)
    io.write_json(path, report)
    return report


def run_recipe(
    path: str | Path,
    *,
    extra_sets: Sequence[str] = (),
    log: Callable[[str], None] = print,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or resume) every stage; returns one row per stage: name, training time, the best
    epoch's validation mAP@1000 and Recall@1 (``val_map``, ``val_recall_at_1``: what chose the
    epoch; ``None`` without validation csvs) and the test figures of the ``eval`` section
    (``map``, ``recall_at_1``: scored once, after training; ``None`` without one)."""
    from vsearch_tf.train import train

    recipe = load_recipe(path, extra_sets)
    for i in range(len(recipe.stages)):
        _check_run_dir(recipe, i)
    rows = []
    for stage in recipe.stages:
        cfg, run_dir = stage.cfg, stage.cfg.run_dir
        if (run_dir / "summary.json").is_file():
            log(f"stage {stage.name}: already finished in {run_dir}, skipped")
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            log(
                f"stage {stage.name}: training ({cfg.model.backbone} @ {cfg.data.image_size}px, "
                f"{cfg.head.type} head, {cfg.train.epochs} epochs)"
            )
            if cfg.data.prepared:
                from vsearch_tf.data.prepared import prepare

                log(f"stage {stage.name}: prepared shards in {cfg.data.prepared}")
                prepare(cfg)  # kept as they are when complete
            resume = (run_dir / "config.yml").is_file()  # same config: checked above
            summary = train(cfg, resume=resume, show_progress=show_progress)
        io.write_json(run_dir / STAGE_FILE, {"key": stage.key})
        best = summary.get("best", {})
        row: dict[str, Any] = {
            "stage": stage.name,
            "run_dir": str(run_dir),
            "train_seconds": summary["seconds"],
            "val_map": best.get("val_map"),
            "val_recall_at_1": best.get("val_recall@1"),
            "map": None,
            "recall_at_1": None,
        }
        if recipe.eval is not None:
            report = _eval_stage(recipe, stage, log)
            row.update(map=report["map_at_k"], recall_at_1=report["recall"]["1"])
        rows.append(row)
    return rows
