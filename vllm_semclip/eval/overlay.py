"""Pictures of a selection: candidate scores as a heatmap, chosen boxes drawn on top.

Each pixel's heat is the mean, over the grids, of the min–max normalised score of the
candidate covering it — the score the crops were ranked by (``Selection.ranking_scores``: ψ's,
standardised within each grid by default) — so fine and coarse grids both show. Chosen boxes are
outlined and numbered by rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vllm_semclip.crops import to_rgb
from vllm_semclip.selection import Selection

MAX_SIDE = 1024  # overlays are for looking at; keep them light


def heatmap(selection: Selection) -> np.ndarray | None:
    """(H, W) array in [0, 1], or None when the method produced no scores."""
    scores = selection.ranking_scores if selection.ranking_scores is not None else selection.candidate_scores
    if not scores:
        return None
    w, h = selection.image_size
    s = np.asarray(scores, dtype=np.float64)
    span = s.max() - s.min()
    norm = (s - s.min()) / span if span > 0 else np.full_like(s, 0.5)
    heat = np.zeros((h, w))
    cover = np.zeros((h, w))
    for (x0, y0, x1, y1), v in zip(selection.candidates, norm):
        heat[y0:y1, x0:x1] += v
        cover[y0:y1, x0:x1] += 1
    return heat / np.maximum(cover, 1)


def draw_selection(image: Image.Image, selection: Selection, out_path: str | Path | None = None) -> Image.Image:
    """The image with the score heatmap blended in and the chosen boxes outlined."""
    from matplotlib import colormaps

    rgb = to_rgb(image)
    heat = heatmap(selection)
    if heat is not None:
        colored = (colormaps["inferno"](heat)[..., :3] * 255).astype(np.uint8)
        rgb = Image.blend(rgb, Image.fromarray(colored), alpha=0.45)
    scale = min(1.0, MAX_SIDE / max(rgb.size))
    if scale < 1.0:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(rgb)
    width = max(2, round(max(rgb.size) / 200))
    for rank, box in enumerate(selection.boxes, start=1):
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(0, 255, 80), width=width)
        draw.text((x0 + width + 2, y0 + width + 2), f"#{rank}", fill=(0, 255, 80))
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        rgb.save(out_path)
    return rgb
