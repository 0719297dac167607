"""Selection in the engine stage: the processor sends ψ's views of every candidate, the overview's tile
and the decoded image; the model's encoder step runs ψ for the whole batch, keeps what ``select_crops``
keeps — alone or batched with other requests — and cuts only those crops, pixel for pixel as the
processor stage cuts them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PSI, MAX_TOPK, chat_prompt, encoded_tiles, make_processor
from PIL import Image
from vllm.multimodal.processing.context import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs

from vllm_semclip.config import SemClipConfig, SemClipConfigError
from vllm_semclip.model import PsiBatch, choose_tiles, parse_psi_batch
from vllm_semclip.processor import ENGINE_FIELDS, tile_pixel_values
from vllm_semclip.relevance import RelevanceModel, get_relevance_model
from vllm_semclip.selection import select_crops, selected_tiles

QUESTIONS = ["What is the color of the flag?", "What is the astronaut holding?",
             "Is the rocket on the left or right side of the woman?", "What color is the helmet?"]


def _apply(processor, question: str, images, kwargs=None):
    ids = processor.info.get_tokenizer()(chat_prompt(question, len(images)))["input_ids"]
    inputs = ProcessorInputs(prompt=ids, mm_data_items=processor.info.parse_mm_data({"image": images}),
                             hf_processor_mm_kwargs=kwargs or {})
    return processor.apply(inputs, TimingContext(enabled=False))


@pytest.fixture(scope="module")
def images(photo):
    from skimage import data

    return [photo, Image.fromarray(data.coffee()), photo.crop((0, 0, 512, 200))]


def test_the_processor_sends_psis_views_the_overview_and_the_image(processor, photo, tokens_per_tile):
    out = _apply(processor, QUESTIONS[0], [photo], {"topk": 2})
    item = out["mm_kwargs"]["image"][0]
    assert set(ENGINE_FIELDS) <= set(item)
    assert int(item["num_candidates"].data) == 17 and int(item["num_tiles"].data) == 3
    assert item["pixel_values"].data.shape[0] == 1  # the overview's tile; the crops are cut in the engine
    source = item["source_image"].data
    assert source.dtype == torch.uint8 and torch.equal(source, torch.from_numpy(np.array(photo.convert("RGB"))))
    views = item["psi_pixel_values"].data
    size = get_relevance_model(PSI).image_size
    assert views.dtype == torch.uint8 and tuple(views.shape[1:]) == (3, size, size)  # a quarter of float32's bytes
    assert item["psi_view_index"].data.shape[0] == 17 and int(item["psi_view_index"].data.max()) < views.shape[0]
    assert [r.length for r in out["mm_placeholders"]["image"]] == [3 * tokens_per_tile]  # unchanged: (1 + k) tiles


def test_the_front_end_holds_psis_text_tower_and_preprocessing_only(photo):
    """In the engine stage the front end cuts ψ's views and embeds the question; ψ's image tower is
    the engine's. Its ψ has the image weights freed (torch's meta device), prepares exactly what a
    whole ψ prepares, and refuses to score an image with a message saying why."""
    from vllm_semclip.selection import prepare_psi_inputs

    config = SemClipConfig(relevance_model=PSI)
    prepared = prepare_psi_inputs(photo, QUESTIONS[0], config)
    front = get_relevance_model(PSI, image_tower=False)
    whole = get_relevance_model(PSI)
    assert front is not whole and whole.has_image_tower and not front.has_image_tower
    assert {p.device.type for p in front.model.visual.parameters()} == {"meta"}
    assert "meta" not in {p.device.type for p in whole.model.visual.parameters()}
    assert "meta" not in {p.device.type for p in front.model.transformer.parameters()}  # the text tower
    pixels, index = whole.region_views(photo, prepared.candidates, config.relevance_fit)
    assert torch.equal(pixels, prepared.pixels) and torch.equal(index, prepared.index)
    assert torch.allclose(whole.text_query(QUESTIONS[0]), prepared.query)
    with pytest.raises(RuntimeError, match="dropped"):
        front.image_features(prepared.pixels)


@pytest.mark.parametrize("layout", ["CLIP", "CustomTextCLIP"])
def test_the_engines_psi_drops_its_text_tower_and_scores_the_same(layout):
    """The engine's ψ scores images only (the front end embeds the question): its text weights go to
    the meta device — in both of open_clip's layouts, the text tower spread over ``CLIP``'s attributes
    or held in ``CustomTextCLIP.text`` — and its image features do not change."""
    import open_clip

    vision = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16}
    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    model = getattr(open_clip, layout)(16, vision, text).eval()
    model.visual.image_mean, model.visual.image_std = (0.5,) * 3, (0.25,) * 3  # what open_clip's factory sets
    psi = RelevanceModel(model, None, None)
    views = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        before = psi.image_features(views)
        psi.drop_text_tower()
        after = psi.image_features(views)
    assert torch.equal(before, after) and psi.has_image_tower and not psi.has_text_tower
    devices = {name: p.device.type for name, p in
               [*model.named_parameters(), *model.named_buffers()] if name != "logit_scale"}
    assert {d for n, d in devices.items() if not n.startswith("visual.")} == {"meta"}
    assert {d for n, d in devices.items() if n.startswith("visual.")} == {"cpu"}
    with pytest.raises(RuntimeError, match="text tower was dropped"):
        psi.query_vector("What is the color of the flag?")


def _batch(outputs, processor) -> tuple[torch.Tensor, list[int], PsiBatch, object]:
    """Several processed requests as one scheduled batch reaches the model, and its image processor."""
    datas = [dict(o["mm_kwargs"].get_data()) for o in outputs]
    pixel_values = torch.cat([d["pixel_values"] for d in datas])
    num_tiles = [n for d in datas for n in d["num_tiles"].tolist()]
    parts = [parse_psi_batch(d) for d in datas]
    batch = PsiBatch(*(sum((getattr(p, f) for p in parts), []) for f in
                       ("num_candidates", "pixels", "view_index", "query", "meta", "images")))
    return pixel_values, num_tiles, batch, processor.info.get_hf_processor().image_processor


def test_the_engine_keeps_what_select_crops_keeps_alone_and_in_any_batch(processor, images):
    """One scoring-and-ranking rule: the crops a request gets do not depend on its batch."""
    psi = get_relevance_model(PSI)
    config = SemClipConfig(relevance_model=PSI, topk=2, max_topk=MAX_TOPK)
    requests = [(q, image) for q in QUESTIONS[:2] for image in images]
    outputs = [_apply(processor, q, [image], {"topk": 2}) for q, image in requests]
    expected = [select_crops(image, q, config).boxes for q, image in requests]
    alone = [choose_tiles(psi, *_batch([o], processor))[1][0].boxes for o in outputs]
    batched = choose_tiles(psi, *_batch(outputs, processor))[1]
    assert alone == expected
    assert [batched[i].boxes for i in range(len(requests))] == expected
    assert len({tuple(map(tuple, b)) for b in expected}) > 1  # the check can fail: the crops differ


def test_the_tiles_kept_are_the_overview_and_the_chosen_candidates_tiles(processor, photo):
    out = _apply(processor, QUESTIONS[0], [photo], {"topk": 2})
    pixel_values, num_tiles, batch, image_processor = _batch([out], processor)
    kept, selections, views = choose_tiles(get_relevance_model(PSI), pixel_values, num_tiles, batch, image_processor)
    expected = tile_pixel_values(image_processor, selected_tiles(photo, selections[0], processor.info.pad_fill,
                                                                 2 * processor.info.tile_size), pixel_values.dtype)
    assert len(selections[0].boxes) == 2 and torch.equal(kept, expected)
    assert views == batch.pixels[0].shape[0] and torch.equal(kept, encoded_tiles(out, processor))


def test_the_processor_stage_is_still_there_and_encodes_the_same_tiles(model_dir, processor, images):
    processor_stage, _ = make_processor(model_dir, {"max_topk": MAX_TOPK, "selection_stage": "processor"})
    for image in images:
        engine = _apply(processor, QUESTIONS[1], [image], {"topk": 2})
        front = _apply(processor_stage, QUESTIONS[1], [image], {"topk": 2})
        assert not set(ENGINE_FIELDS) & set(front["mm_kwargs"]["image"][0])
        assert torch.equal(encoded_tiles(front, processor_stage), encoded_tiles(engine, processor))
        assert front["prompt_token_ids"] == engine["prompt_token_ids"]


def test_images_psi_has_nothing_to_do_for_pass_through(processor, photo, tokens_per_tile):
    """No question, or a method without ψ: the tiles are already the chosen ones, in the same batch."""
    outs = [_apply(processor, "", [photo], {"topk": 2}),
            _apply(processor, QUESTIONS[0], [photo], {"method": "random", "topk": 2}),
            _apply(processor, QUESTIONS[0], [photo], {"topk": 2})]
    pixel_values, num_tiles, batch, image_processor = _batch(outs, processor)
    assert batch.num_candidates == [0, 0, 17] and pixel_values.shape[0] == 1 + 3 + 1
    kept, selections, _ = choose_tiles(get_relevance_model(PSI), pixel_values, num_tiles, batch, image_processor)
    assert list(selections) == [2] and kept.shape[0] == 1 + 3 + 3
    assert torch.equal(kept[:4], pixel_values[:4]) and torch.equal(kept[4], pixel_values[4])


def test_the_stage_is_fixed_by_the_server():
    with pytest.raises(SemClipConfigError) as info:
        SemClipConfig().replace({"selection_stage": "processor"}, request=True)
    assert info.value.parameter == "selection_stage"
    with pytest.raises(SemClipConfigError, match="selection_stage"):
        SemClipConfig(selection_stage="gpu")
