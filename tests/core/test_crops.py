"""Candidate boxes and image normalisation."""

import io

import numpy as np
import pytest
from PIL import Image

from vllm_semclip.crops import candidate_boxes, num_candidates, pad_to_square, square_windows, to_rgb


def test_grid_cells_follow_aspect_ratio():
    boxes = candidate_boxes(300, 100, grids=(2, 3))
    assert len(boxes) == num_candidates((2, 3)) == 13
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
    assert len(boxes) == 13
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


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
