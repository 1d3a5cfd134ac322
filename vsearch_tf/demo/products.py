"""Procedural products: a :class:`Design` (silhouette, colours, pattern, emblem) and its drawing.

Only numpy and PIL touch pixels and every random draw comes from the generator passed in, so a
design and its image depend on nothing else.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

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


# A silhouette and a base colour (hue, saturation, value) shared by a few confusable products.
Family = tuple[str, float, float, float]


def random_family(rng: np.random.Generator, silhouette: str | None = None) -> Family:
    """A family of products; ``silhouette`` fixes its shape, otherwise it is drawn too."""
    return (
        silhouette or SILHOUETTES[rng.integers(len(SILHOUETTES))],
        float(rng.random()),
        float(rng.uniform(0.45, 0.95)),
        float(rng.uniform(0.4, 0.95)),
    )


def random_design(rng: np.random.Generator, family: Family | None = None) -> Design:
    """Draw a design; with ``family`` the silhouette is the family's and the main colour near it."""
    silhouette, h, s, v = family if family is not None else random_family(rng)
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
    """The product alone: an RGBA ``size`` x ``size`` image, transparent (white) outside it."""
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
    near_edge = np.asarray(mask.filter(ImageFilter.BoxBlur(s // 64 + 1))) < 235
    idx[(np.asarray(mask) > 127) & near_edge] = 3
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
