"""Soak: many requests at concurrency 32 against `semclip serve` with the bundled model.

Two phases on one server, side by side in one run: light requests alone, then the same light
requests with heavy ones beside them — eight images each, every image at the server's candidate
cap (``max_candidates``: the most ψ work a request may ask for). The processor and prefix caches
are off, as in ``semclip bench serve``: the workload repeats its images, and a cache hit would
skip the very work being measured. Reports errors, the light
requests' p50 / p99 latency in each phase and their ratio (how much a request at the cap slows
the others), and the server's memory over time (API server + engine core), as JSON and a plot.

    python benchmarks/soak.py                    # 1,000 requests
    python benchmarks/soak.py --requests 200     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"


def _session_rss_mib(sid: int) -> float:
    out = subprocess.run(["ps", "-eo", "sid=,rss="], capture_output=True, text=True, check=True).stdout
    return sum(int(rss) for s, rss in (line.split() for line in out.splitlines() if line.strip()) if int(s) == sid) / 1024


def _post(url: str, body: dict, timeout: float = 600.0) -> tuple[int, float]:
    start = time.monotonic()
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError:
        status = -1  # no answer at all
    return status, time.monotonic() - start


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    from vllm_semclip.bench.serve import NO_CACHE_ARGS
    from vllm_semclip.eval.benchdata import make_attribute
    from vllm_semclip.images import to_data_url
    from vllm_semclip.server import ServerProcess
    from vllm_semclip.tiny.build import ensure_default_models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="in all, half in each phase")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--heavy-every", type=int, default=20, help="in the second phase, one heavy request in N")
    p.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bundled local models
    model_dir, _ = ensure_default_models()
    scenes = [make_attribute(i, 4242)[0] for i in range(8)]
    urls = [to_data_url(s, "JPEG") for s in scenes]
    question = "What is the color of the triangle?"

    def body(images: list[str], mm: dict) -> dict:
        content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
        return {"model": str(model_dir), "max_tokens": 4, "temperature": 0.0, "mm_processor_kwargs": mm,
                "messages": [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]}

    light = [body([urls[i % 8]], {"grids": [2], "topk": 1}) for i in range(8)]  # 4 candidates, one image
    heavy = body(urls, {"grids": [2, 3], "topk": 1})  # 8 images × 17 candidates (13 cells + 4 bridges): the default cap

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    memory: list[tuple[float, float]] = []
    with ServerProcess(str(model_dir), {"max_topk": 1}, vllm_args=NO_CACHE_ARGS,
                       log_path=out.with_suffix(".server.log")) as server:
        url = server.base_url + "/v1/chat/completions"
        t0 = time.monotonic()
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                memory.append((time.monotonic() - t0, _session_rss_mib(server.pid)))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        phases = {}
        half = args.requests // 2
        rng = random.Random(0)
        for phase in ("light alone", "light beside heavy"):
            plan = [("light", light[i % 8]) for i in range(half)]
            if phase == "light beside heavy":
                plan = [("heavy", heavy) if i % args.heavy_every == 0 else job for i, job in enumerate(plan)]
            rng.shuffle(plan)
            start = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(tqdm(pool.map(lambda job: (job[0], *_post(url, job[1])), plan), total=len(plan),
                                    desc=phase))
            lat = {kind: [s for k, code, s in results if k == kind and code == 200] for kind in ("light", "heavy")}
            phases[phase] = {
                "requests": len(plan), "seconds": round(time.monotonic() - start, 1),
                "errors": {str(code): sum(1 for _, c, _ in results if c == code) for code in {c for _, c, _ in results}
                           if code != 200},
                "light_p50_ms": round(1000 * _percentile(lat["light"], 50), 1),
                "light_p99_ms": round(1000 * _percentile(lat["light"], 99), 1),
                "heavy_requests": len(lat["heavy"]),
                "heavy_p50_ms": round(1000 * _percentile(lat["heavy"], 50), 1) if lat["heavy"] else None,
            }
        stop.set()
        sampler.join()
        alive = server.process.poll() is None and server.is_healthy()

    alone, beside = phases["light alone"], phases["light beside heavy"]
    doc = {"phases": phases, "server_alive_at_the_end": alive,
           "light_slowdown_p50": round(beside["light_p50_ms"] / alone["light_p50_ms"], 2),
           "light_slowdown_p99": round(beside["light_p99_ms"] / alone["light_p99_ms"], 2),
           "memory_mib": {"first": round(memory[0][1], 1), "max": round(max(m for _, m in memory), 1),
                          "last": round(memory[-1][1], 1)},
           "memory_over_time": [(round(t, 1), round(m, 1)) for t, m in memory],
           "concurrency": args.concurrency, "caches": "processor cache and prefix caching off", "heavy": "8 images x 17 candidates (the default cap)",
           "light": "1 image, grids [2]"}
    out.write_text(json.dumps(doc, indent=1))
    _plot(memory, phases, out.with_suffix(".png"))
    for name, ph in phases.items():
        print(f"{name}: {ph['requests']} requests in {ph['seconds']} s, errors {ph['errors'] or 'none'}, light p50 / p99 "
              f"{ph['light_p50_ms']} / {ph['light_p99_ms']} ms" + (f", heavy p50 {ph['heavy_p50_ms']} ms"
                                                                      if ph["heavy_requests"] else ""))
    print(f"light requests beside heavy ones: x{doc['light_slowdown_p50']} at p50, x{doc['light_slowdown_p99']} at p99; "
          f"server memory {doc['memory_mib']['first']} -> {doc['memory_mib']['last']} MiB (max "
          f"{doc['memory_mib']['max']}); alive at the end: {alive}\nwritten to {out}")


def _plot(memory, phases, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    ax.plot([t for t, _ in memory], [m for _, m in memory])
    ends = 0.0
    for name, ph in phases.items():
        ends += ph["seconds"]
        ax.axvline(ends, color="grey", lw=0.8, ls="--")
        ax.text(ends, ax.get_ylim()[0], f" end of {name}", fontsize=7, rotation=90, va="bottom", ha="right")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("semclip serve under soak: memory of API server + engine core")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
