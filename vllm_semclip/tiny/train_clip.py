"""Train the tiny CLIP (``SemClip-ViT-T-16``): the tiny LLaVA's eyes, and at 336 px ψ's zero-shot default.

The recipe is CLIP's: an open_clip dual encoder created by open_clip's factory from the
package's named config, trained with open_clip's own contrastive loss (``ClipLoss``) on
(text, image) pairs. The images are photo tiles with one easy-VQA card at the sizes cards
have inside a benchmark crop (:mod:`vllm_semclip.tiny.cards`); the texts are the 24 captions
"a {color} {shape}".

Why the batch is built of *blocks*: with only 24 captions, a random batch of 96 repeats
each caption ~4 times and the contrastive loss would push apart images that share a
caption (false negatives). Each block holds every caption exactly once, and the loss is
``ClipLoss`` applied to each block. Two small extra blocks pair the benchmark's question
phrasings ("What is the color of the triangle?", "Is the circle on the left or right side
of the square?") with tiles that show the named shapes, one text per shape (pair), so ψ
also reads a raw question zero-shot — it is what the processor hands it.

Why an optional patch-position loss (``position_weight``): the LLaVA reads the tower's
patch tokens at its feature layer (the second-to-last block), and a contrastive loss on the
pooled embedding lets those tokens forget *where* they are — ``benchmarks/research/tower_probe.py``
found column and row barely decodable there, while spatial questions need exactly that.
A linear head (discarded after training, like open_clip's loss modules it is not part of
the model) predicts each patch token's column and row at that layer; its cross-entropy,
weighted, is added to the contrastive loss so the tokens keep their position.
Averaged over all patches, that loss is mostly about background: the tokens *under a card*
(a few of 196) let their content overwrite their position, and those are the tokens a spatial
question needs, so
``position_card_weight`` adds the same loss averaged over the patches under a card only.

Why an optional patch-label loss (``label_weight``): to answer "What is the color of the
triangle?" the LLaVA's attention has to find the triangle's tokens, so the shape must be in
*each* token under the card, not only in the pooled embedding the contrastive loss trains;
without it a probe read the card's shape from those tokens little better than chance and the
LLaVA's attention went to every card alike. A linear
head (discarded, like the position head) reads each such token's card shape and colour.
The caption batches hold one card per tile, where a token can learn its card's shape from the
whole tile; the LLaVA reads tiles with up to three cards, where each token must keep to its
own card. ``label_tiles`` adds such tiles (1–3 cards, no caption) to every step for the patch
losses alone.

Why ψ's head alone (``lock_image`` with ``lock_image_unlocked_groups=2``, open_clip's LiT lock):
the LLaVA reads the tower's second-to-last block, so the last block, ``ln_post`` and the
projection make only ψ's embedding; training just those (and the text tower) improves ψ while
every token the LLaVA sees stays bit for bit (``tiny.build.update_llava_tower`` then copies the
unread layer into the LLaVA). ``question_weight`` (:class:`ShapeQueryLoss`) teaches that head
what ψ is actually asked — a shape's question, against every tile of a caption block.

Why a curriculum: the card is large at first and shrinks to its real size over the first
20% of the steps (``curriculum``). Colour is learned in minutes at any size; shape needs the larger
views first.

``semclip train clip`` runs it, evaluates on held-out cards and writes an open_clip
``local-dir`` checkpoint (fp16 weights, a few MB) plus ``train_report.json``.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_semclip.tiny.cards import (
    CAPTIONS,
    CROP_SIDE_RANGE,
    SHAPES,
    attribute_question,
    caption,
    card_tile,
    mosaic,
    spatial_question,
)
from vllm_semclip.relevance import TextReference, create_architecture, save_local_dir
from vllm_semclip.tiny.scenes import COLORS, Placed
from vllm_semclip.tiny.bundled import TOWER_MODEL_NAME

EVAL_SEED_OFFSET = 1_000_003  # held-out cards come from a different stream than training


@dataclass(frozen=True)
class ClipTrainConfig:
    """Hyper-parameters of ``semclip train clip`` (defaults reproduce the committed weights)."""

    model: str = TOWER_MODEL_NAME  # the recipe trains at 224 px; the bundled ψ is it resized to 336
    steps: int = 1500
    caption_blocks: int = 3  # blocks of 24 distinct captions per step
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    curriculum: float = 0.2  # fraction of steps over which cards shrink to their real size
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default
    eval_cards: int = 480
    eval_mosaics: int = 400
    # continue from this local-dir checkpoint instead of random weights; its weights load into ``model``
    # (see load_weights), so a ``-336`` config takes a 224-px CLIP with its position grid resized
    init: str | None = None
    position_weight: float = 0.0  # weight of the patch-position loss at position_layer (0 = off)
    position_layer: int = -2  # the block whose output the LLaVA reads (its vision_feature_layer)
    position_card_weight: float = 0.0  # weight of the same loss averaged over the patches under a card only
    label_weight: float = 0.0  # weight of the patch-label loss (shape and colour of the card under a patch)
    # extra tiles per step with 1–3 cards at crop size (the LLaVA's training tiles), for the patch losses only
    label_tiles: int = 0
    # photo tiles without a card added to every caption block as images no text describes (ClipLossWithNegatives)
    empty_tiles: int = 0
    # open_clip's LiT-style lock: freeze the image tower but its last ``lock_image_unlocked_groups`` groups
    # (2 = the last block, ln_post and the projection: what the LLaVA, reading block -2, never sees)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    # weight of ShapeQueryLoss: each shape's question against every tile of each caption block (0 = off)
    question_weight: float = 0.0
    # the material: "legacy" (the first generator) or "train" (RenderDistribution's training split;
    # held-out cards then come from its "val" split)
    render: str = "legacy"
    checkpoint_every: int = 100  # steps between resumable checkpoints (out_dir/checkpoint.pt); 0 = none

    def __post_init__(self) -> None:
        if self.steps < 0 or self.caption_blocks < 1 or self.label_tiles < 0 or self.empty_tiles < 0:
            raise ValueError("steps, label_tiles and empty_tiles must be non-negative and caption_blocks at least 1")
        if self.lock_image_unlocked_groups < 0 or (self.lock_image_unlocked_groups and not self.lock_image):
            raise ValueError("lock_image_unlocked_groups is a non-negative count and needs lock_image")
        if self.label_tiles and not (self.label_weight or self.position_weight or self.position_card_weight):
            raise ValueError("label_tiles only feed the patch losses: set label_weight (or a position weight)")
        if self.steps == 0 and not self.init:
            raise ValueError("steps=0 (evaluate, and resize to model's input size) needs init")
        if not 0 < self.lr < 1 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("lr must be in (0, 1), weight_decay and warmup non-negative")
        if not 0 <= self.curriculum <= 1:
            raise ValueError("curriculum is a fraction of the steps (0-1)")
        if self.render not in ("legacy", "train"):
            raise ValueError(f"render must be legacy or train, got {self.render!r}")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be non-negative")
        if min(self.position_weight, self.position_card_weight, self.label_weight, self.question_weight) < 0 \
                or self.position_layer >= 0:
            raise ValueError("position_weight, position_card_weight, label_weight and question_weight must be "
                             "non-negative, "
                             "position_layer negative (-1 = last block)")


class PatchPositionLoss(torch.nn.Module):
    """Cross-entropy of a linear head that predicts each patch token's column and row.

    ``patches`` are one block's patch tokens (no class token), in raster order, as open_clip's
    ``VisionTransformer.forward_intermediates(..., output_fmt="NLC")`` returns them."""

    def __init__(self, width: int, grid: int) -> None:
        super().__init__()
        self.column = torch.nn.Linear(width, grid)
        self.row = torch.nn.Linear(width, grid)
        index = torch.arange(grid * grid)
        self.register_buffer("columns", index % grid, persistent=False)
        self.register_buffer("rows", index // grid, persistent=False)

    def logits(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.column(patches), self.row(patches)

    def token_loss(self, patches: torch.Tensor) -> torch.Tensor:
        """Each token's cross-entropy (column and row averaged): ``(images, patches)``."""
        column, row = self.logits(patches)
        n = patches.shape[0]
        ce = torch.nn.functional.cross_entropy
        return 0.5 * (ce(column.transpose(1, 2), self.columns.expand(n, -1), reduction="none")
                      + ce(row.transpose(1, 2), self.rows.expand(n, -1), reduction="none"))

    @staticmethod
    def masked_mean(token_loss: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of ``token_loss`` over all tokens, or over the tokens where ``mask`` is true (0 when none is)."""
        if mask is None:
            return token_loss.mean()
        return token_loss[mask].mean() if mask.any() else token_loss.sum() * 0.0

    def forward(self, patches: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over all tokens, or over the tokens where ``mask`` is true (0 when none is)."""
        return self.masked_mean(self.token_loss(patches), mask)

    @torch.no_grad()
    def accuracy(self, patches: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        """Share of patch tokens (all, or where ``mask`` is true) whose column (and row) the head
        gets right, averaged."""
        column, row = self.logits(patches)
        right = 0.5 * ((column.argmax(-1) == self.columns).float() + (row.argmax(-1) == self.rows).float())
        return float(right.mean() if mask is None else right[mask].mean())


class ClipLossWithNegatives(torch.nn.Module):
    """open_clip's ``ClipLoss`` on one block, with images that no text of the block describes
    added to every text's candidates (text→image only: there is no text to match them with).

    Why: a caption block holds one card per tile, so a CLIP trained on it never learns that a
    photo *without* the named card is wrong for the caption — yet most of ψ's candidate crops
    hold no card. (Alone it moved ψ's benchmark hits by nothing: the dark targets ψ missed were
    lost to the padding band, docs/design.md "What ψ's crop holds"; it stays in the seventh run's
    recipe.) Without negatives it is ``ClipLoss`` exactly (a test checks).
    """

    def __init__(self) -> None:
        super().__init__()
        import open_clip

        self.clip_loss = open_clip.ClipLoss()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        if negatives is None or not len(negatives):
            return self.clip_loss(image_features, text_features, logit_scale)
        ce = torch.nn.functional.cross_entropy
        labels = torch.arange(len(text_features), device=text_features.device)
        per_image = logit_scale * image_features @ text_features.T
        per_text = logit_scale * text_features @ torch.cat([image_features, negatives]).T
        return 0.5 * (ce(per_image, labels) + ce(per_text, labels))


class ShapeQueryLoss(torch.nn.Module):
    """Each shape's question ("What is the color of the circle?") against every tile of a
    caption block: every tile showing that shape is a positive, and *each* positive must
    outrank all the negatives on its own (text→image cross-entropy per positive, the other
    positives left out of its denominator, averaged).

    Why: ψ is asked the question, not the caption, and the question names a shape of *any*
    colour. The caption blocks teach "a black circle"; the small question block pairs each
    question with one tile of a random colour, so a dark circle and a vivid rectangle are rarely
    ranked against each other for it, and among a scene's 13 crops that is what loses dark
    targets. Per positive, so a black circle
    ranked below a green rectangle costs even when the green circle is first.
    """

    def forward(self, query_features: torch.Tensor, image_features: torch.Tensor, positives: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        """``positives``: (queries, images) true where the image shows what the query asks for."""
        logits = logit_scale * query_features @ image_features.T
        negatives = torch.logsumexp(logits.masked_fill(positives, float("-inf")), dim=-1, keepdim=True)
        per_positive = torch.nn.functional.softplus(negatives - logits)  # −log(e^p / (e^p + Σ e^neg))
        return per_positive[positives].mean()


class PatchLabelLoss(torch.nn.Module):
    """Cross-entropy of a linear head that reads, from each patch token under a card, that
    card's shape and colour (averaged) — the tokens the LLaVA's attention has to find by shape.

    ``labels`` are :func:`card_patch_labels`' (shape, colour) indices, -1 where no card is."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(width, len(SHAPES))
        self.color = torch.nn.Linear(width, len(COLORS))

    def forward(self, patches: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shapes, colors = labels
        if not bool((shapes >= 0).any()):
            return patches.sum() * 0.0
        ce = torch.nn.functional.cross_entropy
        return 0.5 * (ce(self.shape(patches).transpose(1, 2), shapes, ignore_index=-1)
                      + ce(self.color(patches).transpose(1, 2), colors, ignore_index=-1))

    @torch.no_grad()
    def accuracy(self, patches: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        """Share of the patch tokens under a card whose card's shape / colour the head gets right."""
        shapes, colors = labels
        on = shapes >= 0
        return (float((self.shape(patches).argmax(-1) == shapes)[on].float().mean()),
                float((self.color(patches).argmax(-1) == colors)[on].float().mean()))


def card_patch_labels(cards: list[list[Placed]], size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, patches)`` indices into ``SHAPES`` and ``COLORS`` of the card each patch
    (raster order) overlaps, -1 where none does — the patches :func:`card_patch_mask` marks."""
    grid = size // patch
    colors = list(COLORS)
    shape = torch.full((len(cards), grid, grid), -1, dtype=torch.long)
    color = torch.full((len(cards), grid, grid), -1, dtype=torch.long)
    for i, placed in enumerate(cards):
        for card in placed:
            rows, cols = _card_patches(card, patch, grid)
            shape[i, rows, cols] = SHAPES.index(card.shape)
            color[i, rows, cols] = colors.index(card.color)
    return shape.flatten(1), color.flatten(1)


def _card_patches(card: Placed, patch: int, grid: int) -> tuple[slice, slice]:
    """The rows and columns of the ``grid``×``grid`` patches that ``card``'s box overlaps."""
    x, y, w, h = card.bbox
    return slice(y // patch, min(grid, -(-(y + h) // patch))), slice(x // patch, min(grid, -(-(x + w) // patch)))


def card_patch_mask(cards: list[list[Placed]], size: int, patch: int) -> torch.Tensor:
    """``(images, patches)`` true where a patch (raster order) overlaps one of its image's cards."""
    grid = size // patch
    mask = torch.zeros(len(cards), grid, grid, dtype=torch.bool)
    for i, placed in enumerate(cards):
        for card in placed:
            rows, cols = _card_patches(card, patch, grid)
            mask[i, rows, cols] = True
    return mask.flatten(1)


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def side_range_at(progress: float, curriculum: float) -> tuple[float, float]:
    """Card side (fraction of the tile) at ``progress`` ∈ [0, 1]: large first, real size after the curriculum."""
    t = 1.0 if curriculum <= 0 else min(1.0, progress / curriculum)
    return _lerp(0.2, CROP_SIDE_RANGE[0], t), _lerp(0.5, CROP_SIDE_RANGE[1], t)


def warmup_cosine(opt, warmup: int, steps: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps`` (both trainers)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup))
                                             * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))


def to_tensor(images, mean, std):
    """PIL tiles (already at the model's size) → a normalised batch, as open_clip's preprocess would give."""
    from torchvision.transforms.functional import pil_to_tensor

    x = torch.stack([pil_to_tensor(im) for im in images]).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def sample_blocks(rng: random.Random, size: int, blocks: int, side_range: tuple[float, float], render=None):
    """One step's blocks of (texts, tiles): ``blocks`` × (24 captions, once each) + one
    shape-question and one pair-question block. Tiles keep their cards (the position loss
    finds the patches under them)."""
    out = []
    for _ in range(blocks):
        texts, tiles = [], []
        for text in rng.sample(CAPTIONS, len(CAPTIONS)):
            color, shape = text.split()[1:]
            texts.append(text)
            tiles.append(card_tile(rng, size, shapes=[shape], colors=[color], side_range=side_range, render=render))
        out.append((texts, tiles))
    texts, tiles = [], []
    for shape in SHAPES:
        texts.append(rng.choice([f"a {shape}", f"the {shape}", attribute_question(shape)]))
        tiles.append(card_tile(rng, size, shapes=[shape], side_range=side_range, render=render))
    out.append((texts, tiles))
    texts, tiles = [], []
    for a, b in ((SHAPES[0], SHAPES[1]), (SHAPES[0], SHAPES[2]), (SHAPES[1], SHAPES[2])):
        if rng.random() < 0.5:
            a, b = b, a
        texts.append(spatial_question(a, b))
        tiles.append(card_tile(rng, size, shapes=[a, b], n_cards=2, side_range=side_range, render=render))
    out.append((texts, tiles))
    return out


def label_only_tiles(rng: random.Random, size: int, n: int, side_range: tuple[float, float], render=None) -> list:
    """``n`` tiles with 1–3 cards each (as ``semclip train vlm``'s tiles have) for the patch losses:
    no caption describes a multi-card tile, so they stay out of the contrastive loss."""
    return [card_tile(rng, size, n_cards=rng.randint(1, len(SHAPES)), side_range=side_range, render=render)
            for _ in range(n)]


def empty_photo_tiles(rng: random.Random, size: int, n: int, render=None) -> list:
    """``n`` photo tiles without a card: the negatives of :class:`ClipLossWithNegatives`."""
    return [card_tile(rng, size, shapes=[], colors=[], render=render) for _ in range(n)]


def zero_shot_scores(model, tokenizer, rng: random.Random, n: int, size: int, batch: int = 96,
                     render=None) -> dict[str, float]:
    """Held-out single cards at crop size, argmax over the 24 caption embeddings: the share of
    cards whose caption is right (``caption``), and whose predicted caption names the right
    shape (``shape``) or colour (``color``) — which of the two a ψ confuses says what to train."""
    mean, std = model.visual.image_mean, model.visual.image_std
    with torch.inference_mode():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(list(CAPTIONS))), dim=-1)
        hits = {"caption": 0, "shape": 0, "color": 0}
        parts = [c.split()[1:] for c in CAPTIONS]  # (colour, shape) of each caption
        labels = [i % len(CAPTIONS) for i in range(n)]
        for start in range(0, n, batch):
            chunk = labels[start:start + batch]
            tiles = [card_tile(rng, size, shapes=[parts[i][1]], colors=[parts[i][0]], render=render).image
                     for i in chunk]
            img = torch.nn.functional.normalize(model.encode_image(to_tensor(tiles, mean, std)), dim=-1)
            for p, i in zip((img @ text.T).argmax(dim=-1).tolist(), chunk):
                hits["caption"] += p == i
                hits["color"] += parts[p][0] == parts[i][0]
                hits["shape"] += parts[p][1] == parts[i][1]
    return {k: v / n for k, v in hits.items()}


def zero_shot_accuracy(model, tokenizer, rng: random.Random, n: int, size: int, batch: int = 96,
                       render=None) -> float:
    """Held-out single cards at crop size: argmax over the 24 caption embeddings."""
    return zero_shot_scores(model, tokenizer, rng, n, size, batch, render)["caption"]


def cell_pick_accuracy(relevance, rng: random.Random, n: int, size: int, query: str = "caption",
                       render=None) -> float:
    """3×3 mosaics: the card's cell must score highest among the 9 (ψ's real scoring path).

    ``query="caption"``: one target card "a {color} {shape}"; each other cell holds, with
    probability 1/2, a card with a different caption (same shape in another colour included).
    ``query="question"``: the text is "What is the color of the {shape}?" and the other
    cells' cards are of other shapes.
    """
    boxes = [((i % 3) * size, (i // 3) * size, (i % 3 + 1) * size, (i // 3 + 1) * size) for i in range(9)]
    correct = 0
    for _ in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        target = rng.randrange(9)
        tiles = []
        for i in range(9):
            if i == target:
                tiles.append(card_tile(rng, size, shapes=[shape], colors=[color], render=render).image)
                continue
            if rng.random() < 0.5:
                while True:
                    s = rng.choice([x for x in SHAPES if x != shape] if query == "question" else SHAPES)
                    c = rng.choice(list(COLORS))
                    if (s, c) != (shape, color):
                        break
                tiles.append(card_tile(rng, size, shapes=[s], colors=[c], render=render).image)
            else:
                tiles.append(card_tile(rng, size, shapes=[], colors=[], render=render).image)
        text = caption(color, shape) if query == "caption" else attribute_question(shape)
        scores = relevance.score_regions(text, mosaic(tiles), boxes)  # square cells: one view each
        correct += int(scores.argmax()) == target
    return correct / n


def evaluate(model_dir: Path | str, seed: int = 0, n_cards: int = 480, n_mosaics: int = 400,
             render: str = "legacy") -> dict:
    """Held-out figures of a saved ψ: zero-shot caption accuracy (and its shape and colour parts)
    and 3×3 cell pick (caption and question). ``render="train"``: cards of the distribution's
    validation split."""
    from vllm_semclip.relevance import RelevanceModel

    relevance = RelevanceModel.from_pretrained(str(model_dir))  # registers the configs, loads its tokenizer
    size = relevance.image_size
    rng = random.Random(seed + EVAL_SEED_OFFSET)
    dist = material("val" if render == "train" else render)
    zero_shot = zero_shot_scores(relevance.model, relevance.tokenizer, rng, n_cards, size, render=dist)
    return {
        "zero_shot_accuracy": zero_shot["caption"],
        "zero_shot_shape_accuracy": zero_shot["shape"],
        "zero_shot_color_accuracy": zero_shot["color"],
        "cell_pick_accuracy": cell_pick_accuracy(relevance, rng, n_mosaics, size, "caption", dist),
        "cell_pick_accuracy_question": cell_pick_accuracy(relevance, rng, n_mosaics, size, "question", dist),
        "render": render,
        "eval_cards": n_cards,
        "eval_mosaics": n_mosaics,
        "eval_seed": seed + EVAL_SEED_OFFSET,
    }


def material(split: str):
    """The ``RenderDistribution`` of ``split`` (None for the legacy generator)."""
    if split == "legacy":
        return None
    from vllm_semclip.tiny.render import RenderDistribution

    return RenderDistribution(split)


def load_weights(model, weights: Path) -> None:
    """Load a local-dir ψ's weights (stored fp16) into ``model`` in fp32, what open_clip's
    ``load_checkpoint`` does, with the position grid resized by its ``resize_pos_embed`` when
    ``model`` takes another input size — in fp32: its antialiased bicubic has no fp16 kernel."""
    from open_clip.model import resize_pos_embed
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    resize_pos_embed(state, model)
    model.load_state_dict(state)


def load_as(model_name: str, src: Path | str):
    """open_clip ``model_name`` created by open_clip's factory, with the weights of the local-dir ψ
    at ``src`` (its position grid resized when ``model_name`` takes another input size)."""
    from vllm_semclip.tiny.bundled import register_model_configs

    weights = Path(src).resolve() / "open_clip_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"init {str(src)!r} has no open_clip_model.safetensors (open_clip local-dir format)")
    register_model_configs()
    model = create_architecture(model_name)
    load_weights(model, weights)
    return model


def resize_local_dir(src: Path | str, model_name: str, out_dir: Path | str) -> Path:
    """``src``'s weights as open_clip ``model_name`` (e.g. at another input size), saved as a
    local-dir: what ``semclip train clip --model NAME --init SRC --steps 0`` writes, unevaluated."""
    import open_clip

    model = load_as(model_name, src)
    return save_local_dir(model.eval(), open_clip.get_model_config(model_name), out_dir,
                          reference=TextReference.load(src))


def train_clip(config: ClipTrainConfig = ClipTrainConfig(), out_dir: Path | str = "out/psi",
               progress: bool = True) -> dict:
    """Train, evaluate and save; return the report (also written as ``train_report.json``)."""
    import open_clip
    from tqdm import tqdm

    from vllm_semclip.tiny.bundled import register_model_configs

    register_model_configs()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if config.init:  # the architecture is config.model's, the weights init's
        model = load_as(config.model, config.init)
        if progress:  # say where the weights came from (the architecture is config.model's)
            print(f"{config.model}: weights from {config.init}", file=sys.stderr)
    else:
        model = open_clip.create_model(config.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config.model)
    size = int(open_clip.get_model_config(config.model)["vision_cfg"]["image_size"])
    mean, std = model.visual.image_mean, model.visual.image_std
    if config.lock_image:  # open_clip's own (LiT); the frozen groups get no gradient and no decay
        model.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    position_fn = None
    if config.position_weight or config.position_card_weight:
        grid = size // model.visual.patch_size[0]
        position_fn = PatchPositionLoss(model.visual.transformer.width, grid)
        # 10× the tower's rate: a fresh head has to catch up with a trained tower before its
        # gradient says anything useful about where the tokens are
        groups.append({"params": list(position_fn.parameters()), "weight_decay": 0.0, "lr": 10 * config.lr})
    label_fn = None
    if config.label_weight:
        label_fn = PatchLabelLoss(model.visual.transformer.width)
        groups.append({"params": list(label_fn.parameters()), "weight_decay": 0.0, "lr": 10 * config.lr})
    opt = torch.optim.AdamW(groups, lr=config.lr)
    sched = warmup_cosine(opt, config.warmup, config.steps)
    loss_fn = ClipLossWithNegatives()
    question_fn = ShapeQueryLoss()
    questions = [attribute_question(shape) for shape in SHAPES]
    render = material(config.render)
    out_path = Path(out_dir)
    heads = {"position": position_fn, "label": label_fn}
    first, running, spent = resume_checkpoint(out_path, config, model, heads, opt, sched, rng)
    model.train()
    start = time.time()
    bar = tqdm(range(first, config.steps), desc="train clip", disable=not progress, mininterval=5,
               initial=first, total=config.steps)
    for step in bar:
        side_range = side_range_at(step / config.steps, config.curriculum)
        blocks = sample_blocks(rng, size, config.caption_blocks, side_range, render)
        texts = [t for ts, _ in blocks for t in ts]
        tiles = [tile for _, ts in blocks for tile in ts]
        tiles += label_only_tiles(rng, size, config.label_tiles, side_range, render)  # after the captioned ones
        tiles += empty_photo_tiles(rng, size, config.empty_tiles, render)  # last
        pixels = to_tensor([tile.image for tile in tiles], mean, std)
        if position_fn is None and label_fn is None:
            image_features = model.encode_image(pixels, normalize=True)
        else:  # the same forward, also handing back the patch tokens of the LLaVA's feature layer
            feats = model.forward_intermediates(image=pixels, image_indices=[config.position_layer],
                                                image_output_fmt="NLC")
            image_features, patches = feats["image_features"], feats["image_intermediates"][0]
        text_features = model.encode_text(tokenizer(texts + (questions if config.question_weight else [])),
                                          normalize=True)
        scale = model.logit_scale.exp()
        negatives = image_features[len(image_features) - config.empty_tiles:] if config.empty_tiles else None
        loss, offset = 0.0, 0
        for ts, _ in blocks:  # the label-only and empty tiles at the end have no caption
            sl = slice(offset, offset + len(ts))
            loss = loss + loss_fn(image_features[sl], text_features[sl], scale, negatives) * len(ts)
            offset += len(ts)
        loss = loss / offset
        if config.question_weight:  # the caption blocks come first; each of their tiles shows one card
            captioned = [tile for _, ts in blocks[:config.caption_blocks] for tile in ts]
            shown = torch.tensor([[tile.cards[0].shape == shape for tile in captioned] for shape in SHAPES])
            candidates = image_features[:len(captioned)]
            if negatives is not None:  # the empty tiles: negatives for every question too
                candidates = torch.cat([candidates, negatives])
                shown = torch.cat([shown, torch.zeros(len(SHAPES), len(negatives), dtype=torch.bool)], dim=1)
            loss = loss + config.question_weight * question_fn(text_features[len(texts):], candidates, shown, scale)
        if position_fn is not None:
            on_cards = card_patch_mask([tile.cards for tile in tiles], size, model.visual.patch_size[0])
            token_loss = position_fn.token_loss(patches)  # one head forward for both terms
            loss = (loss + config.position_weight * position_fn.masked_mean(token_loss)
                    + config.position_card_weight * position_fn.masked_mean(token_loss, on_cards))
        if label_fn is not None:
            labels = card_patch_labels([tile.cards for tile in tiles], size, model.visual.patch_size[0])
            loss = loss + config.label_weight * label_fn(patches, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(out_path, config, step + 1, model, heads, opt, sched, rng, running,
                            spent + time.time() - start)
        if progress and (step + 1) % 250 == 0:  # a quick look at held-out cards (its own generator)
            model.eval()
            acc = zero_shot_accuracy(model, tokenizer, random.Random(config.seed + EVAL_SEED_OFFSET), 96, size,
                                     render=material("val" if config.render == "train" else "legacy"))
            position = "" if position_fn is None else (f", patch position {position_fn.accuracy(patches):.2f}"
                                                       f" (under cards {position_fn.accuracy(patches, on_cards):.2f})")
            if label_fn is not None:
                shape_right, color_right = label_fn.accuracy(patches, labels)
                position += f", patch label shape {shape_right:.2f} colour {color_right:.2f}"
            model.train()
            bar.write(f"step {step + 1}: loss {running:.3f}, zero-shot accuracy on 96 held-out cards {acc:.2f}"
                      + position)
    train_seconds = spent + time.time() - start
    model.eval()
    # the captions it was trained on: ψ scores a question less their mean (relevance.TextReference)
    save_local_dir(model, open_clip.get_model_config(config.model), out_path, reference=TextReference(CAPTIONS))
    report = {"model": config.model, "config": asdict(config), "train_seconds": round(train_seconds, 1),
              "final_loss": round(running or 0.0, 4), "torch_threads": torch.get_num_threads(),
              "resumed_at_step": first or None,
              **evaluate(out_path, config.seed, config.eval_cards, config.eval_mosaics, config.render)}
    (out_path / "train_report.json").write_text(json.dumps(report, indent=2))
    (out_path / CHECKPOINT).unlink(missing_ok=True)
    return report


CHECKPOINT = "checkpoint.pt"


def write_checkpoint(out: Path, config, step: int, model, opt, sched, rng: random.Random, **extra) -> None:
    """Write ``out/checkpoint.pt`` atomically: the run's configuration and step, model, optimiser,
    schedule, the material's and torch's random state, and whatever else the trainer needs (``extra``)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {"config": asdict(config), "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), **extra}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / CHECKPOINT)


def read_checkpoint(out: Path, config, model, opt, sched, rng: random.Random) -> dict | None:
    """Restore what :func:`write_checkpoint` wrote into the run and return the whole state; None
    without a checkpoint. A checkpoint of another configuration is refused rather than mixed in."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    if state["config"] != asdict(config):
        changed = sorted(k for k in state["config"] if state["config"][k] != asdict(config).get(k))
        raise ValueError(f"{path} is a checkpoint of another configuration (differs in {', '.join(changed)}); "
                         "give another output directory or delete it")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return state


def save_checkpoint(out: Path, config: ClipTrainConfig, step: int, model, heads: dict, opt, sched,
                    rng: random.Random, running: float | None, seconds: float) -> None:
    """Everything a stopped run needs to go on as if it had not stopped (written atomically)."""
    write_checkpoint(out, config, step, model, opt, sched, rng, running=running, seconds=seconds,
                     heads={k: h.state_dict() for k, h in heads.items() if h is not None})


def resume_checkpoint(out: Path, config: ClipTrainConfig, model, heads: dict, opt, sched,
                      rng: random.Random) -> tuple[int, float | None, float]:
    """Load ``out``'s checkpoint into the run if there is one: (first step, running loss, seconds
    spent). A checkpoint of another configuration is refused rather than mixed in."""
    state = read_checkpoint(out, config, model, opt, sched, rng)
    if state is None:
        return 0, None, 0.0
    for name, head in heads.items():
        if head is not None:
            head.load_state_dict(state["heads"][name])
    return state["step"], state["running"], state["seconds"]
