"""A procedural, download-free product-retrieval dataset in the MCS2023 / Products-10K layout.

Why: the real datasets are large, licensed and need a network; tests, demos and smoke trainings
need data that is small, instant and reproducible. Every product is a procedural *design*
(silhouette + two colours + pattern + optional emblem). Products come in *families* that share a
silhouette and a hue, so near-duplicates exist and retrieval is not trivial. Each product gets one
clean catalogue ("seller") photo and a few "shopper" photos: the product scaled, rotated, re-lit,
sometimes blurred, pasted on a cluttered scene with distractor objects, with its bounding box.

Determinism: every image draws from its own ``numpy.random.Generator`` seeded by
``(seed, stream, index...)``; only numpy and PIL touch pixels, so the same seed and the same
Pillow/libjpeg give byte-identical files, and one image does not depend on how many came before.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from vsearch_tf.errors import VSearchError
from vsearch_tf.io import atomic_path

__all__ = [
    "Design",
    "SILHOUETTES",
    "PATTERNS",
    "random_design",
    "render_product",
    "seller_photo",
    "user_photo",
    "generate",
]

RGB = tuple[int, int, int]
Point = tuple[float, float]

PATTERNS: tuple[str, ...] = (
    "plain",
    "stripes",
    "diagonal",
    "dots",
    "checks",
    "band",
    "rings",
    "split",
)
_LETTERS = "ABDEHKMNRSTXZ"
_SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing for masks and patterns

# Stream tags for the per-image generators (never reorder: it would change every dataset).
_S_CATALOGUE, _S_DESIGN, _S_SELLER, _S_USER = 0, 1, 2, 3


@dataclass(frozen=True)
class Design:
    """Everything needed to redraw one product at any size."""

    silhouette: str
    pattern: str
    main: RGB
    secondary: RGB
    period: float  # pattern scale, as a fraction of the product canvas
    vertical: bool  # stripes/band/split orientation; diagonal direction
    emblem: str | None  # "dot", "ring", "square" or one capital letter
    emblem_colour: RGB


# --- silhouettes: (draw body mask, draw accent mask, emblem centre + size) in unit coordinates ---


def _poly(d: ImageDraw.ImageDraw, s: int, pts: list[Point]) -> None:
    d.polygon([(x * s, y * s) for x, y in pts], fill=255)


def _box(b: tuple[float, float, float, float], s: int) -> list[float]:
    return [v * s for v in b]


def _regular(n: int, r: float, c: Point = (0.5, 0.5), phase: float = -math.pi / 2) -> list[Point]:
    return [
        (
            c[0] + r * math.cos(phase + 2 * math.pi * k / n),
            c[1] + r * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _star(c: Point = (0.5, 0.54), ro: float = 0.46, ri: float = 0.2) -> list[Point]:
    return [
        (
            c[0] + (ro if k % 2 == 0 else ri) * math.cos(-math.pi / 2 + math.pi * k / 5),
            c[1] + (ro if k % 2 == 0 else ri) * math.sin(-math.pi / 2 + math.pi * k / 5),
        )
        for k in range(10)
    ]


def _body_circle(d: ImageDraw.ImageDraw, s: int) -> None:
    d.ellipse(_box((0.07, 0.07, 0.93, 0.93), s), fill=255)


def _body_rsquare(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rounded_rectangle(_box((0.1, 0.1, 0.9, 0.9), s), radius=0.14 * s, fill=255)


def _body_triangle(d: ImageDraw.ImageDraw, s: int) -> None:
    _poly(d, s, [(0.5, 0.06), (0.94, 0.88), (0.06, 0.88)])


def _body_star(d: ImageDraw.ImageDraw, s: int) -> None:
    _poly(d, s, _star())


def _body_hexagon(d: ImageDraw.ImageDraw, s: int) -> None:
    _poly(d, s, _regular(6, 0.45, phase=0.0))


def _body_diamond(d: ImageDraw.ImageDraw, s: int) -> None:
    _poly(d, s, [(0.5, 0.04), (0.86, 0.5), (0.5, 0.96), (0.14, 0.5)])


def _body_bottle(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rounded_rectangle(_box((0.28, 0.4, 0.72, 0.95), s), radius=0.08 * s, fill=255)
    d.ellipse(_box((0.28, 0.26, 0.72, 0.54), s), fill=255)
    d.rectangle(_box((0.42, 0.1, 0.58, 0.32), s), fill=255)
    d.rectangle(_box((0.39, 0.04, 0.61, 0.13), s), fill=255)


def _accent_bottle(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rectangle(_box((0.39, 0.04, 0.61, 0.13), s), fill=255)


def _body_mug(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rounded_rectangle(_box((0.1, 0.18, 0.7, 0.9), s), radius=0.07 * s, fill=255)
    d.ellipse(_box((0.54, 0.32, 0.93, 0.72), s), outline=255, width=max(1, round(0.08 * s)))


def _accent_mug(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rectangle(_box((0.1, 0.18, 0.7, 0.26), s), fill=255)


def _body_shoe(d: ImageDraw.ImageDraw, s: int) -> None:
    _poly(
        d,
        s,
        [
            (0.05, 0.78),
            (0.07, 0.34),
            (0.3, 0.28),
            (0.44, 0.46),
            (0.72, 0.5),
            (0.92, 0.6),
            (0.96, 0.8),
        ],
    )
    d.rounded_rectangle(_box((0.04, 0.74, 0.97, 0.86), s), radius=0.04 * s, fill=255)


def _accent_shoe(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rounded_rectangle(_box((0.04, 0.76, 0.97, 0.86), s), radius=0.04 * s, fill=255)


def _body_tshirt(d: ImageDraw.ImageDraw, s: int) -> None:
    _poly(
        d,
        s,
        [
            (0.3, 0.1),
            (0.42, 0.1),
            (0.5, 0.18),
            (0.58, 0.1),
            (0.7, 0.1),
            (0.96, 0.32),
            (0.84, 0.46),
            (0.76, 0.39),
            (0.76, 0.92),
            (0.24, 0.92),
            (0.24, 0.39),
            (0.16, 0.46),
            (0.04, 0.32),
        ],
    )


def _body_can(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rectangle(_box((0.24, 0.14, 0.76, 0.86), s), fill=255)
    d.ellipse(_box((0.24, 0.06, 0.76, 0.22), s), fill=255)
    d.ellipse(_box((0.24, 0.78, 0.76, 0.94), s), fill=255)


def _accent_can(d: ImageDraw.ImageDraw, s: int) -> None:
    d.ellipse(_box((0.24, 0.06, 0.76, 0.22), s), fill=255)


def _body_cross(d: ImageDraw.ImageDraw, s: int) -> None:
    d.rounded_rectangle(_box((0.34, 0.06, 0.66, 0.94), s), radius=0.05 * s, fill=255)
    d.rounded_rectangle(_box((0.06, 0.34, 0.94, 0.66), s), radius=0.05 * s, fill=255)


_Draw = Callable[[ImageDraw.ImageDraw, int], None]
_SHAPES: dict[str, tuple[_Draw, _Draw | None, Point, float]] = {
    "circle": (_body_circle, None, (0.5, 0.5), 0.3),
    "rounded_square": (_body_rsquare, None, (0.5, 0.5), 0.3),
    "triangle": (_body_triangle, None, (0.5, 0.62), 0.22),
    "star": (_body_star, None, (0.5, 0.56), 0.16),
    "hexagon": (_body_hexagon, None, (0.5, 0.5), 0.3),
    "diamond": (_body_diamond, None, (0.5, 0.5), 0.24),
    "bottle": (_body_bottle, _accent_bottle, (0.5, 0.68), 0.24),
    "mug": (_body_mug, _accent_mug, (0.4, 0.56), 0.26),
    "shoe": (_body_shoe, _accent_shoe, (0.3, 0.56), 0.18),
    "tshirt": (_body_tshirt, None, (0.5, 0.45), 0.24),
    "can": (_body_can, _accent_can, (0.5, 0.52), 0.26),
    "cross": (_body_cross, None, (0.5, 0.5), 0.2),
}
SILHOUETTES: tuple[str, ...] = tuple(_SHAPES)


# --- designs ---


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _family(
    rng: np.random.Generator, silhouette: str | None = None
) -> tuple[str, float, float, float]:
    """A silhouette and a base colour shared by a few related (confusable) products."""
    return (
        silhouette or SILHOUETTES[rng.integers(len(SILHOUETTES))],
        float(rng.random()),
        float(rng.uniform(0.45, 0.95)),
        float(rng.uniform(0.4, 0.95)),
    )


def random_design(
    rng: np.random.Generator, family: tuple[str, float, float, float] | None = None
) -> Design:
    """Draw a design; with ``family`` the silhouette is fixed and the main colour stays close to it."""
    silhouette, h, s, v = family if family is not None else _family(rng)
    main_v = v + rng.uniform(-0.08, 0.08)
    main = _hsv(h + rng.uniform(-0.035, 0.035), s + rng.uniform(-0.08, 0.08), main_v)
    # The secondary colour sits on the other side of the brightness range so patterns stay visible.
    sec_v = rng.uniform(0.12, 0.45) if main_v > 0.65 else rng.uniform(0.75, 1.0)
    secondary = _hsv(rng.random(), rng.uniform(0.0, 0.9), sec_v)
    emblem: str | None = None
    if rng.random() < 0.5:
        kind = rng.integers(4)
        emblem = (
            ("dot", "ring", "square")[kind] if kind < 3 else _LETTERS[rng.integers(len(_LETTERS))]
        )
    emblem_colour = (255, 255, 255) if main_v < 0.6 else (20, 20, 20)
    if rng.random() < 0.4:
        emblem_colour = _hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    return Design(
        silhouette=silhouette,
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        main=main,
        secondary=secondary,
        period=float(rng.uniform(0.12, 0.24)),
        vertical=bool(rng.random() < 0.5),
        emblem=emblem,
        emblem_colour=emblem_colour,
    )


def _pattern_mask(design: Design, s: int) -> np.ndarray:
    """Boolean (s, s): where the secondary colour shows. Computed in unit coordinates."""
    g = (np.arange(s, dtype=np.float32) + 0.5) / s
    u, v = np.meshgrid(g, g)
    if design.vertical:
        u, v = v, u
    p, name = design.period, design.pattern
    if name == "stripes":
        return (v / p) % 1.0 < 0.45
    if name == "diagonal":
        return ((u + v) / (1.4 * p)) % 1.0 < 0.5
    if name == "dots":
        du, dv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
        return du * du + dv * dv < 0.09
    if name == "checks":
        return (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    if name == "band":
        return np.abs(v - 0.5) < p * 0.9
    if name == "rings":
        return (np.hypot(u - 0.5, v - 0.5) / p) % 1.0 < 0.5
    if name == "split":
        return u < 0.5
    return np.zeros((s, s), bool)


@functools.lru_cache(maxsize=64)
def _shading(s: int) -> Image.Image:
    """Soft light from the top left: a multiplier from 1.0 down to about 0.72."""
    g = np.arange(s, dtype=np.float32) / s
    shade = 255 * (1.0 - 0.28 * (0.6 * g[None, :] + 0.4 * g[:, None]))
    return Image.fromarray(shade.round().astype(np.uint8), "L").convert("RGB")


@functools.lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(px, 6))


def render_product(design: Design, size: int, supersample: int = _SUPERSAMPLE) -> Image.Image:
    """The product alone: an RGBA ``size`` x ``size`` image, transparent (white) outside the product."""
    s = size * supersample
    body_fn, accent_fn, (ex, ey), esize = _SHAPES[design.silhouette]
    mask = Image.new("L", (s, s), 0)
    body_fn(ImageDraw.Draw(mask), s)
    # Palette indices: 0 main, 1 secondary (pattern), 2 accent part, 3 darker rim inside the outline
    # so the shape reads on any background. uint8 throughout: this runs thousands of times.
    idx = _pattern_mask(design, s).astype(np.uint8)
    if accent_fn is not None:
        accent = Image.new("L", (s, s), 0)
        accent_fn(ImageDraw.Draw(accent), s)
        idx[np.asarray(accent) > 127] = 2
    idx[
        (np.asarray(mask) > 127) & (np.asarray(mask.filter(ImageFilter.BoxBlur(s // 64 + 1))) < 235)
    ] = 3
    main, sec = np.asarray(design.main, np.float32), np.asarray(design.secondary, np.float32)
    palette = np.stack([main, sec, sec * 0.7, main * 0.55]).round().astype(np.uint8)
    img = ImageChops.multiply(Image.fromarray(palette[idx], "RGB"), _shading(s))
    if design.emblem is not None:
        d = ImageDraw.Draw(img)
        r = esize * s / 2
        cx, cy = ex * s, ey * s
        box = [cx - r, cy - r, cx + r, cy + r]
        if design.emblem == "dot":
            d.ellipse(box, fill=design.emblem_colour)
        elif design.emblem == "ring":
            d.ellipse(box, outline=design.emblem_colour, width=max(1, round(r * 0.35)))
        elif design.emblem == "square":
            d.rectangle(box, fill=design.emblem_colour)
        else:
            d.text(
                (cx, cy),
                design.emblem,
                fill=design.emblem_colour,
                font=_font(round(2.2 * r)),
                anchor="mm",
            )
    img.paste((255, 255, 255), mask=ImageChops.invert(mask))
    img.putalpha(mask)
    return img if supersample == 1 else img.resize((size, size), Image.Resampling.LANCZOS)


@functools.lru_cache(maxsize=4)
def _master(design: Design, size: int) -> Image.Image:
    """A product rendered once at the largest size a shopper photo needs; its photos shrink it."""
    return render_product(design, size)


# --- photos ---


def seller_photo(design: Design, size: int, transparent: bool = False) -> Image.Image:
    """Studio catalogue photo: the product upright and centred on white (or on transparency)."""
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 0 if transparent else 255))
    inner = round(size * 0.9)
    off = (size - inner) // 2
    canvas.alpha_composite(render_product(design, inner), (off, off))
    return canvas if transparent else canvas.convert("RGB")


def _plain(rng: np.random.Generator, size: int, design: Design) -> Image.Image:
    """A flat background far from every product colour, so the product can be found by pixel tests."""
    candidates = rng.integers(0, 256, (16, 3)).astype(np.float32)
    used = np.array([design.main, design.secondary, design.emblem_colour], np.float32)
    used = np.concatenate([used, used * 0.55, used * 0.7])  # rim and accent shades
    best = candidates[np.abs(candidates[:, None] - used[None]).max(-1).min(-1).argmax()]
    return Image.new("RGBA", (size, size), tuple(int(c) for c in best) + (255,))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    c0, c1 = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    g = np.arange(size, dtype=np.float32) / size
    t = np.clip(
        0.5 + (g[None, :] - 0.5) * math.cos(theta) + (g[:, None] - 0.5) * math.sin(theta), 0, 1
    )
    img = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8), "RGB").convert("RGBA")
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    if rng.random() < 0.5:  # a table or shelf surface
        d.rectangle(
            [0, int(rng.uniform(0.5, 0.85) * size), size, size],
            fill=tuple(int(c) for c in rng.integers(0, 256, 3)) + (255,),
        )
    for _ in range(int(rng.integers(4, 11))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(80, 256)),)
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.5, 2) * size
        kind = rng.integers(4)
        if kind == 0:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 2:
            d.line([x0, y0, x0 + w, y0 + h], fill=colour, width=int(rng.integers(1, 7)))
        else:
            d.polygon([tuple(p) for p in (rng.uniform(-0.1, 1.1, (3, 2)) * size)], fill=colour)
    img.alpha_composite(layer)
    for _ in range(int(rng.integers(1, 4))):  # distractor products, always behind the target
        # Distractors skip supersampling: they are small, rotated and only there to confuse.
        obj = render_product(
            random_design(rng), max(8, round(rng.uniform(0.2, 0.45) * size)), supersample=1
        )
        obj = obj.rotate(float(rng.uniform(-180, 180)), Image.Resampling.BILINEAR, expand=True)
        x, y = (rng.uniform(-0.2, 0.9, 2) * size).astype(int)
        _paste(img, obj, int(x), int(y))
    return img


def _paste(dst: Image.Image, src: Image.Image, x: int, y: int) -> None:
    """alpha_composite at a possibly negative / overhanging offset."""
    if x >= dst.width or y >= dst.height or x + src.width <= 0 or y + src.height <= 0:
        return
    dst.alpha_composite(src, (max(0, x), max(0, y)), (max(0, -x), max(0, -y)))


def user_photo(
    design: Design, size: int, rng: np.random.Generator, clutter: bool = True
) -> tuple[Image.Image, tuple[int, int, int, int], Image.Image]:
    """Shopper photo of ``design``: returns (RGB image, bbox ``x, y, w, h``, product alpha mask).

    The mask is the pasted product's alpha in image coordinates (before re-lighting and blur), so
    callers and tests can check the box against the truth rather than against pixels.
    """
    img = _background(rng, size) if clutter else _plain(rng, size, design)
    side = max(8, round(rng.uniform(0.35, 0.8) * size))
    obj = _master(design, round(0.8 * size)).resize((side, side), Image.Resampling.LANCZOS)
    obj = obj.rotate(float(rng.uniform(-30, 30)), Image.Resampling.BICUBIC, expand=True)
    alpha = obj.getchannel("A").point(
        lambda a: 255 if a >= 128 else 0
    )  # pixels at least half product
    bx0, by0, bx1, by1 = alpha.getbbox() or (0, 0, obj.width, obj.height)
    tw, th = bx1 - bx0, by1 - by0
    # Up to ~10% of the product may fall outside the frame, like a hurried phone photo.
    x = int(rng.integers(-int(0.1 * tw), max(-int(0.1 * tw), size - int(0.9 * tw)) + 1)) - bx0
    y = int(rng.integers(-int(0.1 * th), max(-int(0.1 * th), size - int(0.9 * th)) + 1)) - by0
    _paste(img, obj, x, y)
    mask = Image.new("L", (size, size), 0)
    mask.paste(alpha, (x, y))
    x0, y0 = max(0, x + bx0), max(0, y + by0)
    x1, y1 = min(size, x + bx1), min(size, y + by1)
    bbox = (x0, y0, max(1, x1 - x0), max(1, y1 - y0))

    # Optics, then light, then sensor. Blur first is equivalent (blur is linear, the re-lighting is a
    # per-channel affine map) and saves a float round trip.
    rgb = img.convert("RGB")
    if rng.random() < 0.35:
        rgb = rgb.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.2))))
    arr = np.asarray(rgb, np.float32)
    mean = float(arr.mean())
    contrast, brightness, temp = (
        rng.uniform(0.75, 1.25),
        rng.uniform(0.7, 1.3),
        rng.uniform(-0.12, 0.12),
    )
    gain = np.array([1 + temp, 1.0, 1 - temp], np.float32) * np.float32(brightness)
    arr = ((arr - mean) * np.float32(contrast) + mean) * gain
    if clutter:
        arr += rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(
            rng.uniform(1, 6)
        )
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return out, bbox, mask


# --- the dataset ---

_README = """\
# vsearch-tf procedural demo dataset (seed {seed})

Generated by `vsearch_tf.demo.generate` (no downloads); same seed -> identical files.
- `images/seller/<product_id>.jpg|png`: one clean catalogue photo per product (PNGs may be RGBA).
- `images/user/<user_img_id>.jpg`: {upp} shopper photos per product, cluttered, with a box.
- `train.csv`: img_path, product_id, bbox_x, bbox_y, bbox_w, bbox_h ({n_train} products; empty box = whole image).
- `val_gallery.csv` / `val_queries.csv`: {n_val} validation products, same format as below.
- `gallery.csv`: seller_img_id, img_path, product_id ({n_test} test products + train products as distractors).
- `queries.csv`: user_img_id, img_path, product_id, bbox_x, bbox_y, bbox_w, bbox_h (test products).
- `products.csv`: product_id, split, silhouette, pattern. Boxes are pixels x, y, w, h from the top-left.
"""


def _check(name: str, value: int, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise VSearchError(f"demo data: {name} must be an integer >= {low}, got {value!r}")


def generate(
    out_dir: str | Path,
    *,
    n_train: int = 150,
    n_val: int = 30,
    n_test: int = 100,
    users_per_product: int = 3,
    seed: int = 0,
    seller_size: int = 96,
    user_size: int = 160,
    overwrite: bool = False,
    clutter: bool = True,
) -> dict[str, int]:
    """Write the demo dataset to ``out_dir`` atomically and return row/image counts.

    ``clutter=False`` gives a flat background far from the product's colours, no distractors and
    no noise: only useful to check boxes by eye or in tests. Raises :class:`VSearchError` if ``out_dir`` is a
    file, or a non-empty folder and ``overwrite`` is false.
    """
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_val", n_val, 1),
        ("n_test", n_test, 1),
        ("users_per_product", users_per_product, 1),
        ("seed", seed, 0),
        ("seller_size", seller_size, 32),
        ("user_size", user_size, 48),
    ):
        _check(name, value, low)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VSearchError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise VSearchError(
            f"{out}: folder is not empty (pass overwrite=True / --overwrite to replace it)"
        )

    n = n_train + n_val + n_test
    cat = np.random.default_rng([seed, _S_CATALOGUE])
    shapes = cat.permutation(
        len(SILHOUETTES)
    )  # families cycle through silhouettes: balanced counts
    families = [_family(cat, SILHOUETTES[shapes[f % len(shapes)]]) for f in range(max(1, n // 3))]
    family_of = cat.integers(len(families), size=n)
    split = np.empty(n, dtype=object)  # shuffled, so related products straddle the splits
    split[cat.permutation(n)] = np.repeat(["train", "val", "test"], [n_train, n_val, n_test])

    products: list[dict] = []
    sellers: list[dict] = []
    users: list[dict] = []
    train: list[
        dict
    ] = []  # per train product: its seller photo (whole image), then its user photos
    with atomic_path(out) as tmp:
        (tmp / "images" / "seller").mkdir(parents=True)
        (tmp / "images" / "user").mkdir(parents=True)
        for k in range(n):
            pid = f"p{k:05d}"
            design = random_design(
                np.random.default_rng([seed, _S_DESIGN, k]), families[family_of[k]]
            )
            products.append(
                {
                    "product_id": pid,
                    "split": split[k],
                    "silhouette": design.silhouette,
                    "pattern": design.pattern,
                }
            )
            r = np.random.default_rng([seed, _S_SELLER, k]).random()
            ext, transparent = (".png", r < 2 / 9) if r < 1 / 3 else (".jpg", False)
            rel = f"images/seller/{pid}{ext}"
            img = seller_photo(design, seller_size, transparent)
            img.save(
                tmp / rel,
                **({"format": "PNG"} if ext == ".png" else {"format": "JPEG", "quality": 92}),
            )
            sellers.append(
                {
                    "seller_img_id": f"s{k:05d}",
                    "img_path": rel,
                    "product_id": pid,
                    "split": split[k],
                }
            )
            if split[k] == "train":
                train.append({"img_path": rel, "product_id": pid})
            for j in range(1, users_per_product + 1):
                rng = np.random.default_rng([seed, _S_USER, k, j])
                img, (bx, by, bw, bh), _ = user_photo(design, user_size, rng, clutter)
                rel = f"images/user/u{k:05d}_{j}.jpg"
                img.save(tmp / rel, format="JPEG", quality=int(rng.integers(60, 96)))
                users.append(
                    {
                        "user_img_id": f"u{k:05d}_{j}",
                        "img_path": rel,
                        "product_id": pid,
                        "bbox_x": bx,
                        "bbox_y": by,
                        "bbox_w": bw,
                        "bbox_h": bh,
                        "split": split[k],
                    }
                )
                if split[k] == "train":
                    train.append(
                        {c: v for c, v in users[-1].items() if c not in ("user_img_id", "split")}
                    )

        sel, usr = pd.DataFrame(sellers), pd.DataFrame(users)
        gallery_cols = ["seller_img_id", "img_path", "product_id"]
        query_cols = [
            "user_img_id",
            "img_path",
            "product_id",
            "bbox_x",
            "bbox_y",
            "bbox_w",
            "bbox_h",
        ]
        train_frame = pd.DataFrame(train, columns=query_cols[1:])
        train_frame[query_cols[3:]] = train_frame[query_cols[3:]].astype("Int64")  # empty, not 12.0
        tables = {
            "train.csv": train_frame,
            "val_gallery.csv": sel[sel.split == "val"][gallery_cols],
            "val_queries.csv": usr[usr.split == "val"][query_cols],
            "gallery.csv": sel[sel.split != "val"][gallery_cols],
            "queries.csv": usr[usr.split == "test"][query_cols],
            "products.csv": pd.DataFrame(products),
        }
        for name, frame in tables.items():
            frame.to_csv(tmp / name, index=False, lineterminator="\n")
        (tmp / "README.md").write_text(
            _README.format(
                seed=seed, upp=users_per_product, n_train=n_train, n_val=n_val, n_test=n_test
            )
        )
    counts = {
        "products": n,
        "train_products": n_train,
        "val_products": n_val,
        "test_products": n_test,
        "seller_images": len(sellers),
        "user_images": len(users),
    }
    counts.update(
        {
            name.removesuffix(".csv") + "_rows": len(frame)
            for name, frame in tables.items()
            if name != "products.csv"
        }
    )
    return counts
