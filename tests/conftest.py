"""Session fixtures: the bundled models, one offline engine, one real server.

Engines take ~30-40 s to start on a CPU, so each is built once per session and
shared; every process a fixture starts is stopped when the session ends.
"""

from __future__ import annotations

import gc
import os

from vllm_semclip.server import runtime_env

os.environ.update(runtime_env())  # CPU settings before vLLM is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests use local models only: never wait on a hub

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from vllm_semclip.plugin import ARCHITECTURE  # noqa: E402
from vllm_semclip.tiny.build import ensure_default_models  # noqa: E402
from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR, register_model_configs  # noqa: E402

# ψ named explicitly wherever a test selects crops outside a server (the core has no default ψ)
PSI = str(DEFAULT_RELEVANCE_DIR)
register_model_configs()  # the tiny models' open_clip names (SemClip-ViT-T-16…), which tests load by name

# The offline engine and the server allow up to 3 crops per image (profiled for it).
MAX_TOPK = 3
# Fixtures that start an engine, a server or a Ray job, or train for seconds: a test using one is an
# engine test (the others carry @pytest.mark.engine themselves).
ENGINE_FIXTURES = frozenset({"llm", "server", "small_run", "uninterrupted", "interrupted_then_resumed", "ray_cluster",
                             "tiny_run", "shifted_run"})


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def model_dir() -> str:
    llava, _ = ensure_default_models()
    return str(llava)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def tokens_per_tile(model_dir) -> int:
    import json
    from pathlib import Path

    vision = json.loads((Path(model_dir) / "config.json").read_text())["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2  # CLS dropped ("default" strategy)


def make_model_config(model_dir: str, semclip_config: dict | None = None, mm_processor_kwargs: dict | None = None):
    from vllm.config import ModelConfig

    import vllm_semclip

    vllm_semclip.register()
    overrides = {"architectures": [ARCHITECTURE]}
    if semclip_config is not None:
        overrides["semclip_config"] = semclip_config
    return ModelConfig(
        model=model_dir,
        hf_overrides=overrides,
        dtype="bfloat16",
        max_model_len=8192,
        limit_mm_per_prompt={"image": 8},
        mm_processor_kwargs=mm_processor_kwargs,
    )


def make_processor(model_dir: str, semclip_config: dict | None = None, mm_processor_kwargs: dict | None = None):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    import vllm_semclip.model  # noqa: F401  (registers the processor)

    config = make_model_config(model_dir, semclip_config, mm_processor_kwargs)
    return MULTIMODAL_REGISTRY.create_processor(config), config


@pytest.fixture(scope="session")
def processor(model_dir):
    proc, _ = make_processor(model_dir, {"max_topk": MAX_TOPK})
    return proc


def make_llm(model_dir: str, **semclip_config):
    """An offline engine serving SemClip on ``model_dir``; stop it with ``stop_llm``."""
    from vllm import LLM

    return LLM(
        model=model_dir,
        hf_overrides={"architectures": [ARCHITECTURE], "semclip_config": {"max_topk": MAX_TOPK, **semclip_config}},
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=8192,
        limit_mm_per_prompt={"image": 8},
        seed=0,
    )


def stop_llm(engine) -> None:
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


@pytest.fixture(scope="session")
def llm(model_dir):
    engine = make_llm(model_dir)
    yield engine
    stop_llm(engine)


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    from vllm_semclip.server import ServerProcess

    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(model_dir, {"max_topk": MAX_TOPK, "log_selections": True}, log_path=log)
    proc.start()
    yield proc
    proc.stop()
    assert proc.process.poll() is not None, "server process still running after stop()"


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    from vllm_semclip.tiny.scenes import load_photo as sample_photo

    return sample_photo("astronaut")


def encoded_tiles(processed, processor):
    """The tiles a processor output sends through the vision tower: in the engine stage, the overview
    and the crops the model chooses and cuts (``model.choose_tiles``, with the processor's ψ and
    image processor), else its pixel values."""
    from vllm_semclip.model import choose_tiles, parse_psi_batch
    from vllm_semclip.relevance import get_relevance_model

    data = dict(processed["mm_kwargs"].get_data())
    batch = parse_psi_batch(data)
    if batch is None:
        return data["pixel_values"]
    psi = get_relevance_model(processor.info.server_config.relevance_model or PSI)
    kept, _, _ = choose_tiles(psi, data["pixel_values"], data["num_tiles"].tolist(), batch,
                              processor.info.get_hf_processor().image_processor)
    return kept


def chat_prompt(question: str, num_images: int = 1) -> str:
    """LLaVA-1.5's prompt format, as the bundled chat template renders it."""
    return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"
