"""ψ against the VLM it serves, on one accelerator: real sizes, random weights, torch + transformers only.

What a GPU deployment pays for SemClip's selection, next to what it pays anyway: ψ's image tower
over every candidate of a request (open_clip ``ViT-B-16`` and ``ViT-L-14-336``, random weights) at
batch 1 and 32 requests, against a LLaVA-1.5-7B-sized prefill (transformers'
``LlavaForConditionalGeneration``, its vision tower and language model, random weights) of one
request with 576 and 1,152 visual tokens (the overview alone; overview + one crop) and of 32
requests at once. No vLLM, no weights on disk, no network: the modules are built from configs
(``cost.LLAVA_1_5_7B`` through ``bench.dummy_llava.llava_config``) and filled at random.

    python benchmarks/psi_vs_prefill.py                       # on a CUDA device, fp16 (≈ 16 GiB)
    python benchmarks/psi_vs_prefill.py --tiny --device cpu   # the FLOP-faithful stand-in, for a CPU check

``--tiny`` runs the same code on the stand-in (``bench/standin.py``: its LLaVA and ψ stand-ins
keep LLaVA-1.5-7B's FLOP ratios at a size a CPU runs). Prints a table of medians and writes
``benchmarks/results/psi_vs_prefill.json`` with the measured time ratios beside the analytic FLOP
ratios (``cost.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from vllm_semclip.bench.dummy_llava import llava_config
from vllm_semclip.bench.standin import STANDIN_LLAVA, STANDIN_PSI, standin_psi_flops
from vllm_semclip.cost import LLAVA_1_5_7B, LlavaArchitecture, image_forward_flops, llava_prefill_flops

RESULTS = Path(__file__).resolve().parent / "results" / "psi_vs_prefill.json"
PSI_MODELS = ("ViT-B-16", "ViT-L-14-336")
TEXT_TOKENS = 64  # a question and the chat template around it


def _clock(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def build_psi(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """ψ's image tower at random weights: open_clip's ``name``, or its stand-in (``--tiny``)."""
    import open_clip

    if tiny:
        cfg = STANDIN_PSI[name]
        model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    else:
        model = open_clip.create_model(name, pretrained=None)
    visual = model.visual.to(device, dtype).eval()
    size = visual.image_size
    return visual, int(size[0] if isinstance(size, (tuple, list)) else size)


def build_llava(arch: LlavaArchitecture, device: torch.device, dtype: torch.dtype):
    """A ``LlavaForConditionalGeneration`` of ``arch``'s sizes, random weights, on ``device``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig.from_dict(llava_config(arch, image_token_index=arch.vocab_size - 1))
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval(), config.image_token_index


def measure(tiny: bool, device: torch.device, dtype: torch.dtype, candidates: int, batches: list[int],
            repeats: int) -> dict:
    arch = STANDIN_LLAVA if tiny else LLAVA_1_5_7B
    psi_names = tuple(STANDIN_PSI) if tiny else PSI_MODELS
    out: dict = {"psi_ms": {}, "prefill_ms": {}, "flops_gflop": {}}
    for name in psi_names:
        visual, size = build_psi(name, tiny, device, dtype)
        out["psi_ms"][name] = {}
        for b in batches:
            pixels = torch.randn(b * candidates, 3, size, size, device=device, dtype=dtype)
            out["psi_ms"][name][str(b)] = _clock(lambda: visual(pixels), device, repeats)
        per_view = standin_psi_flops(name) if tiny else image_forward_flops(name)[0]
        out["flops_gflop"][f"psi:{name}"] = per_view * candidates / 1e9
        del visual
    model, image_token = build_llava(arch, device, dtype)
    for tiles in (1, 2):
        tokens = tiles * arch.tokens_per_tile
        out["prefill_ms"][str(tokens)] = {}
        for b in batches:
            ids = torch.full((b, tokens + TEXT_TOKENS), 5, dtype=torch.long, device=device)
            ids[:, 1:1 + tokens] = image_token
            pixels = torch.randn(b * tiles, 3, arch.image_size, arch.image_size, device=device, dtype=dtype)
            out["prefill_ms"][str(tokens)][str(b)] = _clock(
                lambda: model(input_ids=ids, pixel_values=pixels, use_cache=False, logits_to_keep=1), device, repeats)
        f = llava_prefill_flops(arch, tiles, TEXT_TOKENS)
        out["flops_gflop"][f"prefill:{tokens}"] = (f["tower"] + f["language_model"]) / 1e9
    out["ratios"] = {}
    for name in psi_names:
        for tokens, by_batch in out["prefill_ms"].items():
            for b, ms in by_batch.items():
                out["ratios"][f"time psi:{name} / prefill:{tokens} @ batch {b}"] = round(out["psi_ms"][name][b] / ms, 4)
            out["ratios"][f"flops psi:{name} / prefill:{tokens}"] = round(
                out["flops_gflop"][f"psi:{name}"] / out["flops_gflop"][f"prefill:{tokens}"], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="the FLOP-faithful stand-in instead of the real sizes")
    parser.add_argument("--candidates", type=int, default=13, help="ψ views per request (13: grids 2 and 3)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="requests at once")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if args.candidates < 1 or min(args.batch) < 1 or args.repeats < 1:
        parser.error("--candidates, --batch and --repeats must be positive")
    torch.manual_seed(0)
    result = measure(args.tiny, device, dtype, args.candidates, args.batch, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    doc = {"device": name, "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
           "candidates": args.candidates, "text_tokens": TEXT_TOKENS, "repeats": args.repeats, **result}
    print(f"{'part':<34} " + " ".join(f"{'batch ' + str(b):>12}" for b in args.batch) + f" {'GFLOP/request':>14}")
    for psi, by_batch in doc["psi_ms"].items():
        print(f"{'ψ ' + psi + f' ({args.candidates} views)':<34} " + " ".join(f"{by_batch[str(b)]:>10.2f}ms" for b in args.batch)
              + f" {doc['flops_gflop']['psi:' + psi]:>14.1f}")
    for tokens, by_batch in doc["prefill_ms"].items():
        print(f"{'prefill, ' + tokens + ' visual tokens':<34} " + " ".join(f"{by_batch[str(b)]:>10.2f}ms" for b in args.batch)
              + f" {doc['flops_gflop']['prefill:' + tokens]:>14.1f}")
    for key, value in doc["ratios"].items():
        print(f"  {key}: {value:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
