"""Serve the real LLaVA-1.5-7B architecture with SemClip and a ViT-B-16 ψ, random weights, on a CPU.

Not a test (slow: minutes on 2 cores, ~14 GiB of memory; not in CI): it proves that the code
path a real deployment takes — a 336 px ViT-L/14 tower, 576 tokens a tile, the 7B Llama, an
open_clip ψ at 224 px — runs end to end inside vLLM: the checkpoint is config only
(``vllm_semclip.bench.dummy_llava``), vLLM fills the weights (``--load-format dummy``), ψ is
open_clip's ``ViT-B-16`` with random weights (nothing is downloaded). One request goes through
the OpenAI API; the script checks the prompt's token count and the selection log line, and
writes ``out/smoke/llava_7b.json``.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/smoke_llava_7b.py   (or: make smoke-7b)
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from PIL import Image

from vllm_semclip.bench.dummy_llava import write_dummy_llava
from vllm_semclip.cost import LLAVA_1_5_7B
from vllm_semclip.crops import num_candidates
from vllm_semclip.images import to_data_url
from vllm_semclip.server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the colour of the small square?"


def scene(width: int, height: int) -> Image.Image:
    """A high-resolution image with one small detail (what SemClip is for)."""
    image = Image.new("RGB", (width, height), (200, 205, 190))
    side = width // 40
    x, y = int(width * 0.71), int(height * 0.23)
    image.paste((200, 30, 30), (x, y, x + side, y + side))
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--psi", default="ViT-B-16", help="open_clip model name for ψ (random weights)")
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--size", default="1344x1008", help="the request image, WxH")
    parser.add_argument("--kv-cache-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "smoke")
    args = parser.parse_args(argv)

    width, height = (int(v) for v in args.size.lower().split("x"))
    model_dir = write_dummy_llava(args.out / LLAVA_1_5_7B.name, LLAVA_1_5_7B,
                                  semclip_config={"relevance_model": args.psi})
    tiles = 1 + args.topk
    max_len = tiles * LLAVA_1_5_7B.tokens_per_tile + 256
    log = args.out / "server.log"
    config = {"topk": args.topk, "max_topk": args.topk, "relevance_model": args.psi, "log_selections": True}
    vllm_args = ["--load-format", "dummy", "--max-model-len", str(max_len), "--max-num-seqs", "1",
                 "--limit-mm-per-prompt", json.dumps({"image": 1})]
    print(f"serving {model_dir} (load-format dummy, ψ {args.psi}, topk {args.topk}); log: {log}", flush=True)
    started = time.monotonic()
    with ServerProcess(str(model_dir), config, vllm_args=vllm_args, log_path=log, startup_timeout=1800,
                       env={"VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib}) as server:
        ready_s = time.monotonic() - started
        from openai import OpenAI

        client = OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=3600)
        t0 = time.monotonic()
        reply = client.chat.completions.create(
            model=str(model_dir), max_tokens=4, temperature=0.0,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": to_data_url(scene(width, height), "PNG")}},
                {"type": "text", "text": QUESTION},
            ]}],
        )
        request_s = time.monotonic() - t0
    text = log.read_text(errors="replace")
    lines = re.findall(r"semclip selection (\{.*\})", text)
    selection = json.loads(lines[-1]) if lines else None
    prompt_tokens = reply.usage.prompt_tokens
    image_tokens = tiles * LLAVA_1_5_7B.tokens_per_tile
    result = {
        "architecture": LLAVA_1_5_7B.name, "psi": args.psi, "topk": args.topk, "image": [width, height],
        "tokens_per_tile": LLAVA_1_5_7B.tokens_per_tile, "tower_resolution": LLAVA_1_5_7B.image_size,
        "candidates": num_candidates((2, 3)), "prompt_tokens": prompt_tokens, "image_tokens": image_tokens,
        "selection": selection, "answer": reply.choices[0].message.content,
        "ready_seconds": round(ready_s, 1), "request_seconds": round(request_s, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llava_7b.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    problems = []
    if not image_tokens < prompt_tokens < image_tokens + 256:
        problems.append(f"prompt has {prompt_tokens} tokens; expected {image_tokens} image tokens plus the text")
    if selection is None or len(selection.get("boxes", [])) != args.topk:
        problems.append("no selection log line with the chosen boxes")
    for p in problems:
        print("FAILED:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
