"""ψ's FLOPs per request next to the VLM's prefill: counted from open_clip's configs, nothing downloaded."""

import json
import subprocess
import sys

import pytest

from vllm_semclip.cost import (LLAVA_1_5_7B, image_forward_flops, llava_prefill_flops, psi_cost_table, vision_forward_flops,
                               windows_per_request)


def test_windows_are_what_select_crops_cuts():
    assert windows_per_request(1500, 1500) == 17  # square cells: one window each (13 cells + 4 bridges)
    assert windows_per_request(2000, 1500) == 34  # 4:3 cells: two squares each
    assert windows_per_request(2000, 1500, fit="pad") == 17 == windows_per_request(2000, 1500, fit="center")
    assert windows_per_request(2000, 1500, bridges=False) == 26


def test_psi_flops_are_counted_per_window_and_scale_with_the_candidates():
    per_window, size = image_forward_flops("SemClip-ViT-T-16-336")  # the legacy ψ's config (conftest registers it)
    small, size_224 = image_forward_flops("SemClip-ViT-T-16")
    assert (size, size_224) == (336, 224) and per_window > 2 * small > 0  # 441 tokens against 196
    rows = psi_cost_table(["SemClip-ViT-T-16-336"], 2000, 1500)
    assert rows[0]["windows"] == 34 and rows[0]["psi_gflops"] == pytest.approx(34 * per_window / 1e9)
    square = psi_cost_table(["SemClip-ViT-T-16-336"], 1500, 1500)
    assert square[0]["psi_gflops"] == pytest.approx(rows[0]["psi_gflops"] / 2)


@pytest.mark.parametrize("width,layers,head_width", [(24, 3, 12), (64, 2, 32)])
def test_a_vits_flops_count_its_attention(width, layers, head_width):
    # patch embedding, then per block qkv + out projection + a 4× MLP (2·T·12·w²) and the attention's
    # scores and weighted sum (2 · 2·T²·w), which a fused CPU kernel hides from FlopCounterMode
    cfg = {"image_size": 224, "patch_size": 16, "width": width, "layers": layers, "head_width": head_width}
    flops, size = vision_forward_flops(json.dumps(cfg, sort_keys=True))
    patches, tokens = 196, 197
    patch_embed = 2 * patches * 3 * 16 * 16 * width
    blocks = layers * (2 * tokens * 12 * width * width + 4 * tokens * tokens * width)
    projection = 2 * width * 768  # the pooled token into the 768-d embedding of the counting model
    assert size == 224 and flops == patch_embed + blocks + projection


def test_llava_prefill_is_the_7b_arithmetic():
    vlm = llava_prefill_flops(LLAVA_1_5_7B, tiles=2, text_tokens=64)
    t = 2 * 576 + 64
    linear = 2 * t * 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)
    assert vlm["tokens"] == t and vlm["language_model"] == linear + 2 * 32 * 4096 * t * t
    assert 12e12 < vlm["language_model"] < 20e12  # ≈ 2 × 6.7 B parameters × 1,216 tokens, plus attention
    # the tower: open_clip's ViT-L-14-336, LLaVA-1.5's, ≈ 0.35 TFLOP a tile
    assert 0.3e12 < vlm["tower"] / 2 < 0.45e12


def test_cli_psi_cost_json():
    out = subprocess.run([sys.executable, "-m", "vllm_semclip.cli", "psi-cost", "--models", "ViT-B-32", "--json",
                          "--size", "1500x1500"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["psi"] == "ViT-B-32" and row["windows"] == 17 and 0 < row["psi_share_of_prefill"] < 0.05
    bad = subprocess.run([sys.executable, "-m", "vllm_semclip.cli", "psi-cost", "--size", "big"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--size" in bad.stderr
