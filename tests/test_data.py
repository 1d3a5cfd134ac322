"""CSV readers and in-graph decoding/cropping, on images the tests draw themselves."""

from __future__ import annotations

import io as pyio
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vsearch_tf.data.images import crop_window, decode_and_crop, load_crop_resize
from vsearch_tf.data.pipeline import embedding_dataset, training_dataset
from vsearch_tf.data.tables import read_gallery, read_queries, read_training
from vsearch_tf.errors import VSearchError


def _quadrants(h=60, w=80) -> np.ndarray:
    """An image whose colour tells where a pixel came from: red left, blue right, green band."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (255, 0, 0)
    img[:, w // 2 :] = (0, 0, 255)
    img[20:30, :] = (0, 255, 0)
    return img


def _encode(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = pyio.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_crop_takes_exactly_the_box(fmt):
    img = _quadrants()
    data = _encode(img, fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    crop, fallback = decode_and_crop(tf.constant(data), tf.constant([50.0, 20.0, 20.0, 10.0]))
    crop = crop.numpy()
    assert crop.shape == (10, 20, 3) and not fallback.numpy()
    # x 50..70 lies in the blue half, y 20..30 is the green band: all green
    np.testing.assert_allclose(crop.mean(axis=(0, 1)), (0, 255, 0), atol=12)
    left, _ = decode_and_crop(tf.constant(data), tf.constant([0.0, 40.0, 30.0, 20.0]))
    np.testing.assert_allclose(left.numpy().mean(axis=(0, 1)), (255, 0, 0), atol=12)


def test_crop_equals_numpy_slice_for_png():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    crop, _ = decode_and_crop(tf.constant(_encode(img, "PNG")), tf.constant([7.0, 5.0, 30.0, 20.0]))
    np.testing.assert_array_equal(crop.numpy(), img[5:25, 7:37].astype(np.float32))


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_crops_decode_at_a_reduced_dct_scale_and_match_a_full_decode(orientation):
    """A box 4-5x the input size is decoded at 1/4 scale (libjpeg's scaled inverse DCT); after the
    resize it must show what a full decode + resize shows, EXIF-rotated photos included."""
    from PIL import ImageOps

    yy, xx = np.mgrid[0:600, 0:800].astype(np.float32)
    img = np.stack(
        [127 + 120 * np.sin(xx / 37), 127 + 120 * np.cos(yy / 23), (xx + yy) % 256], -1
    ).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(img, "JPEG", quality=95, exif=exif.tobytes())
    shown = np.asarray(
        ImageOps.exif_transpose(Image.open(pyio.BytesIO(data))).convert("RGB"), np.float32
    )
    box = [30.0, 20.0, 4.5 * 100, 4.2 * 100]  # (x, y, w, h) of the displayed image
    full = shown[20:440, 30:480]
    reference = tf.image.resize(full, [100, 100], method="area").numpy()
    pixels, fallback = load_crop_resize(tf.constant(data), tf.constant(box), 100)
    assert not fallback.numpy()
    scaled, _ = decode_and_crop(tf.constant(data), tf.constant(box), min_side=100)
    assert scaled.shape == (105, 113, 3)  # 1/4 scale, window rounded outwards
    assert (
        np.abs(pixels.numpy() - reference).mean() < 3.0
    )  # of 255: the same picture (measured 1.5-2.0)
    unscaled, _ = decode_and_crop(tf.constant(data), tf.constant(box))
    assert unscaled.shape == (420, 450, 3)


@pytest.mark.parametrize(
    "box, window, fallback",
    [
        ((-1, -1, -1, -1), (0, 0, 60, 80), False),  # no box: whole image, not a fallback
        ((70, 50, 40, 40), (50, 70, 10, 10), False),  # clipped to the image
        ((-10, -10, 20, 20), (0, 0, 10, 10), False),  # negative origin clipped
        ((100, 100, 5, 5), (0, 0, 60, 80), True),  # entirely outside: whole image, counted
        ((10, 10, 0, 5), (0, 0, 60, 80), True),  # empty
        ((float("nan"), 1, 2, 3), (0, 0, 60, 80), True),  # NaN
    ],
)
def test_box_clipping_and_fallback(box, window, fallback):
    got, fell_back = crop_window(tf.constant(box, tf.float32), tf.constant(60), tf.constant(80))
    assert tuple(got.numpy()) == window
    assert bool(fell_back.numpy()) == fallback


def test_grayscale_and_alpha_become_rgb():
    gray = np.full((8, 8), 100, np.uint8)
    crop, _ = decode_and_crop(tf.constant(_encode(gray, "PNG")), tf.constant([-1.0] * 4))
    assert crop.shape == (8, 8, 3)
    np.testing.assert_allclose(crop.numpy(), 100.0, atol=0.5)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half transparent -> white
    crop, _ = decode_and_crop(tf.constant(_encode(rgba, "PNG")), tf.constant([-1.0] * 4))
    np.testing.assert_allclose(crop.numpy()[0, 0], (255, 0, 0), atol=0.5)
    np.testing.assert_allclose(crop.numpy()[7, 0], (255, 255, 255), atol=0.5)


def test_sixteen_bit_png_scales_to_255():
    img = np.full((4, 4), 65535, np.uint16)
    buf = pyio.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    crop, _ = decode_and_crop(tf.constant(buf.getvalue()), tf.constant([-1.0] * 4))
    np.testing.assert_allclose(crop.numpy(), 255.0, atol=0.5)


def test_load_crop_resize_shape_and_range():
    pixels, _ = load_crop_resize(
        tf.constant(_encode(_quadrants(), "JPEG")), tf.constant([0.0, 0.0, 40.0, 60.0]), 32
    )
    assert pixels.shape == (32, 32, 3) and pixels.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(pixels)) and float(tf.reduce_max(pixels)) <= 255.0


def _write_dataset(tmp_path, n=6):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(n):
        img = np.full((40, 40, 3), i * 40, np.uint8)
        Image.fromarray(img).save(tmp_path / "img" / f"{i}.jpg")
        rows.append(f"g{i},img/{i}.jpg,p{i % 3}")
    (tmp_path / "gallery.csv").write_text(
        "seller_img_id,img_path,product_id\n" + "\n".join(rows) + "\n"
    )
    return tmp_path / "gallery.csv"


def test_readers_resolve_paths_and_boxes(tmp_path):
    gallery = read_gallery(_write_dataset(tmp_path))
    assert len(gallery) == 6 and gallery.paths[0].startswith(str(tmp_path))
    assert (gallery.boxes == -1).all()
    (tmp_path / "q.csv").write_text(
        "user_img_id,img_path,product_id,bbox_x,bbox_y,bbox_w,bbox_h\nq0,img/0.jpg,p0,1,2,3,4\nq1,img/1.jpg,p1,,,,\n"
    )
    queries = read_queries(tmp_path / "q.csv")
    np.testing.assert_array_equal(queries.boxes, [[1, 2, 3, 4], [-1, -1, -1, -1]])
    train = read_training(tmp_path / "q.csv")
    assert list(train.products) == ["p0", "p1"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "file is empty"),
        ("seller_img_id,img_path\n", "missing column(s) product_id"),
        ("seller_img_id,img_path,product_id\n", "no rows after the header"),
        (
            "seller_img_id,img_path,product_id\ng0,img/0.jpg,p0\ng0,img/1.jpg,p1\n",
            "line 3: duplicated seller_img_id 'g0' (first on line 2)",
        ),
        ("seller_img_id,img_path,product_id\ng0,img/9.jpg,p0\n", "line 2: image not found"),
        (
            "seller_img_id,img_path,product_id\ng0,../../etc/passwd,p0\n",
            "line 2: img_path '../../etc/passwd' points outside",
        ),
        ("seller_img_id,img_path,product_id\ng0,,p0\n", "line 2: empty img_path"),
    ],
)
def test_bad_gallery_csv_is_one_line_error_naming_file_and_row(tmp_path, content, message):
    _write_dataset(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(VSearchError) as err:
        read_gallery(bad, check_files=True)  # what --strict asks for; see the test below
    assert message in str(err.value) and str(bad) in str(err.value) and "\n" not in str(err.value)


def test_a_missing_image_is_read_as_a_row_and_reported_as_not_found(tmp_path):
    """A catalogue's stale row is not a broken csv: the table reads, and embedding skips the
    row with the reason "image not found" (looked for even past the decoding limit)."""
    from vsearch_tf.data.pipeline import why_unreadable

    _write_dataset(tmp_path)
    (tmp_path / "img" / "1.jpg").write_bytes(b"not an image")
    (tmp_path / "img" / "4.jpg").unlink()
    gallery = read_gallery(tmp_path / "gallery.csv")
    rows = []
    for _pixels, _fallback, row in embedding_dataset(gallery, 16, 4):
        rows.extend(row.numpy().tolist())
    assert rows == [0, 2, 3, 5]
    reasons = why_unreadable(gallery, np.array([1, 4]))
    assert reasons[0] == "not a JPEG, PNG, GIF, BMP or WebP image"
    assert reasons[1] == "image not found"
    assert why_unreadable(gallery, np.array([1, 4]), limit=0) == [
        "not examined (more than 0 unreadable)",
        "image not found",
    ]


def test_bad_box_value_names_row_and_column(tmp_path):
    _write_dataset(tmp_path)
    (tmp_path / "q.csv").write_text(
        "user_img_id,img_path,product_id,bbox_x,bbox_y,bbox_w,bbox_h\nq0,img/0.jpg,p0,1,two,3,4\n"
    )
    with pytest.raises(VSearchError, match=r"line 2: bbox_y='two' is not a number"):
        read_queries(tmp_path / "q.csv")


def test_embedding_dataset_reports_unreadable_rows(tmp_path):
    gallery = read_gallery(_write_dataset(tmp_path))
    (tmp_path / "img" / "2.jpg").write_bytes(b"not an image")
    rows = []
    for pixels, _fallback, row in embedding_dataset(gallery, 16, 4):
        assert pixels.shape[1:] == (16, 16, 3)
        rows.extend(row.numpy().tolist())
    assert rows == [0, 1, 3, 4, 5]


def test_training_dataset_batches_are_full_and_labelled(tmp_path):
    gallery = read_gallery(_write_dataset(tmp_path))
    labels = np.array([0, 1, 2, 0, 1, 2])
    batches = list(training_dataset(gallery, labels, 24, 4, augment=0.5))
    assert len(batches) == 1
    images, y = batches[0]
    assert images.shape == (4, 24, 24, 3) and y.shape == (4,)


def test_table_digest_changes_with_any_row_and_not_with_the_block_size():
    from vsearch_tf.data.tables import ImageTable

    n = 300
    ids, paths = (
        np.array([f"s{i}" for i in range(n)]),
        np.array([f"/data/{i}.jpg" for i in range(n)]),
    )
    boxes = np.full((n, 4), -1.0, np.float32)
    table = ImageTable(Path("g.csv"), ids, paths, np.array(["p"] * n), boxes)
    assert table.digest() == table.digest(block=7)
    moved = boxes.copy()
    moved[250, 0] = 3.0
    renamed = paths.copy()
    renamed[0] = "/data/x.jpg"
    for other in (
        ImageTable(Path("g.csv"), ids, paths, table.products, moved),
        ImageTable(Path("g.csv"), ids, renamed, table.products, boxes),
        table.subset(np.arange(n) < n - 1),
    ):
        assert other.digest() != table.digest()
