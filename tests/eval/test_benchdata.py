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
    assert len(load_bench(tmp_path)) == 3 and "wrote 3 questions" in out.stdout
