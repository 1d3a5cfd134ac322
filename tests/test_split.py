"""The validation split carved out of a training csv: seeded, disjoint by product, atomic, and
read back by the toolkit's readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import invoke
from PIL import Image

from vsearch_tf.data.convert import split_roles
from vsearch_tf.data.split import split_validation
from vsearch_tf.data.tables import read_gallery, read_queries, read_training
from vsearch_tf.errors import VSearchError

HEADER = "img_path,product_id,bbox_x,bbox_y,bbox_w,bbox_h"


def _dataset(root: Path, products: int = 20, extra: list[str] = ()) -> Path:
    """An MCS2023 train.csv: per product one seller photo (no box), two user photos (a box)."""
    lines = [HEADER]
    for p in range(products):
        lines += [f"images/seller/{p}.jpg,{p},,,,"]
        lines += [f"images/user/{p}_{i}.jpg,{p},{i},2,20,10" for i in range(2)]
    lines += extra
    (root / "images/seller").mkdir(parents=True)
    (root / "images/user").mkdir(parents=True)
    for line in lines[1:]:
        Image.new("RGB", (32, 24), (0, 90, 200)).save(root / line.split(",")[0])
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def _split_files(root: Path) -> dict[str, bytes]:
    return {
        n: (root / n).read_bytes()
        for n in ("train_split.csv", "val_gallery.csv", "val_queries.csv")
    }


def test_split_is_disjoint_by_product_and_read_back(tmp_path):
    root = _dataset(tmp_path / "data")
    original = (root / "train.csv").read_bytes()
    summary = split_validation(root, val_products=0.1, seed=0, distractors=False)
    train = read_training(root / "train_split.csv")
    gallery, queries = (
        read_gallery(root / "val_gallery.csv"),
        read_queries(root / "val_queries.csv"),
    )
    assert (root / "train.csv").read_bytes() == original
    assert len(set(gallery.products)) == 2 and set(gallery.products) == set(queries.products)
    assert not set(train.products) & set(gallery.products)
    every = sorted([*train.paths, *gallery.paths, *queries.paths])
    assert every == sorted(read_training(root / "train.csv").paths)  # each row exactly once
    assert all("/seller/" in p for p in gallery.paths) and (gallery.boxes == -1).all()
    assert all("/user/" in p for p in queries.paths) and (queries.boxes[:, 2] == 20).all()
    assert [(r["file"], r["rows"], r["products"]) for r in summary.rows()] == [
        ("train_split.csv", 54, 18),
        ("val_gallery.csv", 2, 2),
        ("val_queries.csv", 4, 2),
    ]
    assert "--set data.train_csv=train_split.csv" in summary.notes[0]


def test_the_validation_gallery_holds_the_training_products_as_distractors(tmp_path):
    """As in the test gallery: every product's seller photo, only validation products queried."""
    root = _dataset(tmp_path / "data")
    split_validation(root, val_products=0.1, seed=0)
    train = read_training(root / "train_split.csv")
    gallery, queries = (
        read_gallery(root / "val_gallery.csv"),
        read_queries(root / "val_queries.csv"),
    )
    assert sorted(gallery.products) == sorted(str(p) for p in range(20))
    assert all("/seller/" in p for p in gallery.paths)
    assert len(set(queries.products)) == 2 and not set(queries.products) & set(train.products)


def test_split_depends_on_the_seed_only_not_on_the_row_order(tmp_path):
    root = _dataset(tmp_path / "a")
    split_validation(root, val_products=0.2, seed=7)
    first = _split_files(root)
    val = set(read_queries(root / "val_queries.csv").products)
    shuffled = pd.read_csv(root / "train.csv", dtype=str).sample(frac=1.0, random_state=1)
    shuffled.to_csv(root / "train.csv", index=False)
    split_validation(root, val_products=0.2, seed=7, overwrite=True)
    assert set(read_queries(root / "val_queries.csv").products) == val
    other = _dataset(tmp_path / "b")
    split_validation(other, val_products=0.2, seed=7)
    assert _split_files(other) == first
    split_validation(other, val_products=0.2, seed=8, overwrite=True)
    assert set(read_queries(other / "val_queries.csv").products) != val


def test_roles_seller_photos_index_user_photos_query_and_one_kind_gives_its_first_to_the_gallery():
    """Mixed products: box-less rows are the gallery. All rows boxed, or none (as in SOP): the first
    image is the gallery image, the others are queries."""
    rows = [("mixed", "u0", "1"), ("mixed", "s0", ""), ("mixed", "u1", "1"), ("mixed", "s1", "")]
    rows += [("boxed", f"b{i}", "1") for i in range(3)] + [("plain", f"p{i}", "") for i in range(3)]
    rows += [("single", "x", "")]
    frame = pd.DataFrame(
        [(path, product, box, box, box, box) for product, path, box in rows],
        columns=HEADER.split(","),
    )
    gallery, queries = split_roles(frame.sample(frac=1.0, random_state=0).sort_index())
    assert list(gallery["img_path"]) == ["s0", "s1", "b0", "p0", "x"]
    assert list(queries["img_path"]) == ["u0", "u1", "b1", "b2", "p1", "p2"]


def test_an_existing_split_is_kept_unless_overwrite(tmp_path):
    root = _dataset(tmp_path / "data")
    split_validation(root, seed=0)
    before = _split_files(root)
    with pytest.raises(VSearchError, match=r"train_split.csv: already exists"):
        split_validation(root, seed=1)
    assert _split_files(root) == before
    split_validation(root, seed=1, overwrite=True)
    assert _split_files(root) != before


def test_split_written_elsewhere_keeps_paths_relative_to_the_data_root(tmp_path):
    root, out = _dataset(tmp_path / "data"), tmp_path / "split"
    summary = split_validation(root, out=out)
    assert not (root / "train_split.csv").exists()
    assert len(read_gallery(out / "val_gallery.csv", root)) == 20  # 2 validation + 18 distractors
    assert f"--set data.val_queries_csv={out.resolve() / 'val_queries.csv'}" in summary.notes[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_products": 0.0}, r"val_products must be a fraction in \(0, 1\), got 0.0"),
        ({"val_products": 0.99}, r"20 products cannot give 20 for validation"),
        ({"out_train": "train.csv"}, r"must not replace the training csv"),
        ({"train_csv": "nope.csv"}, r"nope.csv: file not found"),
    ],
)
def test_impossible_splits_are_one_line_errors(tmp_path, kwargs, match):
    root = _dataset(tmp_path / "data")
    with pytest.raises(VSearchError, match=match) as err:
        split_validation(root, **kwargs)
    assert "\n" not in str(err.value) and not (root / "val_gallery.csv").exists()


def test_a_broken_training_csv_is_reported_with_its_line(tmp_path):
    root = _dataset(tmp_path / "data", extra=["images/user/x.jpg,9,1,2,,"])
    with pytest.raises(VSearchError, match=r"train.csv, line 62: a box needs all four"):
        split_validation(root)


def test_vsearch_data_split_prints_the_split_and_loads_no_tensorflow(tmp_path):
    """The command as a user runs it: a table and the notes, JSON with --json, one red line for
    an existing split; and, a csv job, it starts without importing TensorFlow."""
    root, out = _dataset(tmp_path / "data"), tmp_path / "split"
    script = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from vsearch_tf.cli import app\n"
        f"args = ['data', 'split', {str(root)!r}, '--val-products', '0.1', '--seed', '0',"
        f" '--out', {str(out)!r}, '--no-distractors', '--json']\n"
        "result = CliRunner().invoke(app, args, catch_exceptions=False)\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print(result.stdout)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["out"] == str(out)
    assert [(t["file"], t["rows"], t["products"]) for t in report["tables"]] == [
        ("train_split.csv", 54, 18),
        ("val_gallery.csv", 2, 2),
        ("val_queries.csv", 4, 2),
    ]
    assert "--set data.train_csv=" in report["notes"][0]

    table = invoke("data", "split", root, "--out", out, "--overwrite")
    assert table.exit_code == 0, table.output
    assert "val_queries.csv" in table.stdout and "train on it: --set" in table.stdout
    again = invoke("data", "split", root, "--out", out)
    assert again.exit_code == 2 and "train_split.csv: already exists" in again.stderr
