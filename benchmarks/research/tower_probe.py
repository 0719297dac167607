"""What a LLaVA's vision tower tells its language model about *where* things are.

Left/right questions can only be answered if the patch tokens the language model receives
carry their position (the language model's own positions are one long 1-D sequence). This
measures it directly, per tower layer: a small MLP probe (seeded, trained on the tokens of
most tiles, scored on the rest) predicts each patch token's column and row from its feature.
Chance is 1 / grid side; the layer LLaVA hands the language model (``vision_feature_layer``)
is marked. Beside it, the LLaVA's held-out accuracy by number of cards — attribute questions
with 1, 2 and 3 cards and spatial ones with 2 and 3 — with the V* protocol (each option
scored by its likelihood, Hugging Face forward, as ``semclip train vlm`` evaluates), which
separates reading a colour from finding the right card.

Finding the right card is measured twice more. Per tower layer, the same probe reads the
*shape* and *colour* of the card under a token (trained and scored on the tokens under a
card only): the LLaVA's attention can only find "the triangle" among the cards if
each of its tokens says so. And in the language model itself: on tiles with three cards,
the share of attention at the position that predicts the colour word which goes to the asked-for
card, out of all the attention to cards (per layer, the head that binds best; 1/3 when
attention goes to every card alike).

Prints the tables, writes ``benchmarks/results/tower_probe.json`` and a picture beside it.
Any Hugging Face LLaVA checkpoint directory works (``--model``); default: the bundled one.

    python benchmarks/tower_probe.py [--model DIR] [--tiles 256] [--questions 150]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_semclip.tiny.scenes import COLORS, SHAPES


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int, train_fraction: float = 0.8,
                   steps: int = 300, seed: int = 0, score_mask: torch.Tensor | None = None):
    """Held-out accuracy of a 1-hidden-layer MLP predicting ``labels`` from per-token ``features``.

    ``features`` is (tiles, tokens, width): the split is by tile, so the probe is scored on
    tiles it never saw. With ``score_mask`` (tiles, tokens) it returns two figures: over all
    held-out tokens and over the held-out tokens where the mask is true (e.g. under a card).
    Tokens labelled -1 are left out of training (score them only through ``score_mask``).
    """
    gen = torch.Generator().manual_seed(seed)
    n_train = max(1, int(len(features) * train_fraction))
    x_train, x_test = features[:n_train].flatten(0, 1), features[n_train:].flatten(0, 1)
    y_train, y_test = labels[:n_train].flatten(), labels[n_train:].flatten()
    x_train, y_train = x_train[y_train >= 0], y_train[y_train >= 0]  # label -1: a token the probe does not learn
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    with torch.random.fork_rng():  # a seeded probe without touching the caller's global RNG
        torch.manual_seed(seed)
        mlp = torch.nn.Sequential(torch.nn.Linear(features.shape[-1], 256), torch.nn.GELU(),
                                  torch.nn.Linear(256, classes))
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (min(2048, len(x_train)),), generator=gen)
        loss = torch.nn.functional.cross_entropy(mlp(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = (mlp(x_test).argmax(1) == y_test).float()
    if score_mask is None:
        return float(right.mean())
    return float(right.mean()), float(right[score_mask[n_train:].flatten()].mean())


def position_probe(trainer, tiles: list, seed: int = 0) -> list[dict]:
    """Column and row probe accuracy of the patch tokens at every layer of ``trainer``'s tower:
    over all held-out tokens, and over those under a card (``cards.Tile`` s) — the tokens a
    spatial question is about, whose content may have overwritten their position."""
    from vllm_semclip.tiny.train_clip import card_patch_labels, card_patch_mask

    model = trainer.model
    with torch.no_grad():
        out = model.model.vision_tower(trainer.image_processor([t.image for t in tiles], return_tensors="pt")
                                       ["pixel_values"].to(model.dtype), output_hidden_states=True)
    grid = int(round((out.hidden_states[0].shape[1] - 1) ** 0.5))
    on_cards = card_patch_mask([t.cards for t in tiles], trainer.tile_size, trainer.tile_size // grid)
    index = torch.arange(grid * grid)
    columns, rows = (index % grid).expand(len(tiles), -1), (index // grid).expand(len(tiles), -1)
    layers = len(out.hidden_states)
    feature_layer = model.config.vision_feature_layer
    feature_layer = feature_layer % layers if isinstance(feature_layer, int) else None
    # trained and scored on the tokens under a card only (background labelled -1)
    shapes, colors = card_patch_labels([t.cards for t in tiles], trainer.tile_size, trainer.tile_size // grid)
    results = []
    for layer, hidden in enumerate(tqdm(out.hidden_states, desc="token probe")):
        tokens = hidden[:, 1:].float()  # CLS dropped, as LLaVA's "default" strategy does
        column, card_column = probe_accuracy(tokens, columns, grid, seed=seed, score_mask=on_cards)
        row, card_row = probe_accuracy(tokens, rows, grid, seed=seed, score_mask=on_cards)
        _, card_shape = probe_accuracy(tokens, shapes, len(SHAPES), seed=seed, score_mask=on_cards)
        _, card_color = probe_accuracy(tokens, colors, len(COLORS), seed=seed, score_mask=on_cards)
        results.append({"layer": layer, "llava_feature_layer": layer == feature_layer,
                        "column_accuracy": round(column, 4), "row_accuracy": round(row, 4),
                        "card_column_accuracy": round(card_column, 4), "card_row_accuracy": round(card_row, 4),
                        "chance": round(1 / grid, 4), "card_shape_accuracy": round(card_shape, 4),
                        "card_color_accuracy": round(card_color, 4)})
    return results


def attention_binding(trainer, questions: int, seed: int, n_cards: int = 3) -> list[dict]:
    """Per language-model layer: of the attention that the position predicting the colour word
    pays to the cards' tokens, the share on the asked-for card — for the head where it is
    highest, averaged over ``questions`` held-out tiles with ``n_cards`` cards (1/n_cards: no binding);
    and per head that share and how much of its attention goes to the cards at all (a head can
    look at the cards without telling them apart)."""
    from vllm_semclip.tiny.cards import VISIBLE_SIDE_RANGE
    from vllm_semclip.tiny.train_clip import card_patch_labels
    from vllm_semclip.tiny.train_vlm import tile_sample

    patch = trainer.model.config.vision_config.patch_size
    rng = random.Random(f"{seed}-binding")
    share_sum = mass_sum = None
    for _ in tqdm(range(questions), desc="attention binding"):
        s = tile_sample(rng, n_cards=n_cards, spatial=False, side_range=VISIBLE_SIDE_RANGE, size=trainer.tile_size)
        encoded = [trainer.encode(s, s.options[0], eos=False)]
        ((_, colour_at, on_asked),) = trainer.binding_targets([s], encoded)  # the trainer's binding loss targets
        ids = encoded[0][0]
        image_at = ids.index(trainer.image_token_id)
        shapes, _ = card_patch_labels([s.cards], trainer.tile_size, patch)
        on_cards = torch.zeros_like(on_asked)
        on_cards[image_at:image_at + trainer.tokens_per_tile] = (shapes[0] >= 0).float()
        with torch.no_grad():
            attentions = trainer.attentions([ids], trainer.tile_features(trainer.pixel_values([s])))
        a = torch.stack([layer[0, :, colour_at] for layer in attentions])  # (layers, heads, keys)
        to_cards = a @ on_cards
        share, mass = (a @ on_asked) / to_cards.clamp_min(1e-9), to_cards
        share_sum = share if share_sum is None else share_sum + share
        mass_sum = mass if mass_sum is None else mass_sum + mass
    share, mass = share_sum / questions, mass_sum / questions
    return [{"layer": i, "best_head": int(share[i].argmax()), "asked_card_share": round(float(share[i].max()), 4),
             "chance": round(1 / n_cards, 4), "head_share": [round(float(x), 4) for x in share[i]],
             "head_card_attention": [round(float(x), 4) for x in mass[i]]} for i in range(len(share))]


def accuracy_by_cards(trainer, questions: int, seed: int) -> dict[str, float]:
    """Visible-size held-out accuracy per question kind and number of cards (V* protocol)."""
    from vllm_semclip.tiny.cards import VISIBLE_SIDE_RANGE
    from vllm_semclip.tiny.train_vlm import accuracy, tile_sample

    conditions = [("attribute", 1), ("attribute", 2), ("attribute", 3), ("spatial", 2), ("spatial", 3)]
    results = {}
    for kind, cards in tqdm(conditions, desc="accuracy by cards"):
        rng = random.Random(f"{seed}-{kind}-{cards}")
        samples = [tile_sample(rng, n_cards=cards, spatial=kind == "spatial", side_range=VISIBLE_SIDE_RANGE,
                               size=trainer.tile_size) for _ in range(questions)]
        results[f"{kind}_{cards}_card{'s' if cards > 1 else ''}"] = round(accuracy(trainer, samples), 4)
    return results


def plot(probe: list[dict], by_cards: dict[str, float], binding: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 3.8), dpi=110,
                                              gridspec_kw={"width_ratios": [5, 3, 5]})
    layers = [r["layer"] for r in probe]
    width = 0.14
    bars = [("column_accuracy", "column", "tab:blue", None), ("row_accuracy", "row", "tab:orange", None),
            ("card_column_accuracy", "column, under a card", "tab:blue", "//"),
            ("card_row_accuracy", "row, under a card", "tab:orange", "//"),
            ("card_shape_accuracy", "card's shape, under it", "tab:red", None),
            ("card_color_accuracy", "card's colour, under it", "tab:green", None)]
    for i, (key, label, color, hatch) in enumerate(bars):
        left.bar([x + (i - 2.5) * width for x in layers], [100 * r[key] for r in probe], width, label=label,
                 color=color, alpha=0.45 if hatch else 1.0, hatch=hatch)
    left.axhline(100 * probe[0]["chance"], color="gray", linestyle="--", linewidth=1, label="chance (position)")
    left.set_xticks(layers, ["embed" if r["layer"] == 0 else f"{r['layer']}\n(LLaVA's feature\nlayer)"
                             if r["llava_feature_layer"] else str(r["layer"]) for r in probe], fontsize=8)
    left.set_xlabel("tower layer (hidden state)")
    left.set_ylabel("probe accuracy (%)")
    left.set_ylim(0, 120)
    left.set_yticks(range(0, 101, 20))
    left.set_title("What can a probe read from a patch token?", fontsize=10)
    left.legend(fontsize=7, ncol=3, loc="upper right")
    middle.bar([r["layer"] for r in binding], [100 * r["asked_card_share"] for r in binding], color="tab:red")
    middle.axhline(100 * binding[0]["chance"], color="gray", linestyle="--", linewidth=1, label="no binding")
    middle.set_xticks([r["layer"] for r in binding])
    middle.set_xlabel("language-model layer (best head)")
    middle.set_ylabel("% of the attention to cards")
    middle.set_ylim(0, 100)
    middle.set_title("3 cards: attention on the asked-for one", fontsize=10)
    middle.legend(fontsize=8)
    names = list(by_cards)
    chance = [25 if n.startswith("attribute") else 50 for n in names]
    right.bar(range(len(names)), [100 * by_cards[n] for n in names],
              color=["tab:green" if n.startswith("attribute") else "tab:purple" for n in names])
    right.scatter(range(len(names)), chance, marker="_", s=400, color="gray", label="chance")
    right.set_xticks(range(len(names)), [n.replace("_", " ").replace(" ", "\n", 1) for n in names], fontsize=8)
    right.set_ylim(0, 100)
    right.set_ylabel("accuracy (%)")
    right.set_title("LLaVA, target visible, by number of cards", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    from vllm_semclip.tiny.cards import VISIBLE_SIDE_RANGE, card_tile
    from vllm_semclip.tiny.bundled import DEFAULT_MODEL_DIR
    from vllm_semclip.tiny.build import ensure_default_models
    from vllm_semclip.tiny.train_vlm import LlavaTrainer

    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="a Hugging Face LLaVA directory (default: the bundled tiny LLaVA)")
    p.add_argument("--tiles", type=int, default=256, help="tiles whose patch tokens the position probe uses")
    p.add_argument("--questions", type=int, default=150, help="held-out questions per card-count condition")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "tower_probe.json"))
    args = p.parse_args()
    if args.model is None:
        ensure_default_models()
    model_dir = args.model or str(DEFAULT_MODEL_DIR)
    trainer = LlavaTrainer.from_pretrained(model_dir)
    rng = random.Random(args.seed)
    tiles = [card_tile(rng, trainer.tile_size, n_cards=rng.randint(1, 3), side_range=VISIBLE_SIDE_RANGE)
             for _ in range(args.tiles)]
    probe = position_probe(trainer, tiles, seed=args.seed)
    by_cards = accuracy_by_cards(trainer, args.questions, args.seed)
    binding = attention_binding(trainer, min(args.questions, 100), args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_dir, "tiles": args.tiles, "questions_per_condition": args.questions, "seed": args.seed,
            "vision_feature_layer": trainer.model.config.vision_feature_layer}
    out.write_text(json.dumps({"meta": meta, "position_probe": probe, "accuracy_by_cards": by_cards,
                               "attention_binding": binding}, indent=2))
    plot(probe, by_cards, binding, out.with_suffix(".png"))
    print(f"\n{'layer':<8}{'column %':>10}{'row %':>8}{'under a card: column %':>24}{'row %':>8}"
          f"{'shape %':>9}{'colour %':>10}   (chance: position {100 * probe[0]['chance']:.1f}%, "
          f"shape {100 / len(SHAPES):.0f}%, colour {100 / len(COLORS):.1f}%)")
    for r in probe:
        mark = "  <- LLaVA's feature layer" if r["llava_feature_layer"] else ""
        print(f"{'embed' if r['layer'] == 0 else r['layer']:<8}{100 * r['column_accuracy']:>10.1f}"
              f"{100 * r['row_accuracy']:>8.1f}{100 * r['card_column_accuracy']:>24.1f}"
              f"{100 * r['card_row_accuracy']:>8.1f}{100 * r['card_shape_accuracy']:>9.1f}"
              f"{100 * r['card_color_accuracy']:>10.1f}{mark}")
    print(f"\n{'LM layer':<10}{'best head':>10}{'attention on the asked-for card, of all to cards %':>52}"
          f"{'  per head: to cards % / on the asked-for card %':>50}")
    for r in binding:
        heads = "  ".join(f"{100 * m:.0f}/{100 * h:.0f}" for m, h in zip(r["head_card_attention"], r["head_share"]))
        print(f"{r['layer']:<10}{r['best_head']:>10}{100 * r['asked_card_share']:>52.1f}  {heads}")
    print(f"\n{'condition':<22}{'accuracy %':>11}")
    for name, acc in by_cards.items():
        print(f"{name:<22}{100 * acc:>11.1f}")
    print(f"written to {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
