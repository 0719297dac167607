"""Candidate sub-images: grid boxes at several scales, and the pixel handling around them.

Boxes are ``(x0, y0, x1, y1)`` in pixels of the original image, half-open, as PIL's
``Image.crop`` takes them. A ``g``-grid splits the image into ``g × g`` cells that
follow the image's aspect ratio; ``overlap`` widens every cell by that fraction of
its size on each side (clipped to the image).

*Bridges* cover what the grids leave open. With grids 2 and 3, an object lying across a
2×2 line is inside some 3×3 cell and one across a 3×3 line inside some 2×2 cell — except
where a line of one grid crosses a line of the other: there it is in no cell. A bridge is a
window centred on such a crossing, reaching ``BRIDGE_REACH`` of each side around it, so
every object of at most ``BRIDGE_REACH`` of the image's short side lies wholly inside some
candidate (``tests/core/test_crops.py`` checks it over random boxes and aspect ratios). Grids
2 and 3 need four bridges. Where bridges go depends on the grids only, never on the image, so
the number of candidates is fixed by the configuration — it is what the server profiles for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]


# The largest object (as a fraction of the image's short side) that bridges guarantee a candidate for.
BRIDGE_REACH = 1 / 6
FracBox = tuple[float, float, float, float]


def _grid_cells(grids: Sequence[int], overlap: float) -> list[FracBox]:
    """Every grid cell in fractions of the image's width and height (unclipped), in candidate order."""
    cells: list[FracBox] = []
    for g in grids:
        for row in range(g):
            for col in range(g):
                cells.append(((col - overlap) / g, (row - overlap) / g, (col + 1 + overlap) / g, (row + 1 + overlap) / g))
    return cells


@functools.lru_cache(maxsize=256)
def bridge_boxes(grids: tuple[int, ...], overlap: float = 0.0) -> tuple[FracBox, ...]:
    """The bridges of ``grids`` in fractions of the image (row-major by centre).

    A crossing of a line of one grid with a line of another gets a bridge unless some cell
    already holds the square reaching ``BRIDGE_REACH`` around it (in fractions of each side that
    square is the worst case of every aspect ratio: an object of ``BRIDGE_REACH`` of the short side
    spans at most that fraction of either side). A single grid gets none (its lines cut objects
    everywhere along them, not only at crossings), nor do grids whose cells are all smaller than
    the square (no window of theirs could hold such an object either).
    """
    if len(grids) < 2 or 1 / min(grids) < 2 * BRIDGE_REACH:
        return ()
    cells = _grid_cells(grids, overlap)
    own = {g: {i / g for i in range(1, g)} for g in grids}
    r = BRIDGE_REACH
    bridges: list[FracBox] = []
    points = sorted({(x, y) for a in grids for b in grids if a != b for x in own[a] for y in own[b]},
                    key=lambda p: (p[1], p[0]))
    for x, y in points:
        need = (max(0.0, x - r), max(0.0, y - r), min(1.0, x + r), min(1.0, y + r))
        if not any(_holds(c, need) for c in cells):
            bridges.append(need)
    return tuple(bridges)


def _holds(outer: FracBox, inner: FracBox, eps: float = 1e-9) -> bool:
    return (outer[0] <= inner[0] + eps and outer[1] <= inner[1] + eps
            and outer[2] >= inner[2] - eps and outer[3] >= inner[3] - eps)


def num_candidates(grids: Sequence[int], bridges: bool = True, overlap: float = 0.0) -> int:
    return sum(g * g for g in grids) + (len(bridge_boxes(tuple(grids), float(overlap))) if bridges else 0)


def candidate_groups(grids: Sequence[int], bridges: bool = True, overlap: float = 0.0) -> list[int]:
    """Which group each candidate is ranked in (``rank_scores``): its grid's index; the bridges, a
    group of their own after the grids' (docs/design.md, "Bridges")."""
    groups = [i for i, g in enumerate(grids) for _ in range(g * g)]
    if bridges:
        groups += [len(grids)] * len(bridge_boxes(tuple(grids), float(overlap)))
    return groups


def candidate_boxes(width: int, height: int, grids: Sequence[int] = (2, 3), overlap: float = 0.0,
                    bridges: bool = True) -> list[Box]:
    """All grid cells, coarse grids first, row-major within a grid, then the bridges (if asked).
    Never empty boxes, even for 1×1 images."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    fractions = _grid_cells(grids, overlap)
    if bridges:
        fractions += bridge_boxes(tuple(grids), float(overlap))
    return [clip_box(x0 * width, y0 * height, x1 * width, y1 * height, width, height)
            for x0, y0, x1, y1 in fractions]


def clip_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> Box:
    """A non-empty integer box inside a ``width`` × ``height`` image."""
    ix0 = min(max(math.floor(x0), 0), width - 1)
    iy0 = min(max(math.floor(y0), 0), height - 1)
    ix1 = max(min(math.ceil(x1), width), ix0 + 1)
    iy1 = max(min(math.ceil(y1), height), iy0 + 1)
    return ix0, iy0, ix1, iy1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB, without the surprises of a bare ``convert("RGB")``.

    16-bit and 32-bit integer/float images are rescaled by their value range (a plain
    convert clips them to white); transparency is composited on white (as vLLM's
    media loader does); palette, CMYK, 1-bit and grayscale convert directly.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def mean_fill(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """The 8-bit colour of an image processor's mean: what padding to a square fills with."""
    return tuple(int(round(255 * m)) for m in image_mean)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: pad the short side so a center crop loses nothing."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


MAX_WINDOWS = 4
# how ψ fits a non-square region to its square input (``SemClipConfig.relevance_fit``); here, beside
# square_windows, so the CLI and the trainers can name them without importing vLLM
RELEVANCE_FITS: tuple[str, ...] = ("windows", "pad", "center")
# how ψ's scores of candidates from different grids are compared (``SemClipConfig.relevance_norm``)
RELEVANCE_NORMS: tuple[str, ...] = ("grid", "none")


def rank_scores(scores: Sequence[float], grids: Sequence[int], norm: str = "grid", bridges: bool = True,
                overlap: float = 0.0) -> list[float]:
    """The scores candidates are ranked by: ψ's own (``none``) or standardised within each grid.

    ``grid``: each candidate's score less the mean of its grid's cells, over their standard
    deviation (a grid of one cell, or of equal scores, gives 0). Why: a coarse cell and a fine cell
    holding the same detail are scored on windows of different sizes, and ψ's cosines are not on
    one scale across sizes — a coarse cell holds more of everything and its raw score wins ties the
    VLM would rather lose, since it reads a detail better in the finer cell that shows it larger
    (docs/design.md, "Comparing grids"). Standardised, a cell is ranked
    by how far it stands out among its own grid's cells; the bridges among the bridges
    (``candidate_groups``). ``scores`` are in ``candidate_boxes`` order.
    """
    if norm not in RELEVANCE_NORMS:
        raise ValueError(f"norm must be one of {RELEVANCE_NORMS}, got {norm!r}")
    groups = candidate_groups(grids, bridges, overlap)
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores for grids {list(grids)} ({len(groups)} candidates)")
    values = [float(x) for x in scores]
    return values if norm == "none" else standardise_within(values, groups)


def standardise_within(values: Sequence[float], groups: Sequence[int]) -> list[float]:
    """Each value less its group's mean, over the group's standard deviation (0 for a flat group):
    the ``grid`` ranking of ``rank_scores`` for any grouping of the candidates."""
    ranked = [0.0] * len(values)
    for group in set(groups):
        members = [i for i, gi in enumerate(groups) if gi == group]
        cell = [values[i] for i in members]
        mean = sum(cell) / len(cell)
        std = math.sqrt(sum((x - mean) ** 2 for x in cell) / len(cell))
        for i in members:
            ranked[i] = (values[i] - mean) / std if std > 1e-12 else 0.0
    return ranked


def top_indices(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k best scores; ties go to the earlier (coarser) candidate — the order
    ``select_crops`` serves, which validation and the benchmarks must pick by too."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def square_windows(box: Box, max_windows: int = MAX_WINDOWS) -> list[Box]:
    """The fewest squares of the box's short side that cover it, evenly spaced along its long
    side (overlapping where the sides do not divide); a square box is its own one window.

    How ψ looks at a non-square region (``relevance_fit="windows"``): every pixel of the
    region at its own aspect, with no padding band for a CLIP that never saw one. Beyond
    ``max_windows`` (a region longer than 4:1) the windows lengthen instead of multiplying —
    ``max_windows`` equal slices, each then padded — so ψ's cost per region stays bounded.
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    side, long_side = min(w, h), max(w, h)
    n = min(max_windows, math.ceil(long_side / side))
    if n == 1:
        return [box]
    length = max(side, math.ceil(long_side / n))
    starts = [round(i * (long_side - length) / (n - 1)) for i in range(n)]
    if w > h:
        return [(x0 + s, y0, x0 + s + length, y1) for s in starts]
    return [(x0, y0 + s, x1, y0 + s + length) for s in starts]


def crop_boxes(image: Image.Image, boxes: Sequence[Box]) -> list[Image.Image]:
    return [image.crop(box) for box in boxes]
