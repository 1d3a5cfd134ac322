"""Converters to the MCS2023 layout, on tiny trees in the exact file formats each dataset
distributes (images drawn with PIL); every csv written must be read back by the readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import invoke
from PIL import Image

from vsearch_tf.data.convert import (
    convert,
    convert_consumer2shop,
    convert_folders,
    convert_inshop,
    convert_sop,
)
from vsearch_tf.data.tables import read_gallery, read_queries, read_training
from vsearch_tf.errors import VSearchError


def _image(path: Path, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(path)


def _text(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _read_back(out: Path) -> dict[str, object]:
    """Every csv of the layout in ``out``, read with the toolkit's readers (images checked)."""
    readers = {
        "train.csv": read_training,
        "gallery.csv": read_gallery,
        "queries.csv": read_queries,
        "val_gallery.csv": read_gallery,
        "val_queries.csv": read_queries,
    }
    return {name: read(out / name, out) for name, read in readers.items() if (out / name).exists()}


def _by_file(summary) -> dict[str, dict[str, object]]:
    return {row["file"]: row for row in summary.rows()}


# --- Stanford Online Products ----------------------------------------------------------------

SOP_HEADER = "image_id class_id super_class_id path"


def _sop(root: Path) -> Path:
    """2 train products (3 + 2 images), 2 test products (2 + 3 images), as in Ebay_*.txt."""
    train = [(i, 1, 1, f"bicycle_final/111085122871_{i - 1}.JPG") for i in (1, 2, 3)]
    train += [(4, 2, 2, "chair_final/1110_0.JPG"), (5, 2, 2, "chair_final/1110_1.JPG")]
    test = [(6, 3, 1, "bicycle_final/2220_0.JPG"), (7, 3, 1, "bicycle_final/2220_1.JPG")]
    test += [(8, 4, 3, "lamp_final/3330_0.JPG"), (9, 4, 3, "lamp_final/3330_1.JPG")]
    test += [(10, 4, 3, "lamp_final/3330_2.JPG")]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        _text(root / name, [SOP_HEADER] + [" ".join(map(str, r)) for r in rows])
        for *_, path in rows:
            _image(root / path)
    return root


def test_sop_writes_train_and_a_self_protocol_test_set_readable_through_a_link(tmp_path):
    src, out = _sop(tmp_path / "Stanford_Online_Products"), tmp_path / "sop"
    summary = convert_sop(src, out)
    tables = _read_back(out)
    assert set(tables) == {"train.csv", "gallery.csv", "queries.csv"}
    assert (out / "images").is_symlink() and (out / "images").resolve() == src.resolve()
    train, gallery, queries = tables["train.csv"], tables["gallery.csv"], tables["queries.csv"]
    assert list(train.products) == ["1", "1", "1", "2", "2"] and (train.boxes == -1).all()
    assert train.paths[0] == str(out.resolve() / "images/bicycle_final/111085122871_0.JPG")
    # every test image is both indexed and a query, under its SOP image_id
    assert list(gallery.ids) == list(queries.ids) == ["6", "7", "8", "9", "10"]
    assert list(gallery.paths) == list(queries.paths)
    assert (queries.boxes == -1).all()
    assert _by_file(summary)["gallery.csv"] == {
        "file": "gallery.csv",
        "rows": 5,
        "products": 2,
        "boxes": 0,
        "missing": 0,
    }
    assert any("--protocol self" in note for note in summary.notes)


def test_missing_images_are_left_out_and_counted(tmp_path):
    src, out = _sop(tmp_path / "sop_src"), tmp_path / "out"
    (src / "lamp_final/3330_1.JPG").unlink()
    (src / "chair_final/1110_0.JPG").unlink()
    rows = _by_file(convert_sop(src, out))
    assert (rows["train.csv"]["rows"], rows["train.csv"]["missing"]) == (4, 1)
    assert (rows["queries.csv"]["rows"], rows["queries.csv"]["missing"]) == (4, 1)
    assert (
        "8" in _read_back(out)["gallery.csv"].ids and "9" not in _read_back(out)["gallery.csv"].ids
    )


def test_no_image_found_at_all_is_one_error_naming_the_folder(tmp_path):
    src = _sop(tmp_path / "sop_src")
    for folder in ("bicycle_final", "chair_final", "lamp_final"):
        for image in (src / folder).iterdir():
            image.unlink()
    with pytest.raises(VSearchError, match=r"none of the 10 listed images exists") as err:
        convert_sop(src, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out" / "train.csv").exists()


# --- DeepFashion In-shop ---------------------------------------------------------------------

INSHOP = [  # image_name, item_id, evaluation_status, (x_1, y_1, x_2, y_2)
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train", (50, 49, 208, 235)),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train", (60, 40, 190, 230)),
    ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query", (10, 20, 110, 220)),
    ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery", (0, 0, 256, 256)),
    ("img/MEN/Denim/id_00000081/01_1_front.jpg", "id_00000081", "gallery", (5, 6, 7, 8)),
]


def _inshop(root: Path, images: str = "Img", boxes: bool = True) -> Path:
    """The In-shop files: line 1 the count, line 2 the names, fixed-width padded rows."""
    lines = [f"{name:<70} {item} {status}" for name, item, status, _ in INSHOP]
    _text(
        root / "Eval/list_eval_partition.txt",
        [str(len(INSHOP)), "image_name item_id evaluation_status", *lines],
    )
    if boxes:
        header = "image_name clothes_type pose_type x_1 y_1 x_2 y_2"
        rows = [f"{n:<70} 1 1 " + " ".join(f"{v:03d}" for v in box) for n, *_, box in INSHOP]
        _text(root / "Anno/list_bbox_inshop.txt", [str(len(INSHOP)), header, *rows])
    for name, *_ in INSHOP:
        _image(root / images / name, (256, 256))
    return root


def test_inshop_roles_and_boxes_as_x_y_w_h(tmp_path):
    src, out = _inshop(tmp_path / "inshop"), tmp_path / "out"
    summary = convert_inshop(src, out)
    tables = _read_back(out)
    assert set(tables) == {"train.csv", "gallery.csv", "queries.csv"}
    train, gallery, queries = tables["train.csv"], tables["gallery.csv"], tables["queries.csv"]
    np.testing.assert_array_equal(train.boxes, [[50, 49, 158, 186], [60, 40, 130, 190]])
    np.testing.assert_array_equal(queries.boxes, [[10, 20, 100, 200]])
    np.testing.assert_array_equal(gallery.boxes, [[0, 0, 256, 256], [5, 6, 2, 2]])
    assert list(gallery.products) == ["id_00000080", "id_00000081"]
    assert queries.paths[0].endswith("out/images/img/MEN/Denim/id_00000080/01_1_front.jpg")
    assert (out / "images").resolve() == (src / "Img").resolve()
    assert _by_file(summary)["train.csv"]["boxes"] == 2
    assert any("data split" in note for note in summary.notes)


def test_inshop_without_boxes_and_images_unzipped_at_the_root(tmp_path):
    src = _inshop(tmp_path / "inshop", images=".", boxes=False)
    summary = convert_inshop(src, src)  # the csvs next to the dataset: paths need no link
    tables = _read_back(src)
    assert not (src / "images").exists()
    assert (tables["queries.csv"].boxes == -1).all()
    assert "bbox_x" not in (src / "gallery.csv").read_text()
    assert pd.read_csv(src / "queries.csv")["img_path"][0] == INSHOP[2][0]
    assert any("list_bbox_inshop.txt: not found" in note for note in summary.notes)


# --- DeepFashion Consumer-to-shop ------------------------------------------------------------

C2S = "img/CLOTHING/Dress/id_{:08d}/{}_{:02d}.jpg"
C2S_PAIRS = [  # consumer, shop, item, status: consumer 1 of item 1 matches two shop photos
    ((1, "comsumer", 1), (1, "shop", 1), 1, "train"),
    ((1, "comsumer", 1), (1, "shop", 2), 1, "train"),
    ((2, "comsumer", 1), (2, "shop", 1), 2, "val"),
    ((3, "comsumer", 1), (3, "shop", 1), 3, "test"),
    ((3, "comsumer", 2), (3, "shop", 1), 3, "test"),
]


def _c2s(root: Path) -> Path:
    lines = [
        f"{C2S.format(*c)} {C2S.format(*s)} id_{item:08d} {status}"
        for c, s, item, status in C2S_PAIRS
    ]
    header = "image_pair_name_1 image_pair_name_2 item_id evaluation_status"
    _text(root / "Eval/list_eval_partition.txt", [str(len(lines)), header, *lines])
    images = sorted(
        {C2S.format(*c) for c, *_ in C2S_PAIRS} | {C2S.format(*s) for _, s, *_ in C2S_PAIRS}
    )
    boxes = [f"{n} 3 {1 if '/shop_' in n else 2} 010 020 110 170" for n in images]
    header = "image_name clothes_type source_type x_1 y_1 x_2 y_2"
    _text(root / "Anno/list_bbox_consumer2shop.txt", [str(len(images)), header, *boxes])
    for name in images:
        _image(root / "Img" / name, (200, 300))
    return root


def test_consumer2shop_consumer_queries_with_boxes_against_shop_gallery(tmp_path):
    src, out = _c2s(tmp_path / "c2s"), tmp_path / "out"
    rows = _by_file(convert_consumer2shop(src, out))
    tables = _read_back(out)
    train, gallery, queries = tables["train.csv"], tables["gallery.csv"], tables["queries.csv"]
    # distinct images only: the consumer photo of two pairs is one row
    names = sorted(Path(p).name for p in train.paths)
    assert names == ["comsumer_01.jpg", "shop_01.jpg", "shop_02.jpg"]
    shop = np.char.find(train.paths, "/shop_") >= 0
    assert (train.boxes[shop] == -1).all() and (train.boxes[~shop] == [10, 20, 100, 150]).all()
    assert sorted(gallery.products) == ["id_00000002", "id_00000003"]  # val + test shop photos
    assert list(queries.products) == ["id_00000003", "id_00000003"]
    assert (queries.boxes == [10, 20, 100, 150]).all()
    val_gallery, val_queries = tables["val_gallery.csv"], tables["val_queries.csv"]
    assert list(val_gallery.products) == list(val_queries.products) == ["id_00000002"]
    assert [rows["queries.csv"][k] for k in ("rows", "products", "boxes", "missing")] == [
        2,
        1,
        2,
        0,
    ]


# --- folders ---------------------------------------------------------------------------------


def _folders(root: Path, classes: int = 10) -> Path:
    for c in range(classes):
        for i in range(3 if c % 2 else 2):
            _image(root / f"class{c:02d}" / f"img{i}.png")
    (root / "class00" / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("not a class")
    return root


def test_folders_split_by_class_seeded_and_written_next_to_the_images(tmp_path):
    src = _folders(tmp_path / "shop")
    summary = convert_folders(src, src, val=0.2, test=0.3, seed=0)
    tables = _read_back(src)
    assert len(tables) == 5  # train, gallery, queries, val_gallery, val_queries
    classes = {name: set(table.products) for name, table in tables.items()}
    assert len(classes["train.csv"]) == 5 and len(classes["gallery.csv"]) == 3
    assert len(classes["val_gallery.csv"]) == 2
    assert not classes["train.csv"] & (classes["gallery.csv"] | classes["val_gallery.csv"])
    assert not classes["gallery.csv"] & classes["val_gallery.csv"]
    assert all(p.endswith("/img0.png") for p in tables["gallery.csv"].paths)  # first by name
    assert sum(r["rows"] for r in summary.rows()) == 25  # every image once, notes.txt left out
    first = {n: (src / n).read_bytes() for n in tables}
    convert_folders(src, src, val=0.2, test=0.3, seed=0, overwrite=True)
    assert {n: (src / n).read_bytes() for n in tables} == first
    convert_folders(src, src, val=0.2, test=0.3, seed=1, overwrite=True)
    assert set(read_gallery(src / "gallery.csv").products) != classes["gallery.csv"]


def test_folders_without_val_removes_an_old_val_split_on_overwrite(tmp_path):
    src = _folders(tmp_path / "shop")
    convert_folders(src, src, val=0.2, test=0.3)
    summary = convert_folders(src, src, val=0.0, test=0.3, overwrite=True)
    assert not (src / "val_gallery.csv").exists()
    assert _by_file(summary)["val_gallery.csv"]["rows"] == 0
    assert any("data split" in note for note in summary.notes)


@pytest.mark.parametrize(
    ("val", "test", "match"),
    [(0.5, 0.5, r"10 classes cannot give 5 val and 5 test"), (1.0, 0.0, r"val fraction must be")],
)
def test_folders_impossible_fractions(tmp_path, val, test, match):
    with pytest.raises(VSearchError, match=match):
        convert_folders(_folders(tmp_path / "shop"), tmp_path / "out", val=val, test=test)


# --- hostile sources -------------------------------------------------------------------------


def _replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


PARTITION = "Eval/list_eval_partition.txt"
INSHOP_BOXES = "Anno/list_bbox_inshop.txt"
C2S_BOXES = "Anno/list_bbox_consumer2shop.txt"
HOSTILE = [
    # (format, file, line to replace (0: delete the file), new text, message)
    ("sop", "Ebay_test.txt", 0, "", r"Ebay_test.txt: file not found"),
    ("sop", "Ebay_train.txt", 1, "id class super path", r"txt, line 1: expected the header"),
    ("sop", "Ebay_train.txt", 3, "2 1 1", r"Ebay_train.txt, line 3: expected 4 fields .*found 3"),
    ("sop", "Ebay_train.txt", 4, "3 x 1 a/b.JPG", r"line 4: class_id 'x' is not an integer"),
    ("sop", "Ebay_test.txt", 3, "6 3 1 a/b.JPG", r"Ebay_test.txt, line 3: duplicated image_id 6"),
    ("sop", "Ebay_test.txt", 2, "6 3 1 ../../etc/x.JPG", r"line 2: path '../../etc/x.JPG' leaves"),
    ("inshop", PARTITION, 0, "", r"list_eval_partition.txt: file not found"),
    ("inshop", PARTITION, 1, "image_name item_id", r"line 1: expected the number of entries"),
    ("inshop", PARTITION, 4, "img/a.jpg id_1 test", r"line 4: unknown evaluation_status 'test' \("),
    ("inshop", PARTITION, 5, "img/a.jpg", r"list_eval_partition.txt, line 5: expected 3 fields"),
    ("inshop", INSHOP_BOXES, 3, "img/a.jpg 1 1 10 10 x 20", r"line 3: x_2 'x' is not an integer"),
    ("inshop", INSHOP_BOXES, 4, "img/a.jpg 1 1 50 10 40 20", r"line 4: x_2, y_2 \(40, 20\) before"),
    ("consumer2shop", C2S_BOXES, 0, "", r"list_bbox_consumer2shop.txt: file not found"),
    ("consumer2shop", PARTITION, 2, "pair_1 pair_2 item_id status", r"line 2: expected the header"),
    ("consumer2shop", PARTITION, 5, "a.jpg b.jpg id_1 query", r"line 5: unknown evaluation_status"),
    (
        "consumer2shop",
        PARTITION,
        4,
        f"{C2S.format(1, 'comsumer', 1)} b.jpg id_00000009 train",
        r"line 4: image_pair_name_1 img/\S+/comsumer_01.jpg listed before with another item_id",
    ),
]


@pytest.mark.parametrize(("fmt", "file", "line", "text", "match"), HOSTILE)
def test_a_broken_source_is_one_error_naming_file_and_line(tmp_path, fmt, file, line, text, match):
    src = {"sop": _sop, "inshop": _inshop, "consumer2shop": _c2s}[fmt](tmp_path / "src")
    if line:
        _replace_line(src / file, line, text)
    else:
        (src / file).unlink()
    with pytest.raises(VSearchError, match=match) as err:
        convert(fmt, src, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_existing_files_are_kept_unless_overwrite(tmp_path):
    src, out = _sop(tmp_path / "src"), tmp_path / "out"
    convert_sop(src, out)
    (out / "queries.csv").write_text("mine")
    with pytest.raises(VSearchError, match=r"out/train.csv: already exists"):
        convert_sop(src, out)
    assert (out / "queries.csv").read_text() == "mine"
    convert_sop(src, out, overwrite=True)
    assert len(read_queries(out / "queries.csv")) == 5


def test_a_folder_named_images_is_never_replaced_by_the_link(tmp_path):
    src, out = _sop(tmp_path / "src"), tmp_path / "out"
    (out / "images").mkdir(parents=True)
    with pytest.raises(VSearchError, match=r"out/images: already exists and is not a link"):
        convert_sop(src, out, overwrite=True)


def test_convert_dispatch(tmp_path):
    with pytest.raises(VSearchError, match=r"unknown format 'coco': one of sop, inshop"):
        convert("coco", tmp_path, tmp_path / "out")
    with pytest.raises(VSearchError, match=r"val: only for the folders format, not sop"):
        convert("sop", tmp_path, tmp_path / "out", val=0.1)
    summary = convert("folders", _folders(tmp_path / "shop"), tmp_path / "out", test=0.3, seed=3)
    assert _by_file(summary)["gallery.csv"]["products"] == 3


def test_vsearch_data_convert_prints_the_tables_and_notes(tmp_path):
    src, out = _sop(tmp_path / "src"), tmp_path / "out"
    result = invoke("data", "convert", "sop", src, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {t["file"]: t["rows"] for t in report["tables"]} == {
        "train.csv": 5,
        "gallery.csv": 5,
        "queries.csv": 5,
    }
    assert any("--protocol self" in note for note in report["notes"])
    table = invoke("data", "convert", "sop", src, "--out", out, "--overwrite")
    assert table.exit_code == 0, table.output
    assert "gallery.csv" in table.stdout and "missing" in table.stdout
    assert "vsearch data split" in " ".join(table.stdout.split())
    for args, message in (
        (["sop", src, "--out", out], "already exists"),
        (["sop", src, "--out", out, "--val", "0.1"], "val: only for the folders format"),
        (["coco", src, "--out", out], "unknown format 'coco'"),
    ):
        failed = invoke("data", "convert", *args)
        assert failed.exit_code == 2 and message in failed.stderr, failed.output
