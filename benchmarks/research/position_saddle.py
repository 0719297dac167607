"""Why the tiny LLaVA never learns left from right: position on every token is a saddle.

The tiny LLaVA answers every left/right question with one side, whatever was tried (docs/tiny-models.md).
This takes the tower out of the question: the LLaVA's own projector and language model, freshly
initialised exactly as ``semclip train vlm`` builds them, are trained with the real trainer
(:class:`vllm_semclip.train_vlm.LlavaTrainer`: prompt, image-token placement, answer loss) on
*synthetic* tower tokens that carry everything perfectly — every token a noise vector, the
tokens under a card plus a code for its shape and one for its colour, and a 2-D sin-cos
position code (open_clip's ``get_2d_sincos_pos_embed``, CLIP's kind of position) — on the
one-card rung of the spatial questions, "Is the {shape} on the left or right side of the
image?" (1–3 cards). The conditions (the first three, and the tower's two, run by default):

* ``every token``: the position code on every token, as a CLIP tower has it (its background
  tokens carry position best — ``benchmarks/tower_probe.py``);
* ``card tokens only``: the same code on the tokens under a card, nothing on the background;
* ``every token + position binding``: as the first, with ``position_binding_weight`` 0.5 —
  heads 0 and 1 of layer 2, at the position predicting left/right, steered onto the named card;
* ``… + position & word binding``: as position binding, and heads 0 and 1 of layer 0, at the
  same position, steered onto the question's words naming the two cards (``word_binding_weight``
  0.5) — so the cards' heads know which card is which;
* ``CLIP tower`` (± the bindings): the same questions on drawn tiles through the bundled
  tiny CLIP tower (``--tower``), frozen — the LLaVA's real input, for comparison.

Attention spread over the whole image averages the position code of every token — the same for
every tile — so it reads nothing, and no gradient tells it to look at the card: the first
condition stays at a constant answer. With position only under the cards the average already
leans to the card's side, the gradient starts, and the model learns; steering a head onto the
card does the same for tokens that all carry position. (The colour, by contrast, is only under
the card — which is why attribute questions were learnt from the start.)

``--question two-card`` asks the benchmark's "Is the {a} on the left or right side of the {b}?"
instead (2–3 cards, {a} and {b} a card side apart): the same conditions on the question that
needs two places compared, not one read.

Prints the curves and writes ``benchmarks/results/position_saddle.{json,png}``.

    python benchmarks/position_saddle.py [--question side|two-card] [--steps 600] [--every 100] [--questions 96] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_semclip.tiny.cards import CROP_SIDE_RANGE, spatial_option, spatial_question
from vllm_semclip.tiny.scenes import COLORS, SHAPES, Placed, find_box

TILE = 224
CONDITIONS = {  # name: (where the position code is — "tower": the real tiny CLIP's tokens —,
    #                  position_binding_weight, word_binding_weight)
    "every token": ("all", 0.0, 0.0),
    "card tokens only": ("card", 0.0, 0.0),
    "every token + position binding": ("all", 0.5, 0.0),
    "card tokens only + position & word binding": ("card", 0.5, 0.5),
    "CLIP tower": ("tower", 0.0, 0.0),
    "CLIP tower + position binding": ("tower", 0.5, 0.0),
    "CLIP tower + position & word binding": ("tower", 0.5, 0.5),
}
# what a plain run measures (the side-of-the-image figure); the word-binding ones are asked for by name
DEFAULT_CONDITIONS = [c for c, (_, _, words) in CONDITIONS.items() if not words]


def place_cards(rng: random.Random, n_cards: int) -> list[Placed]:
    """``n_cards`` cards of distinct shapes placed on a ``TILE``-px tile as ``card_tile`` places
    them (nothing drawn: the tokens are synthetic)."""
    side = max(4, round(TILE * rng.uniform(*CROP_SIDE_RANGE)))
    shapes = rng.sample(SHAPES, n_cards)
    for _ in range(50):
        boxes: list[tuple[int, int, int, int]] = []
        try:
            for s in shapes:
                boxes.append(find_box(s, side, (1, 1, TILE - 1, TILE - 1), boxes, rng))
            break
        except RuntimeError:
            continue
    return [Placed(s, rng.choice(list(COLORS)), b) for s, b in zip(shapes, boxes)]


def side_question(rng: random.Random, n_cards: int, margin: float = 0.1):
    """``side_sample``'s question on placed cards: the named card at least ``margin`` off the middle."""
    from vllm_semclip.tiny.train_vlm import Sample

    while True:
        cards = place_cards(rng, n_cards)
        target = rng.choice(cards)
        x = target.center[0] / TILE
        if abs(x - 0.5) >= margin:
            break
    sides = ("left", "right") if x < 0.5 else ("right", "left")
    return Sample([None], spatial_question(target.shape, "image"),
                  [spatial_option(target.shape, "image", s) for s in sides], "relative_position", cards)


def drawn_side_question(rng: random.Random, n_cards: int):
    """The trainer's own side question on a drawn tile (for the real tower)."""
    from vllm_semclip.tiny.train_vlm import side_sample

    return side_sample(rng, n_cards=n_cards, size=TILE)


def two_card_question(rng: random.Random, n_cards: int):
    """The benchmark's "Is the {a} on the left or right side of the {b}?" on placed cards
    (``max(2, n_cards)`` of them; {a} and {b} at least a card side apart, as ``card_tile(min_dx=True)``
    places them)."""
    from vllm_semclip.tiny.train_vlm import Sample

    while True:
        cards = place_cards(rng, max(2, n_cards))
        a, b = cards[0], cards[1]
        if abs(a.center[0] - b.center[0]) >= a.bbox[2]:
            break
    sides = ("left", "right") if a.center[0] < b.center[0] else ("right", "left")
    return Sample([None], spatial_question(a.shape, b.shape), [spatial_option(a.shape, b.shape, s) for s in sides],
                  "relative_position", cards)


def drawn_two_card_question(rng: random.Random, n_cards: int):
    """The trainer's own two-card question on a drawn tile (for the real tower)."""
    from vllm_semclip.tiny.train_vlm import tile_sample

    return tile_sample(rng, n_cards=max(2, n_cards), spatial=True, size=TILE)


WHAT = {"side": "side-of-the-image", "two-card": "two-card left/right"}
QUESTIONS = {  # --question: (on synthetic tokens, on drawn tiles)
    "side": (side_question, drawn_side_question),
    "two-card": (two_card_question, drawn_two_card_question),
}


class SyntheticTower:
    """Tower tokens that carry a tile's content perfectly: noise, plus a shape and a colour code
    under each card, plus a 2-D sin-cos position code on every token (``where="all"``) or on
    the tokens under a card only (``"card"``)."""

    def __init__(self, width: int, patch: int = 16, where: str = "all", noise: float = 1.0, seed: int = 0) -> None:
        from open_clip.pos_embed import get_2d_sincos_pos_embed

        if where not in ("all", "card"):
            raise ValueError("where must be 'all' or 'card'")
        gen = torch.Generator().manual_seed(seed)
        self.shape_code = torch.randn(len(SHAPES), width, generator=gen)
        self.color_code = torch.randn(len(COLORS), width, generator=gen)
        grid = TILE // patch
        # unit-variance entries, like the noise and the codes (sin-cos entries have variance 1/2)
        self.position = torch.tensor(get_2d_sincos_pos_embed(width, grid), dtype=torch.float32) * math.sqrt(2)
        self.patch, self.where, self.noise, self.width, self.gen = patch, where, noise, width, gen

    def __call__(self, samples) -> torch.Tensor:
        from vllm_semclip.tiny.train_clip import card_patch_labels

        shapes, colors = card_patch_labels([s.cards for s in samples], TILE, self.patch)
        on = shapes >= 0
        tokens = self.noise * torch.randn(len(samples), shapes.shape[1], self.width, generator=self.gen)
        tokens = tokens + (self.position * on[..., None] if self.where == "card" else self.position)
        tokens[on] += self.shape_code[shapes[on]] + self.color_code[colors[on]]
        return tokens


def run_condition(where: str, binding: float, steps: int, every: int, held_out, seed: int, progress: bool,
                  tower_dir: str | None = None, question: str = "side", word_binding: float = 0.0) -> list[dict]:
    """Train a fresh projector + language model on ``question`` questions (``QUESTIONS``) over
    synthetic tokens (or, for ``where="tower"``, drawn tiles through the CLIP in ``tower_dir``);
    the held-out accuracy (V* protocol) every ``every`` steps."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vllm_semclip.tiny.build import TinyLlavaSpec, build_tiny_llava
    from vllm_semclip.tiny.train_clip import warmup_cosine
    from vllm_semclip.tiny.train_vlm import LlavaTrainer, accuracy

    with tempfile.TemporaryDirectory() as tmp:
        # the seeded random projector + language model every training run starts from
        build_tiny_llava(tmp, TinyLlavaSpec(), relevance_dir=tower_dir if where == "tower" else None)
        model = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
        trainer = LlavaTrainer(model, AutoProcessor.from_pretrained(tmp))
    model.train()
    model.model.vision_tower.eval()
    if where != "tower":
        tower = SyntheticTower(model.config.vision_config.hidden_size, model.config.vision_config.patch_size, where,
                               seed=seed)
        trainer.pixel_values = lambda samples: samples  # the "pixels" are the samples; the tower reads their cards
        trainer.tile_features = lambda samples: tower(samples)
    make = QUESTIONS[question][where == "tower"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)  # the VLM recipe's optimiser and schedule
    sched = warmup_cosine(opt, min(100, steps // 6), steps)
    rng = random.Random(seed)
    curve = []
    for step in tqdm(range(steps), desc=f"{where}, binding {binding}/{word_binding}", disable=not progress, mininterval=5):
        batch = [make(rng, rng.randint(1, 3)) for _ in range(16)]
        loss = trainer.loss(batch, rng, binding_layer=2, position_binding_weight=binding,
                            word_binding_weight=word_binding, word_binding_layer=0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            model.eval()
            curve.append({"step": step + 1, "accuracy": round(accuracy(trainer, held_out), 4)})
            model.train()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=100, help="held-out accuracy every this many steps")
    ap.add_argument("--questions", type=int, default=96, help="held-out questions")
    ap.add_argument("--question", choices=list(QUESTIONS), default="side",
                    help="what is asked: a card's side of the image, or the benchmark's two-card left/right")
    ap.add_argument("--conditions", default=",".join(DEFAULT_CONDITIONS),
                    help="comma-separated, of: " + ", ".join(CONDITIONS) + " (default: those without word binding)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tower", default=None, help="the CLIP (open_clip local dir) of the tower conditions "
                                                  "(default: the bundled tiny CLIP)")
    ap.add_argument("--out", default="benchmarks/results/position_saddle.json")
    args = ap.parse_args()
    names = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONDITIONS]
    if unknown or not names:
        ap.error(f"unknown condition(s) {unknown}; choose from {list(CONDITIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from vllm_semclip.tiny.bundled import DEFAULT_TOWER_DIR

    tower_dir = args.tower or str(DEFAULT_TOWER_DIR)
    held_out = {}
    for kind, make in zip(("synthetic", "tower"), QUESTIONS[args.question]):
        held_rng = random.Random(f"{args.seed}-held-out")
        held_out[kind] = [make(held_rng, held_rng.randint(1, 3)) for _ in range(args.questions)]
    rows = {}
    for name in names:
        where, binding, word_binding = CONDITIONS[name]
        torch.manual_seed(args.seed)
        rows[name] = run_condition(where, binding, args.steps, args.every,
                                   held_out["tower" if where == "tower" else "synthetic"], args.seed, progress=True,
                                   tower_dir=tower_dir, question=args.question, word_binding=word_binding)
    steps = [p["step"] for p in next(iter(rows.values()))]
    print(f"held-out {WHAT[args.question]} accuracy (chance 50%) after N steps: " + " | ".join(f"{s:>5}" for s in steps))
    for name, curve in rows.items():
        print(f"{name:>32}: " + " | ".join(f"{100 * p['accuracy']:4.0f}%" for p in curve))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"question": args.question, "steps": args.steps, "questions": args.questions, "seed": args.seed,
                               "tower": tower_dir, "curves": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, curve in rows.items():
        ax.plot([p["step"] for p in curve], [100 * p["accuracy"] for p in curve], marker="o", label=name)
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    ax.set_xlabel(f"training steps (16 {WHAT[args.question]} questions each)")
    ax.set_ylabel(f"held-out {WHAT[args.question]} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{WHAT[args.question]} questions: synthetic tokens vs the CLIP tower's", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"written {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
