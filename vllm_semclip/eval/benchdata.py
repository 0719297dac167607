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
:mod:`vllm_semclip.tiny.scenes`). Every record is drawn from its own seed ``(split, seed, index)``,
so a record does not depend on how many others were written.

Splits (``SPLITS``):

* ``train`` / ``val`` / ``shifted``: scenes of the randomised distribution
  (:class:`vllm_semclip.tiny.render.RenderDistribution`) — ``shifted`` only from the parts training
  never sees. Their layout is shared: canvases up to 5:2, ``BORDER_FRACTION`` of attribute targets
  laid across a 2×2 or 3×3 cell line, ``FAR_FRACTION`` of spatial pairs farther apart than one 3×3
  cell (no one cell holds both), the rest inside one cell. Each record's ``extra`` says which
  (``border``, ``pair``), so reports can split them.
* ``legacy``: the first generator (one palette, outlined shapes, 12 photos, every target inside
  one 3×3 cell), kept as it was so its figures stay comparable.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from vllm_semclip.tiny.scenes import COLORS, SHAPES, Placed, background, background_names, draw_shape, find_box, place

CATEGORIES = ("direct_attributes", "relative_position")
ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1), (3, 2), (2, 3))
SCENE_ASPECTS = (*ASPECTS, (2, 1), (1, 2), (5, 2), (2, 5))  # the randomised splits: panoramas up to 5:2
ATTRIBUTE_FRACTION = 115 / 191  # V* Bench: 115 attribute, 76 spatial questions
SPLITS: tuple[str, ...] = ("legacy", "train", "val", "shifted")
BORDER_FRACTION = 0.4  # attribute targets laid across a 2×2 or 3×3 cell line
FAR_FRACTION = 0.4  # spatial pairs farther apart than one 3×3 cell


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
    return image, attribute_record(index, target, rng, {"background": bg, "seed": seed, "index": index})


def attribute_record(index: int, target: Placed, rng: random.Random, extra: dict) -> BenchRecord:
    """The colour question about ``target``: its colour and three others drawn by ``rng``."""
    shape, color = target.shape, target.color
    wrong = rng.sample([c for c in COLORS if c != color], 3)
    return BenchRecord(
        name=f"attr_{index:05d}", category="direct_attributes", image="",
        question=f"What is the color of the {shape}?",
        options=[f"The color of the {shape} is {c}." for c in (color, *wrong)],
        target_object=[shape], bbox=[list(target.bbox)], extra={"color": color, **extra},
    )


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
    return image, spatial_record(index, placed, {"background": bg, "seed": seed, "index": index})


def spatial_record(index: int, placed: list[Placed], extra: dict) -> BenchRecord:
    """The left/right question about the first two ``placed`` shapes (the answer from their centres)."""
    a, b = placed[0].shape, placed[1].shape
    left = placed[0].center[0] < placed[1].center[0]
    sides = ("left", "right") if left else ("right", "left")
    return BenchRecord(
        name=f"spatial_{index:05d}", category="relative_position", image="",
        question=f"Is the {a} on the left or right side of the {b}?",
        options=[f"The {a} is on the {s} side of the {b}." for s in sides],
        target_object=[a, b], bbox=[list(placed[0].bbox), list(placed[1].bbox)],
        extra={"colors": [placed[0].color, placed[1].color], **extra},
    )


# ---- the randomised splits ---------------------------------------------------------------------

def crosses_cell_line(bbox: Sequence[int], size: tuple[int, int], grids: Sequence[int] = (2, 3)) -> bool:
    """Whether a box ``(x, y, w, h)`` lies across a line of one of the ``grids``."""
    x, y, w, h = bbox
    W, H = size
    return any(x < i * W / g < x + w or y < i * H / g < y + h for g in grids for i in range(1, g))


def _scene(kind: str, index: int, seed: int, split: str, scale: float):
    from vllm_semclip.tiny.render import RenderDistribution

    dist = RenderDistribution(split)
    rng = random.Random(f"{split}-{kind}-{seed}-{index}")
    aw, ah = rng.choice(SCENE_ASPECTS)
    long_side = round(rng.randint(1500, 2700) * scale)
    size = (long_side, round(long_side * ah / aw)) if aw >= ah else (round(long_side * aw / ah), long_side)
    image, bg = dist.background(size, rng)
    return dist, rng, size, bg, image


def _free_box(shape: str, side: int, size: tuple[int, int], taken: list, rng: random.Random, dist,
              region: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int]:
    """A box for ``shape`` inside ``region`` (default: the canvas less a margin) whose card footprint
    touches no ``taken`` footprint."""
    w, h = size
    region = region or (side // 2, side // 2, w - side // 2, h - side // 2)
    return find_box(shape, side, region, taken, rng, tries=300, footprint=dist.footprint)


def _border_box(shape: str, side: int, size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
    """A box laid across a random 2×2 or 3×3 cell line (20–80% of it on either side), away from the edges."""
    from vllm_semclip.tiny.scenes import shape_box

    W, H = size
    _, _, bw, bh = shape_box(shape, side, 0, 0, rng)
    g = rng.choice((2, 3))
    line = rng.randrange(1, g)
    if rng.random() < 0.5:  # a vertical line
        x = round(line * W / g - rng.uniform(0.2, 0.8) * bw)
        y = rng.randint(side // 2, H - side // 2 - bh)
    else:
        y = round(line * H / g - rng.uniform(0.2, 0.8) * bh)
        x = rng.randint(side // 2, W - side // 2 - bw)
    return x, y, bw, bh


def _cell_of_3x3(size: tuple[int, int], rng: random.Random, pad: int) -> tuple[int, int, int, int]:
    """A random 3×3 cell, shrunk by ``pad`` so a box inside it crosses none of its lines."""
    x0, y0, x1, y1 = _cell_region(size, rng)
    return x0 + pad, y0 + pad, x1 - pad, y1 - pad


def make_scene_attribute(index: int, seed: int, split: str, scale: float = 1.0) -> tuple[Image.Image, BenchRecord]:
    """An attribute question on a scene of the randomised distribution of ``split``."""
    dist, rng, size, bg, image = _scene("attr", index, seed, split, scale)
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    side = _side(size, rng)
    if rng.random() < BORDER_FRACTION:
        box = _border_box(shape, side, size, rng)
    else:
        box = _free_box(shape, side, size, [], rng, dist, _cell_of_3x3(size, rng, 2))
    taken = [dist.footprint(box)]
    target = dist.draw(image, shape, color, box, rng)
    others = [s for s in SHAPES if s != shape]
    rng.shuffle(others)
    for other in others[: rng.randint(0, 2)]:
        b = _free_box(other, side, size, taken, rng, dist)
        taken.append(dist.footprint(b))
        dist.draw(image, other, rng.choice(list(COLORS)), b, rng)
    image, quality = dist.finish(image, rng)
    return image, attribute_record(index, target, rng, {
        "background": bg, "seed": seed, "index": index, "split": split,
        "border": crosses_cell_line(target.bbox, size), "jpeg_quality": quality})


def make_scene_spatial(index: int, seed: int, split: str, scale: float = 1.0) -> tuple[Image.Image, BenchRecord]:
    """A left/right question on a scene of ``split``: the pair inside one 3×3 cell (``near``) or with
    centres more than a 3×3 cell's width apart (``far``)."""
    dist, rng, size, bg, image = _scene("spatial", index, seed, split, scale)
    a, b = rng.sample(SHAPES, 2)
    side = _side(size, rng)
    far = rng.random() < FAR_FRACTION
    W = size[0]
    for _ in range(200):
        if far:
            box_a = _free_box(a, side, size, [], rng, dist)
            box_b = _free_box(b, side, size, [dist.footprint(box_a)], rng, dist)
            ok = abs((box_a[0] + box_a[2] / 2) - (box_b[0] + box_b[2] / 2)) > W / 3
        else:
            region = _cell_of_3x3(size, rng, 2)
            box_a = _free_box(a, side, size, [], rng, dist, region)
            box_b = _free_box(b, side, size, [dist.footprint(box_a)], rng, dist, region)
            ok = abs((box_a[0] + box_a[2] / 2) - (box_b[0] + box_b[2] / 2)) >= side
        if ok:
            break
    taken = [dist.footprint(box_a), dist.footprint(box_b)]
    placed = [dist.draw(image, shape, rng.choice(list(COLORS)), box, rng) for shape, box in ((a, box_a), (b, box_b))]
    third = [s for s in SHAPES if s not in (a, b)]
    for other in third[: rng.randint(0, 1)]:
        box = _free_box(other, side, size, taken, rng, dist)
        taken.append(dist.footprint(box))
        dist.draw(image, other, rng.choice(list(COLORS)), box, rng)
    image, quality = dist.finish(image, rng)
    return image, spatial_record(index, placed, {"background": bg, "seed": seed, "index": index, "split": split,
                                                 "pair": "far" if far else "near", "jpeg_quality": quality})


def make_record(category: str, index: int, seed: int, split: str = "legacy",
                scale: float = 1.0) -> tuple[Image.Image, BenchRecord]:
    """One question of ``category`` from ``split``'s generator."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    attribute = category == "direct_attributes"
    if split == "legacy":
        return (make_attribute if attribute else make_spatial)(index, seed, scale)
    return (make_scene_attribute if attribute else make_scene_spatial)(index, seed, split, scale)


def write_bench(out_dir: str | Path, n: int, seed: int, *, split: str = "legacy",
                attribute_fraction: float = ATTRIBUTE_FRACTION, progress: bool = True,
                quality: int = 90) -> list[BenchRecord]:
    """Write ``n`` questions of ``split`` in V* Bench's layout under ``out_dir``; return their records.

    ``quality`` is the legacy split's JPEG quality; the randomised splits draw their own."""
    from tqdm import tqdm

    out = Path(out_dir)
    n_attr = round(n * attribute_fraction)
    jobs = [("direct_attributes", i) for i in range(n_attr)] + [("relative_position", i) for i in range(n - n_attr)]
    records = []
    for category, i in tqdm(jobs, desc=f"writing benchmark ({split})", disable=not progress):
        image, rec = make_record(category, i, seed, split)
        folder = out / category
        folder.mkdir(parents=True, exist_ok=True)
        rec.image = str(folder / f"{rec.name}.jpg")
        image.save(rec.image, quality=rec.extra.get("jpeg_quality", quality))
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
