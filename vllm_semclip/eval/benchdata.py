"""A V*-style benchmark, written in V* Bench's own layout, and a loader for that layout.

Layout (what V* Bench ships, so the loader also reads the real one)::

    DIR/direct_attributes/NAME.jpg + NAME.json
    DIR/relative_position/NAME.jpg + NAME.json

with JSON keys ``target_object`` (names), ``bbox`` (``[x, y, w, h]`` per target, pixels),
``question`` and ``options`` (the first option is the correct one). A JSONL form of the same
records (one object per line, ``image`` relative to the file) is read and written too.

Questions follow V* Bench's style:

* attribute: "What is the color of the {shape}?" — 4 options "The color of the {shape} is {color}.";
* spatial: "Is the {a} on the left or right side of the {b}?" — 2 options.

Each named shape is unique in its image. Canvases are 1500–2700 px with varied aspect
ratios; shapes are small enough to vanish when the whole canvas is shrunk to a tile (see
:mod:`vllm_semclip.tiny.scenes`). Every record is drawn from its own seed ``(seed, index)``, so a
record does not depend on how many others were written.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from vllm_semclip.tiny.scenes import COLORS, SHAPES, Placed, background, background_names, draw_shape, find_box, place

CATEGORIES = ("direct_attributes", "relative_position")
ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1), (3, 2), (2, 3))
ATTRIBUTE_FRACTION = 115 / 191  # V* Bench: 115 attribute, 76 spatial questions


@dataclass
class BenchRecord:
    """One V*-style question about one image."""

    name: str
    category: str
    image: str  # path to the image file
    question: str
    options: list[str]
    target_object: list[str]
    bbox: list[list[int]]
    extra: dict = field(default_factory=dict)  # generator's metadata (colours, background)

    @property
    def answer(self) -> str:
        return self.options[0]

    @property
    def target_boxes(self) -> list[tuple[int, int, int, int]]:
        """Targets as (x0, y0, x1, y1)."""
        return [(x, y, x + w, y + h) for x, y, w, h in self.bbox]

    def load_image(self) -> Image.Image:
        with Image.open(self.image) as im:
            return im.convert("RGB")

    def vstar_json(self) -> dict:
        return {"target_object": self.target_object, "bbox": self.bbox, "question": self.question,
                "options": self.options, **({"semclip": self.extra} if self.extra else {})}


def _canvas_size(rng: random.Random, scale: float = 1.0) -> tuple[int, int]:
    aw, ah = rng.choice(ASPECTS)
    long_side = round(rng.randint(1500, 2700) * scale)
    return (long_side, round(long_side * ah / aw)) if aw >= ah else (round(long_side * aw / ah), long_side)


def _side(size: tuple[int, int], rng: random.Random) -> int:
    # 1/34–1/22 of the long side: ≥ 1/12 of a 3×3 cell, ≤ ~10 px in a 224-px overview
    return round(max(size) / rng.uniform(22, 34))


def _cell_region(size: tuple[int, int], rng: random.Random, grid: int = 3) -> tuple[int, int, int, int]:
    w, h = size
    col, row = rng.randrange(grid), rng.randrange(grid)
    return (col * w // grid, row * h // grid, (col + 1) * w // grid, (row + 1) * h // grid)


def _distractors(draw, size, shapes: list[str], taken, rng, side) -> list[Placed]:
    w, h = size
    return [place(draw, s, rng.choice(list(COLORS)), side, (0, 0, w, h), taken, rng) for s in shapes]


def _new_scene(kind: str, index: int, seed: int, scale: float = 1.0):
    """The record's own generator, canvas size, background name, canvas and a pen on it.

    ``scale`` < 1 draws the same kind of scene on a smaller canvas (every size relative to
    it), which is how the VLM trainer makes thousands of scenes cheaply.
    """
    rng = random.Random(f"{kind}-{seed}-{index}")
    size = _canvas_size(rng, scale)
    bg = rng.choice(background_names())
    image = background(bg, size, rng)
    return rng, size, bg, image, ImageDraw.Draw(image)


def make_attribute(index: int, seed: int, scale: float = 1.0) -> tuple[Image.Image, BenchRecord]:
    rng, size, bg, image, draw = _new_scene("attr", index, seed, scale)
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    side = _side(size, rng)
    taken: list = []
    target = place(draw, shape, color, side, _cell_region(size, rng), taken, rng)
    others = [s for s in SHAPES if s != shape]
    rng.shuffle(others)
    _distractors(draw, size, others[: rng.randint(0, 2)], taken, rng, side)
    wrong = rng.sample([c for c in COLORS if c != color], 3)
    record = BenchRecord(
        name=f"attr_{index:05d}", category="direct_attributes", image="",
        question=f"What is the color of the {shape}?",
        options=[f"The color of the {shape} is {c}." for c in (color, *wrong)],
        target_object=[shape], bbox=[list(target.bbox)],
        extra={"color": color, "background": bg, "seed": seed, "index": index},
    )
    return image, record


def make_spatial(index: int, seed: int, scale: float = 1.0) -> tuple[Image.Image, BenchRecord]:
    rng, size, bg, image, draw = _new_scene("spatial", index, seed, scale)
    a, b = rng.sample(SHAPES, 2)
    side = _side(size, rng)
    region = _cell_region(size, rng)  # both inside one 3×3 cell: one crop can show both
    for _ in range(100):
        box_a = find_box(a, side, region, [], rng)
        box_b = find_box(b, side, region, [box_a], rng)
        if abs((box_a[0] + box_a[2] / 2) - (box_b[0] + box_b[2] / 2)) >= side:  # unambiguous left/right
            break
    taken = [box_a, box_b]
    placed = []
    for shape, box in ((a, box_a), (b, box_b)):
        color = rng.choice(list(COLORS))
        draw_shape(draw, shape, COLORS[color], box)
        placed.append(Placed(shape, color, box))
    third = [s for s in SHAPES if s not in (a, b)]
    _distractors(draw, size, third[: rng.randint(0, 1)], taken, rng, side)
    left = placed[0].center[0] < placed[1].center[0]
    sides = ("left", "right") if left else ("right", "left")
    record = BenchRecord(
        name=f"spatial_{index:05d}", category="relative_position", image="",
        question=f"Is the {a} on the left or right side of the {b}?",
        options=[f"The {a} is on the {s} side of the {b}." for s in sides],
        target_object=[a, b], bbox=[list(placed[0].bbox), list(placed[1].bbox)],
        extra={"colors": [placed[0].color, placed[1].color], "background": bg, "seed": seed, "index": index},
    )
    return image, record


def write_bench(out_dir: str | Path, n: int, seed: int, *, attribute_fraction: float = ATTRIBUTE_FRACTION,
                progress: bool = True, quality: int = 90) -> list[BenchRecord]:
    """Write ``n`` questions in V* Bench's layout under ``out_dir``; return their records."""
    from tqdm import tqdm

    out = Path(out_dir)
    n_attr = round(n * attribute_fraction)
    jobs = [("direct_attributes", i) for i in range(n_attr)] + [("relative_position", i) for i in range(n - n_attr)]
    records = []
    for category, i in tqdm(jobs, desc="writing benchmark", disable=not progress):
        image, rec = (make_attribute if category == "direct_attributes" else make_spatial)(i, seed)
        folder = out / category
        folder.mkdir(parents=True, exist_ok=True)
        rec.image = str(folder / f"{rec.name}.jpg")
        image.save(rec.image, quality=quality)
        (folder / f"{rec.name}.json").write_text(json.dumps(rec.vstar_json(), indent=1))
        records.append(rec)
    write_jsonl(records, out / "records.jsonl")
    return records


def write_jsonl(records: Iterable[BenchRecord], path: str | Path) -> None:
    path = Path(path)
    with path.open("w") as f:
        for r in records:
            doc = asdict(r)
            doc["image"] = os.path.relpath(Path(r.image).resolve(), path.parent.resolve())
            f.write(json.dumps(doc) + "\n")


def load_bench(path: str | Path) -> list[BenchRecord]:
    """Records from a V*-layout directory (ours or the real V* Bench) or from a JSONL file."""
    path = Path(path)
    if path.is_file():
        records = []
        for line in path.read_text().splitlines():
            if line.strip():
                doc = json.loads(line)
                doc["image"] = str((path.parent / doc["image"]).resolve())
                records.append(BenchRecord(**doc))
        return records
    if not path.is_dir():
        raise FileNotFoundError(f"no benchmark at {path}")
    records = []
    for category in CATEGORIES:
        folder = path / category
        if not folder.is_dir():
            continue
        for meta in sorted(folder.glob("*.json")):
            doc = json.loads(meta.read_text())
            image = next((p for p in (meta.with_suffix(s) for s in (".jpg", ".jpeg", ".png")) if p.exists()), None)
            if image is None:
                raise FileNotFoundError(f"no image beside {meta}")
            records.append(BenchRecord(
                name=meta.stem, category=category, image=str(image.resolve()), question=doc["question"],
                options=list(doc["options"]), target_object=list(doc.get("target_object", [])),
                bbox=[list(map(int, b)) for b in doc.get("bbox", [])], extra=doc.get("semclip", {}),
            ))
    if not records:
        raise FileNotFoundError(f"{path} has no {' or '.join(CATEGORIES)} records")
    return records
