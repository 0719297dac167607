"""The randomised rendering distribution: what each split may draw, and colour names that stay apart."""

import random

import pytest

from vllm_semclip.tiny import render
from vllm_semclip.tiny.render import (
    EASY_VQA_SHADES,
    HELD_OUT_SHADES,
    SPLITS,
    TRAIN_SHADES,
    RenderDistribution,
    ReservedSourceError,
    check_training_source,
    nearest_color_name,
    nearest_reference,
)
from vllm_semclip.tiny.scenes import COLORS


def test_the_shifted_split_shares_nothing_held_out_with_training():
    train, val, shifted = (RenderDistribution(s) for s in SPLITS)
    assert train.backgrounds == val.backgrounds and train.shades == val.shades and train.styles == val.styles
    assert not set(train.backgrounds) & set(shifted.backgrounds)
    assert not set(train.styles) & set(shifted.styles)
    for name in COLORS:
        assert not set(TRAIN_SHADES[name]) & set(HELD_OUT_SHADES[name]), name
    assert all(s.startswith(("opencv:", "texture:")) or s in render.HELD_OUT_PHOTOS for s in shifted.backgrounds)


def test_reserved_sources_are_refused_for_training_material():
    for name in RenderDistribution("shifted").backgrounds:
        with pytest.raises(ReservedSourceError, match="reserved for evaluation"):
            check_training_source(name)
    for name in RenderDistribution("train").backgrounds:
        check_training_source(name)
    rng = random.Random(0)
    for _ in range(60):  # what the training distribution actually draws
        _, name = RenderDistribution("train").background((96, 64), rng)
        check_training_source(name)


@pytest.mark.parametrize("split", ["train", "shifted"])
def test_every_shade_is_nearest_its_own_name(split):
    dist, rng = RenderDistribution(split), random.Random(split)
    for name in COLORS:
        shades = {dist.color(name, rng) for _ in range(300)}
        assert len(shades) > 10  # a region of colour space, not one value
        assert all(nearest_color_name(s) == name for s in shades), name
    assert nearest_color_name(EASY_VQA_SHADES["brown"]) == "brown" and nearest_color_name((250, 5, 5)) == "red"


def test_shade_ranges_are_whole_cells_and_never_shared():
    """Training draws widely in each name's training cells and never a held-out range; the shifted
    split draws only held-out ranges (``nearest_reference``: which reference's cell a shade is in)."""
    for split in ("train", "val", "shifted"):
        dist, rng = RenderDistribution(split), random.Random(split)
        for name in COLORS:
            shades = [dist.color(name, rng) for _ in range(300)]
            assert all(nearest_reference(s) == (name, dist.held_out) for s in shades), (split, name)
            if not dist.held_out:  # a region around each reference, not a few points near it
                values = [max(s) for s in shades]  # HSV value, 0-255
                assert max(values) - min(values) >= 40, (name, min(values), max(values))
    assert nearest_reference(EASY_VQA_SHADES["black"]) == ("black", True)
    assert nearest_reference(COLORS["gray"]) == ("gray", False)


def test_styles_and_textures_draw():
    rng = random.Random(1)
    for kind in ("noise", "gradient", "stripes", "tiles"):
        image = render.texture(kind, (120, 80), rng)
        assert image.size == (120, 80) and image.mode == "RGB"
    for split in ("train", "shifted"):
        dist = RenderDistribution(split)
        styles = {(s.card, s.tone) for s in (dist.style(rng) for _ in range(200))}
        assert styles == set(dist.styles)
    with pytest.raises(ValueError, match="unknown texture"):
        render.texture("plaid", (10, 10), rng)
    with pytest.raises(ValueError, match="split must be one of"):
        RenderDistribution("test")


def test_a_missing_opencv_doc_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(render, "OPENCV_DATA", tmp_path)
    render.load_background_photo.cache_clear()
    with pytest.raises(FileNotFoundError, match="apt-get install opencv-doc"):
        render.load_background_photo("opencv:baboon.jpg")
    render.load_background_photo.cache_clear()
