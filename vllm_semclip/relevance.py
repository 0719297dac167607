"""ψ: the relevance model that scores (question, sub-image) pairs.

One job: given a question and a batch of crops, return one score per crop. It is
implemented on open_clip so that any open_clip model works unchanged — a built-in
name with a ``pretrained`` tag (``ViT-L-14-336`` / ``openai`` for real use), a name
with a local checkpoint file, or a directory in open_clip's ``local-dir:`` format
(what the bundled tiny model and ``semclip train-relevance`` write).

The score is the cosine similarity of the normalised image and text embeddings
(CLIP's zero-shot similarity, without the logit scale: only the ranking matters).
Text embeddings are cached per question, since a server sees the same question
text again (retries, several images, benchmark sweeps).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

_registered = False
_models: dict[tuple[str, str | None, str], "RelevanceModel"] = {}
_models_lock = threading.Lock()


def register_model_configs() -> None:
    """Make the package's named open_clip configs (e.g. ``SemClip-ViT-T-16``) known to open_clip."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def _open_clip_identifier(model_name: str) -> str:
    """A directory path becomes open_clip's ``local-dir:`` schema; names pass through."""
    if model_name.startswith(("local-dir:", "hf-hub:")):
        return model_name
    path = Path(model_name).expanduser()
    if path.is_dir():
        return f"local-dir:{path.resolve()}"
    return model_name


class RelevanceModel:
    """ψ(question, crops) → scores, on an open_clip dual encoder."""

    def __init__(self, model, preprocess, tokenizer, device: str = "cpu", text_cache_size: int = 4096) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained: str | None = None, device: str = "cpu") -> RelevanceModel:
        """Create ψ through open_clip's factory: weights are the explicit ``pretrained`` argument
        (a tag such as ``openai`` or a checkpoint path), or come with a ``local-dir:`` directory."""
        import open_clip

        register_model_configs()
        identifier = _open_clip_identifier(model_name)
        if identifier.startswith("local-dir:"):
            pretrained = None  # the directory carries its own weights
        elif pretrained is not None and Path(pretrained).expanduser().is_file():
            pretrained = str(Path(pretrained).expanduser().resolve())
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                identifier, pretrained=pretrained, device=device
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
        return cls(model, preprocess, tokenizer, device=device)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _text_embedding(self, question: str) -> torch.Tensor:
        cached = self._text_cache.get(question)
        if cached is not None:
            self._text_cache.move_to_end(question)
            return cached
        import torch

        tokens = self.tokenizer([question]).to(self.device)
        emb = self.model.encode_text(tokens)
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)[0]
        self._text_cache[question] = emb
        if len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return emb

    def encode_images(self, crops: Sequence[Image.Image]) -> torch.Tensor:
        import torch

        batch = torch.stack([self.preprocess(c) for c in crops]).to(self.device)
        emb = self.model.encode_image(batch)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def score(self, question: str, crops: Sequence[Image.Image]) -> torch.Tensor:
        """Cosine similarity of each crop with the question, in one batched forward."""
        import torch

        if not crops:
            return torch.empty(0)
        with self._lock, torch.inference_mode():
            text = self._text_embedding(question)
            images = self.encode_images(crops)
            return (images @ text).cpu()


def get_relevance_model(model_name: str, pretrained: str | None = None, device: str = "cpu") -> RelevanceModel:
    """Process-wide cache: ψ is loaded once per (model, weights, device)."""
    key = (model_name, pretrained, device)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = RelevanceModel.from_pretrained(model_name, pretrained, device)
            _models[key] = model
        return model
