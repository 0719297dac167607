"""The V*-style benchmark writer and loader: layout, labels that match the pixels, round trips."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vllm_semclip.eval.benchdata import CATEGORIES, load_bench, make_attribute, write_bench, write_jsonl
from vllm_semclip.tiny.scenes import COLORS


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, write_bench(out, 10, seed=7, progress=False)


def test_vstar_layout(bench):
    out, records = bench
    assert {r.category for r in records} == set(CATEGORIES)
    assert sum(r.category == "direct_attributes" for r in records) == 6  # 115/191 of 10
    for r in records:
        meta = json.loads((out / r.category / f"{r.name}.json").read_text())
        assert set(meta) - {"semclip"} == {"target_object", "bbox", "question", "options"}
        assert (out / r.category / f"{r.name}.jpg").is_file()
        with Image.open(r.image) as im:
            w, h = im.size
        assert 1500 <= max(w, h) <= 2700
        for x, y, bw, bh in meta["bbox"]:
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
            assert max(bw, bh) <= max(w, h) / 12  # small against the canvas


def test_attribute_answers_match_the_pixels(bench):
    _, records = bench
    for r in (r for r in records if r.category == "direct_attributes"):
        assert len(r.options) == 4 and len(set(r.options)) == 4
        assert r.question == f"What is the color of the {r.target_object[0]}?"
        x, y, w, h = r.bbox[0]
        patch = np.asarray(r.load_image().crop((x + w // 2 - 2, y + h // 2 + 1, x + w // 2 + 3, y + h // 2 + 6)))
        seen = np.median(patch.reshape(-1, 3), axis=0)
        nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - seen).sum())
        assert r.answer == f"The color of the {r.target_object[0]} is {nearest}."


def test_spatial_answers_match_the_boxes(bench):
    _, records = bench
    for r in (r for r in records if r.category == "relative_position"):
        a, b = r.target_object
        (ax, _, aw, _), (bx, _, bw, _) = r.bbox
        truth = "left" if ax + aw / 2 < bx + bw / 2 else "right"
        assert r.answer == f"The {a} is on the {truth} side of the {b}."
        assert len(r.options) == 2 and a != b


def test_loader_round_trips_layout_and_jsonl(bench, tmp_path):
    out, records = bench
    key = lambda r: (r.category, r.name)  # noqa: E731
    for loaded in (load_bench(out), load_bench(out / "records.jsonl")):
        assert sorted(((r.category, r.name, r.question, r.options, r.bbox) for r in loaded)) == \
               sorted(((r.category, r.name, r.question, r.options, r.bbox) for r in records))
        assert all(np.array_equal(np.asarray(a.load_image()), np.asarray(b.load_image()))
                   for a, b in zip(sorted(loaded, key=key), sorted(records, key=key)))
    again = tmp_path / "again.jsonl"
    write_jsonl(load_bench(out), again)
    assert [r.name for r in load_bench(again)] == [r.name for r in load_bench(out)]


def test_records_depend_only_on_seed_and_index():
    a_img, a = make_attribute(3, seed=11)
    b_img, b = make_attribute(3, seed=11)
    c_img, c = make_attribute(3, seed=12)
    assert a.question == b.question and a.bbox == b.bbox and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert (a.bbox, a.extra["color"]) != (c.bbox, c.extra["color"])


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_bench(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="direct_attributes"):
        load_bench(tmp_path)


def test_cli_bench_data(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vllm_semclip.cli", "bench-data", "--out", str(tmp_path), "--n", "3",
                          "--seed", "5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(load_bench(tmp_path)) == 3 and "wrote 3 legacy questions" in out.stdout


# ---- the randomised splits -------------------------------------------------------------------

@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    out = tmp_path_factory.mktemp("shifted")
    return write_bench(out, 60, seed=3, split="shifted", progress=False)


def _cells(w, h, g):
    return [(c * w / g, r * h / g, (c + 1) * w / g, (r + 1) * h / g) for r in range(g) for c in range(g)]


def test_shifted_split_draws_only_held_out_parts(shifted):
    from vllm_semclip.tiny.render import RenderDistribution

    held_out = set(RenderDistribution("shifted").backgrounds)
    assert {r.extra["background"] for r in shifted} <= held_out
    assert any(r.extra["background"].startswith("opencv:") for r in shifted)
    assert {r.extra["split"] for r in shifted} == {"shifted"}


def test_shifted_layout_borders_far_pairs_and_panoramas(shifted):
    from vllm_semclip.eval.benchdata import crosses_cell_line

    attrs = [r for r in shifted if r.category == "direct_attributes"]
    pairs = [r for r in shifted if r.category == "relative_position"]
    sizes = {r.name: r.load_image().size for r in shifted}
    assert sum(r.extra["border"] for r in attrs) >= 0.3 * len(attrs)
    assert all(r.extra["border"] == crosses_cell_line(r.bbox[0], sizes[r.name]) for r in attrs)
    assert sum(r.extra["pair"] == "far" for r in pairs) >= 0.3 * len(pairs)
    for r in pairs:
        w, h = sizes[r.name]
        (ax, ay, aw, ah), (bx, by, bw, bh) = r.bbox
        both = (min(ax, bx), min(ay, by), max(ax + aw, bx + bw), max(ay + ah, by + bh))
        in_one_cell = any(c[0] <= both[0] and c[1] <= both[1] and both[2] <= c[2] and both[3] <= c[3]
                          for c in _cells(w, h, 3))
        if r.extra["pair"] == "far":
            assert abs((ax + aw / 2) - (bx + bw / 2)) > w / 3 and not in_one_cell
        else:
            assert in_one_cell
    aspects = [max(w, h) / min(w, h) for w, h in sizes.values()]
    assert max(aspects) <= 2.5 + 1e-2 and any(a > 2.0 for a in aspects)


def test_shifted_answers_match_the_pixels(shifted):
    """The drawn shade at the target's centre is nearest the answer's colour name (through blur,
    noise and JPEG), and left/right follows the boxes."""
    from vllm_semclip.tiny.render import nearest_color_name

    for r in shifted:
        image = r.load_image()
        if r.category == "direct_attributes":
            x, y, w, h = r.bbox[0]
            cy = y + (2 * h) // 3 if r.target_object[0] == "triangle" else y + h // 2
            patch = np.asarray(image.crop((x + w // 2 - 2, cy - 2, x + w // 2 + 3, cy + 3)))
            seen = tuple(int(v) for v in np.median(patch.reshape(-1, 3), axis=0))
            assert nearest_color_name(seen) == r.extra["color"], (r.name, seen)
        else:
            a, b = r.target_object
            (ax, _, aw, _), (bx, _, bw, _) = r.bbox
            assert r.answer == f"The {a} is on the {'left' if ax + aw / 2 < bx + bw / 2 else 'right'} side of the {b}."


def test_training_splits_never_draw_a_reserved_source(tmp_path):
    from vllm_semclip.tiny.render import check_training_source

    for split in ("train", "val"):
        records = write_bench(tmp_path / split, 30, seed=4, split=split, progress=False)
        for r in records:
            check_training_source(r.extra["background"])  # raises for opencv-doc's and held-out sources
            assert not r.extra["background"].startswith("opencv:")


def test_splits_draw_different_scenes_from_one_seed():
    from vllm_semclip.eval.benchdata import make_record

    a = make_record("direct_attributes", 0, 1, "train")[1]
    b = make_record("direct_attributes", 0, 1, "val")[1]
    c = make_record("direct_attributes", 0, 1, "train")[1]
    assert a.bbox == c.bbox and a.extra == c.extra
    assert (a.bbox, a.extra["background"]) != (b.bbox, b.extra["background"])
    with pytest.raises(ValueError, match="split must be one of"):
        make_record("direct_attributes", 0, 1, "test")
