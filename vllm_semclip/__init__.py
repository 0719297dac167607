"""vllm-semclip: semantic crop selection (SemClip) for LLaVA-family models in vLLM.

Importing the package is cheap: the vLLM plugin entry point and the public API are
resolved lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["register", "select_crops", "SemClipConfig", "SemClipConfigError", "Selection", "ARCHITECTURE"]

from .plugin import ARCHITECTURE, register

if TYPE_CHECKING:
    from .config import SemClipConfig, SemClipConfigError
    from .selection import Selection, select_crops


def __getattr__(name: str):
    if name in ("select_crops", "Selection"):
        from . import selection

        return getattr(selection, name)
    if name in ("SemClipConfig", "SemClipConfigError"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'vllm_semclip' has no attribute {name!r}")
