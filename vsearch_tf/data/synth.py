"""Synthetic shopper photos made from the catalogue photos of the training products.

User photos are scarce (two or three per product) and a metric model overfits them; the
catalogue photo of every product is there. Product-recognition teams multiply user photos by
pasting the catalogue image, cut out of its white or transparent background, into real scenes:
scaled, rotated, slanted, restyled (palette, stroke width, detail, as another artist or another
camera would), partly occluded, re-lit, blurred, noisy and JPEG-compressed, with its new box.

The scenes are the training csv's own boxed photos: the cut-out covers the photo's box, whose
product is smudged out first, so its surroundings are a real scene of the task and nothing from
validation or test products is used. ``vsearch data synth`` writes the photos and a training csv
(the original rows, then the synthetic ones) that trains like any other. It runs once, offline,
rather than in tf.data: the photos then go through every training path unchanged (photos,
prepared shards, multi-worker, Beam) and a person can look at them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from vsearch_tf.data.convert import Summary, write_tables
from vsearch_tf.data.split import training_rows
from vsearch_tf.data.tables import BBOX_COLUMNS
from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.io import atomic_path

#: A catalogue pixel at least this close to white on every channel is background, if it touches
#: the border through other such pixels (white inside the product stays product).
WHITE_TOLERANCE = 24


def cutout(photo: Image.Image) -> Image.Image | None:
    """The product of a catalogue photo as RGBA, cropped to it: the photo's alpha when it has
    transparency, else everything but the near-white region connected to the border. ``None``
    when nothing is left (a blank photo)."""
    rgba = photo.convert("RGBA")
    alpha = np.asarray(rgba)[..., 3]
    if alpha.min() < 250:
        mask = alpha >= 128
    else:
        white = np.asarray(photo.convert("RGB")).min(axis=-1) >= 255 - WHITE_TOLERANCE
        padded = ImageOps.expand(Image.fromarray(white.astype(np.uint8) * 255), 1, fill=255)
        ImageDraw.floodfill(padded, (0, 0), 128)  # the frame joins every border region
        mask = np.asarray(padded)[1:-1, 1:-1] != 128
    if not mask.any():
        return None
    soft = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(0.6))
    rgba.putalpha(soft)
    return rgba.crop(Image.fromarray(mask.astype(np.uint8)).getbbox())


def _restyle(obj: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Another artist's or camera's rendering: palette, saturation, stroke width, detail."""
    alpha = obj.getchannel("A")
    rgb = obj.convert("RGB")
    if rng.random() < 0.6:
        hsv = np.asarray(rgb.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-12, 13))) % 256
        rgb = Image.fromarray(hsv, "HSV").convert("RGB")
    rgb = ImageEnhance.Color(rgb).enhance(float(rng.uniform(0.6, 1.4)))
    if rng.random() < 0.25:
        rgb = ImageOps.posterize(rgb, int(rng.integers(3, 6)))
    stroke = rng.random()
    if stroke < 0.2:
        rgb = rgb.filter(ImageFilter.MinFilter(3))  # thicker dark outlines
    elif stroke < 0.3:
        rgb = rgb.filter(ImageFilter.MaxFilter(3))  # thinner ones
    if rng.random() < 0.3:  # less detail: drawn smaller, shown larger
        factor = float(rng.uniform(0.35, 0.7))
        small = (max(4, round(rgb.width * factor)), max(4, round(rgb.height * factor)))
        rgb = rgb.resize(small, Image.Resampling.BILINEAR).resize(rgb.size)
    out = rgb.convert("RGBA")
    out.putalpha(alpha)
    return out


def _geometry(obj: Image.Image, side: float, rng: np.random.Generator) -> Image.Image:
    """Scaled so its larger side is ``side``, stretched, slanted and rotated."""
    stretch = math.exp(rng.uniform(-0.15, 0.15))
    scale = side / max(obj.width, obj.height)
    size = (max(4, round(obj.width * scale * stretch)), max(4, round(obj.height * scale / stretch)))
    obj = obj.resize(size, Image.Resampling.LANCZOS)
    if rng.random() < 0.5:  # a slant, as seen from the side
        shear = float(rng.uniform(-0.2, 0.2))
        width = obj.width + round(abs(shear) * obj.height)
        offset = -shear * obj.height if shear > 0 else 0.0
        obj = obj.transform(
            (width, obj.height),
            Image.Transform.AFFINE,
            (1, shear, -offset, 0, 1, 0),
            Image.Resampling.BICUBIC,
        )
    return obj.rotate(float(rng.uniform(-30, 30)), Image.Resampling.BICUBIC, expand=True)


def _camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Light, optics and sensor: brightness, contrast, a colour cast, blur and grain."""
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.3)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.7, 1.3)))
    cast = 1.0 + rng.uniform(-0.1, 0.1, 3)
    arr = np.asarray(img, np.float32) * cast.astype(np.float32)
    if rng.random() < 0.4:
        arr = np.asarray(
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2)))
            ),
            np.float32,
        )
    arr += rng.standard_normal(arr.shape).astype(np.float32) * float(rng.uniform(0, 6))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _occlude(img: Image.Image, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    """A hand, a label or another object over part of the product, in a colour of the scene."""
    x, y, w, h = box
    ow, oh = w * rng.uniform(0.15, 0.45), h * rng.uniform(0.15, 0.45)
    ox, oy = x + rng.uniform(-0.1, 1.0) * w - ow / 2, y + rng.uniform(-0.1, 1.0) * h - oh / 2
    colour = img.getpixel((int(rng.integers(img.width)), int(rng.integers(img.height))))
    shape = [ox, oy, ox + ow, oy + oh]
    draw = ImageDraw.Draw(img)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(shape, fill=colour)


def synthetic_photo(
    product: Image.Image,
    scene: Image.Image,
    scene_box: tuple[float, float, float, float],
    rng: np.random.Generator,
    restyle: float = 1.0,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """``product`` (a :func:`cutout`) pasted over ``scene``'s box, whose own product is smudged
    out first, restyled with probability ``restyle``; returns the RGB photo and the pasted
    product's box ``x, y, w, h``."""
    img = scene.convert("RGB")
    x, y, w, h = (float(v) for v in scene_box)
    region = (
        max(0, int(x)),
        max(0, int(y)),
        min(img.width, math.ceil(x + w)),
        min(img.height, math.ceil(y + h)),
    )
    img.paste(img.crop(region).filter(ImageFilter.GaussianBlur(max(w, h) / 4)), region[:2])
    if rng.random() < restyle:
        product = _restyle(product, rng)
    obj = _geometry(product, max(w, h) * rng.uniform(0.8, 1.15), rng)
    cx = x + w / 2 + rng.uniform(-0.1, 0.1) * w
    cy = y + h / 2 + rng.uniform(-0.1, 0.1) * h
    px, py = round(cx - obj.width / 2), round(cy - obj.height / 2)
    canvas = img.convert("RGBA")
    canvas.alpha_composite(obj, (max(0, px), max(0, py)), (max(0, -px), max(0, -py)))
    img = canvas.convert("RGB")
    bx0, by0, bx1, by1 = obj.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox()
    x0, y0 = max(0, px + bx0), max(0, py + by0)
    x1, y1 = min(img.width, px + bx1), min(img.height, py + by1)
    box = (x0, y0, max(1, x1 - x0), max(1, y1 - y0))
    if rng.random() < 0.3:
        _occlude(img, box, rng)
    return _camera(img, rng), box


def _open(path: Path, csv: Path, line: int) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (OSError, ValueError) as err:
        raise VSearchError(f"{csv}, line {line}: {path}: {one_line(err)}") from None


def synthesize(
    data_dir: str | os.PathLike,
    *,
    train_csv: str = "train.csv",
    out: str = "synth",
    per_product: int = 4,
    restyle: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> Summary:
    """``vsearch data synth``: ``per_product`` synthetic shopper photos of every product of
    ``data_dir/train_csv`` that has a catalogue photo (a row without a box), written as
    ``data_dir/out/images/*.jpg`` with ``data_dir/out/train.csv``: the csv's rows, then one row
    per synthetic photo, paths relative to ``data_dir`` (still ``data.root``). ``restyle``: the
    fraction restyled (palette, strokes, detail), for catalogues whose shoppers see another
    rendering of the product (emoji-shop: another vendor's drawing); 0 when they see the same
    one. The folder is written atomically; the same seed gives the same files."""
    root = Path(data_dir)
    if per_product < 1:
        raise VSearchError(f"per_product must be at least 1, got {per_product}")
    if not 0 <= restyle <= 1:
        raise VSearchError(f"restyle must be a fraction in [0, 1], got {restyle}")
    if Path(out).is_absolute() or ".." in Path(out).parts or not str(out).strip("./"):
        raise VSearchError(f"--out {out!r}: must be a folder inside the data root {root}")
    target = root / out
    if target.exists() and not overwrite:
        raise VSearchError(f"{target}: exists (pass --overwrite to replace it)")
    csv = root / train_csv
    rows = training_rows(csv, root)
    boxed = (rows[BBOX_COLUMNS] != "").all(axis=1).to_numpy()
    if not boxed.any():
        raise VSearchError(f"{csv}: no row has a box, so there is no shopper photo to use as scene")
    catalogue = rows[~boxed].drop_duplicates("product_id")
    scenes = rows[boxed]
    made, skipped = [], []
    with atomic_path(target) as tmp:
        (tmp / "images").mkdir(parents=True)
        total = len(catalogue) * per_product
        for k, (index, row) in enumerate(catalogue.iterrows()):
            product = cutout(_open(root / row["img_path"], csv, int(index) + 2))
            if product is None:
                skipped.append(row["product_id"])
                continue
            for j in range(per_product):
                rng = np.random.default_rng([seed, k, j])
                s = scenes.iloc[int(rng.integers(len(scenes)))]
                scene = _open(root / s["img_path"], csv, int(s.name) + 2)
                box = tuple(float(s[c]) for c in BBOX_COLUMNS)
                img, (bx, by, bw, bh) = synthetic_photo(product, scene, box, rng, restyle)
                rel = f"images/{k:06d}_{j}.jpg"
                img.save(tmp / rel, format="JPEG", quality=int(rng.integers(60, 96)))
                made.append([f"{out}/{rel}", row["product_id"], bx, by, bw, bh])
                progress(k * per_product + j + 1, total)
        synthetic = pd.DataFrame(made, columns=["img_path", "product_id", *BBOX_COLUMNS])
        table = pd.concat([rows, synthetic.astype(str)], ignore_index=True)
        written = write_tables(tmp, {"train.csv": table})
    notes = [f"train on it: --set data.train_csv={out}/train.csv (paths relative to {root})"]
    if skipped:
        notes.append(f"{len(skipped)} products have a blank catalogue photo and got none")
    if len(catalogue) < rows["product_id"].nunique():
        notes.append(
            f"{rows['product_id'].nunique() - len(catalogue)} products have no catalogue photo "
            "(no row without a box) and got none"
        )
    return Summary(target, written, notes)
