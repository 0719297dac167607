"""How long SemClip's selection takes per image, on this machine, with the bundled ψ.

Times ``select_crops`` (crop the candidates, pad, ψ forward over all of them, top-k) and the
``overview``/``all`` methods beside it (no ψ), over real photos resized to several sizes,
all in one run. Prints a table and writes ``benchmarks/results/selection_latency.json``.

    python benchmarks/selection_latency.py [--repeats 20] [--sizes 512,1500,2700]
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
    from vllm_semclip.images import sample_photo
    from vllm_semclip.selection import select_crops
    from vllm_semclip.tiny_models import ensure_default_models

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sizes", default="512,1500,2700")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "selection_latency.json"))
    args = p.parse_args()
    ensure_default_models()
    import torch

    sizes = [int(s) for s in args.sizes.split(",")]
    photo = sample_photo("astronaut")
    questions = ["What is the color of the flag?", "What is the astronaut holding?", "What color is the helmet?"]
    configs = {"relevance k=1": SemClipConfig(topk=1), "all": SemClipConfig(method="all"),
               "overview": SemClipConfig(method="overview")}
    select_crops(photo, questions[0], configs["relevance k=1"])  # load ψ once, outside the timings
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
    meta = {"torch_threads": torch.get_num_threads(), "repeats": args.repeats,
            "relevance_model": "bundled SemClip-ViT-T-16 (224 px, patch 16, 4 layers)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\n{'method':<16}{'image':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for name, by_size in results.items():
        for size, r in by_size.items():
            print(f"{name:<16}{size:>12}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
