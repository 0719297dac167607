"""Weightless checkpoints of real LLaVA architectures: vLLM reads them as the real model (no engine here)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import PSI, chat_prompt, encoded_tiles, make_processor
from vllm.multimodal.processing.context import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs

from vllm_semclip.bench.dummy_llava import write_dummy_llava
from vllm_semclip.cost import LLAVA_1_5_7B, LLAVA_1_5_13B, LlavaArchitecture


def test_the_7b_config_is_llava_1_5s_shapes(tmp_path):
    out = write_dummy_llava(tmp_path / "7b", LLAVA_1_5_7B, semclip_config={"relevance_model": "ViT-B-16"})
    config = json.loads((out / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["num_hidden_layers"]) == (336, 14, 1024, 24)
    assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"], text["vocab_size"]) == (4096, 32, 11008, 32064)
    assert config["image_seq_length"] == LLAVA_1_5_7B.tokens_per_tile == 576
    assert config["semclip_config"] == {"relevance_model": "ViT-B-16"}
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))  # vLLM's dummy loader fills the weights


def test_vllm_processes_a_request_at_the_real_tower_resolution(tmp_path, photo):
    """vLLM's own config and processing machinery see 336 px tiles and 576 tokens a tile."""
    # (the tests' engines ask for 8192 tokens; LLaVA-1.5 declares 4096)
    out = write_dummy_llava(tmp_path / "13b", dataclasses.replace(LLAVA_1_5_13B, max_position_embeddings=8192))
    processor, _ = make_processor(str(out), {"relevance_model": PSI, "max_topk": 2})
    info = processor.info
    assert (info.tile_size, info.tokens_per_tile, info.get_max_image_tokens()) == (336, 576, 3 * 576)
    ids = info.get_tokenizer()(chat_prompt("What is the color of the flag?"))["input_ids"]
    inputs = ProcessorInputs(prompt=ids, mm_data_items=info.parse_mm_data({"image": [photo]}),
                             hf_processor_mm_kwargs={"topk": 2})
    result = processor.apply(inputs, TimingContext(enabled=False))
    assert tuple(encoded_tiles(result, processor).shape) == (3, 3, 336, 336)  # the overview and 2 crops reach the tower
    image_token = info.get_hf_config().image_token_index
    assert sum(t == image_token for t in result["prompt_token_ids"]) == 3 * 576


def test_an_impossible_architecture_is_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        LlavaArchitecture("bad", 330, 14, 1024, 24, 16, 4096, 4096, 32, 32, 11008, 32064)
    with pytest.raises(ValueError, match="heads"):
        LlavaArchitecture("bad", 336, 14, 1000, 24, 16, 4096, 4096, 32, 32, 11008, 32064)
