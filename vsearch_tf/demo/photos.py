"""Photos of a product: the clean catalogue shot, and a shopper's shot with its bounding box.

A shopper photo is the product scaled, rotated, pasted on a cluttered scene with distractor
products, then re-lit, sometimes blurred, and given sensor noise, all drawn from the generator
passed in.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vsearch_tf.demo.products import Design, random_design, render_product


def seller_photo(design: Design, size: int, transparent: bool = False) -> Image.Image:
    """Studio catalogue photo: the product upright and centred on white (or on transparency)."""
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 0 if transparent else 255))
    inner = round(size * 0.9)
    off = (size - inner) // 2
    canvas.alpha_composite(render_product(design, inner), (off, off))
    return canvas if transparent else canvas.convert("RGB")


@functools.lru_cache(maxsize=4)
def _master(design: Design, size: int) -> Image.Image:
    """A product rendered once at the largest size a shopper photo needs; its photos shrink it."""
    return render_product(design, size)


def _plain(rng: np.random.Generator, size: int, design: Design) -> Image.Image:
    """A flat background far from every product colour, so pixel tests can find the product."""
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
    alpha = obj.getchannel("A").point(lambda a: 255 if a >= 128 else 0)  # at least half product
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
    return _camera(img.convert("RGB"), rng, noise=clutter), bbox, mask


def _camera(rgb: Image.Image, rng: np.random.Generator, noise: bool) -> Image.Image:
    """Optics, then light, then sensor: sometimes blur, re-light and tint, add noise if ``noise``.

    Blurring first is equivalent (blur is linear, the re-lighting a per-channel affine map) and
    saves a float round trip.
    """
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
    if noise:
        grain = rng.standard_normal(arr.shape, dtype=np.float32)  # draw order fixes the bytes
        arr += grain * np.float32(rng.uniform(1, 6))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
