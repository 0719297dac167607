"""Training material: cards drawn where they say, in the colour they say, at the sizes asked for."""

import random

import numpy as np
import pytest

from vllm_semclip.tiny.cards import CAPTIONS, CROP_SIDE_RANGE, Tile, card_tile, mosaic
from vllm_semclip.tiny.scenes import COLORS, SHAPES


def test_captions_are_easy_vqa_vocabulary():
    assert len(CAPTIONS) == len(set(CAPTIONS)) == len(COLORS) * len(SHAPES) == 24
    assert "a red triangle" in CAPTIONS


def _centre_colour(tile: Tile, i: int) -> np.ndarray:
    x, y, w, h = tile.cards[i].bbox
    cx, cy = x + w // 2, y + (2 * h) // 3  # low centre: inside a triangle too
    return np.asarray(tile.image)[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize("seed", range(6))
def test_cards_are_distinct_inside_and_coloured(seed):
    rng = random.Random(seed)
    tile = card_tile(rng, 224, n_cards=3, side_range=(0.1, 0.14))
    assert tile.image.size == (224, 224) and len(tile.cards) == 3
    assert len({c.shape for c in tile.cards}) == 3
    for i, card in enumerate(tile.cards):
        x, y, w, h = card.bbox
        assert 0 <= x and 0 <= y and x + w <= 224 and y + h <= 224
        assert 0.09 * 224 <= max(w, h) <= 0.16 * 224 * 1.3  # rectangles get a random aspect
        assert np.abs(_centre_colour(tile, i) - np.array(COLORS[card.color])).max() < 40


def test_given_shapes_colours_and_left_right_separation():
    rng = random.Random(3)
    for _ in range(20):
        tile = card_tile(rng, 224, shapes=["circle", "triangle"], colors=["red", "blue"], min_dx=True,
                         side_range=CROP_SIDE_RANGE)
        a, b = tile.cards
        assert (a.shape, a.color, b.shape, b.color) == ("circle", "red", "triangle", "blue")
        assert abs(a.center[0] - b.center[0]) >= min(a.bbox[2], b.bbox[2])


def test_bad_tile_requests_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        card_tile(random.Random(0), shapes=["circle", "circle"], colors=["red", "red"])
    with pytest.raises(ValueError, match="colour"):
        card_tile(random.Random(0), shapes=["circle"], colors=[])


def test_mosaic_places_tiles_row_major():
    rng = random.Random(0)
    tiles = [card_tile(rng, 32, shapes=[], colors=[]).image for _ in range(9)]
    big = mosaic(tiles, 3)
    assert big.size == (96, 96)
    assert np.array_equal(np.asarray(big)[32:64, 64:96], np.asarray(tiles[5]))
