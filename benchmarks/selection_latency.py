"""How long SemClip's selection takes per image, on this machine, with the bundled ψ.

Times ``select_crops`` (crop the candidates, pad, ψ forward over all of them, top-k) and the
``overview``/``all`` methods beside it (no ψ), over real photos resized to several sizes,
all in one run; ψ in fp32 and in bf16 (open_clip's ``precision``, the plugin's
``relevance_precision``) side by side, the bundled ψ (336 px) beside the same CLIP at 224 px
(the LLaVA tower's size), and ψ seeing each candidate through its square windows (the default
``relevance_fit``; 4:3 photos: two windows per candidate) beside one padded view. Then, on ``--scenes`` benchmark questions generated in memory (seed 7,
the held-out seed), how often bf16 and the 224-px ψ pick the default's crop and how often each
pick contains the target. Prints tables and writes
``benchmarks/results/selection_latency.json``.

    python benchmarks/selection_latency.py [--repeats 20] [--sizes 512,1500,2700] [--scenes 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    from vllm_semclip.config import SemClipConfig
    from vllm_semclip.tiny.scenes import load_photo as sample_photo
    from vllm_semclip.selection import select_crops
    from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR, LEGACY_TOWER_DIR, RELEVANCE_MODEL_NAME
    from vllm_semclip.tiny.build import ensure_default_models

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sizes", default="512,1500,2700")
    p.add_argument("--scenes", type=int, default=200, help="benchmark questions for the precision agreement")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "selection_latency.json"))
    args = p.parse_args()
    ensure_default_models()
    import torch

    sizes = [int(s) for s in args.sizes.split(",")]
    photo = sample_photo("astronaut")
    questions = ["What is the color of the flag?", "What is the astronaut holding?", "What color is the helmet?"]
    psi = SemClipConfig(relevance_model=str(DEFAULT_RELEVANCE_DIR))  # the bundled ψ
    configs = {"relevance k=1": psi.replace({"topk": 1}),
               "relevance k=1 bf16": psi.replace({"topk": 1, "relevance_precision": "bf16"}),
               "relevance k=1 224px": psi.replace({"topk": 1, "relevance_model": str(LEGACY_TOWER_DIR)}),
               "relevance k=1 pad": psi.replace({"topk": 1, "relevance_fit": "pad"}),
               "all": psi.replace({"method": "all"}), "overview": psi.replace({"method": "overview"})}
    for config in configs.values():  # load ψ (each precision) once, outside the timings
        select_crops(photo, questions[0], config)
    results: dict[str, dict[str, dict[str, float]]] = {}
    jobs = [(name, size) for size in sizes for name in configs]
    for name, size in tqdm(jobs, desc="selection latency"):
        image = photo.resize((size, size * 3 // 4))
        times = []
        for i in range(args.repeats):
            q = f"{questions[i % len(questions)]} ({i})"  # a fresh question: no text-embedding cache hit
            t = time.perf_counter()
            select_crops(image, q, configs[name])
            times.append((time.perf_counter() - t) * 1000)
        results.setdefault(name, {})[f"{size}x{size * 3 // 4}"] = {
            "p50_ms": round(statistics.median(times), 2), "p99_ms": round(percentile(times, 0.99), 2),
            "candidates": configs[name].num_candidates,
        }
    agreement = {other: pick_agreement(configs["relevance k=1"], configs[other], args.scenes)
                 for other in ("relevance k=1 bf16", "relevance k=1 224px", "relevance k=1 pad")}
    meta = {"torch_threads": torch.get_num_threads(), "repeats": args.repeats,
            "relevance_model": f"bundled {RELEVANCE_MODEL_NAME}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "pick_agreement": agreement},
                                         indent=2))
    print(f"\n{'method':<22}{'image':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for name, by_size in results.items():
        for size, r in by_size.items():
            print(f"{name:<22}{size:>12}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}")
    for size in results["relevance k=1"]:
        base = results["relevance k=1"][size]["p50_ms"]
        print(f"p50 at {size}: bf16 / fp32 {results['relevance k=1 bf16'][size]['p50_ms'] / base:.2f}, "
              f"336 px / 224 px {base / results['relevance k=1 224px'][size]['p50_ms']:.2f}, "
              f"windows / pad {base / results['relevance k=1 pad'][size]['p50_ms']:.2f}")
    for other, a in agreement.items():
        print(f"\n{other} picks the default's crop on {a['same_top1']:.1%} of {a['questions']} benchmark questions; "
              f"crop hit default {a['hit_reference']:.1%}, {other} {a['hit_other']:.1%}")
    print(f"written to {args.out}")


def pick_agreement(reference, other, n: int) -> dict:
    """Top-1 agreement and crop hit of two ψ settings on ``n`` held-out benchmark scenes."""
    from vllm_semclip.eval.benchdata import make_attribute, make_spatial
    from vllm_semclip.eval.metrics import crop_hit
    from vllm_semclip.selection import select_crops

    same = hit_a = hit_b = 0
    for i in tqdm(range(n), desc="pick agreement"):
        image, record = (make_attribute if i % 5 < 3 else make_spatial)(i, 7)
        a, b = select_crops(image, record.question, reference), select_crops(image, record.question, other)
        same += a.boxes == b.boxes
        hit_a += crop_hit(a.boxes, record.target_boxes)
        hit_b += crop_hit(b.boxes, record.target_boxes)
    return {"questions": n, "same_top1": same / max(1, n), "hit_reference": hit_a / max(1, n),
            "hit_other": hit_b / max(1, n)}


if __name__ == "__main__":
    main()
