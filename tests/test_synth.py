"""Synthetic shopper photos: the cut-out keeps the product (white inside it included), lands in
the box it reports, the csv trains like any other, and bad input fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import invoke
from PIL import Image, ImageDraw

from vsearch_tf import demo
from vsearch_tf.data.synth import cutout, synthesize, synthetic_photo
from vsearch_tf.data.tables import read_training
from vsearch_tf.errors import VSearchError

RED = (220, 20, 20)


def _ring_on_white() -> Image.Image:
    """A red ring with a white hole on a white catalogue background."""
    img = Image.new("RGB", (40, 40), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse([5, 5, 34, 34], fill=RED)
    draw.ellipse([14, 14, 25, 25], fill="white")
    return img


def test_cutout_keeps_white_inside_the_product_and_drops_the_border_white() -> None:
    obj = cutout(_ring_on_white())
    assert obj is not None and obj.size == (30, 30)  # cropped to the ring
    alpha = np.asarray(obj.getchannel("A"))
    assert alpha[15, 15] == 255  # the white hole is enclosed by the ring: product
    assert alpha[0, 0] < 128 and alpha[29, 29] < 128  # the square's corners are background


def test_cutout_uses_transparency_and_refuses_a_blank_photo() -> None:
    rgba = Image.new("RGBA", (20, 20), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (4, 6, 14, 12))  # white, yet opaque: the product
    assert cutout(rgba).size == (10, 6)
    assert cutout(Image.new("RGB", (20, 20), "white")) is None


def test_the_pasted_product_lies_in_its_box() -> None:
    product = cutout(_ring_on_white())
    scene = Image.new("RGB", (96, 96), (40, 160, 60))
    for seed in range(8):
        img, (x, y, w, h) = synthetic_photo(
            product, scene, (30, 20, 40, 50), np.random.default_rng(seed), restyle=seed % 2
        )
        assert img.size == (96, 96) and 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96
        arr = np.asarray(img, np.int16)
        reddish = (arr[..., 0] - arr[..., 1] > 60) & (arr[..., 0] - arr[..., 2] > 60)
        inside = reddish[y : y + h, x : x + w].sum()
        assert inside > 0.9 * reddish.sum() and inside > 0.15 * w * h, seed


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    demo.generate(root, n_train=4, n_val=1, n_test=1, users_per_product=2, seller_size=48)
    return root


def test_synthesize_writes_a_training_csv_with_the_originals_first(data: Path) -> None:
    summary = synthesize(data, per_product=3, out="synth", seed=1)
    original = pd.read_csv(data / "train.csv")
    table = pd.read_csv(data / "synth" / "train.csv")
    assert summary.rows()[0]["rows"] == len(table) == len(original) + 4 * 3
    pd.testing.assert_frame_equal(table.iloc[: len(original)], original, check_dtype=False)
    synthetic = table.iloc[len(original) :]
    assert synthetic.img_path.str.startswith("synth/images/").all()
    assert (synthetic.groupby("product_id").size() == 3).all()
    assert set(synthetic.product_id) == set(original.product_id)
    for row in synthetic.itertuples():
        with Image.open(data / row.img_path) as img:
            assert row.bbox_x + row.bbox_w <= img.width and row.bbox_y + row.bbox_h <= img.height
    read_training(data / "synth" / "train.csv", data, check_files=True)  # trains as it is


def test_same_seed_same_photos_and_no_silent_overwrite(data: Path) -> None:
    synthesize(data, per_product=2, out="a", seed=5)
    synthesize(data, per_product=2, out="b", seed=5)
    synthesize(data, per_product=2, out="c", seed=6)
    a, b, c = ((data / n / "images" / "000000_0.jpg").read_bytes() for n in "abc")
    assert a == b != c
    with pytest.raises(VSearchError, match="exists"):
        synthesize(data, per_product=2, out="a")
    synthesize(data, per_product=1, out="a", overwrite=True)
    assert len(list((data / "a" / "images").iterdir())) == 4


def test_bad_input_is_one_line(data: Path, tmp_path: Path) -> None:
    for out in ("../elsewhere", "/tmp/x", "."):
        with pytest.raises(VSearchError, match="inside the data root"):
            synthesize(data, out=out)
    with pytest.raises(VSearchError, match="at least 1"):
        synthesize(data, per_product=0, out="z")
    with pytest.raises(VSearchError, match="restyle must be a fraction"):
        synthesize(data, restyle=1.5, out="z")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "train.csv").write_text("img_path,product_id\nimages/a.jpg,1\n")
    with pytest.raises(VSearchError, match="no row has a box"):
        synthesize(tmp_path)


def test_cli_prints_the_table_and_json(data: Path) -> None:
    result = invoke("data", "synth", data, "--per-product", "1", "--out", "cli", "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["tables"][0]["rows"] == 12 + 4
    assert "data.train_csv=cli/train.csv" in report["notes"][0]
    again = invoke("data", "synth", data, "--per-product", "1", "--out", "cli")
    assert again.exit_code != 0 and "exists" in again.output
