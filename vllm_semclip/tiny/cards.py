"""Training and test material for the tiny models: cards, tiles and mosaics.

A *card* is one easy-VQA-style coloured shape drawn on a real-photo background; a *tile*
is a model-input-sized image holding 1–3 cards of distinct shapes (so every named shape
is unique in it, as in the benchmark). Cards are drawn at the sizes they have inside a
candidate crop of a benchmark scene (:mod:`vllm_semclip.eval.benchdata`): 1/17–1/7 of the tile
side, with the same colours, shapes, outline and photos.

Why a card is rendered 4× larger and reduced: in the benchmark a shape is drawn on a
2000-px canvas and reduced with antialiasing when the crop is resized to the tile, so its
edges are soft. Drawing it directly at 20 px would give the models hard, aliased edges
they never meet at serving time.

Every generator takes a ``random.Random`` so that a split is reproducible from a seed.

``render``: with a :class:`~vllm_semclip.tiny.render.RenderDistribution`, a tile's background,
shades, card styles and finish come from that distribution (its training split for training
material) instead of the first generator's one palette and outlined shapes on 12 photos.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from vllm_semclip.tiny.scenes import COLORS, SHAPES, Placed, background_names, draw_shape, find_box, load_photo

if TYPE_CHECKING:
    from vllm_semclip.tiny.render import RenderDistribution

CAPTIONS: tuple[str, ...] = tuple(f"a {c} {s}" for s in SHAPES for c in COLORS)  # 24, easy-VQA's vocabulary
SUPERSAMPLE = 4
# shape side as a fraction of the tile side, as in the grid-2 and grid-3 crops of a benchmark scene
CROP_SIDE_RANGE = (1 / 17, 1 / 6.5)
VISIBLE_SIDE_RANGE = (1 / 12, 1 / 7)  # the "visible at input size" held-out condition


def caption(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def attribute_question(shape: str) -> str:
    return f"What is the color of the {shape}?"


def attribute_option(shape: str, color: str) -> str:
    return f"The color of the {shape} is {color}."


def spatial_question(a: str, b: str) -> str:
    return f"Is the {a} on the left or right side of the {b}?"


def spatial_option(a: str, b: str, side: str) -> str:
    return f"The {a} is on the {side} side of the {b}."


def photo_background(rng: random.Random, size: int) -> Image.Image:
    """A random square region (15–100% of the short side) of one of the benchmark's photos."""
    photo = load_photo(rng.choice(background_names()))
    pw, ph = photo.size
    side = max(16, int(min(pw, ph) * rng.uniform(0.15, 1.0)))
    x0, y0 = rng.randint(0, pw - side), rng.randint(0, ph - side)
    region = photo.crop((x0, y0, x0 + side, y0 + side))
    if rng.random() < 0.5:
        region = region.transpose(Image.FLIP_LEFT_RIGHT)
    return region.resize((size, size), Image.BILINEAR)


def paste_card(image: Image.Image, shape: str, color: str, box: tuple[int, int, int, int]) -> Placed:
    """Draw ``shape`` into ``box`` (x, y, w, h) of ``image``, rendered large and reduced (soft edges)."""
    x, y, w, h = box
    s = SUPERSAMPLE
    big = Image.new("RGBA", (w * s, h * s), (0, 0, 0, 0))
    draw_shape(ImageDraw.Draw(big), shape, COLORS[color], (0, 0, w * s, h * s))
    small = big.resize((w, h), Image.LANCZOS)
    image.paste(small, (x, y), small)
    return Placed(shape, color, box)


@dataclass
class Tile:
    """A tile and the cards on it."""

    image: Image.Image
    cards: list[Placed]


def card_tile(
    rng: random.Random,
    size: int = 224,
    *,
    shapes: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    n_cards: int = 1,
    side_range: tuple[float, float] = CROP_SIDE_RANGE,
    min_dx: bool = False,
    render: RenderDistribution | None = None,
) -> Tile:
    """A ``size``-px photo tile with ``n_cards`` cards of distinct shapes (random unless given).

    ``min_dx`` keeps the first two cards at least one card side apart horizontally, so
    "left or right" has one answer. ``render``: draw from that distribution (module docstring).
    """
    shapes = list(shapes) if shapes is not None else rng.sample(SHAPES, n_cards)
    colors = list(colors) if colors is not None else [rng.choice(list(COLORS)) for _ in shapes]
    if len(set(shapes)) != len(shapes) or len(colors) != len(shapes):
        raise ValueError("a tile's shapes must be distinct and each needs a colour")
    image = photo_background(rng, size) if render is None else None
    side = max(4, round(size * rng.uniform(*side_range)))
    region = (1, 1, size - 1, size - 1)
    for _ in range(50):
        boxes: list[tuple[int, int, int, int]] = []
        try:
            for s in shapes:
                boxes.append(find_box(s, side, region, boxes, rng))
        except RuntimeError:
            continue
        if not min_dx or len(boxes) < 2 or abs((boxes[0][0] + boxes[0][2] / 2) - (boxes[1][0] + boxes[1][2] / 2)) >= side:
            break
    if render is not None:
        return rendered_tile(rng, size, shapes, colors, boxes, render)
    cards = [paste_card(image, s, c, b) for s, c, b in zip(shapes, colors, boxes)]
    return Tile(image, cards)


def rendered_tile(rng: random.Random, size: int, shapes: Sequence[str], colors: Sequence[str],
                  boxes: Sequence[tuple[int, int, int, int]], render: RenderDistribution) -> Tile:
    """A tile drawn by ``render`` at twice its size — background, cards, blur, noise and JPEG as a
    benchmark scene gets them — then reduced (soft edges, as in a reduced crop; twice is enough
    here, and a quarter of the pixels of ``SUPERSAMPLE``)."""
    from vllm_semclip.tiny.render import jpeg_roundtrip

    s = 2
    image, _ = render.background((size * s, size * s), rng, zoom=(0.15, 1.0))  # a crop's share of a scene
    for shape, color, (x, y, w, h) in zip(shapes, colors, boxes):
        render.draw(image, shape, color, (x * s, y * s, w * s, h * s), rng)
    image, quality = render.finish(image, rng)
    image = jpeg_roundtrip(image, quality).resize((size, size), Image.LANCZOS)
    return Tile(image, [Placed(sh, c, b) for sh, c, b in zip(shapes, colors, boxes)])


def mosaic(tiles: Sequence[Image.Image], grid: int = 3) -> Image.Image:
    """``grid``×``grid`` equal tiles side by side, row-major (the 3×3 cell-pick test)."""
    size = tiles[0].size[0]
    out = Image.new("RGB", (size * grid, size * grid))
    for i, tile in enumerate(tiles):
        out.paste(tile, ((i % grid) * size, (i // grid) * size))
    return out
