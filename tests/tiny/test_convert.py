"""open_clip ViT → HF CLIPVisionModel: the same features on the same pixels."""

import open_clip
import pytest
import torch

from vllm_semclip.tiny.convert import UnsupportedVisionTower, open_clip_to_hf_vision
from vllm_semclip.tiny.bundled import register_model_configs
from vllm_semclip.tiny.bundled import TOWER_MODEL_NAME


def _pair(name: str, **kwargs):
    register_model_configs()
    torch.manual_seed(0)
    oc = open_clip.create_model(name, **kwargs).eval()
    cfg = open_clip.get_model_config(name)
    if kwargs.get("force_quick_gelu"):
        cfg = {**cfg, "quick_gelu": True}
    return oc, open_clip_to_hf_vision(oc, cfg)


@pytest.mark.engine
@pytest.mark.parametrize("name, kwargs", [(TOWER_MODEL_NAME, {}), ("ViT-B-32", {"force_quick_gelu": True})])
def test_same_features_on_same_pixels(name, kwargs):
    oc, hf = _pair(name, **kwargs)
    size = hf.config.image_size
    pixels = torch.randn(3, 3, size, size)
    with torch.no_grad():
        want = oc.encode_image(pixels)
        got = hf(pixel_values=pixels)
        # the tokens LLaVA takes: penultimate layer, as vision_feature_layer=-2 selects
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        x = oc.visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([oc.visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + oc.visual.positional_embedding
        x = oc.visual.ln_pre(x)
        for block in oc.visual.transformer.resblocks[:-1]:
            x = block(x)
    assert torch.allclose(got.image_embeds, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(hidden, x, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got.image_embeds, oc.encode_image(torch.randn_like(pixels)), atol=1e-3)


def test_unsupported_towers_are_refused():
    register_model_configs()
    oc = open_clip.create_model(TOWER_MODEL_NAME)
    oc.visual.pool_type = "avg"
    with pytest.raises(UnsupportedVisionTower, match="class-token"):
        open_clip_to_hf_vision(oc, open_clip.get_model_config(TOWER_MODEL_NAME))
