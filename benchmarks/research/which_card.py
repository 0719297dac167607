"""Which card does a LLaVA's two-card left/right answer follow?

"Is the {a} on the left or right side of the {b}?" is right when the answer goes *with* {a}'s
place and *against* {b}'s. A model that has learnt where one card is ("… side of the image?",
``semclip train vlm --side-steps``) may answer the two-card question with that same look, and
this tells which look it uses: for held-out two-card tiles (2–3 cards, visible size, the V*
protocol — each option scored by its likelihood) the share of answers that agree with

* ``truth``: the right answer (the model's accuracy);
* ``side_a``: {a}'s side of the image — what reading {a} alone gives;
* ``side_b``: {b}'s side of the image — what reading {b} (or both cards together) gives;
* ``left``: "left" (a constant answer gives 0 or 1 here);

and the model's accuracy on the pairs on opposite halves of the tile (where {a}'s side alone
is always right) and on the same half (where only comparing the two places answers). For
reference, on the same questions, how often {a}'s side alone is right (``side_a_rule``; 85% on
the default questions): a model that reads {a} well passes the issue's 75% with no comparison
at all. A model whose answers agree with ``side_a`` *and* ``side_b`` well above half reads where the
named cards are together — it has not learnt that {b}'s place counts the other way.

Prints the table, writes ``benchmarks/results/which_card.json`` and a bar chart beside it.

    python benchmarks/which_card.py [--model DIR ...] [--questions 400] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from vllm_semclip.tiny.cards import VISIBLE_SIDE_RANGE
from vllm_semclip.tiny.train_vlm import LlavaTrainer, Sample, tile_sample
from vllm_semclip.tiny.bundled import DEFAULT_MODEL_DIR

RESULTS = Path(__file__).resolve().parent / "results" / "which_card.json"
KEYS = ("truth", "side_a", "side_b", "left")


def two_card_questions(n: int, seed: int = 77, size: int = 224) -> list[Sample]:
    """``n`` held-out "Is the {a} on the left or right side of the {b}?" tiles (2–3 cards)."""
    rng = random.Random(f"which-card-{seed}")
    return [tile_sample(rng, n_cards=rng.randint(2, 3), spatial=True, side_range=VISIBLE_SIDE_RANGE, size=size)
            for _ in range(n)]


def _side(x: float, width: int) -> str:
    return "left" if x < width / 2 else "right"


def answered_side(sample: Sample, scores: list[float]) -> str:
    """The side ("left"/"right") of the option that scores highest."""
    best = sample.options[max(range(len(scores)), key=scores.__getitem__)]
    return "left" if " left side " in best else "right"


def follow_rates(samples: list[Sample], answers: list[str]) -> dict[str, float]:
    """How often ``answers`` (one side per sample) agree with the truth, {a}'s side, {b}'s side
    and "left"; the accuracy on opposite-half and same-half pairs; how often {a}'s side is right."""
    rows = []
    for s, answer in zip(samples, answers, strict=True):
        a, b = s.cards[0], s.cards[1]
        width = s.tiles[0].width
        truth = "left" if a.center[0] < b.center[0] else "right"
        side_a, side_b = _side(a.center[0], width), _side(b.center[0], width)
        rows.append({"truth": answer == truth, "side_a": answer == side_a, "side_b": answer == side_b,
                     "left": answer == "left", "opposite": side_a != side_b, "rule": side_a == truth})

    def share(key: str, where=lambda r: True) -> float:
        chosen = [r for r in rows if where(r)]
        return sum(r[key] for r in chosen) / len(chosen) if chosen else float("nan")

    return {**{k: share(k) for k in KEYS}, "opposite_halves": share("truth", lambda r: r["opposite"]),
            "same_half": share("truth", lambda r: not r["opposite"]), "side_a_rule": share("rule"),
            "opposite_share": share("opposite"), "questions": len(rows)}


def measure(model_dir: Path | str, samples: list[Sample]) -> dict[str, float]:
    scores = LlavaTrainer.from_pretrained(model_dir).option_scores(samples)
    return follow_rates(samples, [answered_side(s, sc) for s, sc in zip(samples, scores)])


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (*KEYS, "opposite_halves", "same_half")
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / max(1, len(results))
    for i, (name, r) in enumerate(results.items()):
        ax.bar([k + i * width for k in range(len(keys))], [100 * r[k] for k in keys], width, label=Path(name).name)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))],
                  ["right\nanswer", "with {a}'s\nside", "with {b}'s\nside", '"left"', "right, opposite\nhalves",
                   "right, same\nhalf"])
    ax.set_ylabel("% of two-card answers")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Which card does the left/right answer follow?")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=[str(DEFAULT_MODEL_DIR)], help="LLaVA checkpoint directories")
    p.add_argument("--questions", type=int, default=400)
    p.add_argument("--seed", type=int, default=77)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = two_card_questions(args.questions, args.seed)
    results = {}
    for model_dir in args.model:
        results[model_dir] = measure(model_dir, samples)
        r = results[model_dir]
        print(f"{model_dir}: right {r['truth']:.1%} (opposite halves {r['opposite_halves']:.1%}, same half "
              f"{r['same_half']:.1%}); with a's side {r['side_a']:.1%}, with b's side {r['side_b']:.1%}, "
              f"'left' {r['left']:.1%}; a's side alone would be right {r['side_a_rule']:.1%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"questions": args.questions, "seed": args.seed, "results": results}, indent=2))
    plot(results, args.out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
