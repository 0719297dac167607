"""Where the bundled tiny models live, and their open_clip config names.

The tiny LLaVA, ψ (a 224-px CLIP fine-tuned on the randomised material, ``tiny/render.py``; its
ViT is also the LLaVA's vision tower), the CLIP it started from (legacy material) and the legacy ψ
ship inside this package for ``make demo``,
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
DEFAULT_RELEVANCE_DIR = MODELS_DIR / "semclip-vit-t-16-psi"
# the CLIP whose ViT is the LLaVA's vision tower: ψ's (the LLaVA was rebuilt on it, issue 32)
DEFAULT_TOWER_DIR = DEFAULT_RELEVANCE_DIR
TOWER_MODEL_NAME = "SemClip-ViT-T-16"
RELEVANCE_MODEL_NAME = TOWER_MODEL_NAME
# the CLIP trained on legacy material only: ψ's starting point and the legacy ψ's weights
LEGACY_TOWER_DIR = MODELS_DIR / "semclip-vit-t-16"
# the previous default ψ: that CLIP with its position grid resized to 336 px (open_clip-style
# name, as ViT-L-14 → ViT-L-14-336)
LEGACY_RELEVANCE_DIR = MODELS_DIR / "semclip-vit-t-16-336"
LEGACY_RELEVANCE_MODEL_NAME = "SemClip-ViT-T-16-336"
# ψ's weights at 160 px (the position grid resized by open_clip's factory, nothing trained): half
# ψ's work a request; measured, not the default (docs/design.md, "A cheaper ψ"); ``semclip bench
# serve`` builds it at run time (config ``semclip_160``)
SMALL_RELEVANCE_MODEL_NAME = "SemClip-ViT-T-16-160"
# ψ after distant supervision on the LLaVA's crop labels (``semclip train-relevance``), what ``--method trained`` serves
DEFAULT_TRAINED_RELEVANCE_DIR = MODELS_DIR / "semclip-vit-t-16-psi-trained"

_registered = False


def register_model_configs() -> None:
    """Make the tiny models' named open_clip configs (``SemClip-ViT-T-16``…) known to open_clip."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True
