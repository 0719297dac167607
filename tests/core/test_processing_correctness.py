"""vLLM's own processing-correctness check, run against SemClip's processor.

The logic of vLLM's ``tests/models/multimodal/processing/test_common.py``: random images in
random batches, items repeated at a chosen cache hit rate over 32 batches, a processor without a
cache against one with vLLM's processor cache — every output equal. Extended for SemClip: every
image carries its own random question (a repeated image with a new question must not hit the
cache), and the per-request options vary from batch to batch. The prompt as text against the
prompt as token ids is checked through the offline engine (``test_offline.py``): in this vLLM
the processor only ever sees token ids.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import MAX_TOPK, make_processor
from PIL import Image
from vllm.multimodal.cache import MultiModalProcessorOnlyCache
from vllm.multimodal.processing.context import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs

pytestmark = pytest.mark.engine

NUM_BATCHES = 32
QUESTIONS = ("What is the color of the circle?", "Is the square on the left or right side of the star?",
             "What is written on the sign?", "How many cars are there?", "What is the man holding?",
             "Where is the cat?", "What colour is the small triangle at the top?", "Is there a dog?")
OPTIONS = ({}, {"topk": 0}, {"topk": 2}, {"topk": 1, "grids": [2]}, {"method": "random", "topk": 1, "grids": [3]},
           {"topk": 1, "relevance_norm": "none"})


def _random_image(rng: random.Random) -> Image.Image:
    width, height = rng.randint(16, 900), rng.randint(16, 900)
    arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _apply(processor, images, questions, kwargs, cache):
    """One request: a LLaVA-1.5 prompt with one turn per image (each image asked its own question)."""
    tokenizer = processor.info.get_tokenizer()
    turns = " ".join(f"USER: <image>\n{q} ASSISTANT: fine." for q in questions[:-1])
    prompt = (turns + " " if turns else "") + f"USER: <image>\n{questions[-1]} ASSISTANT:"
    inputs = ProcessorInputs(prompt=tokenizer(prompt)["input_ids"], mm_data_items=processor.info.parse_mm_data(
        {"image": images}), hf_processor_mm_kwargs=kwargs, cache=cache)
    return processor.apply(inputs, TimingContext(enabled=False))


def _assert_same(a, b, where: str) -> None:
    assert a["prompt_token_ids"] == b["prompt_token_ids"], where
    assert a["mm_hashes"] == b["mm_hashes"], where
    assert a["mm_placeholders"] == b["mm_placeholders"], where
    for x, y in zip(a["mm_kwargs"]["image"], b["mm_kwargs"]["image"], strict=True):
        assert torch.equal(x["pixel_values"].data, y["pixel_values"].data), where


@pytest.mark.parametrize("hit_rate", [0.3, 0.5, 1.0])
def test_cached_processing_equals_uncached_over_random_batches(model_dir, hit_rate):
    rng = random.Random(int(hit_rate * 100))
    baseline, _ = make_processor(model_dir, {"max_topk": MAX_TOPK})
    cached, model_config = make_processor(model_dir, {"max_topk": MAX_TOPK})
    cache = MultiModalProcessorOnlyCache(model_config)
    seen: list[tuple[Image.Image, str]] = []
    fresh_questions = 0
    for batch in range(NUM_BATCHES):
        items = []
        for _ in range(rng.randint(1, 3)):
            if seen and rng.random() < hit_rate:
                image, question = rng.choice(seen)
                if rng.random() < 0.2:  # the same image, another question: its own crops, a cache miss
                    question = rng.choice([q for q in QUESTIONS if q != question])
                    fresh_questions += 1
            else:
                image, question = _random_image(rng), rng.choice(QUESTIONS)
            items.append((image, question))
        seen += items
        kwargs = rng.choice(OPTIONS) if batch else {}
        images, questions = [i for i, _ in items], [q for _, q in items]
        _assert_same(_apply(baseline, images, questions, kwargs, None),
                     _apply(cached, images, questions, kwargs, cache), f"batch {batch} ({kwargs})")
    stats = cache.make_stats()
    assert stats.hits > 0 and fresh_questions > 0, (stats, fresh_questions)
