"""ψ on open_clip and select_crops(): models by name or path, methods, degradation."""

import pytest
import torch
from PIL import Image

from vllm_semclip import SemClipConfig, select_crops
from vllm_semclip.relevance import RelevanceModel, get_relevance_model
from vllm_semclip.tiny_models import DEFAULT_RELEVANCE_DIR, RELEVANCE_MODEL_NAME


@pytest.fixture(scope="module")
def crops(photo):
    return [photo.crop((0, 0, 256, 256)), photo.crop((256, 256, 512, 512)), photo.resize((64, 48))]


def test_local_dir_and_named_config_with_checkpoint_agree(model_dir, crops):
    by_dir = RelevanceModel.from_pretrained(str(DEFAULT_RELEVANCE_DIR))
    by_name = RelevanceModel.from_pretrained(RELEVANCE_MODEL_NAME, str(DEFAULT_RELEVANCE_DIR / "open_clip_model.safetensors"))
    a, b = by_dir.score("a red triangle", crops), by_name.score("a red triangle", crops)
    assert a.shape == (3,) and torch.allclose(a, b, atol=1e-6)
    assert by_dir.image_size == 336  # SemClip-ViT-T-16-336, as ViT-L-14-336 for real LLaVA-1.5


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
    """open_clip's precision argument: bf16 weights (×0.7–0.8 of ψ's CPU time here), the same ranking."""
    fp32 = select_crops(photo, "What is the color of the flag?", SemClipConfig(topk=3))
    low = select_crops(photo, "What is the color of the flag?", SemClipConfig(topk=3, relevance_precision=precision))
    psi = get_relevance_model(str(DEFAULT_RELEVANCE_DIR), None, "cpu", precision)
    assert psi.input_dtype == torch.bfloat16 and psi is not get_relevance_model(str(DEFAULT_RELEVANCE_DIR))
    assert torch.allclose(torch.tensor(low.candidate_scores), torch.tensor(fp32.candidate_scores), atol=2e-2)
    assert low.candidate_scores != fp32.candidate_scores  # really computed in bf16
    # where the pick differs it is a near-tie in fp32 (agreement on the benchmark: selection_latency.py)
    pick = low.candidates.index(low.boxes[0])
    assert fp32.candidate_scores[pick] >= max(fp32.candidate_scores) - 2e-2


def test_text_embeddings_are_cached(model_dir, crops):
    psi = get_relevance_model(str(DEFAULT_RELEVANCE_DIR))
    assert get_relevance_model(str(DEFAULT_RELEVANCE_DIR)) is psi
    psi.score("what is in the corner?", crops)
    cached = psi._text_cache["what is in the corner?"]
    psi.score("what is in the corner?", crops[:1])
    assert psi._text_cache["what is in the corner?"] is cached


def test_relevance_picks_the_top_scores(model_dir, photo):
    sel = select_crops(photo, "What is the color of the flag?", SemClipConfig(topk=3))
    assert len(sel.candidates) == 13 and len(sel.candidate_scores) == 13
    best = sorted(range(13), key=lambda i: -sel.candidate_scores[i])[:3]
    assert sel.boxes == [sel.candidates[i] for i in best]
    assert sel.scores == [sel.candidate_scores[i] for i in best]


def test_random_is_seeded_and_reproducible(photo):
    cfg = SemClipConfig(method="random", topk=2)
    a = select_crops(photo, "q", cfg)
    assert select_crops(photo, "q", cfg).boxes == a.boxes and len(a.boxes) == 2 and a.scores == [None, None]
    picks = {tuple(select_crops(photo, "q", SemClipConfig(method="random", topk=2, seed=s)).boxes) for s in range(8)}
    assert len(picks) > 1  # the seed matters


def test_all_and_overview(photo):
    assert select_crops(photo, "q", SemClipConfig(method="all")).boxes == select_crops(photo, "q").candidates
    assert select_crops(photo, "q", SemClipConfig(method="overview", topk=3)).boxes == []
    assert select_crops(photo, "q", SemClipConfig(topk=0)).boxes == []


def test_no_question_means_no_crops_for_relevance(model_dir, photo):
    assert select_crops(photo, "   ", SemClipConfig(topk=2)).boxes == []


@pytest.mark.parametrize("size", [(1, 1), (10, 3000), (3, 2)])
def test_degenerate_images(model_dir, size):
    sel = select_crops(Image.new("RGB", size, (9, 9, 9)), "What is the color of the square?", SemClipConfig(topk=2))
    assert len(sel.boxes) == 2
    assert all(0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1] for x0, y0, x1, y1 in sel.boxes)
