"""Which ranking group should the bridges join? Compared on distant-supervision labels.

``semclip label`` asked the VLM every question once with each of the 17 candidates (grids 2 and 3
with bridges) beside the overview, so every candidate carries ``correct``: the VLM answers right
with it (k = 1). For a ranking rule, the accuracy SemClip would get is the ``correct`` of the
candidate the rule puts first — no engine needed. ψ scores the candidates as served (windows,
reference texts); the rules differ only in how the scores are ranked:

* ``bridges with 3x3``: standardised within each grid, the bridges among the 3×3 cells (their
  size; served until 2026-12-07);
* ``bridges apart``: the bridges standardised among themselves, a group of their own;
* ``served``: what ``crops.rank_scores`` ranks by now (one of the rules above);
* ``bridges with 2x2``: the bridges standardised among the 2×2 cells;
* ``no bridges``: the 13 cells only (what ``bridges=false`` serves);
* ``raw``: ψ's scores compared across grids (``relevance_norm="none"``);
* ``oracle``: the best candidate the labels know (a correct one where any is).

Choose on training labels (or ``val``), never on ``shifted``. Prints the table and writes
``benchmarks/results/bridge_ranking.json``.

    python benchmarks/research/bridge_ranking.py --labels labels/ [--limit 800] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vllm_semclip.crops import candidate_boxes, candidate_groups, rank_scores, standardise_within, to_rgb, top_indices
from vllm_semclip.relevance import RelevanceModel
from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bridge_ranking.json"
GRIDS = (2, 3)


def rules(scores: list[float]) -> dict[str, int]:
    """The candidate each rule puts first, as an index into the 17 (cells, then bridges)."""
    cells = candidate_groups(GRIDS, bridges=False)  # 0: the 2×2 cells, 1: the 3×3 cells
    n_bridges = len(scores) - len(cells)
    grouped = {"bridges with 3x3": [*cells, *[1] * n_bridges], "bridges with 2x2": [*cells, *[0] * n_bridges],
               "bridges apart": [*cells, *[2] * n_bridges]}
    picks = {rule: top_indices(standardise_within(scores, groups), 1)[0] for rule, groups in grouped.items()}
    picks["served"] = top_indices(rank_scores(scores, GRIDS), 1)[0]
    picks["no bridges"] = top_indices(rank_scores(scores[:len(cells)], GRIDS, bridges=False), 1)[0]
    picks["raw"] = top_indices(scores, 1)[0]
    return picks


def load_labels(path: Path) -> list[dict]:
    files = sorted(path.glob("shard-*.jsonl")) if path.is_dir() else [path]
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="a `semclip label` output directory")
    parser.add_argument("--model", default=str(DEFAULT_RELEVANCE_DIR), help="ψ (local-dir or open_clip name)")
    parser.add_argument("--limit", type=int, help="only the first N labelled questions")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = [r for r in load_labels(Path(args.labels)) if r.get("grids") == list(GRIDS) and r.get("bridges")]
    records = records[:args.limit] if args.limit else records
    psi = RelevanceModel.from_pretrained(args.model)
    right: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    hits: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for rec in tqdm(records, desc="ψ over labelled questions"):
        with Image.open(rec["image"]) as im:
            image = to_rgb(im).copy()
        boxes = candidate_boxes(*image.size, GRIDS)
        if [list(b) for b in boxes] != [c["box"] for c in rec["crops"]]:
            raise ValueError(f"{rec['name']}: the labels' candidates are not grids 2, 3 with bridges")
        with torch.inference_mode():
            scores = (psi.region_features(image, boxes) @ psi.query_vector(rec["question"])).amax(1).tolist()
        picks = rules(scores)
        crops = rec["crops"]
        picks["oracle"] = max(range(len(crops)), key=lambda i: (crops[i]["correct"], crops[i]["hit"], -i))
        for rule, i in picks.items():
            for group in (rec["category"], "overall"):
                right[rule][group].append(crops[i]["correct"])
                hits[rule][group].append(crops[i]["hit"])
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    table = {rule: {"accuracy": {g: mean(v) for g, v in groups.items()},
                    "crop_hit": {g: mean(v) for g, v in hits[rule].items()}} for rule, groups in right.items()}
    print(f"{len(records)} labelled questions; accuracy of the VLM with the first-ranked crop (crop hit)")
    print(f"{'rule':<18} {'attribute':>16} {'spatial':>16} {'overall':>16}")
    for rule, row in table.items():
        cells = [f"{100 * row['accuracy'][g]:.1f} ({100 * row['crop_hit'][g]:.1f})" if g in row["accuracy"] else "-"
                 for g in ("direct_attributes", "relative_position", "overall")]
        print(f"{rule:<18} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"labels": args.labels, "model": args.model, "questions": len(records),
                               "rules": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
