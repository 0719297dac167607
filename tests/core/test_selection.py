"""ψ on open_clip and select_crops(): models by name or path, methods, degradation."""

import pytest
import torch
from PIL import Image

from vllm_semclip import SemClipConfig, select_crops
from vllm_semclip.tiny.cards import CAPTIONS
from vllm_semclip.relevance import RelevanceModel, get_relevance_model
from vllm_semclip.tiny.bundled import DEFAULT_RELEVANCE_DIR, RELEVANCE_MODEL_NAME
from conftest import PSI


@pytest.fixture(scope="module")
def crops(photo):
    return [photo.crop((0, 0, 256, 256)), photo.crop((256, 256, 512, 512)), photo.resize((64, 48))]


@pytest.mark.engine
def test_local_dir_and_named_config_with_checkpoint_agree_up_to_the_reference(model_dir, crops):
    """The same weights by directory or by name + checkpoint file; the directory also carries ψ's
    reference texts (its training captions), whose mean similarity it subtracts — a named model has none."""
    by_dir = RelevanceModel.from_pretrained(str(DEFAULT_RELEVANCE_DIR))
    by_name = RelevanceModel.from_pretrained(RELEVANCE_MODEL_NAME, str(DEFAULT_RELEVANCE_DIR / "open_clip_model.safetensors"))
    assert by_name.reference is None and by_dir.reference.texts == CAPTIONS and by_dir.reference.weight == 1.0
    question = "What is the color of the triangle?"
    plain = by_name.score(question, crops)
    reference_mean = torch.stack([by_name.score(t, crops) for t in CAPTIONS]).mean(dim=0)  # v·mean(r) = mean(v·r)
    assert plain.shape == (3,) and (plain.abs() <= 1.0001).all()
    assert torch.allclose(by_dir.score(question, crops), plain - reference_mean, atol=1e-5)
    assert by_dir.image_size == 224  # SemClip-ViT-T-16: the tower's config, retrained on the randomised material


def test_reference_texts_round_trip_and_are_validated(tmp_path):
    import open_clip

    from vllm_semclip.relevance import TextReference, save_local_dir
    from vllm_semclip.tiny.bundled import register_model_configs

    register_model_configs()
    model = open_clip.create_model(RELEVANCE_MODEL_NAME, pretrained=None)
    cfg = open_clip.get_model_config(RELEVANCE_MODEL_NAME)
    reference = TextReference(("a red circle", "a blue square"), weight=0.5)
    save_local_dir(model, cfg, tmp_path, reference=reference)
    assert TextReference.load(tmp_path) == reference
    assert RelevanceModel.from_pretrained(str(tmp_path)).reference == reference
    save_local_dir(model, cfg, tmp_path)  # saved again without one: no stale reference left behind
    assert TextReference.load(tmp_path) is None and RelevanceModel.from_pretrained(str(tmp_path)).reference is None
    with pytest.raises(ValueError, match="non-empty strings"):
        TextReference(())
    with pytest.raises(ValueError, match="non-empty strings"):
        TextReference(("a red circle", " "))
    with pytest.raises(ValueError, match="weight"):
        TextReference(("a red circle",), weight=-1.0)
    (tmp_path / TextReference.FILE).write_text('{"texts": ["a red circle"]}')
    with pytest.raises(ValueError, match="reference_texts"):
        RelevanceModel.from_pretrained(str(tmp_path))


def test_weight_zero_scores_by_plain_cosine(tmp_path, crops):
    import shutil

    from vllm_semclip.relevance import TextReference

    shutil.copytree(DEFAULT_RELEVANCE_DIR, tmp_path / "psi")
    TextReference(CAPTIONS, weight=0.0).save(tmp_path / "psi")
    plain = RelevanceModel.from_pretrained(RELEVANCE_MODEL_NAME, str(DEFAULT_RELEVANCE_DIR / "open_clip_model.safetensors"))
    off = RelevanceModel.from_pretrained(str(tmp_path / "psi"))
    assert torch.allclose(off.score("a red triangle", crops), plain.score("a red triangle", crops), atol=1e-6)


def test_builtin_open_clip_name_loads(crops):
    """A stock open_clip config by name (random weights here: no hub), same code as ViT-L-14-336/openai."""
    psi = RelevanceModel.from_pretrained("ViT-B-32", None)
    scores = psi.score("a photo of an astronaut", crops)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores.abs() <= 1.0001).all()


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="neither an open_clip model name"):
        RelevanceModel.from_pretrained("No-Such-Model-42")


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_low_precision_psi_ranks_crops_as_fp32(model_dir, photo, precision):
    """open_clip's precision argument: bf16 weights (×0.7–0.8 of ψ's CPU time here), the same ranking
    (of ψ's raw scores, whose scale the tolerance is in)."""
    fp32 = select_crops(photo, "What is the color of the flag?", SemClipConfig(relevance_model=PSI, topk=3, relevance_norm="none"))
    low = select_crops(photo, "What is the color of the flag?",
                       SemClipConfig(relevance_model=PSI, topk=3, relevance_precision=precision, relevance_norm="none"))
    psi = get_relevance_model(str(DEFAULT_RELEVANCE_DIR), None, "cpu", precision)
    assert psi.input_dtype == torch.bfloat16 and psi is not get_relevance_model(str(DEFAULT_RELEVANCE_DIR))
    assert torch.allclose(torch.tensor(low.candidate_scores), torch.tensor(fp32.candidate_scores), atol=2e-2)
    assert low.candidate_scores != fp32.candidate_scores  # really computed in bf16
    # where the pick differs it is a near-tie in fp32 (agreement on the benchmark: selection_latency.py)
    pick = low.candidates.index(low.boxes[0])
    assert fp32.candidate_scores[pick] >= max(fp32.candidate_scores) - 2e-2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_psi_attention_is_fused_and_computes_open_clips_function(precision):
    """ψ's image tower runs open_clip's fused-attention block (F.scaled_dot_product_attention) on the
    very parameters open_clip loaded — same names, dtypes and storage — and gives its features to float
    rounding; a view's features do not depend on the batch around it."""
    import open_clip
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    from vllm_semclip.relevance import fuse_attention

    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{PSI}", precision=precision)
    plain.eval()
    psi = RelevanceModel.from_pretrained(PSI, precision=precision)
    blocks = psi.model.visual.transformer.resblocks
    assert all(type(b) is CustomResidualAttentionBlock for b in blocks)
    assert all(type(b) is ResidualAttentionBlock for b in plain.visual.transformer.resblocks)
    fused_state, plain_state = psi.model.state_dict(), plain.state_dict()
    assert fused_state.keys() == plain_state.keys()
    assert all(fused_state[k].dtype == plain_state[k].dtype and torch.equal(fused_state[k], plain_state[k]) for k in plain_state)
    views = torch.rand(5, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = plain.encode_image(views.to(psi.input_dtype)).float()
        got = psi.model.encode_image(views.to(psi.input_dtype)).float()
        alone = psi.model.encode_image(views[2:3].to(psi.input_dtype)).float()
    tolerance = 1e-4 if precision == "fp32" else 5e-2
    assert torch.allclose(got, want, atol=tolerance) and not torch.equal(got, torch.zeros_like(got))
    assert torch.allclose(alone[0], got[2], atol=tolerance)
    assert fuse_attention(psi.model.visual) == 0  # nothing plain is left; the text tower keeps its blocks
    assert all(type(b) is ResidualAttentionBlock for b in psi.model.transformer.resblocks)


def test_fused_attention_keeps_the_towers_own_norms_and_activation():
    """A tower built with other norm eps and activation (open_clip's ``norm_kwargs``, as SigLIP's
    towers have, or a tanh GELU) computes the same function after fusing, and its blocks keep them."""
    import functools

    from open_clip.transformer import CustomResidualAttentionBlock, LayerNorm, VisionTransformer

    from vllm_semclip.relevance import fuse_attention

    torch.manual_seed(0)
    tower = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=32,
                              norm_layer=functools.partial(LayerNorm, eps=0.1), ls_init_value=0.5,
                              act_layer=functools.partial(torch.nn.GELU, approximate="tanh")).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        want = tower(x)
        assert fuse_attention(tower) == 2
        got = tower(x)
    block = tower.transformer.resblocks[0]
    assert type(block) is CustomResidualAttentionBlock
    assert block.ln_1.eps == block.ln_2.eps == 0.1 and block.mlp.gelu.approximate == "tanh"
    assert torch.allclose(got, want, atol=1e-5) and want.abs().sum() > 0


def test_text_embeddings_are_cached(model_dir, crops):
    psi = get_relevance_model(str(DEFAULT_RELEVANCE_DIR))
    assert get_relevance_model(str(DEFAULT_RELEVANCE_DIR)) is psi
    psi.score("what is in the corner?", crops)
    cached = psi._text_cache["what is in the corner?"]
    psi.score("what is in the corner?", crops[:1])
    assert psi._text_cache["what is in the corner?"] is cached


def test_relevance_picks_the_top_scores(model_dir, photo):
    """Ranked by ψ's scores standardised within each grid (the default), or by the raw scores;
    ``scores`` are ψ's own either way. A question where the two disagree, so each is seen."""
    question = "What is the color of the flag?"
    sel = select_crops(photo, question, SemClipConfig(relevance_model=PSI, topk=3))
    raw = select_crops(photo, question, SemClipConfig(relevance_model=PSI, topk=3, relevance_norm="none"))
    assert len(sel.candidates) == 17 and len(sel.candidate_scores) == 17
    assert raw.candidate_scores == sel.candidate_scores and raw.ranking_scores == raw.candidate_scores
    s = torch.tensor(sel.candidate_scores, dtype=torch.float64)
    # per grid: 4 cells, 9 cells; then the 4 bridges among themselves
    z = torch.cat([(g - g.mean()) / g.std(unbiased=False) for g in (s[:4], s[4:13], s[13:])])
    assert torch.allclose(torch.tensor(sel.ranking_scores, dtype=torch.float64), z, atol=1e-6)
    for chosen, by in ((sel, z.tolist()), (raw, sel.candidate_scores)):
        best = sorted(range(17), key=lambda i: -by[i])[:3]
        assert chosen.boxes == [chosen.candidates[i] for i in best]
        assert chosen.scores == [chosen.candidate_scores[i] for i in best]
    assert sel.boxes != raw.boxes


def test_rank_scores_standardises_within_each_grid():
    """A fine cell that stands out among its grid outranks a coarse cell of higher raw score."""
    from vllm_semclip.crops import rank_scores

    scores = [0.5, 0.6, 0.7, 0.8, *[0.0] * 8, 0.65]  # grid 2: four cells, all high; grid 3: one stands out
    ranked = rank_scores(scores, (2, 3), bridges=False)
    assert ranked[:4] == pytest.approx([-1.3416, -0.4472, 0.4472, 1.3416], abs=1e-4)
    assert ranked[12] == pytest.approx(8 ** 0.5) and max(range(13), key=ranked.__getitem__) == 12
    assert rank_scores(scores, (2, 3), "none", bridges=False) == scores  # raw: the coarse cell 3 would win
    with_bridges = rank_scores([*scores, 0.1, 0.0, 0.0, 0.0], (2, 3))  # the bridges: a group of their own
    assert with_bridges[:13] == pytest.approx(ranked[:13])  # the cells' ranks are the cells' alone
    assert with_bridges[13:] == pytest.approx([3 ** 0.5, -(3 ** -0.5), -(3 ** -0.5), -(3 ** -0.5)])
    assert rank_scores([0.5, 0.1, 0.2, 0.3, 0.4], (1, 2))[0] == 0.0  # a one-cell grid has no spread
    assert rank_scores([0.7] * 4, (2,)) == [0.0] * 4
    with pytest.raises(ValueError, match="13 scores for grids"):
        rank_scores(scores, (3,))
    with pytest.raises(ValueError, match="norm must be one of"):
        rank_scores(scores, (2, 3), "softmax")


def test_windows_score_a_region_by_its_best_square_and_pad_sees_it_padded(model_dir, photo):
    """``relevance_fit="windows"`` (the default): a non-square region scores as the best of the
    squares covering it (each scored alone); a square region is its own one view, the same as
    padded. ``pad`` scores the padded region — another view, another score — and select_crops
    follows the config."""
    from vllm_semclip.crops import square_windows

    psi = get_relevance_model(str(DEFAULT_RELEVANCE_DIR))
    question = "What is the color of the circle?"
    boxes = [(0, 0, 300, 150), (100, 100, 300, 300), (50, 0, 150, 400)]
    pixels, index = psi.region_views(photo, boxes, "windows")
    assert pixels.shape[0] == 2 + 1 + 4 and index.shape == (3, 4)
    windows = psi.score_regions(question, photo, boxes)
    for box, score in zip(boxes, windows):
        alone = psi.score_regions(question, photo, square_windows(box), fit="pad")  # squares: padding adds nothing
        assert float(score) == pytest.approx(float(alone.max()), abs=1e-4)
    padded = psi.score_regions(question, photo, boxes, fit="pad")
    assert float(padded[1]) == pytest.approx(float(windows[1]), abs=1e-4)
    assert abs(float(padded[0]) - float(windows[0])) > 1e-3 and abs(float(padded[2]) - float(windows[2])) > 1e-3
    wide = photo.crop((0, 0, 512, 300))
    a = select_crops(wide, question, SemClipConfig(relevance_model=PSI))
    b = select_crops(wide, question, SemClipConfig(relevance_model=PSI, relevance_fit="pad"))
    assert a.candidates == b.candidates and a.candidate_scores != pytest.approx(b.candidate_scores, abs=1e-4)
    assert a.candidate_scores == pytest.approx(psi.score_regions(question, wide, a.candidates).tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="fit"):
        psi.region_views(photo, boxes, "stretch")


@pytest.mark.parametrize("scale", [0.9, 2.0])
def test_psi_views_are_open_clips_preprocessing_in_eight_bits(photo, scale):
    """ψ's views travel as uint8 (front end → engine) and become ψ's input by its mean and std: the
    result is open_clip's own preprocessing of the PIL crop (resize, centre crop, 8 bits, normalise),
    for a region smaller than ψ's input (upsampled) and one twice its size (the photo downscaled
    once, by 1/2, before the cut; at other factors the cut lands within a pixel of the reduced copy)."""
    import open_clip

    psi = get_relevance_model(PSI)
    side = int(psi.image_size * scale)
    assert 60 + side <= min(photo.size)
    box = (40, 60, 40 + side, 60 + side)  # square: open_clip's transform and ψ's path see the same region
    pixels = psi.region_pixels(photo, [box], pad_to_square=True)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (1, 3, psi.image_size, psi.image_size)
    transform = open_clip.image_transform(psi.image_size, is_train=False, mean=psi.model.visual.image_mean,
                                          std=psi.model.visual.image_std)
    want = transform(photo.crop(box))
    got = psi.normalize(pixels)[0]
    assert torch.equal(got, psi.region_batch(photo, [box], True)[0])
    # open_clip's own arithmetic on these 8 bits (ToTensor's x / 255, then Normalize), bit for bit
    from torchvision.transforms.functional import normalize

    assert torch.equal(got, normalize(pixels[0].float().div(255), psi.model.visual.image_mean, psi.model.visual.image_std))
    std = torch.tensor(psi.model.visual.image_std).view(3, 1, 1)
    assert ((got - want).abs() * std).mean() < 2 / 255  # PIL's and torch's bicubic differ by a grey level or so
    assert psi.image_features(pixels).allclose(psi.image_features(got[None]), atol=1e-6)


def test_psi_views_cut_from_the_array_are_the_views_of_the_image(photo):
    """The engine stage copies a request's image out of Pillow once: ψ's views cut from that array are
    bit for bit the views cut from the PIL image (every fit, a region padded with ψ's mean as 8 bits),
    and the array the engine cuts the chosen crops from is the image's own pixels."""
    import numpy as np

    from vllm_semclip.relevance import image_array
    from vllm_semclip.selection import prepare_psi_inputs

    psi = get_relevance_model(PSI)
    boxes = [(0, 0, 300, 150), (100, 100, 300, 300), (50, 0, 150, 400), (10, 20, 30, 25)]
    array = image_array(photo)
    assert array.dtype == torch.uint8 and tuple(array.shape) == (photo.size[1], photo.size[0], 3)
    for fit in ("windows", "pad", "center"):
        from_image, index = psi.region_views(photo, boxes, fit)
        from_array, index_array = psi.region_views(array, boxes, fit)
        assert torch.equal(from_image, from_array) and torch.equal(index, index_array)
    padded = psi.region_pixels(photo, [(0, 0, 400, 40)], pad_to_square=True)[0]  # a 10:1 band: mostly fill
    fill = [round(255 * m) for m in psi.model.visual.image_mean]
    assert padded[:, 0, psi.image_size // 2].tolist() == fill  # top edge, mid column: the pad, untouched
    prepared = prepare_psi_inputs(photo, "What is the colour of the star?", SemClipConfig(relevance_model=PSI))
    assert np.array_equal(prepared.image.numpy(), np.array(photo.convert("RGB")))
    assert torch.equal(prepared.pixels, psi.region_views(photo, prepared.candidates, "windows")[0])


def test_random_is_seeded_and_reproducible(photo):
    cfg = SemClipConfig(relevance_model=PSI, method="random", topk=2)
    a = select_crops(photo, "q", cfg)
    assert select_crops(photo, "q", cfg).boxes == a.boxes and len(a.boxes) == 2 and a.scores == [None, None]
    picks = {tuple(select_crops(photo, "q", SemClipConfig(relevance_model=PSI, method="random", topk=2, seed=s)).boxes) for s in range(8)}
    assert len(picks) > 1  # the seed matters


def test_all_and_overview(photo):
    assert select_crops(photo, "q", SemClipConfig(relevance_model=PSI, method="all")).boxes == select_crops(photo, "q", SemClipConfig(relevance_model=PSI)).candidates
    assert select_crops(photo, "q", SemClipConfig(relevance_model=PSI, method="overview", topk=3)).boxes == []
    assert select_crops(photo, "q", SemClipConfig(relevance_model=PSI, topk=0)).boxes == []


def test_no_question_means_no_crops_for_relevance(model_dir, photo):
    assert select_crops(photo, "   ", SemClipConfig(relevance_model=PSI, topk=2)).boxes == []


@pytest.mark.parametrize("size", [(1, 1), (10, 3000), (3, 2)])
def test_degenerate_images(model_dir, size):
    sel = select_crops(Image.new("RGB", size, (9, 9, 9)), "What is the color of the square?", SemClipConfig(relevance_model=PSI, topk=2))
    assert len(sel.boxes) == 2
    assert all(0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1] for x0, y0, x1, y1 in sel.boxes)


@pytest.mark.parametrize("model, pretrained, device, field", [
    ("ViT-B-17", None, "cpu", "relevance_model"),            # no such open_clip model
    ("/", None, "cpu", "relevance_model"),                   # a directory, not a local-dir checkpoint
    ("ViT-B-16", "no-such-tag", "cpu", "relevance_pretrained"),
    (PSI, None, "gpu0", "device"),
    (PSI, None, "cuda:7", "device"),
])
def test_a_psi_that_cannot_load_is_refused_before_loading(model, pretrained, device, field):
    from vllm_semclip.config import SemClipConfigError
    from vllm_semclip.relevance import check_relevance_source

    with pytest.raises(SemClipConfigError, match=field) as err:
        check_relevance_source(model, pretrained, device)
    assert err.value.parameter == field


def test_a_loadable_psi_passes_the_check():
    from vllm_semclip.relevance import check_relevance_source

    check_relevance_source(PSI)
    check_relevance_source("ViT-B-16", "openai")  # a tag open_clip knows; nothing is downloaded
