"""Pictures a person would rather look at: query montages and training curves (PIL only)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from vsearch_tf import io

TILE = 128
GREEN, RED, GREY, BLUE = (30, 160, 60), (200, 40, 40), (120, 120, 120), (40, 90, 200)


@dataclass
class MontageRow:
    """One query and its results. ``correct`` per result: True/False, or None when unknown.
    ``expected``: the path (None: no image) and label of a catalogue image of the right product,
    shown last in the row, apart -- what a person looking at a failure wants to see first."""

    query_path: str
    bbox: tuple[float, float, float, float] | None
    result_paths: list[str]
    labels: list[str]
    correct: list[bool | None]
    expected: tuple[str | None, str] | None = None


def _tile(path: str | None, bbox=None, border=GREY) -> Image.Image:
    try:
        if path is None:
            raise FileNotFoundError("no image")
        # Upright as displayed: that is the image the boxes refer to.
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except Exception:  # a montage must not fail on the one image it cannot open
        image = Image.new("RGB", (TILE, TILE), (230, 230, 230))
    if bbox is not None and bbox[2] > 0 and bbox[3] > 0:
        ImageDraw.Draw(image).rectangle(
            [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]],
            outline=(255, 200, 0),
            width=max(2, image.width // 80),
        )
    image = ImageOps.pad(image, (TILE - 8, TILE - 8), color=(255, 255, 255))
    return ImageOps.expand(image, border=4, fill=border)


def montage(rows: list[MontageRow], out: str | Path) -> None:
    """Each row: the query (box drawn in yellow) then its results, and its ``expected`` image
    (blue border) after a gap when any row has one.

    Green border = right product, red = wrong.
    """
    k = max((len(r.result_paths) for r in rows), default=0)
    expected_x = (k + 1) * TILE + 24 if any(r.expected for r in rows) else None
    label_h = 16
    width = (k + 1) * TILE + 12 if expected_x is None else expected_x + TILE
    sheet = Image.new("RGB", (width, len(rows) * (TILE + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        y = i * (TILE + label_h)
        sheet.paste(_tile(row.query_path, row.bbox, BLUE), (0, y))
        draw.text((4, y + TILE), "query", fill="black")
        for j, (path, label, ok) in enumerate(zip(row.result_paths, row.labels, row.correct)):
            border = GREY if ok is None else (GREEN if ok else RED)
            sheet.paste(_tile(path, None, border), (12 + (j + 1) * TILE, y))
            draw.text((16 + (j + 1) * TILE, y + TILE), f"{j + 1}. {label}"[:20], fill="black")
        if expected_x is not None and row.expected is not None:
            path, label = row.expected
            sheet.paste(_tile(path, None, BLUE), (expected_x, y))
            draw.text((expected_x + 4, y + TILE), f"want {label}"[:20], fill="black")
    with io.atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")


def training_curves(
    metrics: pd.DataFrame, out: str | Path, size: tuple[int, int] = (360, 220)
) -> None:
    """One small panel per metric column of ``metrics.csv`` (loss, accuracy, val mAP, ...)."""
    columns = [
        c for c in metrics.columns if c != "epoch" and pd.api.types.is_numeric_dtype(metrics[c])
    ]
    if not columns:
        return
    cols = min(3, len(columns))
    w, h = size
    sheet = Image.new("RGB", (cols * w, math.ceil(len(columns) / cols) * h), "white")
    draw = ImageDraw.Draw(sheet)
    x_values = (
        metrics["epoch"].to_numpy() + 1 if "epoch" in metrics else np.arange(1, len(metrics) + 1)
    )
    for n, column in enumerate(columns):
        ox, oy = (n % cols) * w, (n // cols) * h
        y = metrics[column].to_numpy(float)
        finite = np.isfinite(y)
        draw.text((ox + 8, oy + 4), column, fill="black")
        if finite.sum() == 0:
            continue
        lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
        hi = hi if hi > lo else lo + 1e-9
        left, top, right, bottom = ox + 44, oy + 22, ox + w - 12, oy + h - 22
        draw.rectangle([left, top, right, bottom], outline=GREY)
        draw.text((ox + 4, top - 2), f"{hi:.3g}", fill=GREY)
        draw.text((ox + 4, bottom - 10), f"{lo:.3g}", fill=GREY)
        span = max(x_values[-1] - x_values[0], 1)
        points = [
            (
                left + (x - x_values[0]) / span * (right - left),
                bottom - (v - lo) / (hi - lo) * (bottom - top),
            )
            for x, v, ok in zip(x_values, y, finite)
            if ok
        ]
        if len(points) > 1:
            draw.line(points, fill=(40, 90, 200), width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(40, 90, 200))
        draw.text((left, bottom + 4), f"epoch {int(x_values[0])}..{int(x_values[-1])}", fill=GREY)
    with io.atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
