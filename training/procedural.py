"""Procedural images that need no download, in the spirit of VTAB's structured group.

Every image is a pure function of ``(task, index, seed)``, so a dataset is reproducible, costs no disk, and
train/val/test never overlap (they use different seeds). Five downstream tasks probe different abilities:

- ``count``: how many shapes (1..6);
- ``location``: which cell of a 3x3 grid holds the single shape;
- ``orientation``: the angle of a bar, in 8 bins over 180 degrees;
- ``shape``: which of 6 shapes, at random position, size and colour;
- ``texture``: which of 6 fill patterns over the whole image.

``upstream`` is the pretraining set for the demo backbone: shape x colour x texture (6 x 6 x 4 = 144
classes) at random position and size, so a backbone must learn form, colour and pattern, plus 44 letter
glyphs (Pillow's bundled font, rotated, scaled, coloured; no digits, so the digits task stays unseen) for
stroke shapes. Half of the images are letters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
COLOURS = ((230, 60, 60), (60, 200, 80), (70, 100, 240), (240, 220, 60), (200, 80, 220), (240, 240, 240))
TEXTURES = ("solid", "hstripes", "vstripes", "checker", "dots", "diagonal")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghijkmnpqrty"  # lower case only where it differs
TASKS: dict[str, list[str]] = {
    "count": [str(n) for n in range(1, 7)],
    "location": [f"r{r}c{c}" for r in range(3) for c in range(3)],
    "orientation": [f"deg{i * 180 // 8:03d}" for i in range(8)],
    "shape": list(SHAPES),
    "texture": list(TEXTURES),
    "upstream": [f"{s}-{c}-{t}" for s in SHAPES for c in range(len(COLOURS)) for t in TEXTURES[:4]]
    + [f"letter-{ch}" for ch in LETTERS],
}
SHAPE_CLASSES = len(SHAPES) * len(COLOURS) * 4


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape around (cx, cy) with circumradius r, rotated by ``angle``."""
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "diamond":
        pts = [(k * math.pi / 2, r * (1.0 if k % 2 else 0.6)) for k in range(4)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else r * 0.45) for k in range(10)]
    else:  # cross
        w = r * 0.35
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
        corners += [(-x, -y) for x, y in corners]
        return [
            (cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
            for x, y in corners
        ]
    return [(cx + d * math.cos(a + angle), cy + d * math.sin(a + angle)) for a, d in pts]


def _texture(kind: str, colour: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A SIZE x SIZE x 3 pattern in ``colour`` on a dark background, with a random phase."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    period = int(rng.integers(6, 10))
    phase = int(rng.integers(0, period))
    masks = {
        "solid": np.ones_like(xx, dtype=bool),
        "hstripes": ((yy + phase) % period) < period // 2,
        "vstripes": ((xx + phase) % period) < period // 2,
        "checker": (((xx + phase) // (period // 2 + 1) + (yy // (period // 2 + 1))) % 2) == 0,
        "dots": (((xx + phase) % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < 5,
        "diagonal": ((xx + yy + phase) % period) < period // 2,
    }
    img = np.full((SIZE, SIZE, 3), 25, dtype=np.uint8)
    img[masks[kind]] = colour
    return img


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill: Any
) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def _background(rng: np.random.Generator) -> Image.Image:
    """Dark noisy background so that no task is solvable from a constant pixel."""
    noise = rng.integers(0, 40, size=(SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(noise, "RGB")


def _upstream(rng: np.random.Generator, label: int) -> Image.Image:
    shape_i, rest = divmod(label, len(COLOURS) * 4)
    colour_i, texture_i = divmod(rest, 4)
    pattern = Image.fromarray(_texture(TEXTURES[texture_i], COLOURS[colour_i], rng), "RGB")
    mask = Image.new("L", (SIZE, SIZE), 0)
    r = float(rng.uniform(14, 26))
    cx, cy = (float(v) for v in rng.uniform(r * 0.8, SIZE - r * 0.8, size=2))
    _draw_shape(ImageDraw.Draw(mask), SHAPES[shape_i], cx, cy, r, float(rng.uniform(0, 2 * math.pi)), 255)
    img = _background(rng)
    img.paste(pattern, (0, 0), mask)
    return img


def _letter(rng: np.random.Generator, label: int) -> Image.Image:
    size = int(rng.integers(26, 46))
    glyph = Image.new("L", (SIZE, SIZE), 0)
    font = ImageFont.load_default(size=size)
    ImageDraw.Draw(glyph).text((SIZE / 2, SIZE / 2), LETTERS[label], font=font, fill=255, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.Resampling.BILINEAR)
    glyph = glyph.transform(
        (SIZE, SIZE),
        Image.Transform.AFFINE,
        (1, 0, float(rng.uniform(-10, 10)), 0, 1, float(rng.uniform(-10, 10))),
    )
    img = _background(rng)
    img.paste(COLOURS[int(rng.integers(len(COLOURS)))], (0, 0), glyph)
    return img


def _count(rng: np.random.Generator, label: int) -> Image.Image:
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    cells = rng.permutation(16)[: label + 1]  # a 4x4 grid keeps shapes apart, so counting is well-posed
    for cell in cells:
        cx, cy = (cell % 4) * 16 + 8 + rng.uniform(-2, 2), (cell // 4) * 16 + 8 + rng.uniform(-2, 2)
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        _draw_shape(draw, SHAPES[int(rng.integers(len(SHAPES)))], cx, cy, 5.5, 0.0, colour)
    return img


def _location(rng: np.random.Generator, label: int) -> Image.Image:
    img = _background(rng)
    row, col = divmod(label, 3)
    cx = col * SIZE / 3 + SIZE / 6 + rng.uniform(-4, 4)
    cy = row * SIZE / 3 + SIZE / 6 + rng.uniform(-4, 4)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, 7, 0.0, COLOURS[int(rng.integers(len(COLOURS)))])
    return img


def _orientation(rng: np.random.Generator, label: int) -> Image.Image:
    img = _background(rng)
    angle = (label + rng.uniform(-0.3, 0.3)) * math.pi / 8
    cx, cy = (float(v) for v in rng.uniform(24, 40, size=2))
    length, width = rng.uniform(18, 26), 3.0
    dx, dy, px, py = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
    pts = [
        (cx + s * length * dx + t * width * px, cy + s * length * dy + t * width * py)
        for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))
    ]
    ImageDraw.Draw(img).polygon(pts, fill=COLOURS[int(rng.integers(len(COLOURS)))])
    return img


def _shape(rng: np.random.Generator, label: int) -> Image.Image:
    img = _background(rng)
    r = float(rng.uniform(10, 22))
    cx, cy = (float(v) for v in rng.uniform(r, SIZE - r, size=2))
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    _draw_shape(ImageDraw.Draw(img), SHAPES[label], cx, cy, r, float(rng.uniform(0, 2 * math.pi)), colour)
    return img


def _texture_task(rng: np.random.Generator, label: int) -> Image.Image:
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    return Image.fromarray(_texture(TEXTURES[label], colour, rng), "RGB")


_RENDER = {
    "count": _count,
    "location": _location,
    "orientation": _orientation,
    "shape": _shape,
    "texture": _texture_task,
    "upstream": _upstream,
}


def render(task: str, index: int, seed: int) -> tuple[Image.Image, int]:
    """Image number ``index`` of ``task`` under ``seed``: labels cycle so every split is balanced."""
    rng = np.random.default_rng([seed, index, len(task)])
    if task == "upstream" and index % 2 == 1:  # every other image is a letter
        letter = (index // 2) % len(LETTERS)
        return _letter(rng, letter), SHAPE_CLASSES + letter
    label = (index // 2) % SHAPE_CLASSES if task == "upstream" else index % len(TASKS[task])
    return _RENDER[task](rng, label), label
