"""The procedural demo dataset: layout, honest boxes, determinism, disjoint splits, safe writes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vsearch_tf import demo
from vsearch_tf.errors import VSearchError

TINY = dict(n_train=6, n_val=3, n_test=5, users_per_product=2, seller_size=64, user_size=96)
N = TINY["n_train"] + TINY["n_val"] + TINY["n_test"]
UPP = TINY["users_per_product"]
GALLERY_COLS = ["seller_img_id", "img_path", "product_id"]
QUERY_COLS = ["user_img_id", "img_path", "product_id", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]
TRAIN_COLS = ["img_path", "product_id", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    counts = demo.generate(out, seed=3, **TINY)
    assert counts["products"] == N and counts["user_images"] == N * UPP
    return out


def _csv(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name, dtype={"product_id": str})


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_columns_and_row_counts(data: Path) -> None:
    assert (data / "README.md").read_text().startswith("# vsearch-tf procedural demo dataset")
    expected = {
        "train.csv": (TRAIN_COLS, TINY["n_train"] * (1 + UPP)),
        "val_gallery.csv": (GALLERY_COLS, TINY["n_val"] + TINY["n_train"]),
        "val_queries.csv": (QUERY_COLS, TINY["n_val"] * UPP),
        "gallery.csv": (GALLERY_COLS, TINY["n_test"] + TINY["n_train"]),
        "queries.csv": (QUERY_COLS, TINY["n_test"] * UPP),
        "products.csv": (["product_id", "split", "silhouette", "pattern"], N),
    }
    for name, (columns, rows) in expected.items():
        frame = _csv(data, name)
        assert list(frame.columns) == columns, name
        assert len(frame) == rows, name
        for rel in frame.get("img_path", []):
            assert "\\" not in rel and not rel.startswith("/") and (data / rel).is_file(), rel
    train = _csv(data, "train.csv")
    seller_rows = train.img_path.str.startswith("images/seller/")
    assert train.loc[seller_rows, TRAIN_COLS[2:]].isna().all().all()  # whole image
    assert train.loc[~seller_rows, TRAIN_COLS[2:]].notna().all().all()
    # Boxes are written as integers, not 12.0.
    assert re.fullmatch(
        r"images/user/u\d{5}_\d\.jpg,p\d{5},\d+,\d+,\d+,\d+",
        (data / "queries.csv").read_text().splitlines()[1].split(",", 1)[1],
    )


def test_seller_photos_are_studio_shots_some_png(data: Path) -> None:
    paths = sorted((data / "images" / "seller").iterdir())
    assert len(paths) == N and {p.suffix for p in paths} == {".jpg", ".png"}
    for path in paths:
        with Image.open(path) as img:
            rgba = np.asarray(img.convert("RGBA")).astype(int)
        corners = rgba[[0, 0, -1, -1], [0, -1, 0, -1]]
        if path.suffix == ".png" and img.mode == "RGBA":
            assert (corners[:, 3] == 0).all() and rgba[..., 3].max() == 255, path.name
        else:
            assert (corners[:, :3] >= 245).all(), path.name  # white page
        assert rgba.shape[:2] == (TINY["seller_size"],) * 2


def test_boxes_lie_inside_their_images(data: Path) -> None:
    rows = pd.concat(
        [
            _csv(data, "queries.csv"),
            _csv(data, "val_queries.csv"),
            _csv(data, "train.csv").dropna(subset=["bbox_x"]),
        ]
    )
    assert len(rows) == N * UPP
    for r in rows.itertuples():
        with Image.open(data / r.img_path) as img:
            width, height = img.size
        assert 0 <= r.bbox_x and 0 <= r.bbox_y and r.bbox_w >= 4 and r.bbox_h >= 4, r.img_path
        assert r.bbox_x + r.bbox_w <= width and r.bbox_y + r.bbox_h <= height, r.img_path


@pytest.mark.parametrize("seed", range(12))
def test_box_is_the_tight_box_of_the_pasted_product(seed: int) -> None:
    rng = np.random.default_rng(seed)
    design = demo.random_design(rng)
    image, (x, y, w, h), mask = demo.user_photo(design, 128, rng)
    assert image.size == mask.size == (128, 128) and image.mode == "RGB"
    assert mask.getbbox() == (x, y, x + w, y + h)  # clipped to the frame by construction
    side = max(w, h) / 128
    assert 0.2 < side <= 1.0


def test_box_matches_pixels_on_plain_background(tmp_path: Path) -> None:
    """With clutter off, the pixels that differ from the background are exactly those in the box."""
    out = tmp_path / "plain"
    demo.generate(out, seed=5, clutter=False, **TINY)
    rows = pd.concat([_csv(out, "queries.csv"), _csv(out, "val_queries.csv")])
    for r in rows.itertuples():
        a = np.asarray(Image.open(out / r.img_path).convert("RGB")).astype(int)
        x0, y0, x1, y1 = r.bbox_x, r.bbox_y, r.bbox_x + r.bbox_w, r.bbox_y + r.bbox_h
        near = np.zeros(a.shape[:2], bool)
        # JPEG ringing and faint AA edges
        near[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = True
        differs = np.abs(a - np.median(a[~near], axis=0)).max(axis=-1) > 40
        box = differs[y0:y1, x0:x1]
        assert box.mean() > 0.1, r.img_path  # the box holds the product
        assert differs[~near].mean() < 0.01, r.img_path  # nothing of it outside
        # ... and the box is tight: the product reaches every edge band.
        assert box[:2].any() and box[-2:].any() and box[:, :2].any() and box[:, -2:].any(), (
            r.img_path
        )


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    demo.generate(a, seed=11, **TINY)
    demo.generate(b, seed=11, **TINY)
    demo.generate(c, seed=12, **TINY)
    files_a, files_b = _files(a), _files(b)
    assert len(files_a) == 1 + 6 + N * (1 + UPP)
    assert files_a == files_b
    files_c = _files(c)
    assert files_c["queries.csv"] != files_a["queries.csv"]
    shared_images = [k for k in files_a if k.startswith("images/user/") and k in files_c]
    assert shared_images and all(files_a[k] != files_c[k] for k in shared_images)


def test_splits_disjoint_and_ids_unique(data: Path) -> None:
    products = _csv(data, "products.csv")
    assert products.product_id.is_unique and products.product_id.str.fullmatch(r"p\d{5}").all()
    split = products.set_index("product_id").split
    by_split = {s: set(split[split == s].index) for s in ("train", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [
        TINY["n_train"],
        TINY["n_val"],
        TINY["n_test"],
    ]
    assert not (
        by_split["train"] & by_split["val"]
        or by_split["train"] & by_split["test"]
        or by_split["val"] & by_split["test"]
    )
    assert set(_csv(data, "train.csv").product_id) == by_split["train"]
    assert set(_csv(data, "val_queries.csv").product_id) == by_split["val"]
    val_gallery = set(_csv(data, "val_gallery.csv").product_id)
    assert val_gallery == by_split["val"] | by_split["train"]  # distractors, as in the test
    assert set(_csv(data, "queries.csv").product_id) == by_split["test"]
    gallery = _csv(data, "gallery.csv")
    assert set(gallery.product_id) == by_split["test"] | by_split["train"]  # train = distractors
    sellers = pd.concat([gallery, _csv(data, "val_gallery.csv")]).drop_duplicates()
    users = pd.concat([_csv(data, "queries.csv"), _csv(data, "val_queries.csv")])
    assert sellers.seller_img_id.is_unique and sellers.seller_img_id.str.fullmatch(r"s\d{5}").all()
    assert users.user_img_id.is_unique and users.user_img_id.str.fullmatch(r"u\d{5}_\d+").all()
    all_paths = pd.concat([sellers.img_path, users.img_path, _csv(data, "train.csv").img_path])
    assert all_paths.nunique() == N * (1 + UPP)


def test_refuses_to_overwrite_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    demo.generate(out, seed=1, **TINY)  # an existing but empty folder is fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(VSearchError, match="not empty"):
        demo.generate(out, seed=2, **TINY)
    assert (out / "keep.txt").read_text() == "mine"
    demo.generate(out, seed=2, overwrite=True, **TINY)
    assert not (out / "keep.txt").exists() and (out / "gallery.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(VSearchError, match="not a folder"):
        demo.generate(tmp_path / "file", **TINY)
    with pytest.raises(VSearchError, match="n_val"):
        demo.generate(tmp_path / "bad", **{**TINY, "n_val": 0})
    assert not (tmp_path / "bad").exists()


def test_tool_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "make_demo_data", Path(__file__).resolve().parents[1] / "tools" / "make_demo_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = [
        "--out",
        str(tmp_path / "d"),
        "--seed",
        "4",
        "--train",
        "3",
        "--val",
        "1",
        "--test",
        "2",
        "--users-per-product",
        "1",
        "--seller-size",
        "48",
        "--user-size",
        "64",
    ]
    assert tool.main(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "6 products (3 train / 1 val / 2 test)" in line
    assert len(_csv(tmp_path / "d", "queries.csv")) == 2
    assert tool.main(args) == 2
    assert "not empty" in capsys.readouterr().err
