"""Config-only LLaVA checkpoints for vLLM's ``load_format="dummy"``: real shapes, no weights.

A directory written here holds what vLLM reads before it creates a model — ``config.json``
(a CLIP vision tower and a Llama, LLaVA-1.5's layout), the image processor and a tokenizer —
and no weights: served with ``--load-format dummy`` vLLM fills every tensor with random
values. Shapes, token counts, the tower's resolution and the work per request are those of
the architecture; the answers are noise. The tokenizer is the bundled tiny LLaVA's (the only
one that ships with the package); the vocabulary size in the config is the architecture's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from vllm_semclip.cost import LLAVA_1_5_7B, LlavaArchitecture
from vllm_semclip.tiny.bundled import DEFAULT_MODEL_DIR

__all__ = ["LLAVA_1_5_7B", "LlavaArchitecture", "llava_config", "write_dummy_llava"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def llava_config(arch: LlavaArchitecture, image_token_index: int, semclip_config: dict | None = None) -> dict:
    """``config.json`` of ``arch`` as transformers writes it (built through its config classes)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=arch.image_size, patch_size=arch.patch_size, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=arch.hidden, intermediate_size=arch.intermediate, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.heads, vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_index, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=arch.tokens_per_tile,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = "bfloat16"
    out = config.to_dict()
    if semclip_config:
        out["semclip_config"] = dict(semclip_config)
    return out


def write_dummy_llava(out_dir: Path | str, arch: LlavaArchitecture, semclip_config: dict | None = None,
                      tokenizer_dir: Path | str = DEFAULT_MODEL_DIR) -> Path:
    """Write ``arch`` as a weightless checkpoint in ``out_dir`` (serve it with ``--load-format dummy``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        shutil.copy2(source / name, out / name)
    processor = json.loads((source / "processor_config.json").read_text())
    image_token_index = json.loads((source / "config.json").read_text())["image_token_index"]
    processor["image_processor"].update({
        "size": {"shortest_edge": arch.image_size},
        "crop_size": {"height": arch.image_size, "width": arch.image_size},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    })
    processor["patch_size"] = arch.patch_size
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    config = llava_config(arch, image_token_index, semclip_config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "semclip_build.json").write_text(json.dumps({"builder": "write_dummy_llava", **asdict(arch)}, indent=2))
    for stale in out.glob("*.safetensors"):
        stale.unlink()  # weightless by construction: vLLM must fill the tensors itself
    return out
