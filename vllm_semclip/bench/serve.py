"""What SemClip costs when serving: throughput and latency beside the alternatives, in one run.

Configurations, each a real server on 127.0.0.1 with the bundled model, driven by vLLM's own
client (``vllm bench serve``, openai-chat backend, the custom_image dataset):

1. ``overview`` — stock LLaVA architecture (plain vLLM), one image, no selection;
2. ``semclip``  — SemClip, k=1 on the default grids, ψ in the engine's encoder step (the default
                  ``selection_stage``: batched across requests);
   ``semclip_processor`` — the same with ψ per request in the front end (``selection_stage``
                  ``processor``, the stage before ψ moved into the engine);
   ``semclip_bf16`` — the same with ψ in bf16 (``relevance_precision``), ψ's cheaper setting;
   ``semclip_160`` — the same with the bundled ψ's weights at 160 px (``SemClip-ViT-T-16-160``,
                  built at run time), half ψ's work;
   ``semclip_224`` — the same with the legacy CLIP (224 px, ψ's starting point) as ψ;
                  ``semclip_224_pad`` — and one view per candidate
                  (``relevance_fit="pad"``) instead of its square windows;
3. ``given``    — stock LLaVA, the client sends the overview and the very crop SemClip picks as
                  two images: SemClip's tokens without its selection work (its ceiling);
4. ``all``      — SemClip with every candidate crop (AnyRes-like);
5. ``hf``       — the overview+crop inputs answered by Hugging Face transformers ``generate``,
                  one request at a time, as research code does;
6. ``standin_*`` — ``overview``, ``given``, ``semclip``, ``semclip_processor`` and ``all`` on the
                  FLOP-faithful stand-in of LLaVA-1.5-7B + ViT-B-16 (:mod:`vllm_semclip.bench.standin`);
                  ``standin_semclip_l14`` — ``semclip`` with the stand-in of the paper's ψ,
                  ViT-L-14-336, beside the same LLaVA (``standin_given`` is its reference too).

The workload is a fixed set of high-resolution benchmark images and their questions (from
:mod:`vllm_semclip.eval.benchdata`). Every server runs with the multimodal processor cache and
prefix caching off: the workload cycles through its images, and a cache hit would skip the
very work being measured. Each (config, concurrency) point is measured ``repeats`` times and
the median of each metric is reported. Selection time is measured inside the plugin
(``SEMCLIP_TIMINGS_FILE``); the CPU each process spends per request — front end, engine core,
worker, client — is sampled beside it (:mod:`vllm_semclip.bench.cpu_time`): the front end's is
what caps one API server process, and on a host of few cores it competes with the engine's. Results:
``benchmarks/results/serve_throughput.json`` shaped ``{config: {concurrency: {metric: value}}}`` plus
a plot of throughput against visual tokens.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from vllm_semclip.bench.cpu_time import ROLES, CpuSampler
from vllm_semclip.tiny.bundled import RELEVANCE_MODEL_NAME, SMALL_RELEVANCE_MODEL_NAME, TOWER_MODEL_NAME

CONFIGS = ("overview", "semclip", "semclip_processor", "semclip_bf16", "semclip_160", "semclip_224", "semclip_224_pad",
           "given", "all", "hf", "standin_overview", "standin_given", "standin_semclip", "standin_semclip_processor",
           "standin_semclip_l14", "standin_all")
METRICS = ("request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms",
           "p99_tpot_ms", "p50_e2el_ms", "p99_e2el_ms")
NO_CACHE_ARGS = ["--mm-processor-cache-gb", "0", "--no-enable-prefix-caching"]
DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"  # the repository's benchmarks/


def _data_url(path: str | Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def build_workload(out: Path, n: int, seed: int) -> dict[str, Path]:
    """Benchmark images + questions; the ``given`` rows carry SemClip's own crop as a second image."""
    from vllm_semclip.eval.benchdata import write_bench
    from vllm_semclip.config import SemClipConfig
    from vllm_semclip.selection import select_crops
    from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR

    records = write_bench(out / "data", n, seed)
    config = SemClipConfig(topk=1, relevance_model=str(DEFAULT_RELEVANCE_DIR))  # the bundled LLaVA's ψ
    (out / "crops").mkdir(parents=True, exist_ok=True)
    one, two = [], []
    for r in records:
        image = r.load_image()
        box = select_crops(image, r.question, config).boxes[0]
        crop_path = out / "crops" / f"{r.name}.jpg"
        image.crop(box).save(crop_path, quality=90)
        # the files' own JPEG bytes as data URLs: vLLM's client sends them as they are
        one.append({"prompt": r.question, "image_files": [_data_url(r.image)]})
        two.append({"prompt": r.question, "image_files": [_data_url(r.image), _data_url(crop_path)]})
    paths = {"one": out / "one_image.jsonl", "two": out / "overview_and_crop.jsonl"}
    for key, rows in (("one", one), ("two", two)):
        paths[key].write_text("".join(json.dumps(row) + "\n" for row in rows))
    sizes = [r.load_image().size for r in records]
    (out / "image_sizes.json").write_text(json.dumps(sizes))
    return paths


# config → (ψ: an open_clip name, a stand-in's reference ψ, or None; tiles through the VLM's tower)
FLOP_SHAPES = {"overview": (None, 1), "given": (None, 2), "hf": (None, 2), "semclip": (RELEVANCE_MODEL_NAME, 2),
               "semclip_processor": (RELEVANCE_MODEL_NAME, 2), "semclip_bf16": (RELEVANCE_MODEL_NAME, 2),
               "semclip_160": (SMALL_RELEVANCE_MODEL_NAME, 2),
               "semclip_224": (TOWER_MODEL_NAME, 2), "semclip_224_pad": (TOWER_MODEL_NAME, 2),
               "standin_overview": (None, 1), "standin_given": (None, 2), "standin_semclip": ("standin:ViT-B-16", 2),
               "standin_semclip_processor": ("standin:ViT-B-16", 2), "standin_semclip_l14": ("standin:ViT-L-14-336", 2)}
FLOP_FIT = {"semclip_224_pad": "pad"}  # ψ's relevance_fit where it is not the default "windows"


def standin_psi(name: str) -> str | None:
    """The real ψ a stand-in configuration's ψ stands for (``FLOP_SHAPES``), ``None`` for one without ψ."""
    psi = FLOP_SHAPES.get(name, (None, 0))[0]
    return psi.split(":", 1)[1] if psi and psi.startswith("standin:") else None


def config_flops(name: str, model_dir: Path, sizes: list[tuple[int, int]]) -> dict[str, float]:
    """GFLOP per request of ψ, the tower, the LM prefill and one decoded token for a configuration,
    at the workload's median image size (``cost.request_flops`` on the served models' configs)."""
    from vllm_semclip.bench.standin import STANDIN_LLAVA, standin_psi_flops
    from vllm_semclip.cost import LlavaArchitecture, request_flops, windows_per_request
    from vllm_semclip.crops import num_candidates
    from vllm_semclip.tiny.bundled import register_model_configs

    register_model_configs()
    if name.startswith("standin_"):
        llava = STANDIN_LLAVA
    else:
        llava = LlavaArchitecture.from_config(json.loads((Path(model_dir) / "config.json").read_text()),
                                              "bundled tiny LLaVA")
    psi, tiles = FLOP_SHAPES.get(name, (None, 1 + num_candidates((2, 3))))  # "all": every candidate
    width = int(statistics.median(w for w, _ in sizes))
    height = int(statistics.median(h for _, h in sizes))
    reference = standin_psi(name)
    flops = request_flops(llava, tiles, None if reference else psi, width, height, fit=FLOP_FIT.get(name, "windows"))
    if reference:
        flops["psi"] = standin_psi_flops(reference) * windows_per_request(width, height) / 1e9
    return {k: round(v, 4) for k, v in flops.items()}


def _bundled_tokens_per_tile(model_dir: Path) -> int:
    from vllm_semclip.cost import LlavaArchitecture

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return LlavaArchitecture.from_config(config, "bundled tiny LLaVA").tokens_per_tile


def client_argv(base_url: str, model: str, dataset: Path, concurrency: int, num_prompts: int, output_len: int,
                result_dir: Path, tag: str) -> list[str]:
    """Arguments of one ``vllm bench serve`` run (openai-chat backend, custom_image dataset)."""
    argv = ["--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
            "--model", model, "--tokenizer", model,
            "--dataset-name", "custom_image", "--dataset-path", str(dataset),
            "--custom-output-len", str(output_len), "--ignore-eos", "--disable-shuffle",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{tag}.json", "--seed", "0"]
    return argv


def run_vllm_client(plan: list[dict], plan_path: Path, result_dir: Path,
                    cpu: CpuSampler | None = None) -> dict[str, tuple[dict, dict]]:
    """Run a plan of ``vllm bench serve`` runs in one client process (whose CPU ``cpu`` counts as the
    client's); return {tag: (result, times)}."""
    plan_path.write_text(json.dumps(plan))
    client = subprocess.Popen([sys.executable, "-m", "vllm_semclip.bench.vllm_bench", "--plan", str(plan_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if cpu is not None:
        cpu.watch_client(client.pid)
    try:
        stdout, stderr = client.communicate(timeout=3600)
    except subprocess.TimeoutExpired:
        client.kill()
        raise
    if client.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    times = {t["tag"]: t for t in json.loads(Path(str(plan_path) + ".times").read_text())}
    results = {}
    for run in plan:
        result = json.loads((result_dir / f"{run['tag']}.json").read_text())
        if result.get("completed") != run["num_prompts"]:
            raise RuntimeError(f"{run['tag']}: only {result.get('completed')} of {run['num_prompts']} requests completed")
        results[run["tag"]] = (result, times[run["tag"]])
    return results


def visual_tokens(base_url: str, model: str, row: dict) -> int:
    """Visual tokens of one request: the server's prompt tokens minus the text's."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from vllm_semclip.eval.demo import text_token_count

    client = OpenAI(base_url=base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)
    content = [{"type": "image_url", "image_url": {"url": url}} for url in row["image_files"]]
    content.append({"type": "text", "text": row["prompt"]})
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                           max_tokens=1)
    tokenizer = AutoTokenizer.from_pretrained(model)
    n = len(row["image_files"])
    return reply.usage.prompt_tokens - (text_token_count(tokenizer, row["prompt"], n) - n)


def run_hf(model: str, rows: list[dict], num_prompts: int, output_len: int) -> dict[str, Any]:
    """transformers ``generate`` on the overview+crop inputs, one request at a time."""
    import torch
    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration, StoppingCriteria

    from PIL import Image

    processor = AutoProcessor.from_pretrained(model)
    hf = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.bfloat16).eval()

    class Clock(StoppingCriteria):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ttft, tpot, e2el = [], [], []
    begin = time.perf_counter()
    for i in tqdm(range(num_prompts), desc="hf generate", leave=False):
        row = rows[i % len(rows)]
        start = time.perf_counter()
        images = [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
                  for url in row["image_files"]]
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": row["prompt"]}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=prompt, images=images, return_tensors="pt")
        visual = int((inputs["input_ids"] == hf.config.image_token_index).sum())
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        clock = Clock()
        with torch.inference_mode():
            hf.generate(**inputs, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                        stopping_criteria=[clock], pad_token_id=processor.tokenizer.pad_token_id)
        end = time.perf_counter()
        ttft.append((clock.stamps[0] - start) * 1000)
        tpot.append((end - clock.stamps[0]) * 1000 / max(1, output_len - 1))
        e2el.append((end - start) * 1000)
    duration = time.perf_counter() - begin
    return {
        "request_throughput": num_prompts / duration, "output_throughput": num_prompts * output_len / duration,
        **{f"p{q}_{name}_ms": float(np.percentile(v, q)) for name, v in (("ttft", ttft), ("tpot", tpot), ("e2el", e2el))
           for q in (50, 99)},
        "completed": num_prompts, "duration": duration, "visual_tokens_per_request": visual,
    }


def _median_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {m: statistics.median(r[m] for r in runs) for m in METRICS}


def _selection_stats(records: list[dict], window: dict) -> dict[str, float]:
    """Selection figures inside one run's time window, from the plugin's timing log: per image in
    the processor stage; per ψ forward (and images in it) in the engine stage, with the front end's
    preparation per image (cut, resize, text embedding: no ψ image work)."""
    inside = [t for t in records if window["start"] <= t.get("time", 0) <= window["end"]]
    out: dict[str, float] = {}
    selections = [t for t in inside if t.get("stage", "processor") in ("processor", "engine")]
    if selections:
        values = [t["selection_ms"] for t in selections]
        out.update({"p50_selection_ms": float(np.percentile(values, 50)),
                    "p99_selection_ms": float(np.percentile(values, 99)), "selection_samples": len(values)})
    engine = [t for t in inside if t.get("stage") == "engine"]
    if engine:
        out["psi_images_per_forward"] = sum(t["images"] for t in engine) / len(engine)
    front = [t for t in inside if t.get("stage") == "front_end"]
    if front:
        out["p50_front_end_ms"] = float(np.percentile([t["prepare_ms"] for t in front], 50))
    candidates = [t["candidates"] for t in inside if "candidates" in t]
    if candidates:
        out["candidates"] = statistics.median(candidates)
    return out


def _cpu_stats(cpu: CpuSampler, window: dict, requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each role (front end, engine core, worker, client) and in all,
    inside one run's time window."""
    seconds = cpu.seconds_by_role(window["start"], window["end"])
    out = {f"cpu_{role}_ms": 1000 * seconds[role] / requests for role in ROLES}
    out["cpu_total_ms"] = sum(out.values())
    return out


def plot(results: dict, path: Path, concurrency: str) -> None:
    """Throughput against visual tokens per request, and beside it each configuration's CPU per request
    by process (front end, engine core, worker, client) where the run measured it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {name: by_c[concurrency] for name, by_c in results.items() if by_c.get(concurrency)}
    with_cpu = [name for name, point in points.items() if "cpu_total_ms" in point]
    fig, axes = plt.subplots(1, 2 if with_cpu else 1, figsize=(12 if with_cpu else 6, 4), squeeze=False)
    ax = axes[0][0]
    for name, point in points.items():
        ax.scatter(point["visual_tokens_per_request"], point["request_throughput"], s=60)
        ax.annotate(name, (point["visual_tokens_per_request"], point["request_throughput"]),
                    textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("visual tokens per request")
    ax.set_ylabel(f"requests / s (concurrency {concurrency})")
    ax.set_title("Serving cost of SemClip vs alternatives")
    ax.grid(alpha=0.3)
    if with_cpu:
        ax = axes[0][1]
        left = np.zeros(len(with_cpu))
        for role in ROLES:
            values = np.array([points[name][f"cpu_{role}_ms"] for name in with_cpu])
            ax.barh(with_cpu, values, left=left, label=role.replace("_", " "))
            left += values
        ordered = np.sort(left)
        if len(ordered) > 1 and ordered[-1] > 3 * ordered[-2]:  # one outlier ("all"): clip it, label its total
            limit = 1.3 * ordered[-2]
            ax.set_xlim(0, limit)
            for i, total in enumerate(left):
                if total > limit:
                    ax.text(0.98 * limit, i, f"{total:,.0f} →", ha="right", va="center", fontsize=8,
                            color="white", fontweight="bold")
        ax.set_xlabel("CPU ms per request (engine core, worker: with vLLM's spin-waits)", fontsize=9)
        ax.set_title("Where a request's CPU goes")
        ax.legend(fontsize=8, loc="upper right")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# what a selecting configuration is measured against, within its family (bundled, or ``standin_``)
RATIO_REFERENCES = ("given", "all", "overview", "semclip")


def throughput_ratios(results: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Request throughput of every selecting configuration (``semclip*``, ``standin_semclip*``) over each
    reference of its own family (:data:`RATIO_REFERENCES`, and ``hf`` for the bundled models) measured
    at the same concurrency: ``{"a/b@c": ratio}``."""
    def throughput(name: str, c: str) -> float | None:
        return results.get(name, {}).get(c, {}).get("request_throughput")

    ratios = {}
    for name, by_c in results.items():
        prefix = "standin_" if name.startswith("standin_") else ""
        if not name.removeprefix(prefix).startswith("semclip"):
            continue
        references = [prefix + r for r in RATIO_REFERENCES] + ([] if prefix else ["hf"])
        for c in by_c:
            for ref in references:
                if ref != name and throughput(name, c) and throughput(ref, c):
                    ratios[f"{name}/{ref}@{c}"] = round(throughput(name, c) / throughput(ref, c), 3)
    return ratios


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from vllm_semclip import timings
    from vllm_semclip.server import ServerProcess
    from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR, LEGACY_TOWER_DIR
    from vllm_semclip.tiny.build import ensure_default_models

    p = argparse.ArgumentParser(prog="semclip bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="concurrency 8 only, fewer requests (< 5 minutes)")
    p.add_argument("--concurrency", default=None, help="comma list (default 1,8,32; --quick: 8)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per run (default max(32, 4 x concurrency))")
    p.add_argument("--repeats", type=int, default=None, help="runs per point; the median is reported (default 3; --quick: 2)")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--workload-size", type=int, default=32, help="distinct images and questions")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=str(DEFAULT_RESULTS))
    args = p.parse_args(argv)

    concurrencies = [int(c) for c in (args.concurrency or ("8" if args.quick else "1,8,32")).split(",")]
    repeats = args.repeats or (2 if args.quick else 3)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise ValueError(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    out = Path(args.out)
    runs_dir = out / "serve_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    model_dir, _ = ensure_default_models()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bundled local models: no hub lookups
    model = str(model_dir)

    def prompts_for(c: int) -> int:
        return args.num_prompts or max(32, 4 * c)

    t_begin = time.monotonic()
    print(f"workload: {args.workload_size} benchmark images (seed {args.seed}) ...")
    workload = build_workload(out / "serve_workload", args.workload_size, args.seed)
    rows = {k: [json.loads(line) for line in v.read_text().splitlines()] for k, v in workload.items()}

    servers = {  # config: (server it runs on, that server's SemClip settings, workload)
        "overview": ("stock", {}, "one"),
        "given": ("stock", {}, "two"),
        "semclip": ("semclip", {"topk": 1}, "one"),
        "semclip_processor": ("semclip-processor", {"topk": 1, "selection_stage": "processor"}, "one"),
        "semclip_bf16": ("semclip-bf16", {"topk": 1, "relevance_precision": "bf16"}, "one"),  # ψ in bf16
        "semclip_160": ("semclip-160", {"topk": 1, "relevance_model": str(out / "psi-160")}, "one"),  # ψ at 160 px
        "semclip_224": ("semclip-224", {"topk": 1, "relevance_model": str(LEGACY_TOWER_DIR)}, "one"),  # ψ at 224 px
        "semclip_224_pad": ("semclip-224-pad", {"topk": 1, "relevance_model": str(LEGACY_TOWER_DIR),
                                                "relevance_fit": "pad"}, "one"),  # … one view per candidate
        "all": ("semclip-all", {"method": "all"}, "one"),
        # the FLOP-faithful stand-in of LLaVA-1.5-7B + ViT-B-16 (random weights, bench/standin.py)
        "standin_overview": ("standin-stock", {}, "one"),
        "standin_given": ("standin-stock", {}, "two"),
        "standin_semclip": ("standin-semclip", {"topk": 1}, "one"),
        "standin_semclip_processor": ("standin-semclip-processor", {"topk": 1, "selection_stage": "processor"}, "one"),
        "standin_all": ("standin-all", {"method": "all"}, "one"),
        # … and of LLaVA-1.5-7B + the paper's ψ, ViT-L-14-336 (the same LLaVA, another ψ)
        "standin_semclip_l14": ("standin-l14-semclip", {"topk": 1}, "one"),
    }
    if "semclip_160" in configs:  # the bundled ψ's weights at 160 px, written here (seconds), not stored
        from vllm_semclip.tiny.train_clip import resize_local_dir

        resize_local_dir(DEFAULT_RELEVANCE_DIR, SMALL_RELEVANCE_MODEL_NAME, out / "psi-160")
    standin_dirs: dict[str, Path] = {}
    if any(name.startswith("standin_") for name in configs):
        from vllm_semclip.bench.standin import STANDIN_MAX_MODEL_LEN, STANDIN_MAX_NUM_BATCHED_TOKENS, write_standin

        # a stand-in server serves the pair of its ψ; one without ψ the ViT-B-16 pair (the same LLaVA)
        for reference in {standin_psi(name) or "ViT-B-16" for name in configs if name.startswith("standin_")}:
            standin_dirs[reference] = write_standin(out / "standin", reference)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[str, list[str]] = {}
    for name in configs:
        if name != "hf":
            groups.setdefault(servers[name][0], []).append(name)
    total_runs = sum(len(v) for v in groups.values()) * len(concurrencies) * repeats
    bar = tqdm(total=total_runs, desc="serve benchmark")
    for server_kind, names in groups.items():
        semclip_config = servers[names[0]][1]
        timings_file = runs_dir / f"timings_{server_kind}.jsonl"
        timings_file.unlink(missing_ok=True)
        env = {timings.ENV: str(timings_file)}
        standin = server_kind.startswith("standin")
        served = str(standin_dirs[standin_psi(names[0]) or "ViT-B-16"]) if standin else model
        vllm_args = NO_CACHE_ARGS + (["--load-format", "dummy", "--max-model-len", str(STANDIN_MAX_MODEL_LEN),
                                      "--max-num-batched-tokens", str(STANDIN_MAX_NUM_BATCHED_TOKENS)]
                                     if standin else [])
        with ServerProcess(served, semclip_config, stock=server_kind.endswith("stock"), vllm_args=vllm_args,
                           env={**os.environ, **env}, log_path=runs_dir / f"server_{server_kind}.log") as server, \
                CpuSampler(server.pid) as cpu:
            tokens = {}
            plan = []
            for name in names:
                dataset_key = servers[name][2]
                tokens[name] = visual_tokens(server.base_url, served, rows[dataset_key][0])  # warms up ψ too
                for c in concurrencies:
                    for r in range(repeats):
                        tag = f"{name}_c{c}_r{r}"
                        plan.append({"tag": tag, "name": name, "concurrency": c, "num_prompts": prompts_for(c),
                                     "argv": client_argv(server.base_url, served, workload[dataset_key], c,
                                                         prompts_for(c), args.output_len, runs_dir, tag)})
            done = run_vllm_client(plan, runs_dir / f"plan_{server_kind}.json", runs_dir, cpu)
            bar.update(len(plan))
        selection_log = timings.read(timings_file)
        for name in names:
            for c in concurrencies:
                picked = [done[run["tag"]] for run in plan if run["name"] == name and run["concurrency"] == c]
                point = _median_of([res for res, _ in picked])
                sel: dict[str, list[float]] = {}
                for result, window in picked:
                    stats = {**_selection_stats(selection_log, window), **_cpu_stats(cpu, window, result["completed"])}
                    for k, v in stats.items():
                        sel.setdefault(k, []).append(v)
                point.update({"visual_tokens_per_request": tokens[name], "num_prompts": prompts_for(c),
                              "repeats": repeats, **{k: statistics.median(v) for k, v in sel.items()}})
                results.setdefault(name, {})[str(c)] = point
    bar.close()

    if "hf" in configs:
        n = 16 if args.quick else 32
        hf_runs = [run_hf(model, rows["two"], n, args.output_len) for _ in range(repeats)]
        point = _median_of(hf_runs)
        point.update({"visual_tokens_per_request": hf_runs[0]["visual_tokens_per_request"], "num_prompts": n,
            "repeats": repeats,
            "note": "transformers generate, one request at a time whatever the offered concurrency"})
        results["hf"] = {str(c): dict(point) for c in concurrencies}

    ratios = throughput_ratios(results)
    sizes = [tuple(x) for x in json.loads((out / "serve_workload" / "image_sizes.json").read_text())]
    flops = {name: config_flops(name, model_dir, sizes) for name in results}
    doc = {**results, "_flops_gflop_per_request": flops, "_meta": {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "model": f"bundled tiny LLaVA ({_bundled_tokens_per_tile(model_dir)} tokens per tile); standin_*: the FLOP-faithful "
                 "stand-in of LLaVA-1.5-7B + ViT-B-16 (standin_semclip_l14: + ViT-L-14-336; random weights, "
                 "576 tokens per tile)",
        "output_len": args.output_len,
        "workload": f"{args.workload_size} V*-style images 1500-2700 px (seed {args.seed})",
        "client": "vllm bench serve (openai-chat, custom_image) via python -m vllm_semclip.bench.vllm_bench",
        "caches": "processor cache and prefix caching off", "repeats": repeats, "quick": args.quick,
        "wall_s": round(time.monotonic() - t_begin, 1)}, "_ratios": ratios}
    result_path = out / ("serve_throughput_quick.json" if args.quick else "serve_throughput.json")
    result_path.write_text(json.dumps(doc, indent=2))
    plot_c = str(max(concurrencies))
    plot(results, result_path.with_suffix(".png"), plot_c)

    w = max(len(name) for name in CONFIGS) + 1  # the config column fits every name
    print(f"\n{'config':<{w}}{'conc':>5}{'req/s':>8}{'out tok/s':>10}{'ttft p50':>10}{'ttft p99':>10}"
          f"{'e2el p50':>10}{'e2el p99':>10}{'vis tok':>8}{'sel p50':>9}{'sel p99':>9}{'img/psi':>8}{'front':>7}")
    for name, by_c in results.items():
        for c, m in by_c.items():
            print(f"{name:<{w}}{c:>5}{m['request_throughput']:>8.2f}{m['output_throughput']:>10.1f}"
                  f"{m['p50_ttft_ms']:>10.0f}{m['p99_ttft_ms']:>10.0f}{m['p50_e2el_ms']:>10.0f}{m['p99_e2el_ms']:>10.0f}"
                  f"{m.get('visual_tokens_per_request') or 0:>8}{m.get('p50_selection_ms', float('nan')):>9.1f}"
                  f"{m.get('p99_selection_ms', float('nan')):>9.1f}{m.get('psi_images_per_forward', float('nan')):>8.1f}"
                  f"{m.get('p50_front_end_ms', float('nan')):>7.0f}")
    print(f"\nCPU ms per request: {'config':<{w + 7}}{'front end':>10}{'engine core':>12}{'worker':>8}"
          f"{'client':>8}{'total':>8}")
    for name, by_c in results.items():
        for c, m in by_c.items():
            if "cpu_total_ms" in m:
                print(f"{'':<20}{name + ' @' + c:<{w + 7}}" + "".join(
                    f"{m[f'cpu_{key}_ms']:>{width}.0f}" for key, width in
                    (("front_end", 10), ("engine_core", 12), ("worker", 8), ("client", 8), ("total", 8))))
    print(f"\nGFLOP per request (median workload image): {'config':<{w}}{'psi':>8}{'tower':>8}{'LM prefill':>11}"
          f"{'decode/tok':>11}")
    for name, f in flops.items():
        print(f"{'':<43}{name:<{w}}{f['psi']:>8.2f}{f['tower']:>8.2f}{f['language_model']:>11.2f}"
              f"{f['decode_token']:>11.4f}")
    print("\nratios of request throughput:", json.dumps(ratios))
    print(f"written: {result_path} and {result_path.with_suffix('.png')} ({doc['_meta']['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
