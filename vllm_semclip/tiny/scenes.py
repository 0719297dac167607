"""Scenes with small coloured shapes on real photos: the material of the V*-style benchmark.

The vocabulary is easy-VQA's (3 shapes × 8 colours = 24 "a {color} {shape}" captions), drawn
here at any size. Backgrounds are real photos and textures that ship in packages
(scikit-image's data, matplotlib's sample photo), cropped and resized to the canvas.

Sizes are chosen so the detail really is lost in the overview: on a 1500–2700 px canvas a
shape is 1/22–1/36 of the canvas side, i.e. 3–10 px once the whole image is shrunk to a
224-px tile, but at least 1/12 of a 3×3 cell — visible again in the right crop.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 70, 225),
    "yellow": (245, 210, 40),
    "teal": (0, 150, 150),
    "brown": (135, 80, 30),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
                           "hubble_deep_field", "motorcycle_left", "brick", "grass", "gravel")


@dataclass(frozen=True)
class Placed:
    """One drawn shape: its name, colour and box ``(x, y, w, h)`` in pixels."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> Image.Image:
    if name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")
    from skimage import data

    if name == "motorcycle_left":
        arr = data.stereo_motorcycle()[0]
    else:
        arr = getattr(data, name)()
    return Image.fromarray(arr).convert("RGB")


def background_names() -> tuple[str, ...]:
    return (*PHOTOS, "grace_hopper")


def background(name: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A random crop of a photo, resized to ``size`` (the crop keeps the canvas's aspect ratio)."""
    photo = load_photo(name)
    w, h = size
    pw, ph = photo.size
    scale = rng.uniform(0.6, 1.0)
    cw = min(pw, int(ph * scale * w / h)) if w / h <= pw / ph else int(pw * scale)
    ch = int(cw * h / w)
    ch = min(ch, ph)
    cw = min(cw, int(ch * w / h))
    x0 = rng.randint(0, max(0, pw - cw))
    y0 = rng.randint(0, max(0, ph - ch))
    region = photo.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        region = region.transpose(Image.FLIP_LEFT_RIGHT)
    return region.resize(size, Image.BICUBIC)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: tuple[int, int, int], box: tuple[int, int, int, int],
               outlined: bool = True) -> None:
    """Draw ``shape`` filling ``box`` = (x, y, w, h), with a thin contrasting outline unless ``outlined`` is off."""
    x, y, w, h = box
    outline = ((255, 255, 255) if sum(color) < 300 else (0, 0, 0)) if outlined else None
    width = max(1, round(min(w, h) / 18)) if outlined else 0
    if shape == "circle":
        draw.ellipse([x, y, x + w - 1, y + h - 1], fill=color, outline=outline, width=width)
    elif shape == "rectangle":
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=color, outline=outline, width=width)
    elif shape == "triangle":
        draw.polygon([(x + w / 2, y), (x, y + h - 1), (x + w - 1, y + h - 1)], fill=color, outline=outline, width=width)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def shape_box(shape: str, side: int, x: int, y: int, rng: random.Random) -> tuple[int, int, int, int]:
    """The box of a shape of nominal size ``side`` at (x, y); rectangles get a random aspect."""
    if shape == "rectangle":
        aspect = rng.uniform(0.6, 1.6)
        return x, y, max(2, round(side * math.sqrt(aspect))), max(2, round(side / math.sqrt(aspect)))
    return x, y, side, side


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return not (ax + aw + margin <= bx or bx + bw + margin <= ax or ay + ah + margin <= by or by + bh + margin <= ay)


def find_box(
    shape: str,
    side: int,
    region: tuple[int, int, int, int],
    taken: list[tuple[int, int, int, int]],
    rng: random.Random,
    tries: int = 200,
    footprint: Callable[[tuple[int, int, int, int]], tuple[int, int, int, int]] | None = None,
) -> tuple[int, int, int, int]:
    """A free box for ``shape`` inside ``region`` (x0, y0, x1, y1), clear of the ``taken`` boxes by a
    third of ``side``; with ``footprint``, ``taken`` holds footprints and the box's own footprint
    (what its drawing covers, a card included) must touch none of them."""
    x0, y0, x1, y1 = region
    for _ in range(tries):
        _, _, w, h = shape_box(shape, side, 0, 0, rng)
        box = (rng.randint(x0, max(x0, x1 - w)), rng.randint(y0, max(y0, y1 - h)), w, h)
        probe, margin = (box, side // 3) if footprint is None else (footprint(box), 0)
        if not any(_overlaps(probe, t, margin) for t in taken):
            return box
    raise RuntimeError("could not place a shape without overlap")


def place(
    draw: ImageDraw.ImageDraw,
    shape: str,
    color: str,
    side: int,
    region: tuple[int, int, int, int],
    taken: list[tuple[int, int, int, int]],
    rng: random.Random,
) -> Placed:
    """Draw a shape somewhere inside ``region`` without touching ``taken`` boxes (and take its box)."""
    box = find_box(shape, side, region, taken, rng)
    draw_shape(draw, shape, COLORS[color], box)
    taken.append(box)
    return Placed(shape, color, box)
