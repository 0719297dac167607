"""Candidate boxes and image normalisation."""

import io

import numpy as np
import pytest
from PIL import Image

import random

from vllm_semclip.crops import (
    BRIDGE_REACH,
    bridge_boxes,
    candidate_boxes,
    candidate_groups,
    num_candidates,
    pad_to_square,
    square_windows,
    to_rgb,
)


def test_grid_cells_follow_aspect_ratio():
    boxes = candidate_boxes(300, 100, grids=(2, 3), bridges=False)
    assert len(boxes) == num_candidates((2, 3), bridges=False) == 13
    assert boxes[0] == (0, 0, 150, 50)
    assert boxes[3] == (150, 50, 300, 100)
    assert boxes[4] == (0, 0, 100, 34)  # 3x3 cells of a 300x100 image: 100 x 33.3
    # the cells of each grid tile the image exactly
    for start, g in ((0, 2), (4, 3)):
        area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes[start:start + g * g])
        assert area >= 300 * 100


def test_overlap_widens_cells_and_clips():
    plain = candidate_boxes(200, 200, grids=(2,))
    wide = candidate_boxes(200, 200, grids=(2,), overlap=0.25)
    assert len(wide) == len(plain)
    assert wide[0] == (0, 0, 125, 125)
    assert wide[3] == (75, 75, 200, 200)


@pytest.mark.parametrize("size", [(1, 1), (10, 3000), (3000, 10), (2, 5)])
def test_tiny_and_extreme_images_give_valid_boxes(size):
    w, h = size
    boxes = candidate_boxes(w, h, grids=(2, 3), overlap=0.1)
    assert len(boxes) == num_candidates((2, 3), overlap=0.1) == 17
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def _inside_some(box, candidates) -> bool:
    x0, y0, x1, y1 = box
    return any(c[0] <= x0 and c[1] <= y0 and x1 <= c[2] and y1 <= c[3] for c in candidates)


def _random_box(rng: random.Random, w: int, h: int, near=None) -> tuple[int, int, int, int]:
    """A box of at most BRIDGE_REACH of the short side, of random aspect, anywhere (or straddling ``near``)."""
    most = int(min(w, h) * BRIDGE_REACH)
    bw, bh = rng.randint(1, most), rng.randint(1, most)
    if near is None:
        x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
    else:
        x0 = min(max(0, round(near[0] * w) - rng.randint(0, bw)), w - bw)
        y0 = min(max(0, round(near[1] * h) - rng.randint(0, bh)), h - bh)
    return x0, y0, x0 + bw, y0 + bh


@pytest.mark.parametrize("seed", range(6))
def test_every_small_object_lies_inside_some_candidate(seed):
    """The covering property of the default candidates, over random boxes and aspect ratios (5:2
    panoramas and their tall twins among them), with extra boxes straddling every line crossing."""
    rng = random.Random(seed)
    crossings = [(x, y) for x in (1 / 3, 1 / 2, 2 / 3) for y in (1 / 3, 1 / 2, 2 / 3)]
    for _ in range(150):
        long_side = rng.randint(200, 3000)
        aspect = rng.uniform(1.0, 2.5)
        w, h = long_side, max(12, round(long_side / aspect))
        if rng.random() < 0.5:
            w, h = h, w
        candidates = candidate_boxes(w, h)
        for near in [None, *crossings]:
            box = _random_box(rng, w, h, near)
            assert _inside_some(box, candidates), (w, h, box)


def test_without_bridges_a_box_on_a_crossing_is_in_no_candidate():
    """The case bridges exist for: a 2×2 line crossing a 3×3 line (so the property test can fail)."""
    w, h = 1800, 1200
    box = (900 - 40, 400 - 40, 900 + 40, 400 + 40)  # across x = w/2 and y = h/3
    assert not _inside_some(box, candidate_boxes(w, h, bridges=False))
    assert _inside_some(box, candidate_boxes(w, h))


def test_bridges_sit_on_crossings_of_different_grids_only():
    assert len(bridge_boxes((2, 3))) == 4
    assert bridge_boxes((2,)) == bridge_boxes((3,)) == ()  # one grid: bridges would not cover its lines
    assert bridge_boxes((1, 2, 3)) == ()  # the whole image holds everything
    assert num_candidates((3, 2)) == num_candidates((2, 3)) == 17
    groups = candidate_groups((2, 3))
    assert groups == [0] * 4 + [1] * 9 + [2] * 4  # the bridges are ranked among themselves
    assert candidate_groups((2, 3), bridges=False) == [0] * 4 + [1] * 9


def _roundtrip(image: Image.Image, fmt: str) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1", "LA", "I;16", "I", "F"])
def test_to_rgb_handles_every_mode(mode):
    base = Image.linear_gradient("L").resize((64, 32))
    image = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (np.asarray(base, dtype=np.float64) * 257).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    )
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (64, 32)
    arr = np.asarray(rgb)
    if mode in ("I;16", "I", "F", "L"):
        # the range is kept: a plain convert("RGB") would clip 16-bit values to white
        assert arr.min() < 30 and arr.max() > 220


def test_16bit_png_is_not_clipped_to_white():
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    png = _roundtrip(Image.fromarray(arr), "PNG")
    assert png.mode.startswith("I")
    assert np.asarray(to_rgb(png)).mean() == pytest.approx(127.5, abs=3)


def test_rgba_transparent_becomes_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]


def test_pad_to_square_keeps_content_centered():
    img = Image.new("RGB", (40, 10), (255, 0, 0))
    sq = pad_to_square(img, (0, 0, 255))
    assert sq.size == (40, 40)
    assert sq.getpixel((20, 20)) == (255, 0, 0) and sq.getpixel((20, 0)) == (0, 0, 255)
    assert pad_to_square(Image.new("RGB", (8, 8)), (0, 0, 0)).size == (8, 8)


@pytest.mark.parametrize("box", [(0, 0, 100, 100), (10, 20, 170, 110), (0, 0, 90, 200), (5, 5, 305, 105),
                                 (0, 0, 101, 100), (0, 0, 1000, 10), (3, 0, 4, 700)])
def test_square_windows_cover_the_box_with_the_fewest_squares_of_its_short_side(box):
    """ψ's views of a region: squares of its short side, evenly spaced, covering every pixel; at
    most four (a longer region gets four equal slices instead, so ψ's cost stays bounded)."""
    import math

    windows = square_windows(box)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    expected = min(4, math.ceil(max(w, h) / min(w, h)))
    assert len(windows) == expected
    assert all(bx0 >= x0 and by0 >= y0 and bx1 <= x1 and by1 <= y1 for bx0, by0, bx1, by1 in windows)
    covered = np.zeros((h, w), bool)
    for bx0, by0, bx1, by1 in windows:
        covered[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0] = True
        if expected < 4 or max(w, h) <= 4 * min(w, h):
            assert bx1 - bx0 == by1 - by0 == min(w, h)  # squares
    assert covered.all()
    if w == h:
        assert windows == [box]
