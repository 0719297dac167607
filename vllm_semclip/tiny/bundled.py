"""Where the bundled tiny models live, and their open_clip config names.

The tiny LLaVA, its tower's CLIP (224 px, legacy material) and ψ (that CLIP fine-tuned on the
randomised material, ``tiny/render.py``, also 224 px) ship inside this package for ``make demo``,
the tests and ``semclip serve`` without a model. Nothing in the plugin core depends on these paths: the
LLaVA's own ``config.json`` names its ψ (``semclip_config.relevance_model``, relative to
the LLaVA's directory).
"""

from __future__ import annotations

from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent
MODELS_DIR = TINY_DIR / "models"
MODEL_CONFIG_DIR = TINY_DIR / "model_configs"

DEFAULT_MODEL_DIR = MODELS_DIR / "semclip-tiny-llava"
DEFAULT_TOWER_DIR = MODELS_DIR / "semclip-vit-t-16"
TOWER_MODEL_NAME = "SemClip-ViT-T-16"
DEFAULT_RELEVANCE_DIR = MODELS_DIR / "semclip-vit-t-16-psi"
RELEVANCE_MODEL_NAME = TOWER_MODEL_NAME
# the previous default ψ: the tower's CLIP with its position grid resized to 336 px (open_clip-style
# name, as ViT-L-14 → ViT-L-14-336); the trained ψ below was distilled from it
LEGACY_RELEVANCE_DIR = MODELS_DIR / "semclip-vit-t-16-336"
LEGACY_RELEVANCE_MODEL_NAME = "SemClip-ViT-T-16-336"
DEFAULT_TRAINED_RELEVANCE_DIR = MODELS_DIR / "semclip-vit-t-16-336-trained"

_registered = False


def register_model_configs() -> None:
    """Make the tiny models' named open_clip configs (``SemClip-ViT-T-16``…) known to open_clip."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True
