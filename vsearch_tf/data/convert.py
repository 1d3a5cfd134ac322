"""Converters from the files retrieval datasets distribute to the MCS2023 layout the toolkit reads.

Each ``convert_*`` reads its source listings (validating every line: a missing file, a line with
the wrong number of fields, a non-number or an unknown status is a ``VSearchError`` naming file
and line), leaves out the rows whose image is missing (counted in the summary), and writes the
csvs of :mod:`vsearch_tf.data.tables` into ``out``, all of them or none.

Image paths are written relative to ``out``, so that ``data.root: OUT`` works: when the images
lie outside ``out``, ``out/images`` is made a symbolic link to the source's image folder and the
paths start with ``images/``. Where a source has no query / gallery roles of its own, the rule of
:func:`split_roles` gives them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from vsearch_tf.data.tables import BBOX_COLUMNS
from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.io import atomic_path

#: Suffixes of the files the ``folders`` format takes as images (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

_ROWS = ["img_path", "product_id", *BBOX_COLUMNS]  # what a converter hands to the writer


@dataclass(frozen=True)
class TableSummary:
    """One csv as written: ``rows`` of ``products``, ``boxes`` of them with a box, and
    ``missing`` rows of the source left out because their image does not exist."""

    file: str
    rows: int
    products: int
    boxes: int
    missing: int = 0


@dataclass
class Summary:
    """What a conversion or split wrote into ``out``, and what the user should know about it."""

    out: Path
    tables: list[TableSummary]
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, object]]:
        """One dict per csv, for a table on screen or ``--json``."""
        return [asdict(t) for t in self.tables]


def split_roles(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The gallery rows and the query rows of some products (``_ROWS`` columns, boxes as text).

    A product's box-less rows are its seller photos (gallery) and its boxed rows its user photos
    (queries), as in MCS2023's ``train.csv``. A product whose rows are all of one kind (no box
    anywhere, as in SOP, or a box everywhere) gets its first row as the gallery image and the
    others as queries, so every product with two images or more can be queried.
    """
    boxed = (rows[BBOX_COLUMNS] != "").any(axis=1)
    per_product = boxed.groupby(rows["product_id"])
    mixed = (per_product.transform("sum") > 0) & ~per_product.transform("all")
    first = ~rows["product_id"].duplicated()
    gallery = (mixed & ~boxed) | (~mixed & first)
    return rows[gallery], rows[~gallery]


def _id_column(name: str) -> str | None:
    if name.endswith("gallery.csv"):
        return "seller_img_id"
    return "user_img_id" if name.endswith("queries.csv") else None


def _layout(name: str, rows: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """``rows`` as the csv ``name`` of the layout: its id column (the source's ``id`` if it has
    one, else 0..n-1), paths under ``prefix``, and boxes (a gallery only when it has any)."""
    frame = rows[_ROWS].copy()
    if prefix:
        frame["img_path"] = prefix + "/" + frame["img_path"]
    id_column = _id_column(name)
    if id_column == "seller_img_id" and not (frame[BBOX_COLUMNS] != "").any(axis=None):
        frame = frame.drop(columns=BBOX_COLUMNS)
    if id_column:
        ids = rows["id"] if "id" in rows else pd.Series(range(len(rows)), index=rows.index)
        frame.insert(0, id_column, ids.astype(str))
    return frame


def _summary(name: str, rows: pd.DataFrame) -> TableSummary:
    boxes = int((rows[BBOX_COLUMNS] != "").any(axis=1).sum())
    return TableSummary(name, len(rows), rows["product_id"].nunique(), boxes)


def _refuse_existing(out: Path, names: list[str], overwrite: bool) -> None:
    for name in names:
        if not overwrite and (out / name).exists():
            raise VSearchError(f"{out / name}: already exists (overwrite to replace it)")


def write_tables(
    out: Path, tables: dict[str, pd.DataFrame], *, prefix: str = "", overwrite: bool = False
) -> list[TableSummary]:
    """Write each table as ``out/NAME``; every file is renamed into place only after all were
    written, so a failure leaves the previous files. An empty table is not written (and, with
    ``overwrite``, its old file removed). Existing files are an error unless ``overwrite``."""
    _refuse_existing(out, list(tables), overwrite)
    with contextlib.ExitStack() as stack:
        for name, rows in tables.items():
            if len(rows):
                tmp = stack.enter_context(atomic_path(out / name))
                _layout(name, rows, prefix).to_csv(tmp, index=False)
    for name, rows in tables.items():
        if not len(rows):
            (out / name).unlink(missing_ok=True)
    return [_summary(name, rows) for name, rows in tables.items()]


# --- reading the sources ---------------------------------------------------------------------


def _listing(path: Path, columns: list[str], *, counted: bool) -> pd.DataFrame:
    """A whitespace-separated listing as strings, with each row's ``line`` number. ``counted``:
    line 1 is the number of entries (DeepFashion), the header comes next."""
    if not path.is_file():
        raise VSearchError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise VSearchError(f"{path}: not a readable text file ({one_line(err)})") from None
    start = int(counted)
    if counted and not (lines and lines[0].strip().isdigit()):
        found = lines[0].strip() if lines else ""
        raise VSearchError(f"{path}, line 1: expected the number of entries, found {found!r}")
    header = lines[start].split() if len(lines) > start else []
    if header != columns:
        raise VSearchError(
            f"{path}, line {start + 1}: expected the header {' '.join(columns)!r}, "
            f"found {' '.join(header)!r}"
        )
    rows, numbers = [], []
    for number, line in enumerate(lines[start + 1 :], start + 2):
        fields = line.split()
        if fields and len(fields) != len(columns):
            raise VSearchError(
                f"{path}, line {number}: expected {len(columns)} fields "
                f"({' '.join(columns)}), found {len(fields)}"
            )
        if fields:
            rows.append(fields)
            numbers.append(number)
    if not rows:
        raise VSearchError(f"{path}: no entries after the header")
    frame = pd.DataFrame(rows, columns=columns)
    frame["line"] = numbers
    return frame


def _reject(path: Path, frame: pd.DataFrame, bad: pd.Series, message: str) -> None:
    """Raise for the first ``bad`` row: ``message`` is formatted with that row's fields."""
    if bad.any():
        row = frame[bad.to_numpy()].iloc[0]
        raise VSearchError(f"{path}, line {row['line']}: {message.format(**row)}")


def _statuses(path: Path, frame: pd.DataFrame, allowed: tuple[str, ...]) -> None:
    bad = ~frame["evaluation_status"].isin(allowed)
    expected = f"expected {', '.join(allowed[:-1])} or {allowed[-1]}"
    _reject(path, frame, bad, f"unknown evaluation_status {{evaluation_status!r}} ({expected})")


def _integers(path: Path, frame: pd.DataFrame, columns: list[str]) -> None:
    for column in columns:
        bad = ~frame[column].str.fullmatch(r"-?\d+")
        _reject(path, frame, bad, f"{column} {{{column}!r}} is not an integer")


def _relative(path: Path, frame: pd.DataFrame, column: str) -> None:
    escapes = frame[column].map(
        lambda p: os.path.isabs(p) or os.path.normpath(p).split(os.sep)[0] == ".."
    )
    _reject(path, frame, escapes, f"{column} {{{column}!r}} leaves the dataset folder")


def _bbox_file(path: Path, columns: list[str]) -> pd.DataFrame:
    """A DeepFashion bbox listing as ``image_name`` and the layout's ``bbox_*`` (x, y, w, h)."""
    frame = _listing(path, columns, counted=True)
    corners = ["x_1", "y_1", "x_2", "y_2"]
    _integers(path, frame, corners)
    x1, y1, x2, y2 = (frame[c].astype(np.int64) for c in corners)
    _reject(path, frame, (x2 < x1) | (y2 < y1), "x_2, y_2 ({x_2}, {y_2}) before x_1, y_1")
    boxes = pd.DataFrame({"image_name": frame["image_name"]})
    for column, value in zip(BBOX_COLUMNS, (x1, y1, x2 - x1, y2 - y1)):
        boxes[column] = value.astype(str)
    return boxes.drop_duplicates("image_name").set_index("image_name")


def _with_boxes(rows: pd.DataFrame, boxes: pd.DataFrame | None) -> pd.DataFrame:
    """``rows`` (``img_path``, ``product_id``, ...) with the boxes of their images, "" if none."""
    if boxes is None:
        return rows.assign(**dict.fromkeys(BBOX_COLUMNS, ""))
    looked_up = boxes.reindex(rows["img_path"]).fillna("").set_axis(rows.index)
    return pd.concat([rows, looked_up], axis=1)


def _no_boxes(rows: pd.DataFrame) -> pd.DataFrame:
    return _with_boxes(rows, None)


# --- writing ---------------------------------------------------------------------------------


def _image_prefix(images: Path, out: Path, overwrite: bool) -> str:
    """How paths under ``images`` are written in csvs under ``out``: relative when ``images`` is
    inside ``out``, else through the link ``out/images``, made here."""
    images, out = images.resolve(), out.resolve()
    if images == out:
        return ""
    if out in images.parents:
        return images.relative_to(out).as_posix()
    link = out / "images"
    if link.is_symlink() and link.resolve() == images:
        return "images"
    if link.is_symlink() and overwrite:
        link.unlink()
    elif link.exists() or link.is_symlink():
        raise VSearchError(f"{link}: already exists and is not a link to {images}")
    out.mkdir(parents=True, exist_ok=True)
    link.symlink_to(images, target_is_directory=True)
    return "images"


def _finish(
    images: Path,
    out: Path,
    tables: dict[str, pd.DataFrame],
    overwrite: bool,
    notes: list[str],
) -> Summary:
    """Leave out rows whose image is missing (counted), then write the tables into ``out``."""
    paths = pd.unique(pd.concat([t["img_path"] for t in tables.values()]))
    present = {p for p in paths if os.path.isfile(os.path.join(images, p))}
    if not present:
        raise VSearchError(
            f"{images}: none of the {len(paths)} listed images exists (first: {images / paths[0]})"
        )
    _refuse_existing(out, list(tables), overwrite)
    kept = {
        name: t[np.array([p in present for p in t["img_path"]], dtype=bool)]
        for name, t in tables.items()
    }
    prefix = _image_prefix(images, out, overwrite)
    written = write_tables(out, kept, prefix=prefix, overwrite=overwrite)
    return Summary(out, [replace(t, missing=len(tables[t.file]) - t.rows) for t in written], notes)


def _first_existing(src: Path, candidates: list[str], probe: str) -> Path:
    """The folder of ``candidates`` (under ``src``) in which the image ``probe`` exists."""
    for candidate in candidates:
        if (src / candidate / probe).is_file():
            return src / candidate
    return src / candidates[0] if (src / candidates[0]).is_dir() else src


def _no_val(out: str | os.PathLike) -> str:
    return f"no validation split: `vsearch data split {out} --val-products 0.1` makes one"


# --- the formats -----------------------------------------------------------------------------


def _sop_listing(path: Path) -> pd.DataFrame:
    frame = _listing(path, ["image_id", "class_id", "super_class_id", "path"], counted=False)
    _integers(path, frame, ["image_id", "class_id", "super_class_id"])
    _reject(path, frame, frame["image_id"].duplicated(), "duplicated image_id {image_id}")
    _relative(path, frame, "path")
    rows = frame.rename(columns={"image_id": "id", "path": "img_path", "class_id": "product_id"})
    return _no_boxes(rows)


def convert_sop(
    src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> Summary:
    """Stanford Online Products (``SRC/Ebay_train.txt``, ``SRC/Ebay_test.txt``, images under
    ``SRC``): train.csv from the train listing; every test image is both in gallery.csv and in
    queries.csv (same ids, the SOP ``image_id``), to be evaluated with the self protocol."""
    src = Path(src)
    train, test = _sop_listing(src / "Ebay_train.txt"), _sop_listing(src / "Ebay_test.txt")
    tables = {"train.csv": train, "gallery.csv": test, "queries.csv": test}
    notes = [
        "gallery.csv and queries.csv both hold every test image: evaluate with --protocol self "
        "(each image queries all the others, itself excluded)",
        _no_val(out),
    ]
    return _finish(src, Path(out), tables, overwrite, notes)


def _deepfashion_boxes(path: Path, kind: str) -> pd.DataFrame:
    columns = ["image_name", "clothes_type", kind, "x_1", "y_1", "x_2", "y_2"]
    return _bbox_file(path, columns)


def convert_inshop(
    src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> Summary:
    """DeepFashion In-shop (``SRC/Eval/list_eval_partition.txt``; images ``img/...`` under
    ``SRC/Img`` or ``SRC``; boxes from ``SRC/Anno/list_bbox_inshop.txt`` when present, on every
    row, so that training crops as evaluation does)."""
    src = Path(src)
    path = src / "Eval" / "list_eval_partition.txt"
    frame = _listing(path, ["image_name", "item_id", "evaluation_status"], counted=True)
    _statuses(path, frame, ("train", "query", "gallery"))
    _relative(path, frame, "image_name")
    bbox_file = src / "Anno" / "list_bbox_inshop.txt"
    boxes = _deepfashion_boxes(bbox_file, "pose_type") if bbox_file.exists() else None
    rows = frame.rename(columns={"image_name": "img_path", "item_id": "product_id"})
    rows = _with_boxes(rows, boxes)
    status = rows["evaluation_status"]
    tables = {
        "train.csv": rows[status == "train"],
        "gallery.csv": rows[status == "gallery"],
        "queries.csv": rows[status == "query"],
    }
    notes = [_no_val(out)] + ([] if boxes is not None else [f"{bbox_file}: not found, no boxes"])
    images = _first_existing(src, ["Img", "."], frame["image_name"].iloc[0])
    return _finish(images, Path(out), tables, overwrite, notes)


def _pair_side(path: Path, frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """The distinct images of one side of the consumer2shop pairs; an image listed with two
    items or two statuses is an error."""
    side = frame[[column, "item_id", "evaluation_status", "line"]]
    first = side.drop_duplicates(column).set_index(column)
    clash = side[["item_id", "evaluation_status"]].ne(
        first.loc[side[column], ["item_id", "evaluation_status"]].to_numpy()
    )
    message = f"{column} {{{column}}} listed before with another item_id or evaluation_status"
    _reject(path, side, clash.any(axis=1), message)
    rows = first.reset_index().rename(columns={column: "img_path", "item_id": "product_id"})
    return rows


def convert_consumer2shop(
    src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> Summary:
    """DeepFashion Consumer-to-shop (``SRC/Eval/list_eval_partition.txt``: pairs of a consumer
    photo and a shop photo of one item; ``SRC/Anno/list_bbox_consumer2shop.txt``; images
    ``img/...`` under ``SRC/Img`` or ``SRC``).

    Consumer photos, with their boxes, are queries; shop photos, whole, the gallery; the gallery of
    the test queries is every val and test shop photo, as the benchmark defines it. The val items
    become val_gallery.csv / val_queries.csv. In train.csv the shop photos have no box and the
    consumer photos theirs, like the seller and user photos of MCS2023.
    """
    src = Path(src)
    path = src / "Eval" / "list_eval_partition.txt"
    columns = ["image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status"]
    frame = _listing(path, columns, counted=True)
    _statuses(path, frame, ("train", "val", "test"))
    for column in columns[:2]:
        _relative(path, frame, column)
    boxes = _deepfashion_boxes(src / "Anno" / "list_bbox_consumer2shop.txt", "source_type")
    consumer = _with_boxes(_pair_side(path, frame, "image_pair_name_1"), boxes)
    shop = _no_boxes(_pair_side(path, frame, "image_pair_name_2"))
    cs, ss = consumer["evaluation_status"], shop["evaluation_status"]
    tables = {
        "train.csv": pd.concat([shop[ss == "train"], consumer[cs == "train"]]),
        "val_gallery.csv": shop[ss == "val"],
        "val_queries.csv": consumer[cs == "val"],
        "gallery.csv": shop[ss != "train"],
        "queries.csv": consumer[cs == "test"],
    }
    notes = ["gallery.csv holds the val and test shop photos (the benchmark's gallery)"]
    images = _first_existing(src, ["Img", "."], frame["image_pair_name_1"].iloc[0])
    return _finish(images, Path(out), tables, overwrite, notes)


def _class_count(fraction: float, classes: int) -> int:
    return max(1, round(fraction * classes)) if fraction > 0 else 0


def _folder_rows(src: Path) -> pd.DataFrame:
    """``class/image`` of every image directly inside a class folder of ``src``, sorted."""
    if not src.is_dir():
        raise VSearchError(f"{src}: not a folder")
    paths = [
        f"{folder.name}/{image.name}"
        for folder in sorted(src.iterdir())
        if folder.is_dir() and not folder.name.startswith(".")
        for image in sorted(folder.iterdir())
        if image.suffix.lower() in IMAGE_SUFFIXES and not image.name.startswith(".")
    ]
    if not paths:
        raise VSearchError(f"{src}: no images in ROOT/<class>/<image> (suffixes {IMAGE_SUFFIXES})")
    products = [p.split("/", 1)[0] for p in paths]
    return _no_boxes(pd.DataFrame({"img_path": paths, "product_id": products}))


def convert_folders(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> Summary:
    """One folder per class (``SRC/<class>/<image>``): a seeded ``val`` / ``test`` fraction of the
    classes (at least one when the fraction is > 0) is held out, the rest is train.csv. Held-out
    classes are split into gallery and queries by :func:`split_roles` (the first image by name is
    the gallery image)."""
    for name, fraction in (("val", val), ("test", test)):
        if not 0 <= fraction < 1:
            raise VSearchError(f"{name} fraction must be in [0, 1), got {fraction}")
    src = Path(src)
    rows = _folder_rows(src)
    classes = np.array(sorted(rows["product_id"].unique()))
    n_test, n_val = _class_count(test, len(classes)), _class_count(val, len(classes))
    if n_test + n_val >= len(classes):
        raise VSearchError(
            f"{src}: {len(classes)} classes cannot give {n_val} val and {n_test} test classes "
            "and keep one for training"
        )
    order = np.random.default_rng(seed).permutation(classes)
    held = {"": order[:n_test], "val_": order[n_test : n_test + n_val]}
    train = ~rows["product_id"].isin(order[: n_test + n_val])
    tables = {"train.csv": rows[train]}
    for prefix, chosen in held.items():  # empty with a fraction 0: an older split is removed
        gallery, queries = split_roles(rows[rows["product_id"].isin(chosen)])
        tables |= {f"{prefix}gallery.csv": gallery, f"{prefix}queries.csv": queries}
    notes = [] if n_val else [_no_val(out)]
    return _finish(src, Path(out), tables, overwrite, notes)


#: ``vsearch data convert FORMAT``: the converter of each format.
CONVERTERS: dict[str, Callable[..., Summary]] = {
    "sop": convert_sop,
    "inshop": convert_inshop,
    "consumer2shop": convert_consumer2shop,
    "folders": convert_folders,
}


def convert(
    fmt: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    val: float | None = None,
    test: float | None = None,
    seed: int | None = None,
) -> Summary:
    """``vsearch data convert``: run the converter of ``fmt``; ``val``, ``test`` and ``seed``
    belong to ``folders`` (the other formats come with their own split)."""
    if fmt not in CONVERTERS:
        raise VSearchError(f"unknown format {fmt!r}: one of {', '.join(CONVERTERS)}")
    options = {k: v for k, v in (("val", val), ("test", test), ("seed", seed)) if v is not None}
    if options and fmt != "folders":
        raise VSearchError(f"{', '.join(options)}: only for the folders format, not {fmt}")
    return CONVERTERS[fmt](src, out, overwrite=overwrite, **options)
