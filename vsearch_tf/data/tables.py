"""Readers for the MCS2023 / Products-10K CSV layout, with one-line errors that name file and row.

- ``gallery.csv``: ``seller_img_id, img_path, product_id``
- ``queries.csv``: ``user_img_id, img_path, product_id, bbox_x, bbox_y, bbox_w, bbox_h``
- training csv: ``img_path, product_id`` and optional ``bbox_*`` columns

Paths are relative to a data root and may not escape it. Boxes are pixels ``x, y, w, h`` of the
image as displayed (EXIF orientation applied); four empty cells mean "no box" and become the all
-1 sentinel of :mod:`vsearch_tf.data.images`; ``nan`` or ``inf`` is an error, like any non-number.
Rows are reported as CSV line numbers (header = line 1), which is what an editor shows.

Image files are not looked for: a catalogue of a million rows always has stale ones, so a missing
file is skipped and listed like a damaged image when the rows are embedded. ``check_files=True``
(what ``--strict`` uses) makes one an error naming its line, before any work starts.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vsearch_tf.errors import VSearchError, one_line

BBOX_COLUMNS = ["bbox_x", "bbox_y", "bbox_w", "bbox_h"]


@dataclass(frozen=True)
class ImageTable:
    """One CSV, resolved: absolute paths, product ids, image ids and boxes, row-aligned."""

    source: Path
    ids: np.ndarray  # str, unique
    paths: np.ndarray  # str, absolute
    products: np.ndarray  # str
    boxes: np.ndarray  # float32 (N, 4); all -1 = whole image

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, mask: np.ndarray) -> ImageTable:
        return ImageTable(
            self.source, self.ids[mask], self.paths[mask], self.products[mask], self.boxes[mask]
        )

    def without(
        self, skipped: list[dict[str, str]], rows: np.ndarray, max_bad_fraction: float, what: str
    ) -> ImageTable:
        """This table less its bad ``rows`` (``skipped``: their paths and reasons, in order), or a
        ``VSearchError`` if more than ``max_bad_fraction`` of it is bad: a few broken files should
        not stop a long run, a broken dataset should not train quietly. ``what`` completes "N of
        M training images ...", e.g. "are unreadable"."""
        if len(rows) > max_bad_fraction * len(self):
            first = skipped[0]
            raise VSearchError(
                f"{self.source}: {len(rows)} of {len(self)} training images {what} "
                f"({len(rows) / len(self):.1%} > data.max_bad_fraction={max_bad_fraction:g}); "
                f"first: {first['path']}: {first['reason']}"
            )
        keep = np.ones(len(self), bool)
        keep[rows] = False
        return self.subset(keep)

    def digest(self, block: int = 1 << 16) -> str:
        """A hash of the rows (ids, paths, boxes, in order), fed block by block so a catalogue of
        10^8 rows is hashed without a copy of it in memory."""
        columns = (self.ids, self.paths, self.boxes)
        hashes = [hashlib.sha256(str(column.dtype).encode()) for column in columns]
        for start in range(0, len(self), block):
            for h, column in zip(hashes, columns):
                h.update(np.ascontiguousarray(column[start : start + block]).tobytes())
        return hashlib.sha256(b"".join(h.digest() for h in hashes)).hexdigest()


def _line(index: int) -> int:
    return int(index) + 2


def _read(csv: Path, required: list[str]) -> pd.DataFrame:
    if not csv.is_file():
        raise VSearchError(f"{csv}: file not found")
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise VSearchError(
            f"{csv}: the file is empty (expected a header with {', '.join(required)})"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise VSearchError(f"{csv}: not a readable CSV ({one_line(err)})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        near = {
            c: difflib.get_close_matches(c, list(frame.columns), n=1, cutoff=0.6) for c in missing
        }
        hints = [f"{near[c][0]!r} -> {c}" for c in missing if near[c]]
        hint = f" (misspelt? rename {', '.join(hints)})" if hints else ""
        raise VSearchError(
            f"{csv}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}{hint}"
        )
    if frame.empty:
        raise VSearchError(f"{csv}: no rows after the header")
    for column in required:
        blank = frame[column].str.strip() == ""
        if blank.any():
            raise VSearchError(f"{csv}, line {_line(np.flatnonzero(blank)[0])}: empty {column}")
    return frame


def _boxes(csv: Path, frame: pd.DataFrame) -> np.ndarray:
    present = [c for c in BBOX_COLUMNS if c in frame.columns]
    if not present:
        return np.full((len(frame), 4), -1.0, np.float32)
    if len(present) != 4:
        missing = sorted(set(BBOX_COLUMNS) - set(present))
        raise VSearchError(f"{csv}: has {', '.join(present)} but not {', '.join(missing)}")
    raw = frame[BBOX_COLUMNS].apply(lambda col: col.str.strip())
    values = raw.apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(values.astype(float)) & (raw != "")
    if bad.any().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise VSearchError(
            f"{csv}, line {_line(row)}: {BBOX_COLUMNS[col]}={raw.iat[row, col]!r} is not a number"
        )
    boxes = values.to_numpy(np.float32, copy=True)
    empty = (raw == "").to_numpy()
    partial = empty.any(axis=1) & ~empty.all(axis=1)
    if partial.any():
        raise VSearchError(
            f"{csv}, line {_line(np.flatnonzero(partial)[0])}: a box needs all four of "
            + ", ".join(BBOX_COLUMNS)
        )
    boxes[empty.all(axis=1)] = -1.0
    return boxes


def _paths(csv: Path, frame: pd.DataFrame, root: Path, check_files: bool) -> np.ndarray:
    root = root.resolve()
    rel = frame["img_path"].str.strip().to_numpy(str)
    absolute = np.array([os.path.normpath(root / p) for p in rel], dtype=str)
    prefix = str(root) + os.sep
    escapes = ~np.char.startswith(absolute, prefix)
    if escapes.any():
        i = np.flatnonzero(escapes)[0]
        raise VSearchError(
            f"{csv}, line {_line(i)}: img_path {str(rel[i])!r} points outside the data root {root}"
        )
    if check_files:
        missing = np.flatnonzero([not os.path.isfile(p) for p in absolute])
        if len(missing):
            i = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise VSearchError(f"{csv}, line {_line(i)}: image not found: {absolute[i]}{more}")
    return absolute


def _table(
    csv: str | os.PathLike, root: str | os.PathLike | None, id_column: str | None, check_files: bool
) -> ImageTable:
    csv = Path(csv)
    root = Path(root) if root is not None else csv.parent
    frame = _read(csv, ([id_column] if id_column else []) + ["img_path", "product_id"])
    if id_column:
        ids = frame[id_column].str.strip().to_numpy(str)
        dup = pd.Series(ids).duplicated(keep="first").to_numpy()
        if dup.any():
            i = np.flatnonzero(dup)[0]
            first = np.flatnonzero(ids == ids[i])[0]
            raise VSearchError(
                f"{csv}, line {_line(i)}: duplicated {id_column} {str(ids[i])!r} "
                f"(first on line {_line(first)})"
            )
    else:
        ids = np.array([f"row{i}" for i in range(len(frame))], dtype=str)
    return ImageTable(
        source=csv,
        ids=ids,
        paths=_paths(csv, frame, root, check_files),
        products=frame["product_id"].str.strip().to_numpy(str),
        boxes=_boxes(csv, frame),
    )


def read_gallery(
    csv: str | os.PathLike, root: str | os.PathLike | None = None, *, check_files: bool = False
) -> ImageTable:
    """Read ``gallery.csv`` (seller photos). Boxes are optional."""
    return _table(csv, root, "seller_img_id", check_files)


def read_queries(
    csv: str | os.PathLike, root: str | os.PathLike | None = None, *, check_files: bool = False
) -> ImageTable:
    """Read ``queries.csv`` (user photos with a product box)."""
    return _table(csv, root, "user_img_id", check_files)


def read_training(
    csv: str | os.PathLike, root: str | os.PathLike | None = None, *, check_files: bool = False
) -> ImageTable:
    """Read a training csv: ``img_path, product_id`` and optional boxes."""
    return _table(csv, root, None, check_files)
