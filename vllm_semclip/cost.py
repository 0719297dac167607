"""What selection costs against what it saves: FLOPs per request of ψ, the VLM's tower and its LM.

ψ's figures are counted, not estimated: the open_clip model is created by open_clip's factory with
random weights (nothing is downloaded) and one forward per window at its input size runs under
``torch.utils.flop_counter.FlopCounterMode``; a request's windows are what ``select_crops`` would
cut for the default candidates of an image of the given size. The LLaVA side is analytic from
the architecture's sizes: its vision tower (counted the same way, on an open_clip ViT of the
tower's shape — ViT-L-14-336 for LLaVA-1.5) on every tile, and the language model's prefill over (1 + k) × tokens-per-tile plus
the text — linear layers ``2·T·L·(4d² + 3·d·f)``, causal attention ``2·L·d·T²``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from .crops import candidate_boxes, square_windows

# open_clip models a user would pick for ψ (a MobileCLIP and a SigLIP among them)
PSI_CHOICES: tuple[str, ...] = ("ViT-B-32", "ViT-B-16", "MobileCLIP-S2", "ViT-B-16-SigLIP", "ViT-L-14",
                                "ViT-L-14-336")


@dataclass(frozen=True)
class LlavaArchitecture:
    """The sizes of a LLaVA-1.5-layout model (a CLIP ViT tower, a 2-layer MLP projector, a Llama):
    what fixes its FLOPs per request here, and its ``config.json`` in ``bench.dummy_llava``."""

    name: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_hidden % self.vision_heads or self.hidden % self.heads:
            raise ValueError(f"{self.name}: a width is not divisible by its number of heads")

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # the CLS token is dropped ("default" strategy)

    @property
    def tower_vision_cfg(self) -> dict:
        """open_clip's ``vision_cfg`` of a ViT shaped like this model's vision tower (FLOPs are counted on it)."""
        return {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_hidden,
                "layers": self.vision_layers, "head_width": self.vision_hidden // self.vision_heads,
                "mlp_ratio": self.vision_intermediate / self.vision_hidden}

    @classmethod
    def from_config(cls, config: dict, name: str) -> LlavaArchitecture:
        """The sizes in a LLaVA ``config.json`` (as a dict)."""
        v, t = config["vision_config"], config["text_config"]
        return cls(name, v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"],
                   v["num_attention_heads"], v["intermediate_size"], hidden=t["hidden_size"],
                   layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                   intermediate=t["intermediate_size"], vocab_size=t["vocab_size"],
                   max_position_embeddings=t.get("max_position_embeddings", 4096))


# llava-hf/llava-1.5-{7b,13b}-hf: CLIP ViT-L/14 at 336 px (576 tokens a tile) and Vicuna (Llama 2)
LLAVA_1_5_7B = LlavaArchitecture("llava-1.5-7b", 336, 14, 1024, 24, 16, 4096,
                                 hidden=4096, layers=32, heads=32, intermediate=11008, vocab_size=32064)
LLAVA_1_5_13B = LlavaArchitecture("llava-1.5-13b", 336, 14, 1024, 24, 16, 4096,
                                  hidden=5120, layers=40, heads=40, intermediate=13824, vocab_size=32064)


@functools.lru_cache(maxsize=None)
def image_forward_flops(model_name: str) -> tuple[int, int]:
    """(FLOPs of one image through ``model_name``'s image tower at its input size, that size)."""
    from .relevance import create_architecture

    model = create_architecture(model_name).eval()  # counted, never run for its outputs: no weights
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return count_image_flops(model, size), size


@functools.lru_cache(maxsize=None)
def vision_forward_flops(vision_cfg_json: str) -> tuple[int, int]:
    """(FLOPs of one image through an open_clip ViT built from ``vision_cfg`` (JSON), its input size)."""
    import open_clip

    vision_cfg = json.loads(vision_cfg_json)
    text_cfg = {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}
    model = open_clip.CLIP(embed_dim=768, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    size = int(vision_cfg["image_size"])
    return count_image_flops(model, size), size


def count_image_flops(model, size: int) -> int:
    """FLOPs of one ``size`` px image through ``model.encode_image``, attention included.

    ``FlopCounterMode`` counts the matmuls it sees, but a fused attention kernel (the CPU's
    flash attention) is one op it has no formula for, so the attention's scores and weighted
    sum would go uncounted — a small share of a real ViT, most of a narrow stand-in's work, whose
    token count dwarfs its width. Under PyTorch's math backend the same attention runs as matmuls,
    and is counted."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # (timm towers refuse no_grad)
        model.encode_image(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


def windows_per_request(width: int, height: int, grids: Sequence[int] = (2, 3), bridges: bool = True,
                        fit: str = "windows") -> int:
    """ψ forwards one image costs: a window per square (``windows``) or one per candidate."""
    boxes = candidate_boxes(width, height, grids, bridges=bridges)
    return sum(len(square_windows(b)) for b in boxes) if fit == "windows" else len(boxes)


def llava_prefill_flops(size: LlavaArchitecture, tiles: int, text_tokens: int = 64) -> dict[str, int]:
    """The VLM's prefill for ``tiles`` tiles (overview + crops): tower and language model FLOPs."""
    tower, _ = vision_forward_flops(json.dumps(size.tower_vision_cfg, sort_keys=True))
    t = tiles * size.tokens_per_tile + text_tokens
    d, f, layers = size.hidden, size.intermediate, size.layers
    lm = 2 * t * layers * (4 * d * d + 3 * d * f) + 2 * layers * d * t * t
    return {"tower": tiles * tower, "language_model": lm, "tokens": t}


def psi_cost_table(models: Sequence[str] = PSI_CHOICES, width: int = 2000, height: int = 1500, topk: int = 1,
                   grids: Sequence[int] = (2, 3), bridges: bool = True, llava: LlavaArchitecture = LLAVA_1_5_7B) -> list[dict]:
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


def request_flops(llava: LlavaArchitecture, tiles: int, psi: str | None = None, width: int = 2000,
                  height: int = 1500, grids: Sequence[int] = (2, 3), bridges: bool = True,
                  fit: str = "windows", text_tokens: int = 64) -> dict[str, float]:
    """GFLOP of one request by part: ψ over the default candidates' windows (none without ``psi``),
    the VLM's tower over ``tiles`` tiles, its language model's prefill, and one decoded token."""
    vlm = llava_prefill_flops(llava, tiles, text_tokens)
    psi_flops = 0
    if psi is not None:
        per_window, _ = image_forward_flops(psi)
        psi_flops = per_window * windows_per_request(width, height, grids, bridges, fit)
    d, f, layers = llava.hidden, llava.intermediate, llava.layers
    decode = 2 * layers * (4 * d * d + 3 * d * f) + 2 * layers * d * vlm["tokens"] + 2 * d * llava.vocab_size
    return {"psi": psi_flops / 1e9, "tower": vlm["tower"] / 1e9, "language_model": vlm["language_model"] / 1e9,
            "decode_token": decode / 1e9}
