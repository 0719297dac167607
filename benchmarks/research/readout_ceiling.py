"""How much of "the colour of the named card" the LLaVA's frozen tower tokens carry.

The tiny LLaVA reads a card's colour well when the tile holds one card and loses most when it
must first find the named card among two or three (``benchmarks/tower_probe.py``). Is that the
tower's tokens or the language model? This trains a read-out that is nothing but the step the
language model has to learn — a learned query per shape attends once (4 heads) over the tile's
tokens at the LLaVA's feature layer, and a small MLP names the colour (8-way) — on as many
generated tiles with 1–3 cards as a default ``semclip train vlm`` run sees, one pass, the same
batch size, and scores it beside the LLaVA itself on the *same* held-out tiles (the LLaVA
with the V* protocol over its 4 options; the read-out both 8-way and restricted to those 4
options).

Prints the table and writes ``benchmarks/results/readout_ceiling.{json,png}``.

    python benchmarks/readout_ceiling.py [--model DIR] [--tiles 19200] [--questions 300]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_semclip.tiny.scenes import COLORS, SHAPES


class ShapeQueryReadout(torch.nn.Module):
    """A learned query per shape attends over a tile's tokens (+ a learned position each); an MLP
    reads the colour from what it gathered."""

    def __init__(self, width: int, tokens: int, dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(width, dim)
        self.pos = torch.nn.Parameter(torch.zeros(tokens, dim))
        self.query = torch.nn.Embedding(len(SHAPES), dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, len(COLORS)))

    def forward(self, tokens: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        keys = self.inp(tokens) + self.pos
        gathered, _ = self.attn(self.query(shape)[:, None], keys, keys)
        return self.out(gathered[:, 0])


def tile_set(trainer, rng: random.Random, n: int, n_cards: int | None, side_range, desc: str):
    """``n`` attribute samples (1–3 cards, or ``n_cards``), their feature-layer tokens, asked shape and colour."""
    from vllm_semclip.tiny.train_vlm import tile_sample

    samples, features = [], []
    colors = list(COLORS)
    for start in tqdm(range(0, n, 64), desc=desc, mininterval=5):
        chunk = [tile_sample(rng, n_cards=n_cards or rng.randint(1, 3), spatial=False, side_range=side_range)
                 for _ in range(min(64, n - start))]
        with torch.no_grad():
            features.append(trainer.tile_features(trainer.pixel_values(chunk)).float())
        samples += chunk
    asked = [s.asked_card() for s in samples]
    return (samples, torch.cat(features), torch.tensor([SHAPES.index(c.shape) for c in asked]),
            torch.tensor([colors.index(c.color) for c in asked]))


def option_mask(samples) -> torch.Tensor:
    """(samples, colours) true for the colours among a sample's 4 options."""
    colors = list(COLORS)
    mask = torch.zeros(len(samples), len(colors), dtype=torch.bool)
    for i, s in enumerate(samples):
        for opt in s.options:
            mask[i, colors.index(opt.rstrip(".").rsplit(" ", 1)[-1])] = True
    return mask


def main() -> None:
    from vllm_semclip.tiny.cards import CROP_SIDE_RANGE, VISIBLE_SIDE_RANGE
    from vllm_semclip.tiny.bundled import DEFAULT_MODEL_DIR
    from vllm_semclip.tiny.train_vlm import LlavaTrainer, accuracy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--tiles", type=int, default=19200, help="training tiles, seen once (a default run: 1,200 × 16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--questions", type=int, default=300, help="held-out questions per card count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/readout_ceiling.json")
    args = ap.parse_args()

    trainer = LlavaTrainer.from_pretrained(args.model)
    rng = random.Random(f"{args.seed}-readout")
    _, train_x, train_shape, train_color = tile_set(trainer, rng, args.tiles, None, CROP_SIDE_RANGE, "training tiles")
    held = {k: tile_set(trainer, rng, args.questions, k, VISIBLE_SIDE_RANGE, f"held-out, {k} card(s)") for k in (1, 2, 3)}

    torch.manual_seed(args.seed)
    readout = ShapeQueryReadout(train_x.shape[-1], train_x.shape[1])
    opt = torch.optim.Adam(readout.parameters(), lr=1e-3)
    order = torch.randperm(len(train_x))
    for start in tqdm(range(0, len(order), args.batch_size), desc="read-out (one pass)", mininterval=5):
        idx = order[start:start + args.batch_size]
        loss = torch.nn.functional.cross_entropy(readout(train_x[idx], train_shape[idx]), train_color[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows = []
    with torch.no_grad():
        for k, (samples, x, shape, color) in held.items():
            logits = readout(x, shape)
            eight = float((logits.argmax(1) == color).float().mean())
            four = float((logits.masked_fill(~option_mask(samples), -torch.inf).argmax(1) == color).float().mean())
            rows.append({"cards": k, "readout_8way": round(eight, 4), "readout_4_options": round(four, 4),
                         "llava_4_options": round(accuracy(trainer, samples), 4)})
    print(f"{'cards':>5} | read-out 8-way | read-out, 4 options | LLaVA, 4 options (V* protocol)")
    for r in rows:
        print(f"{r['cards']:>5} | {100 * r['readout_8way']:13.1f}% | {100 * r['readout_4_options']:18.1f}% | "
              f"{100 * r['llava_4_options']:.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "training_tiles": args.tiles, "batch_size": args.batch_size,
                               "questions_per_card_count": args.questions, "seed": args.seed, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = range(len(rows))
    for i, (key, label) in enumerate((("readout_4_options", "read-out on the frozen tokens"),
                                      ("llava_4_options", "the LLaVA"))):
        ax.bar([x + 0.38 * i for x in xs], [100 * r[key] for r in rows], 0.38, label=label)
    ax.set_xticks([x + 0.19 for x in xs], [f"{r['cards']} card(s)" for r in rows])
    ax.axhline(25, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("colour of the named card, 4 options (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"written {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
