"""The FLOP-faithful stand-in: LLaVA-1.5-7B's proportions of work per request, small enough for a CPU."""

from __future__ import annotations

import json

import pytest

from vllm_semclip.bench.standin import STANDIN_LLAVA, flop_ratios, write_standin
from vllm_semclip.relevance import RelevanceModel


@pytest.mark.parametrize("reference_psi", ["ViT-B-16", "ViT-L-14-336"])
def test_the_stand_ins_work_is_in_the_real_pairs_proportions(reference_psi):
    ratios = flop_ratios(reference_psi)
    real, standin = ratios["real"], ratios["standin"]
    for part in ("psi", "tower", "decode_token"):  # each a fraction of the language model's prefill
        assert standin[part] == pytest.approx(real[part], rel=0.10), part
    assert real["language_model_gflop"] / standin["language_model_gflop"] > 1000  # scaled down a thousandfold
    assert standin["language_model_gflop"] < 20  # a CPU prefills it in well under a second


def test_the_stand_in_is_weightless_and_names_its_random_psi(tmp_path):
    llava = write_standin(tmp_path, "ViT-B-16")
    config = json.loads((llava / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 336 and config["image_seq_length"] == STANDIN_LLAVA.tokens_per_tile == 576
    assert not list(llava.glob("*.safetensors"))
    psi = RelevanceModel.from_pretrained(config["semclip_config"]["relevance_model"])
    assert psi.image_size == 224 and psi.query_vector("a question").shape == (64,)
    with pytest.raises(ValueError, match="no stand-in"):
        write_standin(tmp_path / "x", "ViT-H-14")
