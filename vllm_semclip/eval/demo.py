"""``semclip demo``: serve the bundled model, ask about small details in large scenes, show what SemClip did.

The scenes are the V*-style benchmark's (:mod:`vllm_semclip.eval.benchdata`, a seed no training
run uses): 1500–2700 px photos with small shapes that vanish when the image is shrunk to one
tile. Each question is asked twice of the same real server — with SemClip (overview + the
crop ψ picks) and as stock LLaVA (``topk: 0``, overview only) — so the difference is visible.
Four scenes are shown in full (answers, crops, overlays); four are too few to judge by, so
``--tally N`` more scenes (half of each kind, the next indices of the same seed) are then asked
concurrently and only counted, which is also what a served client sees under load.

The server is real (vLLM's OpenAI server on 127.0.0.1 with the plugin) and so is the
client (the ``openai`` package, images sent as base64 data URLs). Visual tokens are
measured from the server's own ``usage.prompt_tokens`` minus the text's tokens; the
boxes come from ``select_crops``, the very function the server's processor calls.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEMO_SEED = 2026  # not a training seed (training scenes use 1_000_000 and up)
SCENES = [("attribute", 0), ("attribute", 1), ("spatial", 0), ("spatial", 1)]
TALLY_WORKERS = 8  # concurrent requests while tallying (the server batches them)


def tally_scenes(n: int) -> list[tuple[str, int]]:
    """``n`` scenes after the shown ones, alternating kinds (attribute first)."""
    first = 1 + max(index for _, index in SCENES)
    return [("attribute" if i % 2 == 0 else "spatial", first + i // 2) for i in range(n)]


def text_token_count(tokenizer, question: str, num_images: int = 1) -> int:
    """Tokens of the chat prompt with each image placeholder counted as one token."""
    messages = [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return len(ids)


def main(argv: list[str] | None = None) -> int:
    from openai import OpenAI
    from transformers import AutoTokenizer

    from vllm_semclip.eval.benchdata import make_attribute, make_spatial
    from vllm_semclip.config import SemClipConfig
    from vllm_semclip.eval.metrics import crop_hit
    from vllm_semclip.eval.harness import choose_option
    from vllm_semclip.images import to_data_url
    from vllm_semclip.eval.overlay import draw_selection
    from vllm_semclip.selection import select_crops
    from vllm_semclip.server import ServerProcess
    from vllm_semclip.tiny.build import ensure_default_models

    p = argparse.ArgumentParser(prog="semclip demo")
    p.add_argument("--out", default="out/demo", help="where overlays and the server log go")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--tally", type=int, default=20,
                   help="more scenes asked after the four shown, only counted (default 20; 0: none)")
    args = p.parse_args(argv)
    if args.tally < 0:
        p.error("--tally must be 0 or more")

    model_dir, _ = ensure_default_models()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bundled local models: no hub lookups
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = SemClipConfig.from_hf_config(None, model_dir).replace({"topk": args.topk})  # as the server selects
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"starting `semclip serve` on 127.0.0.1 (model {model_dir}, topk={args.topk}); log: {out / 'server.log'}")
    t0 = time.monotonic()
    with ServerProcess(str(model_dir), {"topk": args.topk}, log_path=out / "server.log") as server:
        print(f"server ready at {server.base_url} in {time.monotonic() - t0:.0f}s (pid {server.pid})\n")
        client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
        served = client.models.list().data[0].id

        def ask(image, question: str, topk: int):
            t = time.monotonic()
            reply = client.chat.completions.create(
                model=served,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": to_data_url(image, "JPEG")}},
                    {"type": "text", "text": question},
                ]}],
                max_tokens=args.max_tokens,
                temperature=0.0,
                extra_body={"mm_processor_kwargs": {"topk": topk}},
            )
            return reply, time.monotonic() - t

        def ask_both(kind: str, index: int):
            """One scene's question with SemClip and as stock LLaVA, graded; ψ's selection beside."""
            image, rec = (make_attribute if kind == "attribute" else make_spatial)(index, DEMO_SEED)
            reply, latency = ask(image, rec.question, args.topk)
            stock, _ = ask(image, rec.question, 0)
            selection = select_crops(image, rec.question, config)
            graded = {"name": rec.name, "kind": kind,
                      "correct": choose_option(reply.choices[0].message.content, rec.options) == 0,
                      "stock_correct": choose_option(stock.choices[0].message.content, rec.options) == 0,
                      "crop_hit": crop_hit(selection.boxes, rec.target_boxes)}
            return image, rec, reply, latency, stock, selection, graded

        records = []
        for i, (kind, index) in enumerate(SCENES):
            image, rec, reply, latency, stock, selection, graded = ask_both(kind, index)
            question = rec.question
            answer, stock_answer = reply.choices[0].message.content, stock.choices[0].message.content
            right, stock_right, hit = graded["correct"], graded["stock_correct"], graded["crop_hit"]
            visual = reply.usage.prompt_tokens - text_token_count(tokenizer, question) + 1
            overlay = out / f"{i}_{rec.name}.png"
            draw_selection(image, selection, overlay)
            mark = lambda ok: "right" if ok else "wrong"  # noqa: E731
            print(f"[{rec.name} {image.width}x{image.height}, target {rec.target_object} at {rec.bbox}] {question}")
            print(f"  SemClip (k={args.topk}): {answer!r} — {mark(right)} ({latency * 1000:.0f} ms)")
            print(f"  stock LLaVA (overview only): {stock_answer!r} — {mark(stock_right)}")
            print(f"  expected: {rec.answer!r}")
            for rank, (box, score) in enumerate(zip(selection.boxes, selection.scores), start=1):
                print(f"  crop #{rank}: box {list(box)}  ψ score {score:.3f}  "
                      f"{'contains' if hit else 'misses'} the target")
            print(f"  visual tokens: {visual} ({1 + selection.num_crops} tiles)  overlay: {overlay}\n")
            records.append({"name": rec.name, "question": question, "expected": rec.answer, "answer": answer,
                            "correct": right, "stock_answer": stock_answer, "stock_correct": stock_right,
                            "boxes": [list(b) for b in selection.boxes], "crop_hit": hit, "visual_tokens": visual,
                            "prompt_tokens": reply.usage.prompt_tokens, "overlay": str(overlay)})
        (out / "demo.json").write_text(json.dumps(records, indent=2))
        n = len(records)
        print(f"SemClip right on {sum(r['correct'] for r in records)}/{n}, stock LLaVA on "
              f"{sum(r['stock_correct'] for r in records)}/{n}.")

        if args.tally:
            from concurrent.futures import ThreadPoolExecutor

            from tqdm import tqdm

            with ThreadPoolExecutor(TALLY_WORKERS) as pool:
                graded = pool.map(lambda scene: ask_both(*scene)[-1], tally_scenes(args.tally))
                tally = list(tqdm(graded, total=args.tally, desc=f"{args.tally} more scenes"))
            (out / "tally.json").write_text(json.dumps(tally, indent=2))
            print(f"On {args.tally} more scenes (counted only): SemClip right on "
                  f"{sum(r['correct'] for r in tally)}/{args.tally}, stock LLaVA on "
                  f"{sum(r['stock_correct'] for r in tally)}/{args.tally}; {out / 'tally.json'}")
            for kind in ("attribute", "spatial"):
                rows = [r for r in tally if r["kind"] == kind]
                print(f"  {kind}: SemClip {sum(r['correct'] for r in rows)}/{len(rows)}, stock LLaVA "
                      f"{sum(r['stock_correct'] for r in rows)}/{len(rows)}, ψ's crop holds the target "
                      f"{sum(r['crop_hit'] for r in rows)}/{len(rows)}")
    print(f"server stopped. Answers and boxes: {out / 'demo.json'}")
    return 0
