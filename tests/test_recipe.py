"""`vsearch pipeline`: recipes are checked whole before any training, resume at the step where
they stopped, never report a result for a config that did not produce it, and build their eval
index as their `index:` section says."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import invoke, write_tiny_config

from vsearch_tf.data.tables import read_queries, read_training
from vsearch_tf.demo import generate
from vsearch_tf.recipe import load_recipe


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    generate(root / "data", n_train=8, n_val=3, n_test=5, users_per_product=2, seed=1)
    write_tiny_config(root, {"root": str(root / "data"), "train_csv": "train.csv"})
    return root


def _eval_section(ws: Path, **more) -> dict:
    data = ws / "data"
    return {
        "gallery": str(data / "gallery.csv"),
        "queries": str(data / "queries.csv"),
        "root": str(data),
        **more,
    }


def _recipe(ws: Path, name: str, stages: list[dict], **sections) -> Path:
    """``ws/name.yml``: ``stages`` (name -> extra ``set``) over the tiny config, out in ws/name."""
    recipe = {
        "out_dir": str(ws / name),
        "set": ["train.epochs=1"],
        "stages": [{"config": str(ws / "tiny.yml"), **stage} for stage in stages],
        **sections,
    }
    path = ws / f"{name}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _one_line_error(result, *expected: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    text = " ".join(result.stderr.split())
    for part in expected:
        assert part in text, text
    return text


def test_every_stage_is_checked_before_the_first_one_trains(ws):
    typo = _recipe(
        ws,
        "typo",
        [{"name": "first"}, {"name": "last", "set": ["train.learning_rate=0.1"]}],
    )
    _one_line_error(
        invoke("pipeline", typo), "stage 'last'", "unknown config key 'train.learning_rate'"
    )
    assert not (ws / "typo" / "first").exists()  # nothing trained for an hour first

    bad_eval = _recipe(
        ws, "bad_eval", [{"name": "first"}], eval=_eval_section(ws, queries=str(ws / "nope.csv"))
    )
    _one_line_error(invoke("pipeline", bad_eval), "nope.csv: file not found")
    bad_index = _recipe(ws, "bad_index", [{"name": "first"}], index={"exact_bellow": 5})
    _one_line_error(
        invoke("pipeline", bad_index), "unknown index setting 'exact_bellow'", "'exact_below'"
    )
    for name in ("bad_eval", "bad_index"):
        assert not (ws / name).exists()


def test_a_stage_stopped_before_its_eval_goes_straight_to_the_eval(ws):
    validated = ["data.val_gallery_csv=val_gallery.csv", "data.val_queries_csv=val_queries.csv"]
    stages = [{"name": "only", "set": validated}]
    run_dir = ws / "resumed" / "only"
    trained = invoke("pipeline", _recipe(ws, "resumed", stages), "--json")
    assert trained.exit_code == 0, trained.output
    assert (run_dir / "summary.json").is_file() and not (run_dir / "eval.json").exists()
    # Without an eval section there is no test figure: validation is reported as validation.
    [row] = json.loads(trained.stdout)
    assert row["map"] is None and row["recall_at_1"] is None
    assert 0.0 <= row["val_map"] <= 1.0 and 0.0 <= row["val_recall_at_1"] <= 1.0
    metrics = (run_dir / "metrics.csv").read_text()

    # As if the first run had stopped between training and its eval report.
    result = invoke("pipeline", _recipe(ws, "resumed", stages, eval=_eval_section(ws)), "--json")
    assert result.exit_code == 0, result.output
    assert "already finished" in result.stderr
    assert (run_dir / "metrics.csv").read_text() == metrics  # not trained again
    report = json.loads((run_dir / "eval.json").read_text())
    [evaluated] = json.loads(result.stdout)
    assert evaluated["map"] == report["map_at_k"] and report["k"] == 1000
    assert evaluated["val_map"] == row["val_map"]  # the best epoch's, beside the test figure

    # Other eval or index settings: the report is made again (not reported stale), the index
    # as the recipe's index section says.
    index = {"exact_below": 5, "large_k": 50}
    recipe = _recipe(ws, "resumed", stages, eval=_eval_section(ws, k=5), index=index)
    again = invoke("pipeline", recipe, "--json")
    assert again.exit_code == 0 and "evaluating again" in again.stderr
    assert json.loads((run_dir / "eval.json").read_text())["k"] == 5
    tuning = json.loads((run_dir / "index" / "manifest.json").read_text())["tuning"]
    assert tuning["exact_below"] == 5 and tuning["large_k"] == 50


def test_a_recipe_with_prepared_trains_every_stage_from_shards(ws):
    """One shard folder per size (the settings a manifest is checked against), written by the
    first stage that needs it and read, not rewritten, by the next that agrees."""
    stages = [
        {"name": "small", "set": ["data.image_size=32"]},
        {"name": "large", "set": ["data.image_size=40"]},
        {"name": "large_again", "set": ["data.image_size=40"]},
    ]
    shards = ws / "shards"
    result = invoke("pipeline", _recipe(ws, "from_shards", stages, prepared=str(shards)), "--json")
    assert result.exit_code == 0, result.output
    folders = sorted(p.name for p in shards.iterdir())
    assert folders == ["train-32px-margin0.25-raw", "train-40px-margin0.25-raw"]
    for name, size in (("small", 32), ("large", 40), ("large_again", 40)):
        saved = yaml.safe_load((ws / "from_shards" / name / "config.yml").read_text())
        assert saved["data"]["prepared"] == str(shards / f"train-{size}px-margin0.25-raw")
    assert result.stderr.count("prepared shards in") == 3
    manifest = json.loads((shards / folders[1] / "manifest.json").read_text())
    assert manifest["complete"] and manifest["image_size"] == 40


def test_a_finished_stage_run_with_another_config_is_refused_not_reported(ws):
    stages = [{"name": "first"}, {"name": "second"}]
    path = _recipe(ws, "changed", stages)
    first, second = ws / "changed" / "first", ws / "changed" / "second"
    done = invoke("pipeline", path, "--json")
    assert done.exit_code == 0, done.output
    summaries = [(d / "summary.json").read_text() for d in (first, second)]

    _one_line_error(
        invoke("pipeline", path, "--set", "train.lr=0.002"),
        "stage 'first'",
        "train.lr: 0.001 -> 0.002",
        "delete that folder",
    )
    edited = _recipe(ws, "changed", [{"name": "first", "set": ["train.epochs=2"]}, stages[1]])
    _one_line_error(invoke("pipeline", edited), "stage 'first'", "train.epochs: 1 -> 2")
    assert [(d / "summary.json").read_text() for d in (first, second)] == summaries

    # The first stage's folder deleted to re-run it: the second one started from the old first.
    shutil.rmtree(first)
    _one_line_error(
        invoke("pipeline", edited), "stage 'second'", "started from another version of stage"
    )
    assert not first.exists()  # refused before anything ran


def _bench_recipe():
    path = Path(__file__).resolve().parents[1] / "tools" / "bench_recipe.py"
    spec = importlib.util.spec_from_file_location("bench_recipe", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_bench_recipe_trains_every_stage_on_a_validation_split_and_spares_the_data(
    tmp_path, monkeypatch
):
    """Where the bench's split goes (never into a read-only folder, nor over a dataset's own
    validation csvs), and that every stage it runs trains on it and validates on it."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the recipes name configs/*.yml
    bench, data = _bench_recipe(), tmp_path / "data"
    generate(data, n_train=8, n_val=3, n_test=5, users_per_product=2, seed=1)
    names = ["train_split.csv", "val_gallery.csv", "val_queries.csv"]
    keys = ["data.train_csv", "data.val_gallery_csv", "data.val_queries_csv"]

    def split(out: str) -> list[str]:
        return bench.validation_split(data, tmp_path / out, log=lambda _: None)

    own = {n: (data / n).read_bytes() for n in names[1:]}  # the dataset's own validation csvs
    elsewhere = (tmp_path / "own" / "split").resolve()
    assert split("own") == [f"{k}={elsewhere}/{n}" for k, n in zip(keys, names)]
    assert {n: (data / n).read_bytes() for n in names[1:]} == own
    for name in names[1:]:
        (data / name).unlink()
    data.chmod(0o555)  # a read-only share (which root could write anyway)
    try:
        elsewhere = (tmp_path / "read_only" / "split").resolve()
        read_only = split("read_only")
    finally:
        data.chmod(0o755)
    assert read_only == [f"{k}={elsewhere}/{n}" for k, n in zip(keys, names)]
    assert not any((data / n).exists() for n in names)
    in_data = [f"{k}={n}" for k, n in zip(keys, names)]
    assert split("writable") == in_data and (data / "train_split.csv").is_file()
    made = {n: (data / n).stat().st_mtime_ns for n in names}
    assert split("again") == in_data and {n: (data / n).stat().st_mtime_ns for n in names} == made

    recipes = bench.write_recipes(data, tmp_path / "runs", "none", bench.STAGES, read_only)
    stages = [stage for path in recipes for stage in load_recipe(path).stages]
    with_shards = bench.write_recipes(data, tmp_path / "p", "none", bench.STAGES, read_only, True)
    prepared = [[s.cfg.data.prepared for s in load_recipe(path).stages] for path in with_shards]
    assert prepared[0] == [None]  # the untrained row reads no shards
    assert all(p.startswith(str(tmp_path / "p" / "prepared")) for p in prepared[1])
    assert [s.name for s in stages] == ["untrained", *bench.STAGES]
    for stage in stages:
        cfg = stage.cfg.data
        assert (cfg.train_csv, cfg.val_gallery_csv, cfg.val_queries_csv) == tuple(
            s.split("=", 1)[1] for s in read_only
        )
        train = read_training(Path(cfg.root) / cfg.train_csv, cfg.root, check_files=True)
        queries = read_queries(Path(cfg.root) / cfg.val_queries_csv, cfg.root, check_files=True)
        assert not set(train.products) & set(queries.products)


def test_bench_recipe_synthetic_photos_go_beside_a_read_only_dataset(tmp_path):
    """``--synth N`` on a read-only dataset: a view of symlinks in OUT holds the photos, the
    stages read the split's products plus theirs, and the dataset is not written."""
    bench, data = _bench_recipe(), tmp_path / "data"
    generate(data, n_train=4, n_val=2, n_test=2, users_per_product=2, seed=2)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    data.chmod(0o555)
    try:
        split = bench.validation_split(data, tmp_path / "out", log=lambda _: None)
        sets = bench.synthetic_photos(data, tmp_path / "out", split, 2, log=lambda _: None)
    finally:
        data.chmod(0o755)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    view = (tmp_path / "out" / "view").resolve()
    assert sets == [f"data.root={view}", "data.train_csv=synth2/train.csv"]
    train = read_training(view / "synth2" / "train.csv", view, check_files=True)
    split_train = read_training(split[0].split("=", 1)[1], data)
    assert set(train.products) == set(split_train.products)
    assert len(train) == len(split_train) + 2 * len(set(split_train.products))
