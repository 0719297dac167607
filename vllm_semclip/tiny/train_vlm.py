"""Train the tiny LLaVA: ψ's trained ViT as the frozen tower, then projector + language model.

LLaVA-1.5's recipe in miniature, with the tower frozen throughout (by default):

1. *alignment* (the first ``align_fraction`` of the steps): tiles with one card and the
   question about its colour — the projector learns to hand the language model what
   the tower sees, on the simplest data (the curriculum: one card first);
2. *instruction tuning*: tiles with 1–3 cards and both question kinds, plus SemClip-style
   inputs — a small benchmark scene's overview followed by 1–3 candidate crops, one of
   which shows the targets — so the model learns to read the detail in whichever tile
   has it, in the token layout the plugin serves (overview first, then crops).

Options, each off by default and each there because the plain recipe failed at something:

- ``side_fraction``: questions about a card's side *of the image*, LLaVA's grounding data in
  miniature — the one-card rung below "… of the {b}?".
- ``turns``: every card of a tile asked in one conversation (more supervision per tile).
- ``side_steps`` / ``ground_spatial_fraction`` / ``align_ground_fraction``: a grounding stage of
  side questions first (position is on every token of a CLIP tower, so a projector first trained
  on colour has no reason to keep it), the two-card question joining in its second half, and
  grounding samples kept in the alignment so the skill survives it.
- ``position_binding_weight`` / ``word_binding_weight``: attention supervision of the left/right
  question — heads 0 and 1 of a late layer steered onto the two named cards, and of layer 0 onto
  the question's words naming them, so the later heads know which shapes to look for.
- ``binding_weight`` / ``attribute_word_binding_weight``: the same pair of steerings for the colour
  question (among several cards the answer otherwise takes another card's colour).
- ``text_steps`` / ``align_projector_only``: text-only pretraining of the language model (no text
  corpus ships in a package) and a projector-only alignment (LLaVA-1.5's stage 1).
- ``tower_lr``: fine-tune the tower after alignment, as later LLaVAs do.

Samples are generated on the fly (every step sees new cards), the targets are the benchmark's
own option sentences, and the loss covers the answer tokens only. Half the prompts carry a BOS
token and half do not, so the model answers the same whether a front end adds one or not.
The bundled LLaVA's commands and figures are in docs/tiny-models.md.

``semclip train vlm`` trains, evaluates on held-out data with the V* protocol (each
option scored by its likelihood; correct when the first option scores highest) and
writes the checkpoint (bf16, a few MB) with ``train_report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vllm_semclip.eval.benchdata import make_record
from vllm_semclip.tiny.cards import (
    CROP_SIDE_RANGE,
    VISIBLE_SIDE_RANGE,
    attribute_option,
    attribute_question,
    card_tile,
    spatial_option,
    spatial_question,
)
from vllm_semclip.config import SemClipConfig
from vllm_semclip.crops import candidate_boxes, mean_fill
from vllm_semclip.eval.metrics import oracle_index
from vllm_semclip.eval.harness import prompt_for
from vllm_semclip.tiny.scenes import COLORS, SHAPES, Placed
from vllm_semclip.selection import select_crops, selected_tiles
from vllm_semclip.tiny.render import RenderDistribution
from vllm_semclip.tiny.train_clip import (
    CHECKPOINT,
    card_patch_labels,
    material,
    read_checkpoint,
    warmup_cosine,
    write_checkpoint,
)
from vllm_semclip.tiny.bundled import DEFAULT_MODEL_DIR, DEFAULT_TOWER_DIR
from vllm_semclip.tiny.build import TinyLlavaSpec, build_tiny_llava

TRAIN_SCENE_SEED = 1_000_000  # benchmark scenes for training use seeds from here; held-out splits use small ones
EVAL_SEED_OFFSET = 2_000_003
GRIDS = (2, 3)


@dataclass(frozen=True)
class VlmTrainConfig:
    """Hyper-parameters of ``semclip train vlm`` (defaults reproduce the committed weights)."""

    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    align_fraction: float = 0.15
    scene_fraction: float = 0.4  # share of SemClip-style (overview + crops) samples after alignment
    spatial_fraction: float = 0.45  # share of spatial questions among multi-card samples
    scene_scale: float = 0.4  # training scenes are benchmark scenes drawn at this scale
    side_fraction: float = 0.0  # share of single-tile samples asking a card's side of the image
    binding_weight: float = 0.0  # weight of the attention-binding loss (0 = off; see LlavaTrainer.binding_loss)
    binding_layer: int = 2  # the language-model layer whose first head it steers (and second, for left/right)
    position_binding_weight: float = 0.0  # the same loss on left/right questions: heads 0 and 1 onto the two cards
    word_binding_weight: float = 0.0  # left/right questions: heads 0 and 1 of word_binding_layer onto the words naming them
    word_binding_layer: int = 0
    attribute_word_binding_weight: float = 0.0  # colour questions: head 0 of word_binding_layer onto the shape word
    tower_lr: float = 0.0  # learning rate of the tower after alignment (0 = frozen throughout, LLaVA-1.5's recipe)
    turns: int = 1  # questions per multi-card tile, asked as one multi-turn conversation (see add_turns)
    text_steps: int = 0  # text-only steps before the image stages: the language model's pretraining (see text_sample)
    align_projector_only: bool = False  # alignment trains the projector alone (LLaVA-1.5's stage 1), the LM frozen
    side_steps: int = 0  # a grounding stage first: side-of-the-image questions alone (see ground_side)
    ground_spatial_fraction: float = 0.0  # share of grounding samples asking the two-card left/right question instead
    align_ground_fraction: float = 0.0  # share of alignment samples drawn as grounding samples (keeps the skill)
    init: str | None = None  # a saved LLaVA whose projector and language model to continue from (the tower: relevance_dir's)
    seed: int = 0
    threads: int = 0
    eval_questions: int = 400
    # the material: "legacy" (the first generator) or "train" (RenderDistribution's training split: tiles and
    # scenes; held-out questions then come from its "val" split)
    render: str = "legacy"
    checkpoint_every: int = 100  # image-stage steps between resumable checkpoints (out_dir/checkpoint.pt); 0 = none

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if self.render not in ("legacy", "train"):
            raise ValueError(f"render must be legacy or train, got {self.render!r}")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be non-negative")
        if not 0 < self.lr < 1 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("lr must be in (0, 1), weight_decay and warmup non-negative")
        for name in ("align_fraction", "scene_fraction", "spatial_fraction", "side_fraction", "ground_spatial_fraction",
                     "align_ground_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a fraction (0-1)")
        if not 0.1 <= self.scene_scale <= 1:
            raise ValueError("scene_scale must be in [0.1, 1]")
        if min(self.binding_weight, self.position_binding_weight, self.binding_layer, self.word_binding_weight,
               self.word_binding_layer, self.attribute_word_binding_weight) < 0:
            raise ValueError("binding_weight, position_binding_weight, word_binding_weight, "
                             "attribute_word_binding_weight and their layers must be non-negative")
        if self.tower_lr < 0:
            raise ValueError("tower_lr must be non-negative (0 keeps the tower frozen)")
        if self.turns < 1:
            raise ValueError("turns must be at least 1 (one question per sample)")
        if self.text_steps < 0:
            raise ValueError("text_steps must be non-negative (0: no text pretraining)")
        if self.side_steps < 0:
            raise ValueError("side_steps must be non-negative (0: no grounding stage)")

    @property
    def held_out_split(self) -> str:
        """Where held-out questions come from: ``val`` for the randomised material, else ``legacy``."""
        return "val" if self.render == "train" else "legacy"

    @property
    def align_steps(self) -> int:
        """How many first steps are alignment (one-card tiles; the tower frozen even with ``tower_lr``)."""
        return math.ceil(self.align_fraction * self.steps)


@dataclass
class Sample:
    """One multiple-choice question about a list of tiles (the first option is the answer)."""

    tiles: list[Image.Image]
    question: str
    options: list[str]
    category: str  # "direct_attributes" | "relative_position"
    cards: list[Placed] = field(default_factory=list)  # what a single-tile sample shows (checks, diagnostics)
    turns: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) asked after the first (training)
    text: str = ""  # words standing in for the image (text pretraining: a sample without tiles)

    def asked_card(self) -> Placed:
        """The card an attribute question ("What is the color of the {shape}?") names."""
        return next(c for c in self.cards if self.question.endswith(f" {c.shape}?"))

    def named_cards(self) -> list[Placed]:
        """The cards the question names, in its order: the asked card of an attribute question;
        {a} then {b} of "Is the {a} on the left or right side of the {b}?" ({a} alone when {b} is
        "image")."""
        if self.category == "direct_attributes":
            return [self.asked_card()]
        words = self.question.rstrip("?").split()
        by_shape = {c.shape: c for c in self.cards}
        return [by_shape[w] for w in (words[2], words[-1]) if w in by_shape]


def tile_sample(rng: random.Random, *, n_cards: int, spatial: bool, side_range=CROP_SIDE_RANGE,
                size: int = 224, render: RenderDistribution | None = None) -> Sample:
    """A ``size``-px tile (the tower's input size: drawn at the detail the tower gets) with
    ``n_cards`` cards (distinct shapes) and a question about it; ``render``: drawn from that
    distribution (None: the legacy generator)."""
    tile = card_tile(rng, size, n_cards=n_cards, side_range=side_range, min_dx=spatial, render=render)
    if spatial:
        a, b = tile.cards[0], tile.cards[1]
        left = a.center[0] < b.center[0]
        sides = ("left", "right") if left else ("right", "left")
        options = [spatial_option(a.shape, b.shape, s) for s in sides]
        return Sample([tile.image], spatial_question(a.shape, b.shape), options, "relative_position", tile.cards)
    target = rng.choice(tile.cards)
    wrong = rng.sample([c for c in COLORS if c != target.color], 3)
    options = [attribute_option(target.shape, c) for c in (target.color, *wrong)]
    return Sample([tile.image], attribute_question(target.shape), options, "direct_attributes", tile.cards)


def add_turns(rng: random.Random, sample: Sample, turns: int) -> Sample:
    """``sample`` with up to ``turns - 1`` more questions about the same tile, as later turns of
    one conversation (LLaVA-Instruct's form: several questions about one image): the colour of
    each other card, and left/right for each ordered pair of cards at least a card side apart.

    Why: a multi-card tile costs the language model ~200 image tokens and a question ~20 more,
    so asking about every card multiplies the supervision of *finding the named card* at little
    cost (``benchmarks/research/readout_ceiling.py``: a read-out on the frozen tokens gains with more
    examples of finding the card). Tried at 3 and 6 turns: the held-out figures stayed level
    with one question per tile."""
    if turns < 2 or len(sample.tiles) != 1 or len(sample.cards) < 2:
        return sample
    pool: list[tuple[str, str]] = []
    for card in sample.cards:
        question = attribute_question(card.shape)
        if question != sample.question:
            pool.append((question, attribute_option(card.shape, card.color)))
    for a in sample.cards:
        for b in sample.cards:
            if a is not b and abs(a.center[0] - b.center[0]) >= a.bbox[2]:
                question = spatial_question(a.shape, b.shape)
                if question != sample.question:
                    side = "left" if a.center[0] < b.center[0] else "right"
                    pool.append((question, spatial_option(a.shape, b.shape, side)))
    extra = rng.sample(pool, min(turns - 1, len(pool)))
    return dataclasses.replace(sample, turns=extra)


FILLER_WORDS = ("the", "a", "image", "picture", "person", "cup", "coffee", "plate", "cat", "rocket", "suit", "of",
                "in", "and", "objects", "holding", "wearing")


def text_sample(rng: random.Random, *, n_cards: int, span: int = 48) -> Sample:
    """An attribute question whose "image" is words: each card as "{color} {shape}" at a random
    place among ``span`` filler words (no tiles; the trainer puts the words where the image
    tokens go).

    Why: LLaVA's language model arrives pretrained and the projector only has to hand it
    something it can already search; ours learns from nothing, and the part that fails is
    finding the named card (``benchmarks/research/readout_ceiling.py``: a read-out whose query *is*
    the shape does better on the same tokens). Text with the same question over cards written
    out teaches that search — match the shape, copy its colour — before any image is seen."""
    shapes = rng.sample(SHAPES, n_cards)
    colours = [rng.choice(list(COLORS)) for _ in shapes]
    words = [rng.choice(FILLER_WORDS) for _ in range(span)]
    for i, at in enumerate(sorted(rng.sample(range(span + 1), n_cards), reverse=True)):
        words[at:at] = [colours[i], shapes[i]]
    k = rng.randrange(n_cards)
    wrong = rng.sample([c for c in COLORS if c != colours[k]], 3)
    options = [attribute_option(shapes[k], c) for c in (colours[k], *wrong)]
    return Sample([], attribute_question(shapes[k]), options, "direct_attributes", text=" ".join(words))


def side_sample(rng: random.Random, *, n_cards: int, side_range=CROP_SIDE_RANGE, margin: float = 0.1,
                size: int = 224, render: RenderDistribution | None = None) -> Sample:
    """A tile with ``n_cards`` cards and "Is the {shape} on the left or right side of the image?"
    about one of them, whose centre is at least ``margin`` of the tile off the middle."""
    while True:
        tile = card_tile(rng, size, n_cards=n_cards, side_range=side_range, render=render)
        target = rng.choice(tile.cards)
        x = target.center[0] / tile.image.width
        if abs(x - 0.5) >= margin:
            break
    sides = ("left", "right") if x < 0.5 else ("right", "left")
    options = [spatial_option(target.shape, "image", s) for s in sides]
    return Sample([tile.image], spatial_question(target.shape, "image"), options, "relative_position", tile.cards)


def scene_tiles(image: Image.Image, targets: list[tuple[int, int, int, int]], crops: int, rng: random.Random,
                pad_fill: tuple[int, int, int], tile_size: int) -> list[Image.Image]:
    """[overview, crops…] as the plugin builds them: the oracle crop and ``crops - 1`` others, shuffled."""
    candidates = candidate_boxes(*image.size, GRIDS)
    best = oracle_index(candidates, targets)
    others = rng.sample([i for i in range(len(candidates)) if i != best], crops - 1)
    chosen = [best, *others]
    rng.shuffle(chosen)
    config = SemClipConfig(method="given", boxes=tuple(candidates[i] for i in chosen))
    return selected_tiles(image, select_crops(image, "", config), pad_fill, max_side=2 * tile_size)


def scene_sample(rng: random.Random, index: int, *, spatial: bool, scale: float, crops: int,
                 pad_fill: tuple[int, int, int], tile_size: int, seed: int = TRAIN_SCENE_SEED,
                 split: str = "legacy") -> Sample:
    """A benchmark scene of ``split``'s generator as the plugin sends it: [overview, ``crops`` crops]."""
    image, rec = make_record("relative_position" if spatial else "direct_attributes", index, seed, split, scale)
    if crops:
        tiles = scene_tiles(image, rec.target_boxes, crops, rng, pad_fill, tile_size)
    else:
        tiles = selected_tiles(image, select_crops(image, "", SemClipConfig(method="overview")), pad_fill,
                               max_side=2 * tile_size)
    return Sample(tiles, rec.question, rec.options, rec.category)


class LlavaTrainer:
    """Batches → loss for a Hugging Face ``LlavaForConditionalGeneration`` with a frozen tower.

    It fills the image-token positions with projected tower features exactly as the model
    (and vLLM's LLaVA) does — overview first, then crops, ``tokens_per_tile`` each.
    """

    def __init__(self, model, processor) -> None:
        self.model = model
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token_id = model.config.image_token_index
        cfg = model.config.vision_config
        self.tokens_per_tile = (cfg.image_size // cfg.patch_size) ** 2
        self.pad_fill = mean_fill(self.image_processor.image_mean)
        self.tile_size = cfg.image_size
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model_dir: Path | str) -> "LlavaTrainer":
        """A saved LLaVA checkpoint (fp32, eval mode) and its processor, ready to score."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        return cls(model, AutoProcessor.from_pretrained(model_dir))

    def unfreeze_tower(self) -> None:
        """Let the language model's loss train the tower too (``VlmTrainConfig.tower_lr``)."""
        for p in self.model.model.vision_tower.parameters():
            p.requires_grad_(True)

    def language_model_parameters(self) -> list[torch.nn.Parameter]:
        """The language side: embeddings, decoder layers and the LM head (not projector, not tower)."""
        return list(self.model.model.language_model.parameters()) + list(self.model.lm_head.parameters())

    def set_language_model_trainable(self, trainable: bool) -> None:
        """Freeze (LLaVA-1.5's alignment stage: the projector alone learns) or unfreeze the language side."""
        for p in self.language_model_parameters():
            p.requires_grad_(trainable)

    def encode(self, sample: Sample, answer: str | None, bos: bool = True, eos: bool = True) -> tuple[list[int], int]:
        """Token ids of prompt (+ " answer" [+ </s>]) with the image token expanded; and where the answer starts."""
        prompt_ids = self.tokenizer(prompt_for(self.tokenizer, sample.question), add_special_tokens=bos)["input_ids"]
        answer_ids = [] if answer is None else self.answer_ids(answer, eos)
        image = self.tokenizer(" " + sample.text, add_special_tokens=False)["input_ids"] if sample.text else None
        expanded: list[int] = []
        for t in prompt_ids:
            if t != self.image_token_id:
                expanded.append(t)
            else:
                expanded.extend(image if image is not None else [t] * (self.tokens_per_tile * len(sample.tiles)))
        return expanded + answer_ids, len(expanded)

    def answer_ids(self, answer: str, eos: bool = True) -> list[int]:
        """Token ids of " answer" as it follows "ASSISTANT:" [+ </s>]."""
        ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id] if eos else ids

    def encode_conversation(self, sample: Sample, bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode` of the first question and answer, then each of ``sample.turns`` as
        "USER: {question} ASSISTANT: {answer}</s>" (LLaVA-1.5's later turns); the ids and each
        answer's (start, end) — the positions the loss covers."""
        ids, start = self.encode(sample, sample.options[0], bos=bos)
        spans = [(start, len(ids))]
        for question, answer in sample.turns:
            ids = ids + self.tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
            begin = len(ids)
            ids = ids + self.answer_ids(answer)
            spans.append((begin, len(ids)))
        return ids, spans

    def pixel_values(self, samples: list[Sample]):
        """The tiles of ``samples`` preprocessed, or None when they have none (text samples)."""
        tiles = [t for s in samples for t in s.tiles]
        return self.image_processor(tiles, return_tensors="pt")["pixel_values"] if tiles else None

    def tile_features(self, pixel_values):
        """Tower features (layer -2, CLS dropped): (tiles, tokens_per_tile, width); None for no
        tiles. Gradients reach the tower only once :meth:`unfreeze_tower` was called."""
        if pixel_values is None:
            return None
        tower = self.model.model.vision_tower
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())):
            out = tower(pixel_values.to(self.model.dtype), output_hidden_states=True)
            return out.hidden_states[self.model.config.vision_feature_layer][:, 1:]

    def embeds(self, ids: list[list[int]], features):
        """Padded batch of input embeddings (image positions take the projected features in
        order) and its attention mask."""
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        embeds = self.model.get_input_embeddings()(input_ids)
        if features is None:
            return embeds, mask
        image_pos = input_ids == self.image_token_id
        projected = self.model.model.multi_modal_projector(features).reshape(-1, embeds.shape[-1])
        return embeds.masked_scatter(image_pos.unsqueeze(-1), projected.to(embeds.dtype)), mask

    def logits(self, ids: list[list[int]], features):
        """Padded batch forward; image positions take the projected features in order."""
        embeds, mask = self.embeds(ids, features)
        hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return self.model.lm_head(hidden)

    def _forward_with_attentions(self, ids: list[list[int]], features):
        """The language model's output with its attention weights (eager kernel: the fused ones
        return none; the model's own kernel is restored after)."""
        lm = self.model.model.language_model
        previous = lm.config._attn_implementation
        lm.set_attn_implementation("eager")
        try:
            embeds, mask = self.embeds(ids, features)
            return lm(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
        finally:
            lm.set_attn_implementation(previous)

    def attentions(self, ids: list[list[int]], features) -> tuple[torch.Tensor, ...]:
        """The language model's attention weights, one ``(batch, heads, query, key)`` per layer
        (diagnostics: which tokens a question's answer reads)."""
        return self._forward_with_attentions(ids, features).attentions

    def answer_position(self, sample: Sample, begin: int) -> int:
        """Where, in :meth:`encode`'s ids of ``sample`` with its first option, the token that
        predicts the answer's deciding word is — the first token where the first two options
        differ (the colour in "The color of the {shape} is {colour}.", left/right in "The {a} is
        on the {side} side of the {b}.")."""
        first, second = (self.answer_ids(o, eos=False) for o in sample.options[:2])
        same = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
        return begin + same - 1

    def binding_targets(self, samples: list[Sample], encoded: list[tuple[list[int], int]],
                        category: str = "direct_attributes", named: int = 0):
        """For each ``category`` question about one tile with its cards known: (row, the position
        predicting the deciding word, a 0/1 vector over the row's keys marking the image tokens of
        the card the question names ``named``-th). Attribute questions name one card (the asked
        one); relative-position questions two — "Is the {a} on the left or right side of the {b}?"
        — or one when {b} is "image". Other samples have no target."""
        width = max(len(x) for x, _ in encoded)
        patch = self.model.config.vision_config.patch_size
        targets = []
        for row, (s, (ids, begin)) in enumerate(zip(samples, encoded)):
            if s.category != category or len(s.tiles) != 1 or not s.cards:
                continue
            card = s.named_cards()[named:named + 1]
            if not card:
                continue
            shapes, _ = card_patch_labels([s.cards], self.tile_size, patch)
            on_card = torch.zeros(width)
            image_at = ids.index(self.image_token_id)
            on_card[image_at:image_at + self.tokens_per_tile] = (shapes[0] == SHAPES.index(card[0].shape)).float()
            targets.append((row, self.answer_position(s, begin), on_card))
        return targets

    def word_targets(self, samples: list[Sample], encoded: list[tuple[list[int], int]], named: int = 0,
                     category: str = "relative_position"):
        """For each ``category`` question: (row, the position predicting the deciding word, a 0/1
        vector over the row's keys marking the question's tokens of the word that names its
        ``named``-th card) — :meth:`binding_loss`'s targets for steering a head from the answer
        back to the words that name the cards. A left/right question ("Is the {a} on the left or
        right side of the {b}?", {b} possibly "image") names {a} (``named`` 0) and {b} (1); an
        attribute question ("What is the color of the {shape}?") names one, its shape."""
        width = max(len(x) for x, _ in encoded)
        targets = []
        for row, (s, (ids, begin)) in enumerate(zip(samples, encoded)):
            if s.category != category:
                continue
            words = s.question.rstrip("?").split()
            named_words = (words[2], words[-1]) if category == "relative_position" else (words[-1],)
            if named >= len(named_words):
                continue
            word = named_words[named]
            start = ids.index(self.image_token_id) + self.tokens_per_tile * len(s.tiles) if s.tiles else 0
            at = _find(ids, self.tokenizer(" " + word, add_special_tokens=False)["input_ids"], start, begin)
            if at is None:
                raise ValueError(f"{word!r} is not a token sequence of the question {s.question!r}")
            keys = torch.zeros(width)
            keys[at[0]:at[1]] = 1.0
            targets.append((row, self.answer_position(s, begin), keys))
        return targets

    def binding_loss(self, attentions: tuple[torch.Tensor, ...], targets, layer: int, head: int = 0) -> torch.Tensor:
        """−log of the attention that ``head`` of ``layer``, at the position predicting the
        deciding word, pays to the targeted card's tokens, averaged over ``targets``.

        Why: the tiny language model has no text pretraining, and on its own its attention finds
        the asked-for card among three hardly better than chance (``benchmarks/research/tower_probe.py``)
        even when the tokens say which card they belong to. This is grounding supervision of one
        head — a training signal only; the model and what vLLM serves are unchanged.

        The same loss steers heads 0 and 1 onto the two cards of a left/right question
        (``position_binding_weight``): there the signal the answer needs — where the cards are —
        is on *every* image token (the background's too), so attention spread over the image
        reads nothing and the gradient that would focus it starts only late — a saddle, which
        the steering skips on clean synthetic tokens, not on the tiny CLIP's
        (``benchmarks/research/position_saddle.py``)."""
        a = attentions[layer][:, head]  # (batch, query, key)
        rows = torch.tensor([r for r, _, _ in targets])
        queries = torch.tensor([q for _, q, _ in targets])
        keys = torch.stack([k for _, _, k in targets])
        mass = (a[rows, queries] * keys).sum(-1)
        return -torch.log(mass.clamp_min(1e-6)).mean()

    def loss(self, samples: list[Sample], rng: random.Random, binding_weight: float = 0.0, binding_layer: int = 2,
             position_binding_weight: float = 0.0, word_binding_weight: float = 0.0, word_binding_layer: int = 0,
             attribute_word_binding_weight: float = 0.0):
        """Cross-entropy of the answer tokens (of every turn); plus ``binding_weight`` ×
        :meth:`binding_loss` on attribute questions (head 0 on the asked card),
        ``position_binding_weight`` × the same on left/right questions (head 0 on the first card
        named, head 1 on the second) and ``word_binding_weight`` × the same for heads 0 and 1 of
        ``word_binding_layer`` onto the question's words naming them (:meth:`word_targets`);
        ``attribute_word_binding_weight`` × the same for head 0 of ``word_binding_layer`` onto an
        attribute question's shape word — with ``binding_weight``, the pair of steerings that
        taught the left/right question, on the colour question.

        Why the words: steered onto the cards alone, heads 0 and 1 look at all the cards alike
        (~⅓ each among three) — at the answer's position nothing yet says which shapes were
        named — and the two-card question stays at a constant answer; with an earlier layer
        steered from the answer back to the two words, the cards' heads lock onto {a} and {b}
        and the comparison can be learnt (``benchmarks/research/position_saddle.py``)."""
        conversations = [self.encode_conversation(s, bos=rng.random() < 0.5) for s in samples]
        ids = [x for x, _ in conversations]
        encoded = [(x, spans[0][0]) for x, spans in conversations]  # the first answer (binding targets)
        features = self.tile_features(self.pixel_values(samples))
        steered = []  # (weight, layer, head, targets)
        if binding_weight:
            steered.append((binding_weight, binding_layer, 0, self.binding_targets(samples, encoded)))
        if position_binding_weight:
            steered += [(position_binding_weight, binding_layer, head,
                         self.binding_targets(samples, encoded, "relative_position", head)) for head in (0, 1)]
        if word_binding_weight:
            steered += [(word_binding_weight, word_binding_layer, head, self.word_targets(samples, encoded, head))
                        for head in (0, 1)]
        if attribute_word_binding_weight:
            steered.append((attribute_word_binding_weight, word_binding_layer, 0,
                            self.word_targets(samples, encoded, 0, "direct_attributes")))
        steered = [x for x in steered if x[3]]
        if steered:
            out = self._forward_with_attentions(ids, features)
            logits = self.model.lm_head(out.last_hidden_state)
        else:
            logits = self.logits(ids, features)
        labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
        for row, (x, spans) in enumerate(conversations):
            for start, end in spans:
                labels[row, start:end] = torch.tensor(x[start:end])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        for weight, layer, head, targets in steered:
            loss = loss + weight * self.binding_loss(out.attentions, targets, layer, head)
        return loss

    def option_scores(self, samples: list[Sample], batch: int = 32) -> list[list[float]]:
        """Sum of each option's token log-probabilities given image and question (V* Bench's protocol)."""
        scores: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(samples), batch):
                chunk = samples[start:start + batch]
                features = self.tile_features(self.pixel_values(chunk))
                offsets = [0]
                for s in chunk:
                    offsets.append(offsets[-1] + len(s.tiles))
                rows, owners, spans = [], [], []
                for i, s in enumerate(chunk):
                    for opt in s.options:
                        ids, begin = self.encode(s, opt, eos=False)  # the option's own tokens, as vLLM scores them
                        rows.append(ids)
                        owners.append(i)
                        spans.append((begin, len(ids)))
                feats = None if features is None else torch.cat([features[offsets[i]:offsets[i + 1]] for i in owners])
                logprobs = torch.log_softmax(self.logits(rows, feats).float(), dim=-1)
                per_row = []
                for r, (ids, (b, e)) in enumerate(zip(rows, spans)):
                    target = torch.tensor(ids[b:e])
                    per_row.append(float(logprobs[r, b - 1:e - 1].gather(1, target[:, None]).sum()))
                k = 0
                for s in chunk:
                    scores.append(per_row[k:k + len(s.options)])
                    k += len(s.options)
        return scores


def _find(ids: list[int], sub: list[int], start: int, end: int) -> tuple[int, int] | None:
    """(first, last + 1) of the first occurrence of ``sub`` in ``ids[start:end]``, or None."""
    for i in range(start, end - len(sub) + 1):
        if ids[i:i + len(sub)] == sub:
            return i, i + len(sub)
    return None


def accuracy(trainer: LlavaTrainer, samples: list[Sample]) -> float:
    scores = trainer.option_scores(samples)
    return sum(max(range(len(s)), key=s.__getitem__) == 0 for s in scores) / len(samples)


def held_out_sets(n: int, seed: int, pad_fill, tile_size: int, split: str = "legacy") -> dict[str, list[Sample]]:
    """The issue's three held-out conditions and the side-of-the-image rung, ``n`` questions each,
    from seeds training never uses, drawn by ``split``'s generator (``legacy``, or a
    :class:`RenderDistribution` split: ``val`` for models trained on ``train``)."""
    rng = random.Random(seed + EVAL_SEED_OFFSET)
    render = material(split)
    return {
        "visible_attribute": [tile_sample(rng, n_cards=rng.randint(1, 3), spatial=False, side_range=VISIBLE_SIDE_RANGE,
                                          size=tile_size, render=render) for _ in range(n)],
        "visible_spatial": [tile_sample(rng, n_cards=rng.randint(2, 3), spatial=True, side_range=VISIBLE_SIDE_RANGE,
                                        size=tile_size, render=render) for _ in range(n)],
        # full-size benchmark scenes (1500-2700 px) shrunk whole to one tile: the detail should be lost
        "overview_attribute": [scene_sample(rng, i, spatial=False, scale=1.0, crops=0, pad_fill=pad_fill,
                                            tile_size=tile_size, seed=seed + EVAL_SEED_OFFSET, split=split)
                               for i in range(n)],
        # the one-card rung below the spatial question: a card's side of the image (after the rest: same draws)
        "visible_side": [side_sample(rng, n_cards=rng.randint(1, 3), side_range=VISIBLE_SIDE_RANGE, size=tile_size,
                                     render=render) for _ in range(n)],
    }


def evaluate(model_dir: Path | str, n: int = 400, seed: int = 0, progress: bool = True,
             split: str = "legacy") -> dict:
    """Held-out accuracies of a saved tiny LLaVA on ``split``'s material (likelihood protocol, Hugging Face forward)."""
    trainer = LlavaTrainer.from_pretrained(model_dir)
    sets = held_out_sets(n, seed, trainer.pad_fill, trainer.tile_size, split)
    return ({f"{name}_accuracy": accuracy(trainer, samples) for name, samples in sets.items()}
            | {"eval_questions": n, "eval_split": split})


def grounding_sample(rng: random.Random, spatial_fraction: float, tile_size: int,
                     render: RenderDistribution | None = None) -> Sample:
    """A sample of the grounding stage: "Is the {shape} on the left or right side of the image?"
    (1–3 cards), or, with probability ``spatial_fraction``, the benchmark's two-card
    "Is the {a} on the left or right side of the {b}?" (2–3 cards).

    Why the two go together: both name the card to find at the same place, and {a}'s side of the
    image alone mostly answers the two-card question, so a model that reads where one card is
    could answer it with the same look (``benchmarks/research/which_card.py`` checks whether it does)."""
    if spatial_fraction and rng.random() < spatial_fraction:
        return tile_sample(rng, n_cards=rng.randint(2, 3), spatial=True, size=tile_size, render=render)
    return side_sample(rng, n_cards=rng.randint(1, 3), size=tile_size, render=render)


def _batch(rng: random.Random, config: VlmTrainConfig, step: int, trainer: LlavaTrainer, counter: list[int]) -> list[Sample]:
    """One step's samples. A step is all single tiles or all scenes with the same crop count:
    similar lengths in a batch, so little compute goes to padding. Alignment samples are one-card
    colour questions, or (``align_ground_fraction``) grounding samples, so that what a grounding
    stage taught is still asked while the projector learns colour."""
    render = material(config.render)
    if step < config.align_steps:
        return [grounding_sample(rng, config.ground_spatial_fraction, trainer.tile_size, render)
                if config.align_ground_fraction and rng.random() < config.align_ground_fraction
                else tile_sample(rng, n_cards=1, spatial=False, size=trainer.tile_size, render=render)
                for _ in range(config.batch_size)]
    if rng.random() < config.scene_fraction:
        crops = rng.choice((1, 1, 2))
        out = []
        for _ in range(config.batch_size):
            counter[0] += 1
            out.append(scene_sample(rng, counter[0], spatial=rng.random() < config.spatial_fraction,
                                    scale=config.scene_scale, crops=crops, pad_fill=trainer.pad_fill,
                                    tile_size=trainer.tile_size, seed=TRAIN_SCENE_SEED + config.seed,
                                    split=config.render))
        return out
    out = []
    for _ in range(config.batch_size):
        n_cards = rng.randint(1, 3)
        if config.side_fraction and rng.random() < config.side_fraction:
            out.append(side_sample(rng, n_cards=n_cards, size=trainer.tile_size, render=render))
        else:
            sample = tile_sample(rng, n_cards=n_cards, spatial=n_cards > 1 and rng.random() < config.spatial_fraction,
                                 size=trainer.tile_size, render=render)
            out.append(add_turns(rng, sample, config.turns))
    return out


def _optimizer_step(loss: torch.Tensor, opt, sched, params: list, running: float | None) -> float:
    """Back-propagate ``loss``, clip the gradients to norm 1, step optimiser and schedule; return
    the running loss (an exponential average, for the progress bar)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.item() if running is None else 0.98 * running + 0.02 * loss.item()


def _held_out_accuracy(trainer: LlavaTrainer, samples: list[Sample]) -> float:
    """:func:`accuracy` in eval mode mid-training; back to training mode after (the tower stays in eval)."""
    trainer.model.eval()
    result = accuracy(trainer, samples)
    trainer.model.train()
    trainer.model.model.vision_tower.eval()
    return result


def held_out_text(n: int, seed: int, longest: int) -> list[Sample]:
    """``n`` text questions from a seed text pretraining never draws from (32 to ``longest`` filler words)."""
    rng = random.Random(f"text-eval-{seed}")
    return [text_sample(rng, n_cards=rng.randint(1, 3), span=rng.randint(32, longest)) for _ in range(n)]


def _probe_accuracies(trainer: LlavaTrainer, probes: dict[str, list[Sample]]) -> dict[str, float]:
    return {k: _held_out_accuracy(trainer, v) for k, v in probes.items()}


def _run_stage(trainer: LlavaTrainer, name: str, steps: int, warmup: int, params: list, step_loss,
               probes: dict[str, list[Sample]], config: VlmTrainConfig, progress: bool) -> dict[str, float]:
    """A stage before the image stages: ``steps`` optimiser steps on ``step_loss()`` (its own
    AdamW and warm-up/cosine schedule over ``params``); returns the accuracy on each of ``probes``
    (also printed every 200 steps with ``progress``)."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = warmup_cosine(opt, warmup, steps)
    running = None
    bar = tqdm(range(steps), desc=f"train vlm ({name})", disable=not progress, mininterval=5)
    for step in bar:
        running = _optimizer_step(step_loss(), opt, sched, params, running)
        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        if progress and (step + 1) % 200 == 0 and step + 1 < steps:
            bar.write(f"{name} step {step + 1}: loss {running:.3f}, " + _format(_probe_accuracies(trainer, probes)))
    result = _probe_accuracies(trainer, probes)
    if progress:
        bar.write(f"{name} stage: loss {running:.3f}, " + _format(result))
    return result


def _format(accuracies: dict[str, float]) -> str:
    return "held-out accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in accuracies.items())


def pretrain_text(trainer: LlavaTrainer, config: VlmTrainConfig, progress: bool = True) -> float:
    """``config.text_steps`` steps of the language model alone on :func:`text_sample` questions
    (its own optimizer and warm-up/cosine schedule; the projector and tower get no gradient);
    returns its accuracy on 128 held-out text questions."""
    rng = random.Random(f"text-{config.seed}")
    longest = trainer.tokens_per_tile  # as many filler words as a tile has tokens, at most

    def step_loss() -> torch.Tensor:
        span = rng.randint(32, longest)  # one length per batch: no padding
        return trainer.loss([text_sample(rng, n_cards=rng.randint(1, 3), span=span) for _ in range(config.batch_size)],
                            rng)

    return _run_stage(trainer, "text", config.text_steps, config.warmup, trainer.language_model_parameters(),
                      step_loss, {"text": held_out_text(128, config.seed, longest)}, config, progress)["text"]


def ground_spatial_share(config: VlmTrainConfig, step: int) -> float:
    """The share of two-card questions at ``step`` of the grounding stage: none in its first half,
    ``ground_spatial_fraction`` in the second.

    Why: mixed in from the first step, neither question was learnt, where side questions alone
    were; so the one-card look is learnt first and the two-card question joins once it is there."""
    return config.ground_spatial_fraction if step >= config.side_steps // 2 else 0.0


def ground_side(trainer: LlavaTrainer, config: VlmTrainConfig, probes: dict[str, list[Sample]],
                progress: bool = True) -> dict[str, float]:
    """``config.side_steps`` steps of :func:`grounding_sample` questions alone (side of the image;
    in the second half also the two-card question, at ``ground_spatial_fraction``; projector and
    language model, the tower frozen; own optimizer and warm-up/cosine schedule) before the
    alignment stage; returns the accuracy on each of ``probes`` (held-out questions).

    Why: a fresh projector and language model trained on these questions alone learn where a card
    is from the tower's tokens in a few hundred steps (``benchmarks/research/position_saddle.py``),
    while the default recipe, which aligns on colour first and mixes side questions
    in later, never did. Position is on every token of a CLIP tower, so attention spread over the
    image reads nothing about the card, and a projector first trained on colour alone has no
    reason to keep it; so position comes first here, as a grounding stage."""
    rng = random.Random(f"side-{config.seed}")
    step = [0]

    def step_loss() -> torch.Tensor:
        fraction = ground_spatial_share(config, step[0])
        step[0] += 1
        batch = [grounding_sample(rng, fraction, trainer.tile_size, material(config.render))
                 for _ in range(config.batch_size)]
        return trainer.loss(batch, rng, position_binding_weight=config.position_binding_weight,
                            binding_layer=config.binding_layer, word_binding_weight=config.word_binding_weight,
                            word_binding_layer=config.word_binding_layer)

    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return _run_stage(trainer, "side", config.side_steps, min(config.warmup, config.side_steps // 6), params,
                      step_loss, probes, config, progress)


def continue_from(model, init_dir: Path | str) -> None:
    """Load the projector and language model of the saved LLaVA in ``init_dir`` into ``model``
    (its tower stays: the tower is the CLIP the run was given). A checkpoint of other sizes is
    refused with the parameters that differ."""
    from transformers import LlavaForConditionalGeneration

    source = LlavaForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32).state_dict()
    target = model.state_dict()
    wanted = [k for k in target if ".vision_tower." not in k and not k.startswith("vision_tower.")]
    bad = [k for k in wanted if k not in source or source[k].shape != target[k].shape]
    if bad:
        raise ValueError(f"init {str(init_dir)!r} is not a LLaVA of this model's sizes: {bad[:3]} differ")
    model.load_state_dict({k: source[k] for k in wanted}, strict=False)


def train_vlm(config: VlmTrainConfig = VlmTrainConfig(), relevance_dir: Path | str = DEFAULT_TOWER_DIR,
              out_dir: Path | str = DEFAULT_MODEL_DIR, spec: TinyLlavaSpec = TinyLlavaSpec(),
              progress: bool = True) -> dict:
    """Build the tiny LLaVA on ψ's tower, train projector + LM, save, evaluate; return the report."""
    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if (config.binding_weight or config.position_binding_weight) and config.binding_layer >= spec.text_layers:
        raise ValueError(f"binding_layer {config.binding_layer} is not a layer of a {spec.text_layers}-layer model")
    words_steered = config.word_binding_weight or config.attribute_word_binding_weight
    if words_steered and config.word_binding_layer >= spec.text_layers:
        raise ValueError(f"word_binding_layer {config.word_binding_layer} is not a layer of a "
                         f"{spec.text_layers}-layer model")
    if config.init and Path(config.init).resolve() == Path(out_dir).resolve():
        raise ValueError(f"init and out are the same directory ({config.init}): the run would overwrite what it continues")
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(out_dir)
    build_tiny_llava(out, spec, relevance_dir=relevance_dir)  # random projector + LM on the trained tower
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    if config.init:
        continue_from(model, config.init)
    trainer = LlavaTrainer(model, AutoProcessor.from_pretrained(out))
    model.train()
    model.model.vision_tower.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": config.lr}]
    if config.tower_lr:
        tower_params = list(model.model.vision_tower.parameters())
        groups.append({"params": tower_params, "lr": config.tower_lr})
        params = params + tower_params  # no gradient (so no update) until the tower is unfrozen
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    sched = warmup_cosine(opt, config.warmup, config.steps)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    probe_rng = random.Random(config.seed + EVAL_SEED_OFFSET + 1)
    held_out = material(config.held_out_split)
    probe = {
        "attr": [tile_sample(probe_rng, n_cards=probe_rng.randint(1, 3), spatial=False, size=trainer.tile_size,
                             render=held_out) for _ in range(64)],
        "spatial": [tile_sample(probe_rng, n_cards=2, spatial=True, size=trainer.tile_size, render=held_out)
                    for _ in range(64)],
        "side": [side_sample(probe_rng, n_cards=probe_rng.randint(1, 3), size=trainer.tile_size, render=held_out)
                 for _ in range(64)],
    }
    start = time.time()
    resumed = resume_checkpoint(out, config, model, opt, sched, rng)
    if resumed is None:  # a fresh run: the stages before the image stage (a stop inside them restarts them)
        first, running, spent, counter = 0, None, 0.0, [0]
        text_accuracy = pretrain_text(trainer, config, progress) if config.text_steps else None
        grounding = ground_side(trainer, config, {k: probe[k] for k in ("side", "spatial")}, progress) \
            if config.side_steps else {}
        spent = time.time() - start
        stages = {"text_accuracy": text_accuracy, "grounding": grounding}
    else:
        first, running, spent, counter, stages = resumed
        text_accuracy, grounding = stages["text_accuracy"], stages["grounding"]
    start = time.time() - spent
    bar = tqdm(range(first, config.steps), desc="train vlm", disable=not progress, mininterval=5,
               initial=first, total=config.steps)
    if config.align_projector_only and first < config.align_steps:
        trainer.set_language_model_trainable(False)
    if config.tower_lr and first > config.align_steps:
        trainer.unfreeze_tower()
    for step in bar:
        if step == config.align_steps:
            if config.tower_lr:
                trainer.unfreeze_tower()
            if config.align_projector_only:
                trainer.set_language_model_trainable(True)
        loss = trainer.loss(_batch(rng, config, step, trainer, counter), rng, config.binding_weight,
                            config.binding_layer, config.position_binding_weight, config.word_binding_weight,
                            config.word_binding_layer, config.attribute_word_binding_weight)
        running = _optimizer_step(loss, opt, sched, params, running)
        bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        if progress and (step + 1) % 200 == 0:
            bar.write(f"step {step + 1}: loss {running:.3f}, " + _format(_probe_accuracies(trainer, probe)))
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(out, config, step + 1, model, opt, sched, rng, running, time.time() - start, counter,
                            stages)
    train_seconds = time.time() - start
    model.eval()
    weights = {k: v.detach().float() for k, v in model.state_dict().items()}
    build_tiny_llava(out, spec, relevance_dir=relevance_dir, weights=weights)
    text = {} if text_accuracy is None else {"text_accuracy": round(text_accuracy, 4)}
    for k, v in grounding.items():  # the 64-question probes after the grounding stage
        text[f"grounding_{k}_accuracy"] = round(v, 4)
    report = {"config": asdict(config), "spec": asdict(spec), "train_seconds": round(train_seconds, 1), **text,
              "final_loss": round(running or 0.0, 4), "torch_threads": torch.get_num_threads(),
              "resumed_at_step": (resumed[0] if resumed else None) or None,
              **evaluate(out, config.eval_questions, config.seed, progress, config.held_out_split)}
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    (out / CHECKPOINT).unlink(missing_ok=True)  # finished: nothing to go on from
    return report


def save_checkpoint(out: Path, config: VlmTrainConfig, step: int, model, opt, sched, rng: random.Random,
                    running: float | None, seconds: float, counter: list[int], stages: dict) -> None:
    """Everything a stopped run needs to go on as if it had not stopped (written atomically): the
    model, optimiser, schedule, the material's random state and the earlier stages' results."""
    write_checkpoint(out, config, step, model, opt, sched, rng, running=running, seconds=seconds,
                     counter=list(counter), stages=stages)


def resume_checkpoint(out: Path, config: VlmTrainConfig, model, opt, sched, rng: random.Random):
    """Load ``out``'s checkpoint into the run if there is one: (first step, running loss, seconds
    spent, scene counter, earlier stages' results); None without one. A checkpoint of another
    configuration is refused rather than mixed in."""
    state = read_checkpoint(out, config, model, opt, sched, rng)
    if state is None:
        return None
    return state["step"], state["running"], state["seconds"], list(state["counter"]), state["stages"]
