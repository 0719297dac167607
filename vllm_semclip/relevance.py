"""ψ: the relevance model that scores (question, sub-image) pairs.

One job: given a question and a batch of crops, return one score per crop. It is
implemented on open_clip so that any open_clip model works unchanged — a built-in
name with a ``pretrained`` tag (``ViT-L-14-336`` / ``openai`` for real use), a name
with a local checkpoint file, or a directory in open_clip's ``local-dir:`` format
(what the bundled tiny model and ``semclip train-relevance`` write).

The score is the cosine similarity of the normalised image and text embeddings
(CLIP's zero-shot similarity, without the logit scale: only the ranking matters),
less — when ψ's directory names *reference texts* (:class:`TextReference`) — the
similarity with their mean embedding. Why: a question's embedding shares a large part
with every text ψ was trained on ("there is a card here"), and crops whose texture
looks like a card in general score high on that shared part whatever shape was asked
for; subtracting the mean of ψ's own caption vocabulary leaves the part of the question
that says *which* object (docs/design.md has the measurements). A named open_clip model has
no reference and scores by plain cosine.

A non-square region is seen through square windows by default (:meth:`region_views`,
``SemClipConfig.relevance_fit``): the best of the fewest squares of its short side that
cover it. Padded to a square instead — as the VLM's tiles are — the grey band is content to
a CLIP trained on square photos, and dark targets are lost to it.
Text embeddings are cached per question, since a server sees the same question
text again (retries, several images, benchmark sweeps).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

_models: dict[tuple[str, str | None, str, str, bool], "RelevanceModel"] = {}
_models_lock = threading.Lock()


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images ``[..., 3, H, W]`` → float32, scaled to 0–1 and normalised by a CLIP's mean and std."""
    import torch

    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    # in place on the one float copy: the same arithmetic as out of place, without two more tensors
    return pixels.float().div_(255.0).sub_(mean_t).div_(std_t)


def image_array(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """An RGB image as ``[H, W, 3]`` uint8 (a tensor passes through): Pillow's copy out costs about as much
    as cutting all of ψ's views, so a request makes it once."""
    import numpy as np
    import torch

    return image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))


def fuse_attention(tower) -> int:
    """Give an open_clip image tower's plain attention blocks torch's fused attention kernel, in place;
    return how many blocks were swapped.

    open_clip builds a ViT of plain blocks with ``nn.MultiheadAttention``, whose inference path
    on a CPU materialises every head's score matrix (two batched matmuls and a softmax); its own
    ``CustomResidualAttentionBlock`` calls ``F.scaled_dot_product_attention``, which fuses them. Each
    plain block is replaced by one of those that keeps the plain block's own norms, layer scales and
    MLP (their eps, activation and weights as built) and takes over its attention's parameters
    (strict), so ψ computes the same function: its features agree to float rounding, and a
    region's score does not depend on the batch around it (tested). Serving only; the trainers keep
    open_clip's model as built.
    """
    import torch
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if blocks is None:
        return 0
    swapped = 0
    for i, block in enumerate(blocks):
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            continue
        attn = block.attn
        if (not attn.batch_first or attn.in_proj_weight is None or attn.in_proj_bias is None
                or attn.bias_k is not None):
            continue
        with torch.device("meta"):  # no memory: every tensor of the new block is the plain one's own
            fused = CustomResidualAttentionBlock(attn.embed_dim, attn.num_heads, batch_first=True)
        fused.ln_1, fused.ls_1, fused.ln_2, fused.ls_2, fused.mlp = (block.ln_1, block.ls_1, block.ln_2, block.ls_2,
                                                                     block.mlp)
        fused.attn.load_state_dict(attn.state_dict(keep_vars=True), strict=True, assign=True)
        blocks[i] = fused.train(block.training)
        swapped += 1
    return swapped


def create_architecture(model_name: str):
    """open_clip ``model_name`` as its factory builds it, with no weights: for callers that load the
    weights next or only count FLOPs, where open_clip's "initialized randomly" warning is not true
    of what they return (it is silenced for this call only)."""
    import logging

    import open_clip

    def not_random_init_warning(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()  # open_clip's factory warns through the root logger
    root.addFilter(not_random_init_warning)
    try:
        return open_clip.create_model(model_name, pretrained=None)
    finally:
        root.removeFilter(not_random_init_warning)


def open_clip_identifier(model_name: str) -> str:
    """A directory path becomes open_clip's ``local-dir:`` schema; names pass through."""
    if model_name.startswith(("local-dir:", "hf-hub:")):
        return model_name
    path = Path(model_name).expanduser()
    if path.is_dir():
        return f"local-dir:{path.resolve()}"
    return model_name


def check_relevance_source(model_name: str, pretrained: str | None = None, device: str = "cpu") -> None:
    """Refuse, before any weight is loaded, a ψ that cannot load: a directory that is not open_clip's
    local-dir format, a name open_clip does not know, a ``pretrained`` that is neither a file nor one
    of that model's tags, a device torch cannot place tensors on. Raises ``SemClipConfigError``
    naming the field and the value, so a server stops at start-up instead of failing every request.
    """
    import open_clip
    import torch

    from .config import SemClipConfigError

    identifier = open_clip_identifier(model_name)
    if identifier.startswith("local-dir:"):
        directory = Path(identifier.split(":", 1)[1])
        if not (directory / "open_clip_config.json").is_file():
            raise SemClipConfigError(f"relevance_model={model_name!r} is a directory without open_clip_config.json "
                                     "(not open_clip's local-dir format)", parameter="relevance_model")
    elif not identifier.startswith("hf-hub:"):
        if model_name not in open_clip.list_models():
            raise SemClipConfigError(f"relevance_model={model_name!r} is neither an open_clip model name (see "
                                     "open_clip.list_models()) nor an existing directory", parameter="relevance_model")
        if pretrained is not None and not Path(pretrained).expanduser().is_file() \
                and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
            raise SemClipConfigError(f"relevance_pretrained={pretrained!r} is neither a file nor a pretrained tag of "
                                     f"{model_name} ({tags})", parameter="relevance_pretrained")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise SemClipConfigError(f"device={device!r} cannot hold ψ here: {str(exc).splitlines()[0]}",
                                 parameter="device") from None


def check_server_psi(config) -> None:
    """At start-up: a server configuration whose method needs ψ must name one that can load
    (:func:`check_relevance_source`). ``semclip serve`` and the processor both call this."""
    if config.method == "relevance":
        check_relevance_source(config.require_relevance_model(), config.relevance_pretrained, config.device)


@dataclass(frozen=True)
class TextReference:
    """Texts whose mean embedding is subtracted from every query's (see the module doc).

    Kept beside the weights, in ``semclip_relevance.json`` of a local-dir ψ, because it
    belongs to the model: the captions it was trained on. ``weight`` scales the mean.
    """

    texts: tuple[str, ...]
    weight: float = 1.0

    FILE = "semclip_relevance.json"

    def __post_init__(self) -> None:
        if not self.texts or not all(isinstance(t, str) and t.strip() for t in self.texts):
            raise ValueError(f"reference texts must be non-empty strings, got {self.texts!r}")
        if not 0.0 <= self.weight <= 4.0:
            raise ValueError(f"reference weight must be in [0, 4], got {self.weight}")

    @classmethod
    def load(cls, directory: Path | str) -> TextReference | None:
        path = Path(directory) / cls.FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("reference_texts"), list):
            raise ValueError(f"{path} must hold {{\"reference_texts\": [...], \"reference_weight\": w}}")
        return cls(tuple(data["reference_texts"]), float(data.get("reference_weight", 1.0)))

    def save(self, directory: Path | str) -> Path:
        path = Path(directory) / self.FILE
        path.write_text(json.dumps({"reference_texts": list(self.texts), "reference_weight": self.weight}, indent=1))
        return path


def text_features(model, tokenizer, texts: Sequence[str], device: str = "cpu") -> torch.Tensor:
    """Normalised text embeddings (float32)."""
    import torch

    return torch.nn.functional.normalize(model.encode_text(tokenizer(list(texts)).to(device)).float(), dim=-1)


def reference_offset(model, tokenizer, reference: TextReference | None, device: str = "cpu") -> torch.Tensor | None:
    """``weight`` × the mean normalised embedding of the reference texts: what every query loses
    (``None`` without a reference or at weight 0)."""
    if reference is None or not reference.weight:
        return None
    return reference.weight * text_features(model, tokenizer, reference.texts, device).mean(dim=0)


def query_features(model, tokenizer, texts: Sequence[str], reference: TextReference | None = None,
                   device: str = "cpu") -> torch.Tensor:
    """ψ's query vectors: normalised text embeddings less the reference offset.

    What a crop's normalised embedding is dotted with — the trained-ψ objective and its
    validation call it (with gradients where training needs them); serving does the same
    with the offset computed once per model (:meth:`RelevanceModel.query_vector`).
    """
    feats = text_features(model, tokenizer, texts, device)
    offset = reference_offset(model, tokenizer, reference, device)
    return feats if offset is None else feats - offset


class RelevanceModel:
    """ψ(question, crops) → scores, on an open_clip dual encoder."""

    def __init__(self, model, preprocess, tokenizer, device: str = "cpu", text_cache_size: int = 4096,
                 reference: TextReference | None = None) -> None:
        import torch
        from torch import nn

        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.reference = reference
        with torch.no_grad():  # the reference texts are encoded once per model, not once per question
            self._offset = reference_offset(model, tokenizer, reference, device)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._lock = threading.Lock()
        # pixels enter the patch embedding in its dtype (fp32 unless a low precision was asked for;
        # open_clip's "bf16" keeps embeddings and layer norms fp32, so ask the first conv/linear)
        self.input_dtype = next(m.weight.dtype for m in model.visual.modules()
                                if isinstance(m, (nn.Conv2d, nn.Linear)))
        self.has_image_tower = self.has_text_tower = True
        fuse_attention(model.visual)

    def drop_image_tower(self) -> None:
        """Free the image tower's weights (moved to torch's ``meta`` device), keeping what preparing
        ψ's inputs reads — input size, mean and std, resize mode — and the text tower. For vLLM's
        front end in the engine stage: there ψ only cuts views and embeds the question, and the
        engine holds the image tower (ViT-L-14-336's is 1.2 GB in fp32)."""
        self.model.visual.to("meta")
        self.has_image_tower = False

    def drop_text_tower(self) -> None:
        """Free the text tower's weights (moved to torch's ``meta`` device), keeping the image tower.
        For vLLM's engine in the engine stage: the front end embeds the question and sends the query
        vector, so the engine only ever runs the image tower. Everything of the model outside
        ``visual`` goes — open_clip's ``CLIP`` keeps its text tower in several attributes of the
        model, ``CustomTextCLIP`` in ``text`` — except the logit scale and bias, which are not weights
        of either tower."""
        from torch import nn

        for name, child in self.model.named_children():
            if name != "visual":
                child.to("meta")
        for name, param in list(self.model._parameters.items()):
            if param is not None and name not in ("logit_scale", "logit_bias"):
                self.model._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
        for name, buffer in list(self.model._buffers.items()):
            if buffer is not None:
                self.model._buffers[name] = buffer.to("meta")
        self._text_cache.clear()
        self.has_text_tower = False

    @classmethod
    def from_pretrained(
        cls, model_name: str, pretrained: str | None = None, device: str = "cpu", precision: str = "fp32"
    ) -> RelevanceModel:
        """Create ψ through open_clip's factory: weights are the explicit ``pretrained`` argument
        (a tag such as ``openai`` or a checkpoint path), or come with a ``local-dir:`` directory;
        ``precision`` is open_clip's (``fp32``, ``bf16``, ``pure_bf16``…)."""
        import open_clip

        identifier = open_clip_identifier(model_name)
        reference = None
        if identifier.startswith("local-dir:"):
            pretrained = None  # the directory carries its own weights (and maybe its reference texts)
            reference = TextReference.load(identifier.split(":", 1)[1])
        elif pretrained is not None and Path(pretrained).expanduser().is_file():
            pretrained = str(Path(pretrained).expanduser().resolve())
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                identifier, pretrained=pretrained, device=device, precision=precision
            )
        except RuntimeError as exc:
            if "Unknown model" in str(exc) or "not found" in str(exc):
                raise ValueError(
                    f"relevance_model={model_name!r} is neither an open_clip model name "
                    "(see open_clip.list_models()) nor a directory in open_clip's local-dir format"
                ) from exc
            raise
        tokenizer = open_clip.get_tokenizer(identifier)
        model.eval()
        return cls(model, preprocess, tokenizer, device=device, reference=reference)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def query_vector(self, question: str) -> torch.Tensor:
        """What every crop's normalised embedding is dotted with for ``question`` (cached per text)."""
        cached = self._text_cache.get(question)
        if cached is not None:
            self._text_cache.move_to_end(question)
            return cached
        if not self.has_text_tower:
            raise RuntimeError("this ψ's text tower was dropped (the engine of the engine stage scores images "
                               "only); the front end embeds questions")
        # query_features(), with the reference offset computed once in __init__
        emb = text_features(self.model, self.tokenizer, [question], self.device)[0]
        if self._offset is not None:
            emb = emb - self._offset
        self._text_cache[question] = emb
        if len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return emb

    def text_query(self, question: str) -> torch.Tensor:
        """:meth:`query_vector` under ψ's lock and without autograd (safe from any thread)."""
        import torch

        with self._lock, torch.inference_mode():
            return self.query_vector(question)

    def _similarity(self, question: str, batch: torch.Tensor) -> torch.Tensor:
        """ψ's score of each preprocessed image in ``batch`` for the question (one forward; see the module doc)."""
        import torch

        with self._lock, torch.inference_mode():
            return (self.image_features(batch) @ self.query_vector(question)).cpu()

    def image_features(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised float32 embeddings of ψ's inputs: uint8 views (:meth:`region_pixels`, normalised
        here) or already normalised float tensors; moved to ψ's device and input dtype."""
        import torch

        if not self.has_image_tower:
            raise RuntimeError("this ψ's image tower was dropped (a front end of the engine stage prepares ψ's "
                               "inputs only); load ψ with image_tower=True to score images")
        if batch.dtype == torch.uint8:  # on ψ's device: a quarter of float32's bytes to move
            batch = self.normalize(batch.to(self.device))
        return torch.nn.functional.normalize(self.model.encode_image(batch.to(self.device, self.input_dtype)).float(), dim=-1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 views ``[N, 3, S, S]`` → ψ's float32 input (its mean and std)."""
        return normalize_pixels(pixels, self.model.visual.image_mean, self.model.visual.image_std)

    @property
    def resize_mode(self) -> str:
        cfg = getattr(self.model.visual, "preprocess_cfg", None) or {}
        return cfg.get("resize_mode", "shortest")

    def region_batch(self, image: Image.Image, boxes: Sequence[tuple[int, int, int, int]], pad_to_square: bool) -> torch.Tensor:
        """ψ's normalised float32 inputs for many regions of one image (:meth:`region_pixels`, normalised)."""
        return self.normalize(self.region_pixels(image, boxes, pad_to_square))

    def region_pixels(self, image: Image.Image | torch.Tensor, boxes: Sequence[tuple[int, int, int, int]],
                      pad_to_square: bool) -> torch.Tensor:
        """ψ's views of many regions of one RGB image (PIL, or :func:`image_array`'s ``[H, W, 3]`` uint8,
        which spares a second copy where the caller needs the array too) as uint8 ``[N, 3, S, S]``,
        without a full-resolution crop each.

        The image is downscaled once — only as far as its smallest region allows, so no
        region is later upsampled from a needlessly reduced copy — and every region is
        then cut, padded and resized as a tensor slice. The result matches open_clip's
        preprocessing (resize to the model's size, bicubic with antialiasing, center
        crop; a decoded image's 8 bits) of each region padded to a square (LLaVA-1.5's
        expand2square) within a grey level or so. Every step stays in 8 bits, channels
        last: torch's vectorised uint8 resampling (torchvision's own ``resize`` path), at a
        fraction of the float path's time — the front end does this for every request.
        uint8 also because these views cross from vLLM's front end to its engine (a
        quarter of float32's bytes); :meth:`normalize` makes them ψ's input.
        """
        import torch
        import torch.nn.functional as F

        size = self.image_size
        array = image_array(image)
        height, width = array.shape[:2]
        sides = [max(x1 - x0, y1 - y0) if pad_to_square else min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]
        factor = min(1.0, size / max(1, min(sides)))
        pixels = array.permute(2, 0, 1)[None]  # [1, 3, H, W], channels-last strides
        if factor < 1.0:
            pixels = F.interpolate(pixels, size=(max(1, round(height * factor)), max(1, round(width * factor))),
                                   mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.contiguous(memory_format=torch.channels_last)  # every cut below is then one copy
        reduced_h, reduced_w = pixels.shape[2:]
        fill = torch.tensor([round(255 * m) for m in self.model.visual.image_mean], dtype=torch.uint8).view(1, 3, 1, 1)
        sw, sh = reduced_w / width, reduced_h / height
        out = []
        for x0, y0, x1, y1 in boxes:
            a0, b0 = min(int(x0 * sw), reduced_w - 1), min(int(y0 * sh), reduced_h - 1)
            a1, b1 = max(a0 + 1, min(round(x1 * sw), reduced_w)), max(b0 + 1, min(round(y1 * sh), reduced_h))
            region = pixels[:, :, b0:b1, a0:a1]
            h, w = region.shape[2:]
            if pad_to_square and h != w:
                side = max(h, w)
                canvas = fill.expand(1, 3, side, side).contiguous(memory_format=torch.channels_last)
                canvas[:, :, (side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = region
                region = canvas
            if self.resize_mode == "squash" or region.shape[2] == region.shape[3]:
                target = (size, size)
            else:  # resize the shortest side, then center crop
                scale = size / min(h, w)
                target = (max(size, round(h * scale)), max(size, round(w * scale)))
            region = F.interpolate(region.contiguous(memory_format=torch.channels_last), size=target,
                                   mode="bicubic", antialias=True, align_corners=False)[0]
            if target != (size, size):
                top, left = (target[0] - size) // 2, (target[1] - size) // 2
                region = region[:, top:top + size, left:left + size]
            out.append(region)
        return torch.stack(out)

    def region_views(self, image: Image.Image | torch.Tensor, boxes: Sequence[tuple[int, int, int, int]],
                     fit: str = "windows") -> tuple[torch.Tensor, torch.Tensor]:
        """ψ's inputs for ``boxes`` fitted to its square input by ``fit`` (``SemClipConfig.relevance_fit``):
        ``(pixels [N, 3, S, S] uint8, index [R, V])``, region ``r``'s views being ``pixels[index[r]]``.

        ``windows`` gives a region one view per square of :func:`crops.square_windows` (at most 4;
        a region with fewer views than ``V`` repeats its first, which a max ignores); ``pad`` and
        ``center`` one view each, padded to a square or centre-cropped.
        """
        import torch

        from .crops import RELEVANCE_FITS, square_windows

        if fit not in RELEVANCE_FITS:
            raise ValueError(f"fit must be one of {RELEVANCE_FITS}, got {fit!r}")
        if fit == "windows":
            views = [square_windows(b) for b in boxes]
            flat = [w for ws in views for w in ws]
            pixels = self.region_pixels(image, flat, pad_to_square=True)  # squares: nothing to pad (only > 4:1 is)
            width = max(len(ws) for ws in views)
            starts = [sum(len(ws) for ws in views[:i]) for i in range(len(views))]
            index = torch.tensor([[s + j if j < len(ws) else s for j in range(width)] for s, ws in zip(starts, views)])
            return pixels, index
        return self.region_pixels(image, boxes, pad_to_square=fit == "pad"), torch.arange(len(boxes))[:, None]

    def score_regions(
        self, question: str, image: Image.Image, boxes: Sequence[tuple[int, int, int, int]], fit: str = "windows"
    ) -> torch.Tensor:
        """ψ's score of each region of ``image`` for the question, in one batched forward: the best
        of its views' scores (one view unless ``fit`` is ``windows`` and the region not square)."""
        import torch

        if not boxes:
            return torch.empty(0)
        with self._lock, torch.inference_mode():
            pixels, index = self.region_views(image, boxes, fit)
            return candidate_scores(self.image_features(pixels), index, self.query_vector(question)).cpu()

    def region_features(self, image: Image.Image, boxes: Sequence[tuple[int, int, int, int]],
                        fit: str = "windows") -> torch.Tensor:
        """Normalised embeddings of every region's views, ``[R, V, D]`` (see :meth:`region_views`):
        a region's score for a query is its best view's dot product with it."""
        pixels, index = self.region_views(image, boxes, fit)
        return self.image_features(pixels)[index]

    def score(self, question: str, crops: Sequence[Image.Image]) -> torch.Tensor:
        """ψ's score of each crop for the question, in one batched forward."""
        import torch

        if not crops:
            return torch.empty(0)
        return self._similarity(question, torch.stack([self.preprocess(c) for c in crops]))


def candidate_scores(view_features: torch.Tensor, index: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Each candidate's score: the best of its views' dot products with the query.

    ``view_features`` ``[N, D]`` (normalised, :meth:`RelevanceModel.image_features`), ``index``
    ``[R, V]`` (region ``r``'s views, :meth:`RelevanceModel.region_views`), ``query`` ``[D]``
    (:meth:`RelevanceModel.query_vector`). The processor stage and the engine stage both score
    with it.
    """
    return (view_features[index] @ query).amax(dim=1)


def save_local_dir(model, model_cfg: dict, out_dir: Path | str, half: bool = True,
                   reference: TextReference | None = None) -> Path:
    """Write ψ in open_clip's ``local-dir`` format: ``open_clip_config.json`` + ``open_clip_model.safetensors``
    (+ ``semclip_relevance.json`` with a ``reference``; a stale one is removed without).

    safetensors, not pickle: a checkpoint is data, never code. ``half`` stores fp16 (a few MB
    for the tiny model); :meth:`RelevanceModel.from_pretrained` reads it back either way.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(model.visual.image_mean), "std": list(model.visual.image_std)},
    }, indent=2))
    if reference is not None:
        reference.save(out)
    else:
        (out / TextReference.FILE).unlink(missing_ok=True)
    return out


def get_relevance_model(
    model_name: str, pretrained: str | None = None, device: str = "cpu", precision: str = "fp32",
    image_tower: bool = True,
) -> RelevanceModel:
    """Process-wide cache: ψ is loaded once per (model, weights, device, precision, image tower);
    ``image_tower=False`` gives one that prepares inputs only (:meth:`RelevanceModel.drop_image_tower`)."""
    key = (model_name, pretrained, device, precision, image_tower)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = RelevanceModel.from_pretrained(model_name, pretrained, device, precision)
            if not image_tower:
                model.drop_image_tower()
            _models[key] = model
        return model
