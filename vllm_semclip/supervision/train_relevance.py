"""Fine-tune ψ on the VLM's own labels (distant supervision): ``semclip train-relevance``.

Input: label shards from :mod:`vllm_semclip.supervision.label` — for each question, every candidate
crop's *gain* (how much overview + that crop raises the correct option's log-probability
over the overview alone). The question's positive is its crop of largest gain; questions
whose best gain is below ``min_gain`` carry no signal (no crop helps the VLM) and are left
out of training (they stay in validation).

The objective (:class:`CropContrastiveLoss`): with ``B`` questions in a batch and the
``C`` candidate crops of each one's image, question ``i``'s query ``t_i`` is compared
with every crop embedding ``v_{j,c}`` of the batch::

    logits[i, (j, c)] = s · <t_i, v_{j,c}>          (s = exp(logit_scale), v normalised)

``t_i`` is what serving scores with (:func:`relevance.query_features`): the normalised
text embedding, less the mean of ψ's reference texts when the starting ψ has them — encoded
by the text tower being trained, every step, and saved with the trained ψ.
    loss = mean_i  −log softmax_{(j,c) ∈ N(i)}(logits[i])[(i, best_i)]

``N(i)`` is every crop of the batch — the other crops of the same image and the crops of
the other images are the negatives — *except* crops of other questions with the same
text: the benchmark asks the same few questions about many images ("What is the color of
the triangle?"), and another image's triangle crop is not a wrong answer to it. This is
CLIP's text→image InfoNCE (open_clip's ``ClipLoss`` with one positive per row) with the
negatives made explicit; the batch gathering of ``open_clip.loss.gather_features`` is not
needed on one process and is left out.

That loss (``loss="contrastive"``) compares crops on one scale across images and grids; serving
does neither: it ranks one image's candidates, each standardised within its grid
(:func:`crops.rank_scores`). :class:`GridRankLoss` (``loss="rank"``, the default) trains that
ranking itself: per question, the scores of its own candidates, standardised within each grid
as served (``norm="grid"``; with ``norm="none"`` the raw scores times the logit scale), then
cross-entropy towards the best crop::

    loss = mean_i  −log softmax_c(τ · z_i)[best_i]      z_i = rank_scores(<t_i, v_{i,c}>)

``lock_image`` (open_clip's name, on by default) freezes the image tower — its crop
embeddings are computed once — and tunes the text tower and logit scale: a few hundred
labelled questions teach ψ what a question asks for, not to see anew. With
``lock_image_unlocked_groups`` (open_clip's LiT groups: 1 the projection, 2 also the last block
and ``ln_post``, each more one block further down) the tower's top trains too: the frozen blocks
run once per crop view and their tokens are kept (:class:`CropEncoder`), so a step costs only the
trainable blocks. The crops are cut
by ψ's serving path (:meth:`RelevanceModel.region_views`, ``fit`` as served: a crop's score
is its best square window's), so training sees exactly what the processor will score.
Validation (held-out questions, seeded split) runs before training and after every epoch, the
candidates ranked as served (``norm``, ``SemClipConfig.relevance_norm``): top-1 hit rate (the
chosen crop contains the target), agreement with the VLM's best crop, and the mean gain of the
chosen crop; the epoch with the best mean gain is saved, as open_clip ``local-dir``
(safetensors, no pickle) with the config it was trained with and its report.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_semclip.supervision.label import helped, holds_targets, label_statistics, load_labels
from vllm_semclip.relevance import TextReference, normalize_pixels, query_features
from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR, DEFAULT_TRAINED_RELEVANCE_DIR

RELEVANCE_LOSSES: tuple[str, ...] = ("rank", "contrastive")
# what a question's positive crops are: the VLM's crop of largest gain (distant supervision) or
# every crop that holds the labelled boxes (where the data has boxes, as the generated splits do)
RELEVANCE_TARGETS: tuple[str, ...] = ("gain", "hit")


@dataclass(frozen=True)
class RelevanceTrainConfig:
    """Hyper-parameters of ``semclip train-relevance`` (defaults reproduce the bundled trained ψ)."""

    labels: str
    init: str = str(DEFAULT_RELEVANCE_DIR)  # ψ to start from: local-dir, or an open_clip name + init_pretrained
    init_pretrained: str | None = None
    epochs: int = 30
    batch_size: int = 32  # questions per step
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup: int = 20
    lock_image: bool = True
    lock_image_unlocked_groups: int = 0  # with lock_image: the image tower's last groups still trained (open_clip's)
    fit: str = "windows"  # how ψ fits a candidate to its input, as served (SemClipConfig.relevance_fit)
    norm: str = "grid"  # how validation ranks the candidates, as served (SemClipConfig.relevance_norm)
    loss: str = "rank"  # "rank": GridRankLoss, the serving rule's ranking; "contrastive": CropContrastiveLoss
    rank_scale: float = 8.0  # τ of GridRankLoss (z-scores of a grid span a few units); 8 beat 4 on val
    target: str = "gain"  # positives: the VLM's best crop ("gain") or the crops holding the boxes ("hit")
    keep_best: bool = True  # save the epoch with the best validation gain (hit rate, target "hit"; else the last)
    min_gain: float = 0.05
    val_fraction: float = 0.2
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be at least 1 and batch_size at least 2")
        if not 0 < self.lr < 1 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("lr must be in (0, 1), weight_decay and warmup non-negative")
        if self.loss not in RELEVANCE_LOSSES:
            raise ValueError(f"loss must be one of {RELEVANCE_LOSSES}, got {self.loss!r}")
        if self.target not in RELEVANCE_TARGETS:
            raise ValueError(f"target must be one of {RELEVANCE_TARGETS}, got {self.target!r}")
        if self.target == "hit" and self.loss != "rank":
            raise ValueError("target 'hit' (several positive crops a question) needs loss 'rank'")
        if self.rank_scale <= 0:
            raise ValueError("rank_scale must be positive")
        if self.lock_image_unlocked_groups < 0 or (self.lock_image_unlocked_groups and not self.lock_image):
            raise ValueError("lock_image_unlocked_groups must be non-negative, and is only for a locked image tower")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        from vllm_semclip.crops import RELEVANCE_FITS, RELEVANCE_NORMS

        if self.fit not in RELEVANCE_FITS:
            raise ValueError(f"fit must be one of {RELEVANCE_FITS}, got {self.fit!r}")
        if self.norm not in RELEVANCE_NORMS:
            raise ValueError(f"norm must be one of {RELEVANCE_NORMS}, got {self.norm!r}")


class CropContrastiveLoss:
    """Text→crop InfoNCE over every crop of the batch, same-text crops of other images masked (see module doc)."""

    def __call__(self, text_features, crop_features, positives, logit_scale, question_ids):
        """``text_features`` [B, D] (ψ's queries), ``crop_features`` [B, C, D] or [B, C, V, D] (normalised; a
        crop's logit is its best view's, as served), ``positives`` [B] crop index, ``question_ids`` [B] ints
        equal for equal question texts."""
        import torch

        if crop_features.dim() == 3:
            crop_features = crop_features[:, :, None]
        b, c, v, d = crop_features.shape
        logits = (logit_scale * text_features @ crop_features.reshape(b * c * v, d).T).reshape(b, b * c, v).amax(-1)
        owner = torch.arange(b, device=logits.device).repeat_interleave(c)  # which question each crop belongs to
        same_text = question_ids[:, None] == question_ids[owner][None, :]
        other_image = owner[None, :] != torch.arange(b, device=logits.device)[:, None]
        logits = logits.masked_fill(same_text & other_image, float("-inf"))
        target = torch.arange(b, device=logits.device) * c + positives
        return torch.nn.functional.cross_entropy(logits, target)


class GridRankLoss:
    """Cross-entropy over each question's own candidates, scored as served (see module doc)."""

    def __init__(self, norm: str = "grid", scale: float = 8.0) -> None:
        self.norm, self.scale = norm, scale

    def __call__(self, text_features, crop_features, positives, logit_scale, groups):
        """``text_features`` [B, D], ``crop_features`` [B, C, D] or [B, C, V, D] (normalised; a crop's score is
        its best view's), ``positives`` [B] crop index or [B, C] bool (every marked crop a positive: the
        loss is −log of their summed probability), ``groups`` [B, C] each candidate's rank group
        (:func:`crops.candidate_groups`)."""
        import torch

        if crop_features.dim() == 3:
            crop_features = crop_features[:, :, None]
        scores = torch.einsum("bd,bcvd->bcv", text_features, crop_features).amax(-1)  # [B, C]
        logits = logit_scale * scores if self.norm == "none" else self.scale * standardise_within(scores, groups)
        if positives.dim() == 1:
            return torch.nn.functional.cross_entropy(logits, positives)
        log_p = logits.log_softmax(-1)
        return -(log_p.masked_fill(~positives, float("-inf")).logsumexp(-1)).mean()


def standardise_within(scores, groups):
    """``rank_scores``'s ``grid`` rule on a batch, differentiable: each score less its group's mean,
    over the group's (population) standard deviation; 0 where a group's scores are equal."""
    import torch

    member = torch.nn.functional.one_hot(groups, int(groups.max()) + 1).to(scores.dtype)  # [B, C, G]
    count = member.sum(1).clamp_min(1)
    mean = torch.einsum("bc,bcg->bg", scores, member) / count
    centred = scores - torch.einsum("bg,bcg->bc", mean, member)
    var = torch.einsum("bg,bcg->bc", torch.einsum("bc,bcg->bg", centred ** 2, member) / count, member)
    flat = var <= 1e-24  # std <= 1e-12, as rank_scores; no sqrt of 0 (its gradient is infinite)
    std = torch.where(flat, torch.ones_like(var), var).sqrt()
    return torch.where(flat, torch.zeros_like(centred), centred / std)


@dataclass
class LabelledSet:
    """Questions with their crops' pixels (or frozen features) and gains."""

    questions: list[str]
    gains: list[list[float]]
    best: list[int]  # the labeller's positive crop per question (``best`` of its label row)
    hits: list[list[bool]]
    crops: Any  # [Q, C, V, 3, H, W] uint8 pixels of each crop's V views, or [Q, C, V, D] frozen features
    grids: list[tuple[int, ...]]  # each question's candidate grids (its crops in ``candidate_boxes`` order)
    bridges: list[bool] | None = None  # each question's ``bridges`` (labels written before bridges: none)

    def __len__(self) -> int:
        return len(self.questions)


def _crop_views(psi, rows: Sequence[dict], fit: str, progress: bool, encode=None):
    """Every labelled question's candidate crops, cut by ψ's serving path (``fit`` as served):
    [Q, C, V, 3, H, W] uint8 pixels, or with ``encode`` (:meth:`CropEncoder.prepare`) what it keeps
    of each view, [Q, C, V, ...], encoded question by question. V is the most views a crop has; a
    crop with fewer repeats its first (the max over views ignores it)."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    from vllm_semclip.crops import square_windows

    # V known before cutting (``region_views``'s windows), so each question goes straight into the
    # result: the set is held once, not as a list and its stacked copy
    width = 1 if fit != "windows" else max((len(square_windows(tuple(c["box"]))) for r in rows for c in r["crops"]),
                                            default=1)
    kept = None
    for i, row in enumerate(tqdm(rows, desc="cutting crops", disable=not progress)):
        with Image.open(row["image"]) as im:
            image = im.convert("RGB")
        pixels, index = psi.region_views(image, [tuple(c["box"]) for c in row["crops"]], fit)
        if encode is not None:
            with torch.inference_mode():
                pixels = encode(pixels)
        x = pixels[index]  # [C, v, ...]: uint8 views, or what ``encode`` keeps of them
        if kept is None:
            kept = torch.empty((len(rows), x.shape[0], width, *x.shape[2:]), dtype=x.dtype)
        kept[i, :, :x.shape[1]] = x
        kept[i, :, x.shape[1]:] = x[:, :1]
    return kept


def _encode_crops(model, pixels, batch: int = 256):
    import torch

    flat = pixels.reshape(-1, *pixels.shape[-3:])
    mean, std = model.visual.image_mean, model.visual.image_std
    feats = torch.cat([model.encode_image(normalize_pixels(flat[i:i + batch], mean, std), normalize=True)
                       for i in range(0, flat.shape[0], batch)])
    return feats.reshape(*pixels.shape[:-3], -1)


class CropEncoder:
    """How training sees the crops' views: what is computed once per view (:meth:`prepare`, the frozen part
    of the image tower) and what every step computes from that (``__call__``: normalised embeddings).

    Locked (``lock_image``, no unlocked group): the embeddings themselves, once. Unlocked: the uint8
    pixels are kept and the whole tower runs every step. Locked with ``unlocked_groups``: the tokens
    entering the first trainable block are kept (in float16, to halve what is held); the step runs
    the trainable blocks, ``ln_post``, the pooling and the projection — the tower's own modules, so
    ``head(trunk(x))`` is its forward (tested).
    """

    def __init__(self, model, lock_image: bool = True, unlocked_groups: int = 0, batch: int = 256) -> None:
        self.model, self.lock_image, self.unlocked_groups, self.batch = model, lock_image, unlocked_groups, batch
        blocks = model.visual.transformer.resblocks
        if unlocked_groups > len(blocks) + 1:
            raise ValueError(f"the image tower has {len(blocks) + 2} groups; unlock it whole instead "
                             f"(lock_image=False) than {unlocked_groups} of them")
        self.split = None if not lock_image or not unlocked_groups else len(blocks) - max(0, unlocked_groups - 1)

    def lock(self) -> None:
        """Freeze what :meth:`prepare` computes (open_clip's LiT lock)."""
        if self.lock_image:
            self.model.lock_image_tower(unlocked_groups=self.unlocked_groups)

    def _trunk(self, pixels):
        visual = self.model.visual
        x = visual._embeds(normalize_pixels(pixels, visual.image_mean, visual.image_std))
        return self._blocks(x, visual.transformer.resblocks[:self.split])

    def _head(self, tokens):
        import torch.nn.functional as F

        visual = self.model.visual
        x = self._blocks(tokens.float(), visual.transformer.resblocks[self.split:])
        pooled, _ = visual._pool(x)
        return F.normalize(pooled @ visual.proj if visual.proj is not None else pooled, dim=-1)

    def _blocks(self, x, blocks):
        batch_first = getattr(self.model.visual.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks:
            x = block(x)
        return x if batch_first else x.transpose(0, 1)

    def prepare(self, pixels):
        """What is kept of views ``[N, 3, H, W]`` uint8: embeddings, trunk tokens (float16) or the pixels."""
        import torch

        if not self.lock_image:
            return pixels
        with torch.inference_mode():
            if self.split is None:
                return _encode_crops(self.model, pixels, self.batch)
            return torch.cat([self._trunk(pixels[i:i + self.batch]).half() for i in range(0, len(pixels), self.batch)])

    def __call__(self, kept):
        """Normalised embeddings ``[..., D]`` of views kept by :meth:`prepare` (``[...]`` + their shape)."""
        import torch

        if not self.lock_image:
            return _encode_crops(self.model, kept, self.batch)
        if self.split is None:
            return kept
        flat = kept.reshape(-1, *kept.shape[-2:])
        feats = torch.cat([self._head(flat[i:i + self.batch]) for i in range(0, flat.shape[0], self.batch)])
        return feats.reshape(*kept.shape[:-2], -1)


def validate(model, tokenizer, data: LabelledSet, lock_image: bool | CropEncoder,
             reference: TextReference | None = None, norm: str = "grid") -> dict[str, float]:
    """Top-1 crop per held-out question, ranked as served (``norm``: ``SemClipConfig.relevance_norm``):
    hit rate, agreement with the VLM's best crop, mean gain. ``lock_image``: how ``data.crops`` were
    kept (:class:`CropEncoder`; ``True``: embeddings, ``False``: pixels)."""
    import torch

    from vllm_semclip.crops import rank_scores, top_indices

    model.eval()
    encoder = lock_image if isinstance(lock_image, CropEncoder) else CropEncoder(model, lock_image)
    with torch.inference_mode():
        texts = query_features(model, tokenizer, data.questions, reference)
        feats = encoder(data.crops)
        scores = torch.einsum("qd,qcvd->qcv", texts, feats).amax(-1).tolist()
    bridges = data.bridges or [False] * len(data)
    ranked = [rank_scores(s, grids, norm, b) for s, grids, b in zip(scores, data.grids, bridges)]
    choice = [top_indices(r, 1)[0] for r in ranked]
    n = len(data)
    return {"hit_rate": sum(h[c] for h, c in zip(data.hits, choice)) / n,
            "best_agreement": sum(c == b for c, b in zip(choice, data.best)) / n,
            "mean_gain": sum(g[c] for g, c in zip(data.gains, choice)) / n}


def _split(rows: list[dict], config: RelevanceTrainConfig) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(config.seed).shuffle(order)
    n_val = max(1, round(len(rows) * config.val_fraction))
    val = [rows[i] for i in sorted(order[:n_val])]
    train = [rows[i] for i in sorted(order[n_val:])
             if (holds_targets(rows[i]) if config.target == "hit" else helped(rows[i], config.min_gain))]
    return train, val


def _init_model(config: RelevanceTrainConfig):
    """ψ to fine-tune, its tokenizer and the open_clip config to save it with (same path for tiny and real ψ)."""
    import open_clip

    from vllm_semclip.relevance import RelevanceModel, open_clip_identifier

    psi = RelevanceModel.from_pretrained(config.init, config.init_pretrained)
    identifier = open_clip_identifier(config.init)
    if identifier.startswith("local-dir:"):
        model_cfg = json.loads((Path(identifier.split(":", 1)[1]) / "open_clip_config.json").read_text())["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(config.init)
    return psi, model_cfg


def train_relevance(config: RelevanceTrainConfig, out_dir: Path | str = DEFAULT_TRAINED_RELEVANCE_DIR,
                    progress: bool = True) -> dict:
    """Fine-tune ψ on the labels, keep the best validation epoch, save it; return the report."""
    import torch
    from tqdm import tqdm

    from vllm_semclip.relevance import save_local_dir
    from vllm_semclip.tiny.train_clip import warmup_cosine

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rows = load_labels(config.labels)
    train_rows, val_rows = _split(rows, config)
    if len(train_rows) < 2:
        if config.target == "hit":
            raise ValueError(f"only {len(train_rows)} labelled questions have a crop holding their boxes")
        raise ValueError(f"only {len(train_rows)} labelled questions have a crop with gain >= {config.min_gain}; "
                         "label more questions or lower min_gain")
    psi, model_cfg = _init_model(config)
    model, tokenizer = psi.model.float(), psi.tokenizer

    encoder = CropEncoder(model, config.lock_image, config.lock_image_unlocked_groups)

    def prepare(subset: list[dict]) -> LabelledSet:
        model.eval()
        pixels = _crop_views(psi, subset, config.fit, progress, encoder.prepare)
        return LabelledSet([r["question"] for r in subset], [[c["gain"] for c in r["crops"]] for r in subset],
                           [r["best"] for r in subset], [[c["hit"] for c in r["crops"]] for r in subset], pixels,
                           [tuple(r["grids"]) for r in subset], [bool(r.get("bridges", False)) for r in subset])

    train_set, val_set = prepare(train_rows), prepare(val_rows)
    encoder.lock()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    sched = warmup_cosine(opt, config.warmup, config.epochs * steps_per_epoch)
    positives = torch.tensor(train_set.hits) if config.target == "hit" else torch.tensor(train_set.best)
    criterion = "hit_rate" if config.target == "hit" else "mean_gain"
    # each loss's last argument, per question, computed once: the rank groups of its candidates
    # (GridRankLoss) or an id equal for equal question texts (CropContrastiveLoss)
    if config.loss == "rank":
        from vllm_semclip.crops import candidate_groups

        loss_fn = GridRankLoss(config.norm, config.rank_scale)
        keys = torch.tensor([candidate_groups(g, b) for g, b in zip(train_set.grids, train_set.bridges)])
    else:
        loss_fn = CropContrastiveLoss()
        text_ids = {q: i for i, q in enumerate(sorted(set(train_set.questions)))}
        keys = torch.tensor([text_ids[q] for q in train_set.questions])
    history = [{"epoch": 0, "loss": None,
                **validate(model, tokenizer, val_set, encoder, psi.reference, config.norm)}]
    best_state, best = {k: v.detach().clone() for k, v in model.state_dict().items()}, history[0]
    rng = torch.Generator().manual_seed(config.seed)
    start = time.time()
    bar = tqdm(range(1, config.epochs + 1), desc="train relevance", disable=not progress)
    for epoch in bar:
        model.train()
        if config.lock_image:
            model.visual.eval()
        order = torch.randperm(len(train_set), generator=rng)
        losses = []
        for s in range(0, len(order), config.batch_size):
            idx = order[s:s + config.batch_size]
            if len(idx) < 2:
                continue
            texts = query_features(model, tokenizer, [train_set.questions[i] for i in idx], psi.reference)
            crops = encoder(train_set.crops[idx])
            loss = loss_fn(texts, crops, positives[idx], model.logit_scale.exp(), keys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
        entry = {"epoch": epoch, "loss": round(sum(losses) / max(1, len(losses)), 4),
                 **validate(model, tokenizer, val_set, encoder, psi.reference, config.norm)}
        history.append(entry)
        bar.set_postfix(loss=entry["loss"], val_hit=f"{entry['hit_rate']:.3f}", val_gain=f"{entry['mean_gain']:.3f}")
        if entry[criterion] > best[criterion] or not config.keep_best:
            best, best_state = entry, {k: v.detach().clone() for k, v in model.state_dict().items()}
    # keep-best can keep the start itself: a ψ that is already as good on the validation
    # questions as any epoch (say so, or the "trained" ψ silently equals the zero-shot one)
    kept_start = config.keep_best and best["epoch"] == 0
    if kept_start:
        warnings.warn(f"no epoch beat the starting ψ's {criterion.replace('_', ' ')} on the validation questions: the "
                      "saved ψ is the start's weights (keep_best=False / --keep-last saves the last epoch)", stacklevel=2)
    model.load_state_dict(best_state)
    model.eval()
    out = save_local_dir(model, model_cfg, out_dir, reference=psi.reference)  # scored as it was trained
    report = {"config": asdict(config), "train_questions": len(train_set), "val_questions": len(val_set),
              "labelled_questions": len(rows), "train_seconds": round(time.time() - start, 1),
              "label_statistics": label_statistics(rows, config.min_gain),
              "zero_shot": history[0], "best_epoch": best, "kept_start": kept_start, "history": history}
    (out / "train_config.json").write_text(json.dumps(asdict(config), indent=1))
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    plot_history(history, out / "validation.png")
    return report


def plot_history(history: Sequence[dict], path: Path | str) -> Path:
    """Held-out hit rate, agreement with the VLM's best crop and mean gain, per epoch (0 = zero-shot ψ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.4), dpi=110)
    left.plot(epochs, [100 * h["hit_rate"] for h in history], "o-", ms=3, label="top-1 crop contains the target")
    left.plot(epochs, [100 * h["best_agreement"] for h in history], "s-", ms=3, label="top-1 = VLM's best crop")
    left.set_xlabel("epoch (0 = zero-shot ψ)")
    left.set_ylabel("held-out questions (%)")
    left.set_ylim(0, 100)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(epochs, [h["mean_gain"] for h in history], "o-", ms=3, c="C2")
    right.set_xlabel("epoch")
    right.set_ylabel("mean gain of the chosen crop (nats)")
    right.grid(alpha=0.3)
    fig.suptitle("ψ trained by distant supervision: held-out validation")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
