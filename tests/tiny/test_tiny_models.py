"""The bundled models: loadable as-is by vLLM (stock and SemClip) and by transformers, reproducible."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from vllm_semclip.tiny.bundled import (
    DEFAULT_MODEL_DIR,
    DEFAULT_RELEVANCE_DIR,
    DEFAULT_TOWER_DIR,
    LEGACY_RELEVANCE_DIR,
    LEGACY_RELEVANCE_MODEL_NAME,
    LEGACY_TOWER_DIR,
    SMALL_RELEVANCE_MODEL_NAME,
)
from vllm_semclip.tiny.build import TinyLlavaSpec, build_tiny_llava, build_tiny_relevance, update_llava_tower


@pytest.mark.engine
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


@pytest.mark.parametrize("sizes", [{"text_heads": 6}, {"text_hidden_size": 96, "text_heads": 4},
                                   {"text_layers": 0}, {"text_rope_theta": 0.0}])
def test_a_language_model_vllm_cannot_serve_on_cpu_is_refused(sizes):
    with pytest.raises(ValueError):
        TinyLlavaSpec(**sizes)


def test_a_wider_language_model_builds_with_32_wide_heads(tmp_path):
    spec = TinyLlavaSpec(text_hidden_size=256, text_heads=8, text_intermediate_size=688)
    text = json.loads((build_tiny_llava(tmp_path / "wide", spec) / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["intermediate_size"]) == (256, 8, 688)


def test_the_rope_base_reaches_the_config_that_transformers_and_vllm_read(tmp_path):
    from transformers import AutoConfig

    out = build_tiny_llava(tmp_path / "rope", TinyLlavaSpec(text_rope_theta=1e6))
    text = AutoConfig.from_pretrained(out).text_config
    assert text.rope_parameters["rope_theta"] == 1e6


def test_build_is_reproducible(tmp_path, model_dir):
    one = build_tiny_llava(tmp_path / "one", TinyLlavaSpec())
    two = build_tiny_llava(tmp_path / "two", TinyLlavaSpec())
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    # the tokenizer is rebuilt from the same corpus: the bundled model's ids stay valid
    assert (one / "tokenizer.json").read_bytes() == (Path(model_dir) / "tokenizer.json").read_bytes()
    assert (DEFAULT_TOWER_DIR / "open_clip_config.json").is_file()


def test_llava_tower_is_the_bundled_tiny_clip(model_dir):
    """The LLaVA vision tower and ψ's ViT are one model: same features on the same pixels. The
    bundled LLaVA was rebuilt on that tower and trained on the randomised material (issue 32)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vllm_semclip.relevance import RelevanceModel

    build = json.loads((Path(model_dir) / "semclip_build.json").read_text())
    report = json.loads((Path(model_dir) / "train_report.json").read_text())
    assert build["vision_tower_from"] == DEFAULT_TOWER_DIR.name == DEFAULT_RELEVANCE_DIR.name
    assert report["config"]["render"] == "train" and report["config"]["tower_lr"] == 0

    clip = RelevanceModel.from_pretrained(str(DEFAULT_TOWER_DIR))
    oc = clip.model.float()
    tower = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).model.vision_tower
    size = tower.config.image_size
    assert size == clip.image_size == 224
    pixels = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        oc.visual.output_tokens = True
        pooled, _ = oc.visual(pixels)
        oc.visual.output_tokens = False
        hf = tower(pixels).pooler_output @ oc.visual.proj
    # LLaVA's tower is stored in bf16 (ψ in fp16): compare at that precision
    assert torch.allclose(hf, pooled, atol=0.05, rtol=0.05)
    assert not torch.allclose(hf, pooled.roll(1, dims=0), atol=0.05, rtol=0.05)  # and different images differ


def _feature_layer_tokens(model_dir, pixels):
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer], out.pooler_output


def test_the_tokens_the_llava_reads_are_the_bundled_clips_at_its_feature_layer(model_dir):
    """What the LLaVA actually sees — its tower's hidden states at ``vision_feature_layer`` — is
    the tiny CLIP's block output there (open_clip's ``forward_intermediates``), every token."""
    import torch

    from vllm_semclip.relevance import RelevanceModel

    layer = json.loads((Path(model_dir) / "config.json").read_text())["vision_feature_layer"]
    oc = RelevanceModel.from_pretrained(str(DEFAULT_TOWER_DIR)).model.float()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        theirs = oc.visual.forward_intermediates(pixels, indices=[layer], output_fmt="NLC",
                                                 intermediates_only=True, output_extra_tokens=True)
        below = oc.visual.forward_intermediates(pixels, indices=[layer - 1], output_fmt="NLC",
                                                intermediates_only=True)["image_intermediates"][0]
        ours, _ = _feature_layer_tokens(model_dir, pixels)
    tokens = torch.cat([theirs["image_intermediates_prefix"][0], theirs["image_intermediates"][0]], dim=1)
    assert ours.shape == tokens.shape == (2, 197, 128)
    assert torch.allclose(ours, tokens, atol=0.05, rtol=0.05)
    assert not torch.allclose(ours[:, 1:], below, atol=0.05, rtol=0.05)  # one layer lower is another thing


def test_update_llava_tower_takes_a_clips_unread_layers_and_refuses_one_that_changes_what_it_reads(tmp_path):
    """A CLIP that differs from the LLaVA's tower only above ``vision_feature_layer`` (its last
    layer, post-layernorm) becomes the tower: the pooled output follows the new CLIP, the tokens
    the LLaVA reads stay bit for bit. A CLIP that differs below is refused, naming the tensors."""
    import torch

    from vllm_semclip.relevance import RelevanceModel, save_local_dir

    clip_dir = build_tiny_relevance(tmp_path / "clip", seed=1)
    llava_dir = build_tiny_llava(tmp_path / "llava", relevance_dir=clip_dir)

    def perturbed(name: str, block: int) -> Path:
        model = RelevanceModel.from_pretrained(str(clip_dir)).model.float()
        with torch.no_grad():
            for p in model.visual.transformer.resblocks[block].parameters():
                p.add_(0.05 * torch.randn_like(p))
        cfg = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
        return save_local_dir(model, cfg, tmp_path / name, half=False)

    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    before, pooled_before = _feature_layer_tokens(str(llava_dir), pixels)
    head = perturbed("head", 3)  # 4 layers, feature layer -2: layer index 3 is never read
    changed = update_llava_tower(llava_dir, head)
    assert changed and all(".encoder.layers.3." in k for k in changed)
    after, pooled_after = _feature_layer_tokens(str(llava_dir), pixels)
    assert torch.equal(before, after)  # what the LLaVA reads: unchanged
    assert not torch.allclose(pooled_before, pooled_after)
    oc = RelevanceModel.from_pretrained(str(head)).model.float()
    with torch.inference_mode():
        oc.visual.output_tokens = True
        pooled, _ = oc.visual(pixels)
        assert torch.allclose(pooled_after @ oc.visual.proj, pooled, atol=0.05, rtol=0.05)  # the tower is the new CLIP
    assert update_llava_tower(llava_dir, head) == []  # idempotent
    with pytest.raises(ValueError, match="layers.0"):
        update_llava_tower(llava_dir, perturbed("body", 0))
    assert torch.equal(_feature_layer_tokens(str(llava_dir), pixels)[0], before)  # the refused one wrote nothing


def test_legacy_psi_is_the_legacy_clip_at_336_px():
    """The legacy ψ is the legacy CLIP (the LLaVA's tower before issue 32) with its position grid
    resized to 336 px, nothing else changed: rebuilt from that CLIP, it is byte-identical to the bundled one."""
    import tempfile

    from safetensors.torch import load_file

    from vllm_semclip.relevance import RelevanceModel
    from vllm_semclip.tiny.train_clip import resize_local_dir

    assert RelevanceModel.from_pretrained(str(LEGACY_RELEVANCE_DIR)).image_size == 336
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = resize_local_dir(LEGACY_TOWER_DIR, LEGACY_RELEVANCE_MODEL_NAME, tmp)
        assert (rebuilt / "open_clip_model.safetensors").read_bytes() == \
            (LEGACY_RELEVANCE_DIR / "open_clip_model.safetensors").read_bytes()
        # and the reference texts (the CLIP's training captions) come along
        assert (rebuilt / "semclip_relevance.json").read_bytes() == \
            (LEGACY_RELEVANCE_DIR / "semclip_relevance.json").read_bytes()
    psi, tower = (load_file(str(d / "open_clip_model.safetensors")) for d in (LEGACY_RELEVANCE_DIR, LEGACY_TOWER_DIR))
    assert psi.keys() == tower.keys()
    assert [k for k in psi if psi[k].shape != tower[k].shape or not (psi[k] == tower[k]).all()] == \
        ["visual.positional_embedding"]


def test_the_160_px_psi_is_the_bundled_psi_with_its_position_grid_resized(tmp_path):
    """``SemClip-ViT-T-16-160`` (what ``semclip bench serve``'s ``semclip_160`` serves, built at run
    time): the bundled ψ's weights and reference texts, the position grid resized 14×14 → 10×10."""
    from safetensors.torch import load_file

    from vllm_semclip.relevance import RelevanceModel
    from vllm_semclip.tiny.train_clip import resize_local_dir

    small = resize_local_dir(DEFAULT_RELEVANCE_DIR, SMALL_RELEVANCE_MODEL_NAME, tmp_path / "psi-160")
    psi = RelevanceModel.from_pretrained(str(small))
    assert psi.image_size == 160 and psi.reference.texts == RelevanceModel.from_pretrained(
        str(DEFAULT_RELEVANCE_DIR)).reference.texts
    a, b = (load_file(str(d / "open_clip_model.safetensors")) for d in (small, DEFAULT_RELEVANCE_DIR))
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].shape != b[k].shape or not (a[k] == b[k]).all()] == ["visual.positional_embedding"]
    assert a["visual.positional_embedding"].shape[0] == 1 + 10 * 10


def test_no_random_init_warning_where_weights_follow_or_only_flops_are_counted(tmp_path, caplog):
    """open_clip warns "initialized randomly" for every model built without weights; where ψ's weights
    are loaded next (``load_as``, ``resize_local_dir``) or only its FLOPs are counted, that is not true
    of the result and is not said — and open_clip's own warning is left as it is elsewhere."""
    import logging

    import open_clip

    from vllm_semclip.cost import image_forward_flops
    from vllm_semclip.tiny.train_clip import resize_local_dir

    image_forward_flops.cache_clear()
    with caplog.at_level(logging.WARNING):
        resize_local_dir(DEFAULT_RELEVANCE_DIR, SMALL_RELEVANCE_MODEL_NAME, tmp_path / "psi-160")
        image_forward_flops(SMALL_RELEVANCE_MODEL_NAME)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        open_clip.create_model(SMALL_RELEVANCE_MODEL_NAME, pretrained=None)
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_bundled_psi_is_the_legacy_clip_fine_tuned_on_randomised_material():
    """The default ψ — the one the bundled LLaVA's config names, and its vision tower — is the
    legacy CLIP's architecture at 224 px, started from its weights and trained on the randomised
    ``train`` material by the recipe its report records (docs/tiny-models.md): from the legacy CLIP
    or, continued, from the ψ bundled before it; every weight of its image tower moved."""
    import torch
    from safetensors.torch import load_file

    from vllm_semclip.relevance import RelevanceModel

    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert (DEFAULT_MODEL_DIR / config["semclip_config"]["relevance_model"]).resolve() == DEFAULT_RELEVANCE_DIR
    assert RelevanceModel.from_pretrained(str(DEFAULT_RELEVANCE_DIR)).image_size == 224
    report = json.loads((DEFAULT_RELEVANCE_DIR / "train_report.json").read_text())
    assert report["render"] == "train" and report["config"]["render"] == "train"
    assert Path(report["config"]["init"]).name in {LEGACY_TOWER_DIR.name, DEFAULT_RELEVANCE_DIR.name}
    assert not report["config"]["lock_image"]
    assert DEFAULT_TOWER_DIR == DEFAULT_RELEVANCE_DIR
    psi, tower = (load_file(str(d / "open_clip_model.safetensors")) for d in (DEFAULT_RELEVANCE_DIR, LEGACY_TOWER_DIR))
    assert psi.keys() == tower.keys()
    assert all(psi[k].shape == tower[k].shape for k in psi)
    unchanged = [k for k in psi if k.startswith("visual.") and torch.equal(psi[k].float(), tower[k].float())]
    assert unchanged == []


def _scene_inputs(index: int, spatial: bool):
    from vllm_semclip.eval.benchdata import make_attribute, make_spatial
    from vllm_semclip.crops import candidate_boxes
    from vllm_semclip.eval.metrics import oracle_index

    image, rec = (make_spatial if spatial else make_attribute)(index, seed=4242, scale=0.4)
    candidates = candidate_boxes(*image.size, (2, 3))
    box = candidates[oracle_index(candidates, rec.target_boxes)]
    return image, rec, box


def test_vllm_greedy_answers_match_transformers(llm, model_dir, tokens_per_tile):
    """Same image, question and crop: vLLM with the plugin and transformers' LLaVA decode the same tokens.

    Both run in bf16 but with different kernels, so a step where transformers' two best tokens
    are within a rounding error of each other may go either way; there (and only there) the
    two may part, and vLLM's token must be one of transformers' two best. Every other step must agree.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from vllm import SamplingParams

    from vllm_semclip.config import SemClipConfig
    from vllm_semclip.crops import mean_fill
    from vllm_semclip.selection import select_crops, selected_tiles

    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    hf = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    pad_fill = mean_fill(processor.image_processor.image_mean)
    params = SamplingParams(temperature=0.0, max_tokens=14)
    full_matches = 0
    for index, spatial in ((0, False), (1, False), (2, False), (0, True), (1, True), (2, True)):
        image, rec, box = _scene_inputs(index, spatial)
        prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": rec.question}]}], add_generation_prompt=True, tokenize=False)
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image},
                            "mm_processor_kwargs": {"method": "given", "boxes": [list(box)]}}, params, use_tqdm=False)
        vllm_ids = list(out[0].outputs[0].token_ids)

        given = select_crops(image, rec.question, SemClipConfig(method="given", boxes=(box,)))
        tiles = selected_tiles(image, given, pad_fill, 448)
        pixel_values = processor.image_processor(tiles, return_tensors="pt")["pixel_values"].to(torch.bfloat16)
        ids = []
        for t in tok(prompt)["input_ids"]:
            ids.extend([t] * (len(tiles) * tokens_per_tile) if t == hf.config.image_token_index else [t])
        with torch.inference_mode():
            gen = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values, max_new_tokens=14,
                              do_sample=False, output_scores=True, return_dict_in_generate=True)
        hf_ids = gen.sequences[0, len(ids):].tolist()
        if tok.eos_token_id in hf_ids:
            hf_ids = hf_ids[:hf_ids.index(tok.eos_token_id) + 1]
        assert tok.decode(vllm_ids, skip_special_tokens=True).strip().startswith("The ")
        if vllm_ids == hf_ids:
            full_matches += 1
            continue
        step = next(i for i, (a, b) in enumerate(zip(vllm_ids, hf_ids)) if a != b)
        logprobs = torch.log_softmax(gen.scores[step][0].float(), -1)
        top2 = logprobs.topk(2)
        assert vllm_ids[:step] == hf_ids[:step]
        assert vllm_ids[step] in top2.indices.tolist(), (rec.question, tok.decode(vllm_ids), tok.decode(hf_ids))
        assert float(top2.values[0] - top2.values[1]) < 0.1, (rec.question, float(top2.values[0] - top2.values[1]))
    assert full_matches >= 4


def test_bundled_trained_psi_is_psi_with_a_text_tower_trained_on_crop_labels():
    """``--method trained`` serves ψ after distant supervision: started from the bundled ψ, image
    tower locked (every visual weight equal to ψ's), the text tower moved, the ranking loss."""
    import torch
    from safetensors.torch import load_file

    from vllm_semclip.tiny.bundled import DEFAULT_TRAINED_RELEVANCE_DIR

    config = json.loads((DEFAULT_TRAINED_RELEVANCE_DIR / "train_config.json").read_text())
    assert Path(config["init"]).name == DEFAULT_RELEVANCE_DIR.name
    assert config["lock_image"] and config["loss"] == "rank" and config["norm"] == "grid"
    trained, psi = (load_file(str(d / "open_clip_model.safetensors")) for d in (DEFAULT_TRAINED_RELEVANCE_DIR,
                                                                                 DEFAULT_RELEVANCE_DIR))
    assert trained.keys() == psi.keys()
    assert all(torch.equal(trained[k], psi[k]) for k in psi if k.startswith("visual."))
    assert any(not torch.equal(trained[k], psi[k]) for k in psi if not k.startswith("visual."))
