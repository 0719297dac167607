"""The bundled models: loadable as-is by vLLM (stock and SemClip) and by transformers, reproducible."""

import json
from pathlib import Path

from safetensors import safe_open

from vllm_semclip.tiny_models import DEFAULT_RELEVANCE_DIR, TinyLlavaSpec, build_tiny_llava


def test_vllm_resolves_stock_and_semclip_architectures(model_dir):
    from vllm.config import ModelConfig

    stock = ModelConfig(model=model_dir, dtype="bfloat16")
    assert stock.architectures == ["LlavaForConditionalGeneration"] and stock.runner_type == "generate"
    from conftest import make_model_config

    semclip = make_model_config(model_dir)
    assert semclip.architectures == ["SemClipLlavaForConditionalGeneration"] and semclip.runner_type == "generate"


def test_weights_use_the_layout_vllm_loads_and_transformers_accepts(model_dir):
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    tower = [k for k in keys if k.startswith("model.vision_tower.")]
    assert tower and all(k.startswith("model.vision_tower.vision_model.") for k in tower)
    from transformers import LlavaForConditionalGeneration

    _, info = LlavaForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_heads_are_wide_enough_for_vllm_cpu(model_dir):
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for part in ("vision_config", "text_config"):
        c = cfg[part]
        assert c["hidden_size"] // c["num_attention_heads"] >= 32


def test_build_is_reproducible(tmp_path, model_dir):
    out = build_tiny_llava(tmp_path / "again", TinyLlavaSpec())
    for name in ("model.safetensors", "tokenizer.json"):
        assert (out / name).read_bytes() == (Path(model_dir) / name).read_bytes(), name
    assert (DEFAULT_RELEVANCE_DIR / "open_clip_config.json").is_file()
