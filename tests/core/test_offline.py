"""Offline ``LLM.generate`` with the plugin: token counts, per-question crops, caches.

How we see which crops the engine used: SemClip with k=1 turns ``<image>`` into
[overview, crop] tiles whose tokens sit back to back. Sending the same prompt with
two adjacent ``<image>`` placeholders, the overview and that crop given explicitly
(``method=overview``, so nothing is selected), puts the very same embeddings at the
very same positions. So the outputs' logprobs must match for the crop SemClip was
supposed to pick — and differ for another crop.
"""

from __future__ import annotations

import pytest
from conftest import PSI, MAX_TOPK, chat_prompt, make_llm, stop_llm
from vllm import SamplingParams

from vllm_semclip.config import SemClipConfig, SemClipConfigError
from vllm_semclip.crops import to_rgb
from vllm_semclip.selection import select_crops

PARAMS = SamplingParams(max_tokens=2, temperature=0.0, logprobs=5)
QUESTIONS = [
    "What is the color of the flag?",
    "What is the astronaut holding?",
    "Is the rocket on the left or right side of the woman?",
    "What color is the helmet?",
    "What is written on the patch?",
    "Is the star on the left or right side of the circle?",
]


def _two_questions_with_different_crops(image):
    config = SemClipConfig(relevance_model=PSI, max_topk=MAX_TOPK)
    by_box = {}
    for q in QUESTIONS:
        by_box.setdefault(select_crops(image, q, config).boxes[0], q)
    assert len(by_box) >= 2, "ψ picks the same crop for every question; cannot tell requests apart"
    (box_a, qa), (box_b, qb) = list(by_box.items())[:2]
    return (qa, box_a), (qb, box_b)


def _semclip_request(question, image, **kwargs):
    return {"prompt": chat_prompt(question), "multi_modal_data": {"image": image},
            "mm_processor_kwargs": {"topk": 1, **kwargs}}


def _given_request(question, image, box):
    """Overview and crop as two explicit images, adjacent, no selection."""
    crop = to_rgb(image).crop(box)
    return {"prompt": "USER: <image><image>\n" + question + " ASSISTANT:",
            "multi_modal_data": {"image": [image, crop]}, "mm_processor_kwargs": {"method": "overview"}}


def _first_logprobs(output) -> dict[int, float]:
    return {tok: lp.logprob for tok, lp in output.outputs[0].logprobs[0].items()}


def _close(a: dict[int, float], b: dict[int, float], tol: float = 0.02) -> bool:
    common = set(a) & set(b)
    return len(common) >= 4 and all(abs(a[t] - b[t]) <= tol for t in common)


@pytest.mark.parametrize("topk", [0, 1, 3])
def test_prompt_length_is_text_plus_tiles(llm, photo, tokenizer, tokens_per_tile, topk):
    question = "What is the color of the flag?"
    out = llm.generate(_semclip_request(question, photo, topk=topk), SamplingParams(max_tokens=3, temperature=0))[0]
    text_tokens = len(tokenizer(chat_prompt(question))["input_ids"]) - 1  # minus the <image> placeholder
    assert len(out.prompt_token_ids) == text_tokens + (1 + topk) * tokens_per_tile
    assert len(out.outputs[0].token_ids) == 3


def test_each_question_gets_its_own_crop(llm, photo):
    (qa, box_a), (qb, box_b) = _two_questions_with_different_crops(photo)
    # sequentially: the second question about the same image must not reuse the first's crops
    sem_a = llm.generate(_semclip_request(qa, photo), PARAMS)[0]
    sem_b = llm.generate(_semclip_request(qb, photo), PARAMS)[0]
    given = llm.generate([_given_request(qa, photo, box_a), _given_request(qb, photo, box_b),
                          _given_request(qb, photo, box_a)], PARAMS)
    assert _close(_first_logprobs(sem_a), _first_logprobs(given[0]))
    assert _close(_first_logprobs(sem_b), _first_logprobs(given[1]))
    # the check can fail: question B with A's crop is a different input
    assert not _close(_first_logprobs(sem_b), _first_logprobs(given[2]), tol=1e-4)


def test_each_question_gets_its_own_crop_when_sent_together(llm, photo):
    (qa, box_a), (qb, box_b) = _two_questions_with_different_crops(photo)
    both = llm.generate([_semclip_request(qa, photo), _semclip_request(qb, photo)], PARAMS)
    given = llm.generate([_given_request(qa, photo, box_a), _given_request(qb, photo, box_b)], PARAMS)
    assert _close(_first_logprobs(both[0]), _first_logprobs(given[0]))
    assert _close(_first_logprobs(both[1]), _first_logprobs(given[1]))


def test_same_uuid_different_questions_get_their_own_crops(llm, photo):
    (qa, box_a), (qb, box_b) = _two_questions_with_different_crops(photo)
    reqs = [dict(_semclip_request(q, photo), multi_modal_uuids={"image": ["astronaut-1"]}) for q in (qa, qb)]
    outs = [llm.generate(r, PARAMS)[0] for r in reqs]
    given = llm.generate([_given_request(qa, photo, box_a), _given_request(qb, photo, box_b)], PARAMS)
    assert _close(_first_logprobs(outs[0]), _first_logprobs(given[0]))
    assert _close(_first_logprobs(outs[1]), _first_logprobs(given[1]))


def test_same_question_twice_is_deterministic(llm, photo):
    q = QUESTIONS[0]
    first = llm.generate(_semclip_request(q, photo), PARAMS)[0]
    second = llm.generate(_semclip_request(q, photo), PARAMS)[0]
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert _close(_first_logprobs(first), _first_logprobs(second), tol=1e-6)


def test_bad_kwargs_raise_typed_errors_and_engine_keeps_working(llm, photo):
    for kwargs, field in (({"topk": 9}, "topk"), ({"topk": MAX_TOPK + 1}, "topk"), ({"nope": 1}, "nope")):
        with pytest.raises(SemClipConfigError) as info:
            llm.generate(_semclip_request("What is the color of the flag?", photo, **kwargs), PARAMS)
        assert info.value.parameter == field
    out = llm.generate(_semclip_request("What is the color of the flag?", photo), PARAMS)[0]
    assert len(out.outputs[0].token_ids) == 2


def test_the_prompt_as_text_and_as_token_ids_is_processed_alike(llm, photo, tokenizer):
    """vLLM's processing-correctness check, its text-against-ids half: the same crops either way."""
    text = chat_prompt("What is the color of the flag?")
    ids = tokenizer(text)["input_ids"]
    as_text, as_ids = llm.generate([
        {"prompt": text, "multi_modal_data": {"image": photo}, "mm_processor_kwargs": {"topk": 2}},
        {"prompt_token_ids": ids, "multi_modal_data": {"image": photo}, "mm_processor_kwargs": {"topk": 2}},
    ], PARAMS)
    assert as_text.prompt_token_ids == as_ids.prompt_token_ids
    assert as_text.outputs[0].token_ids == as_ids.outputs[0].token_ids
    assert _close(_first_logprobs(as_text), _first_logprobs(as_ids), tol=1e-4)


def test_the_processor_stage_answers_as_the_engine_stage(llm, model_dir, photo):
    """ψ in the engine (the fixture's default) or per request in the front end: the same crops, so
    the same logprobs, for requests sent together (one engine-stage batch) — and another crop differs."""
    (qa, box_a), (qb, box_b) = _two_questions_with_different_crops(photo)
    requests = [_semclip_request(q, photo) for q in (qa, qb, QUESTIONS[3])]
    engine_stage = llm.generate(requests, PARAMS)
    front = make_llm(model_dir, selection_stage="processor")
    try:
        processor_stage = front.generate(requests, PARAMS)
        other_crop = front.generate(_given_request(qa, photo, box_b), PARAMS)[0]
    finally:
        stop_llm(front)
    for a, b in zip(engine_stage, processor_stage):
        assert _close(_first_logprobs(a), _first_logprobs(b))
    assert not _close(_first_logprobs(engine_stage[0]), _first_logprobs(other_crop), tol=1e-4)
