"""``semclip demo``: serve the bundled model, ask about real photos, show what SemClip did.

The server is real (vLLM's OpenAI server on 127.0.0.1 with the plugin) and so is the
client (the ``openai`` package, images sent as base64 data URLs). Visual tokens are
measured from the server's own ``usage.prompt_tokens`` minus the text's tokens; the
boxes come from ``select_crops``, the very function the server's processor calls.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

QUESTIONS = [
    ("astronaut", "What is the color of the flag on the astronaut's suit?"),
    ("astronaut", "What is the astronaut holding in his hand?"),
    ("coffee", "What color is the saucer under the cup?"),
    ("rocket", "What is written on the side of the rocket?"),
]


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

    from .config import SemClipConfig
    from .images import sample_photo, to_data_url
    from .overlay import draw_selection
    from .selection import select_crops
    from .server import ServerProcess
    from .tiny_models import ensure_default_models

    p = argparse.ArgumentParser(prog="semclip demo")
    p.add_argument("--out", default="out/demo", help="where overlays and the server log go")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=12)
    args = p.parse_args(argv)

    model_dir, _ = ensure_default_models()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = SemClipConfig(topk=args.topk)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"starting `semclip serve` on 127.0.0.1 (model {model_dir}, topk={args.topk}); log: {out / 'server.log'}")
    t0 = time.monotonic()
    with ServerProcess(str(model_dir), {"topk": args.topk}, log_path=out / "server.log") as server:
        print(f"server ready at {server.base_url} in {time.monotonic() - t0:.0f}s (pid {server.pid})\n")
        client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
        served = client.models.list().data[0].id
        records = []
        for i, (photo, question) in enumerate(QUESTIONS):
            image = sample_photo(photo)
            t = time.monotonic()
            reply = client.chat.completions.create(
                model=served,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": to_data_url(image)}},
                    {"type": "text", "text": question},
                ]}],
                max_tokens=args.max_tokens,
                temperature=0.0,
            )
            latency = time.monotonic() - t
            selection = select_crops(image, question, config)
            visual = reply.usage.prompt_tokens - text_token_count(tokenizer, question) + 1
            overlay = out / f"{i}_{photo}.png"
            draw_selection(image, selection, overlay)
            print(f"[{photo} {image.width}x{image.height}] {question}")
            print(f"  answer: {reply.choices[0].message.content!r}  ({latency * 1000:.0f} ms)")
            for rank, (box, score) in enumerate(zip(selection.boxes, selection.scores), start=1):
                print(f"  crop #{rank}: box {list(box)}  ψ score {score:.3f}")
            print(f"  visual tokens: {visual} ({1 + selection.num_crops} tiles)  overlay: {overlay}\n")
            records.append({"photo": photo, "question": question, "answer": reply.choices[0].message.content,
                            "boxes": [list(b) for b in selection.boxes], "visual_tokens": visual,
                            "prompt_tokens": reply.usage.prompt_tokens})
        (out / "demo.json").write_text(json.dumps(records, indent=2))
    print(f"server stopped. Answers and boxes: {out / 'demo.json'}")
    return 0
