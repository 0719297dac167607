"""The SemClip processor inside vLLM's processing machinery (no engine needed).

In the style of vLLM's processor tests: count placeholder tokens across settings,
image counts and init-time vs per-request kwargs; check cached and uncached
processing agree; and check that the cache key follows the question.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PSI, MAX_TOPK, chat_prompt, encoded_tiles, make_processor
from PIL import Image
from vllm.multimodal.cache import MultiModalProcessorOnlyCache
from vllm.multimodal.processing.context import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs

from vllm_semclip.config import SemClipConfig, SemClipConfigError
from vllm_semclip.processor import QUESTIONS_KEY
from vllm_semclip.selection import select_crops, selected_tiles


def _apply(processor, prompt: str, images, kwargs=None, cache=None, uuids=None):
    tokenizer = processor.info.get_tokenizer()
    ids = tokenizer(prompt)["input_ids"]
    items = processor.info.parse_mm_data({"image": images})
    inputs = ProcessorInputs(
        prompt=ids,
        mm_data_items=items,
        mm_uuid_items={"image": uuids} if uuids else None,
        hf_processor_mm_kwargs=kwargs or {},
        cache=cache,
    )
    return processor.apply(inputs, TimingContext(enabled=False))


def _count_image_tokens(processor, out) -> int:
    image_token_id = processor.info.get_hf_config().image_token_index
    return sum(1 for t in out["prompt_token_ids"] if t == image_token_id)


def _pixel_values(out, processor) -> torch.Tensor:
    """What reaches the vision tower: [overview, crops] per image, in either selection stage."""
    return encoded_tiles(out, processor)


@pytest.mark.parametrize("num_images", [1, 2, 3])
@pytest.mark.parametrize("topk", [0, 1, 2, 3])
def test_placeholders_per_request_kwargs(processor, photo, tokens_per_tile, num_images, topk):
    prompt = chat_prompt("What is the color of the flag?", num_images)
    out = _apply(processor, prompt, [photo] * num_images, {"topk": topk})
    assert _count_image_tokens(processor, out) == num_images * (1 + topk) * tokens_per_tile
    ranges = out["mm_placeholders"]["image"]
    assert [r.length for r in ranges] == [(1 + topk) * tokens_per_tile] * num_images
    assert _pixel_values(out, processor).shape[0] == num_images * (1 + topk)


@pytest.mark.parametrize("topk", [0, 2])
def test_placeholders_init_time_vs_per_request(model_dir, photo, tokens_per_tile, topk):
    prompt = chat_prompt("What is the color of the flag?")
    via_hf_overrides, _ = make_processor(model_dir, {"topk": topk})
    via_server_kwargs, _ = make_processor(model_dir, None, mm_processor_kwargs={"topk": topk, "max_topk": 3})
    via_request, _ = make_processor(model_dir, {"max_topk": 3})
    outs = [
        _apply(via_hf_overrides, prompt, [photo]),
        _apply(via_server_kwargs, prompt, [photo]),
        _apply(via_request, prompt, [photo], {"topk": topk}),
    ]
    for out in outs:
        assert _count_image_tokens(via_request, out) == (1 + topk) * tokens_per_tile
    assert outs[0]["prompt_token_ids"] == outs[1]["prompt_token_ids"] == outs[2]["prompt_token_ids"]
    assert torch.equal(_pixel_values(outs[0], via_hf_overrides), _pixel_values(outs[2], via_request))


@pytest.mark.parametrize("method, grids, expected", [("all", [2, 3], 17), ("all", [2], 4), ("overview", [2, 3], 0), ("random", [2], 1)])
def test_methods_token_counts(model_dir, photo, tokens_per_tile, method, grids, expected):
    processor, _ = make_processor(model_dir, {"method": "all"})  # profiled for every candidate
    out = _apply(processor, chat_prompt("What is the color of the flag?"), [photo],
                 {"method": method, "grids": grids, "topk": 1})
    assert _count_image_tokens(processor, out) == (1 + expected) * tokens_per_tile


def test_tiles_are_exactly_select_crops(processor, photo):
    """The processor encodes [overview] + the boxes select_crops() returns, nothing else."""
    question = "What is the color of the flag?"
    out = _apply(processor, chat_prompt(question), [photo], {"topk": 2})
    config = SemClipConfig(relevance_model=PSI, topk=2, max_topk=MAX_TOPK)
    selection = select_crops(photo, question, config)
    assert selection.num_crops == 2
    tiles = selected_tiles(photo, selection, processor.info.pad_fill, 2 * processor.info.tile_size)
    expected = processor.info.get_hf_processor().image_processor(tiles, return_tensors="pt")["pixel_values"]
    assert torch.allclose(_pixel_values(out, processor).float(), expected.to(torch.bfloat16).float())


def test_cached_and_uncached_processing_agree(model_dir, photo):
    processor, model_config = make_processor(model_dir, {"max_topk": MAX_TOPK})
    cache = MultiModalProcessorOnlyCache(model_config)
    other = Image.fromarray(__import__("skimage.data", fromlist=["coffee"]).coffee())
    prompt = chat_prompt("Is the circle on the left or right side of the cross?", 2)
    kwargs = {"topk": 2}
    uncached = _apply(processor, prompt, [photo, other], kwargs)
    first = _apply(processor, prompt, [photo, other], kwargs, cache=cache)
    second = _apply(processor, prompt, [photo, other], kwargs, cache=cache)  # served from the cache
    stats = cache.make_stats()
    assert stats.hits >= 2, stats
    for out in (first, second):
        assert out["prompt_token_ids"] == uncached["prompt_token_ids"]
        assert out["mm_hashes"] == uncached["mm_hashes"]
        assert torch.equal(_pixel_values(out, processor), _pixel_values(uncached, processor))
        assert out["mm_placeholders"] == uncached["mm_placeholders"]


def test_cache_key_follows_the_question(model_dir, photo):
    processor, model_config = make_processor(model_dir, {"max_topk": MAX_TOPK})
    cache = MultiModalProcessorOnlyCache(model_config)
    a = _apply(processor, chat_prompt("What is the color of the flag?"), [photo], cache=cache)
    b = _apply(processor, chat_prompt("What is the astronaut holding?"), [photo], cache=cache)
    a2 = _apply(processor, chat_prompt("What is the color of the flag?"), [photo], cache=cache)
    assert a["mm_hashes"]["image"] != b["mm_hashes"]["image"]
    assert a["mm_hashes"] == a2["mm_hashes"]
    stats = cache.make_stats()
    assert (stats.hits, stats.total) == (1, 3), stats
    # per-request settings enter the key too
    c = _apply(processor, chat_prompt("What is the color of the flag?"), [photo], {"topk": 2}, cache=cache)
    assert c["mm_hashes"]["image"] != a["mm_hashes"]["image"]


def test_cache_key_with_client_uuid(processor, photo):
    """A client-supplied multi_modal_uuid names the image; the question still enters the key."""
    a = _apply(processor, chat_prompt("What is the color of the flag?"), [photo], uuids=["photo-1"])
    b = _apply(processor, chat_prompt("What is the astronaut holding?"), [photo], uuids=["photo-1"])
    a2 = _apply(processor, chat_prompt("What is the color of the flag?"), [photo], uuids=["photo-1"])
    assert a["mm_hashes"]["image"] != b["mm_hashes"]["image"]
    assert a["mm_hashes"] == a2["mm_hashes"]


def test_question_does_not_split_cache_when_it_cannot_matter(processor, photo):
    """With no crops (topk=0 / overview) the question is irrelevant, so it stays out of the key."""
    a = _apply(processor, chat_prompt("What is the color of the flag?"), [photo], {"topk": 0})
    b = _apply(processor, chat_prompt("What is the astronaut holding?"), [photo], {"topk": 0})
    assert a["mm_hashes"] == b["mm_hashes"]


def test_each_image_gets_its_own_selection(processor, tokens_per_tile):
    """Two images in one prompt: each is scored on its own pixels."""
    from skimage import data

    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]
    question = "What is the color of the cup?"
    out = _apply(processor, chat_prompt(question, 2), images, {"topk": 1})
    config = SemClipConfig(relevance_model=PSI, max_topk=MAX_TOPK)
    pv = _pixel_values(out, processor)
    ip = processor.info.get_hf_processor().image_processor
    for i, image in enumerate(images):
        tiles = selected_tiles(image, select_crops(image, question, config), processor.info.pad_fill,
                               2 * processor.info.tile_size)
        expected = ip(tiles, return_tensors="pt")["pixel_values"].to(torch.bfloat16)
        assert torch.equal(pv[2 * i: 2 * i + 2], expected)


def test_image_only_prompt_gets_overview_only(processor, photo, tokens_per_tile):
    out = _apply(processor, "USER: <image>\n ASSISTANT:", [photo], {"topk": 3})
    assert _count_image_tokens(processor, out) == tokens_per_tile


@pytest.mark.parametrize("size", [(1, 1), (10, 3000), (3000, 10), (5, 7)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_odd_images_degrade_gracefully(processor, tokens_per_tile, size, mode):
    image = Image.new("RGB", size, (200, 30, 30)).convert(mode) if mode != "I;16" else Image.new("I;16", size, 40000)
    out = _apply(processor, chat_prompt("What is the color of the square?"), [image], {"topk": 2})
    assert _count_image_tokens(processor, out) == 3 * tokens_per_tile
    assert torch.isfinite(_pixel_values(out, processor).float()).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [({"topk": 4}, "topk"), ({"topk": "x"}, "topk"), ({"foo": 1}, "foo"), ({"method": "all"}, "method"),
     ({"relevance_model": "ViT-B-32"}, "relevance_model"), ({QUESTIONS_KEY: ["injected"]}, QUESTIONS_KEY)],
)
def test_bad_kwargs_raise_typed_error(processor, photo, kwargs, field):
    with pytest.raises(SemClipConfigError) as info:
        _apply(processor, chat_prompt("What is the color of the flag?"), [photo], kwargs)
    assert info.value.parameter == field


def test_dummy_inputs_are_the_worst_case(model_dir, tokens_per_tile):
    for server, crops in (({"max_topk": 3}, 3), ({"topk": 2}, 2), ({"method": "all"}, 17), ({"topk": 0}, 0)):
        processor, _ = make_processor(model_dir, server)
        assert processor.info.get_max_image_tokens() == (1 + crops) * tokens_per_tile
        mm = processor.get_dummy_mm_inputs({"image": 2})
        lengths = [r.length for r in mm["mm_placeholders"]["image"]]
        assert lengths == [(1 + crops) * tokens_per_tile] * 2, server


def test_bad_server_config_fails_at_start(model_dir):
    processor, _ = make_processor(model_dir, {"topk": 12})
    with pytest.raises(SemClipConfigError, match="topk"):
        processor.info.server_config


def _model_without_psi(model_dir: str, tmp_path) -> str:
    """The bundled LLaVA's files (weights aside: the processor never reads them), its config naming no ψ."""
    import json
    import shutil
    from pathlib import Path

    out = tmp_path / "llava-no-psi"
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config.pop("semclip_config")
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def test_a_model_that_names_no_psi_is_refused_when_the_server_starts(model_dir, tmp_path):
    """Profiling reads the server config first: a ψ method with no ψ stops start-up, naming the field;
    a method that needs no ψ, or a ψ named by the server, starts."""
    from vllm_semclip.config import SemClipConfigError

    bare = _model_without_psi(model_dir, tmp_path)
    proc, _ = make_processor(bare)
    with pytest.raises(SemClipConfigError, match="relevance_model is not set") as err:
        proc.info.server_config
    assert err.value.parameter == "relevance_model"
    assert make_processor(bare, {"method": "random"})[0].info.server_config.relevance_model is None
    assert make_processor(bare, {"relevance_model": PSI})[0].info.server_config.relevance_model == PSI


def test_a_psi_that_cannot_load_stops_the_server_at_start(model_dir):
    """Plain vLLM with --hf-overrides: a misspelt ψ is refused when the processor is built (start-up),
    naming the field and the value, not on every request."""
    from vllm_semclip.config import SemClipConfigError

    proc, _ = make_processor(model_dir, {"relevance_model": "ViT-B-17"})
    with pytest.raises(SemClipConfigError, match="relevance_model='ViT-B-17'") as err:
        proc.info.server_config
    assert err.value.parameter == "relevance_model"
    proc, _ = make_processor(model_dir, {"device": "gpu0"})
    with pytest.raises(SemClipConfigError, match="device='gpu0'"):
        proc.info.server_config
