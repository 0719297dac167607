"""What selection costs against what it saves: FLOPs per request of ψ, the VLM's tower and its LM.

ψ's figures are counted, not estimated: the open_clip model is created by open_clip's factory with
random weights (nothing is downloaded) and one forward per window at its input size runs under
``torch.utils.flop_counter.FlopCounterMode``; a request's windows are what ``select_crops`` would
cut for the default candidates of an image of the given size. The LLaVA side is analytic from
the architecture's sizes: its vision tower (counted the same way, open_clip's ViT-L-14-336 for
LLaVA-1.5) on every tile, and the language model's prefill over (1 + k) × tokens-per-tile plus
the text — linear layers ``2·T·L·(4d² + 3·d·f)``, causal attention ``2·L·d·T²``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from .crops import candidate_boxes, square_windows

# open_clip models a user would pick for ψ (a MobileCLIP and a SigLIP among them)
PSI_CHOICES: tuple[str, ...] = ("ViT-B-32", "ViT-B-16", "MobileCLIP-S2", "ViT-B-16-SigLIP", "ViT-L-14",
                                "ViT-L-14-336")


@dataclass(frozen=True)
class LlavaSize:
    """The sizes that fix a LLaVA's prefill FLOPs."""

    name: str
    tower: str  # the open_clip model whose image tower has the VLM tower's shape
    tokens_per_tile: int
    layers: int
    hidden: int
    intermediate: int


LLAVA_1_5_7B = LlavaSize("llava-1.5-7b", "ViT-L-14-336", 576, 32, 4096, 11008)
LLAVA_1_5_13B = LlavaSize("llava-1.5-13b", "ViT-L-14-336", 576, 40, 5120, 13824)


@functools.lru_cache(maxsize=None)
def image_forward_flops(model_name: str) -> tuple[int, int]:
    """(FLOPs of one image through ``model_name``'s image tower at its input size, that size)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = open_clip.create_model(model_name, pretrained=None).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    with FlopCounterMode(display=False) as counter:  # (timm towers refuse it under no_grad)
        model.encode_image(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops()), size


def windows_per_request(width: int, height: int, grids: Sequence[int] = (2, 3), bridges: bool = True,
                        fit: str = "windows") -> int:
    """ψ forwards one image costs: a window per square (``windows``) or one per candidate."""
    boxes = candidate_boxes(width, height, grids, bridges=bridges)
    return sum(len(square_windows(b)) for b in boxes) if fit == "windows" else len(boxes)


def llava_prefill_flops(size: LlavaSize, tiles: int, text_tokens: int = 64) -> dict[str, int]:
    """The VLM's prefill for ``tiles`` tiles (overview + crops): tower and language model FLOPs."""
    tower, _ = image_forward_flops(size.tower)
    t = tiles * size.tokens_per_tile + text_tokens
    d, f, layers = size.hidden, size.intermediate, size.layers
    lm = 2 * t * layers * (4 * d * d + 3 * d * f) + 2 * layers * d * t * t
    return {"tower": tiles * tower, "language_model": lm, "tokens": t}


def psi_cost_table(models: Sequence[str] = PSI_CHOICES, width: int = 2000, height: int = 1500, topk: int = 1,
                   grids: Sequence[int] = (2, 3), bridges: bool = True, llava: LlavaSize = LLAVA_1_5_7B) -> list[dict]:
    """One row per ψ: its FLOPs per request, next to the LLaVA prefill of (1 + k) tiles."""
    vlm = llava_prefill_flops(llava, 1 + topk)
    vlm_total = vlm["tower"] + vlm["language_model"]
    windows = windows_per_request(width, height, grids, bridges)
    rows = []
    for name in models:
        per_window, size = image_forward_flops(name)
        psi = per_window * windows
        rows.append({"psi": name, "input_px": size, "windows": windows, "psi_gflops": psi / 1e9,
                     "vlm_prefill_gflops": vlm_total / 1e9, "vlm_tokens": vlm["tokens"],
                     "psi_share_of_prefill": psi / vlm_total})
    return rows
