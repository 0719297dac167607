"""SemClip's multimodal processor for vLLM: select crops, encode [overview, crops…].

Three small classes, as vLLM's own ``llava.py`` has them:

* :class:`SemClipProcessingInfo` — what the model is: the server's
  :class:`~vllm_semclip.config.SemClipConfig`, tokens per tile, the most tokens one
  image can take (``(1 + max_crops) × tokens_per_tile``), how to find questions.
* :class:`SemClipDummyInputsBuilder` — the worst case for memory profiling: every
  image carries the most crops the server allows.
* :class:`SemClipMultiModalProcessor` — per request: recover each image's question
  from the prompt ids, and either prepare ψ's views of every candidate, the question's
  text embedding, the overview's tile and the decoded image for the model, which chooses
  in its encoder step and cuts only the chosen crops (``selection_stage="engine"``, the
  default; ``ENGINE_FIELDS``, :func:`crop_pixel_values`), or select the crops with ψ here
  (``"processor"``); run the model's own image processor on the tiles, and expand each
  ``<image>`` into ``(1 + k) × tokens_per_tile`` placeholders.

Caching: vLLM keys processed items (and the encoder and prefix caches) by a hash of
the image and the request's ``mm_processor_kwargs``. Crops depend on the question,
so :meth:`SemClipMultiModalProcessor._get_mm_hashes` folds each image's question
and the effective selection settings into its key. The same image asked two
questions is processed twice; the same question twice hits the cache. This also
holds when the client names the image with ``multi_modal_uuids``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature

from vllm.model_executor.models.llava import (
    BaseLlavaMultiModalProcessor,
    LlavaDummyInputsBuilder,
    LlavaProcessingInfo,
)
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.context import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs

from . import timings
from .observe import observe_selection
from .config import SemClipConfig, server_config
from .crops import Box, mean_fill, to_rgb
from .images import answer_oversized_images_with_400
from .question import QuestionExtractor
from .relevance import check_server_psi
from .selection import PsiInputs, box_tiles, prepare_psi_inputs, select_crops, selected_tiles

# Internal key: the processor attaches each image's question to the processor
# kwargs so it reaches `_call_hf_processor` for exactly the images that miss the
# cache. It is never accepted from a request (unknown keys are refused first).
QUESTIONS_KEY = "semclip_questions"
ITEM_IDS_KEY = "semclip_item_ids"  # each image's cache identity, carried for the selection log only
_PRIVATE_KEYS = (QUESTIONS_KEY, ITEM_IDS_KEY)
# What an image carries to the model in the engine stage (``SemClipConfig.selection_stage``).
ENGINE_FIELDS = ("num_candidates", "psi_pixel_values", "psi_view_index", "psi_query", "selection_meta",
                 "source_image")


def tile_pixel_values(image_processor, tiles: Sequence[Image.Image], dtype: torch.dtype) -> torch.Tensor:
    """The LLaVA's image processor over tiles, as the vision tower takes them (``[N, 3, S, S]``)."""
    return image_processor(list(tiles), return_tensors="pt")["pixel_values"].to(dtype)


def crop_tiling(pad_fill: tuple[int, int, int] | None, tile_size: int) -> dict[str, Any]:
    """How an image's tiles are cut (``box_tiles``), as ``selection_meta["tiles"]`` carries it to the
    engine: the pad colour (``None``: no padding) and ``max_side``, twice the tower's input side."""
    return {"pad_fill": list(pad_fill) if pad_fill is not None else None, "max_side": 2 * tile_size}


def crop_pixel_values(source_image: torch.Tensor, boxes: Sequence[Box], tiles: Mapping[str, Any],
                      image_processor, dtype: torch.dtype) -> torch.Tensor:
    """The engine stage's chosen crops, cut from the decoded image the processor sent (``[H, W, 3]``
    uint8) by the very functions the processor stage cuts them with (``box_tiles``, the image
    processor), so a crop's pixels do not depend on the stage. ``tiles`` is the image's
    ``selection_meta["tiles"]`` (:func:`crop_tiling`)."""
    image = Image.fromarray(source_image.cpu().numpy())  # [H, W, 3] uint8: RGB
    fill = tiles["pad_fill"]
    crops = box_tiles(image, boxes, tuple(fill) if fill is not None else None, tiles["max_side"], overview=False)
    return tile_pixel_values(image_processor, crops, dtype)


def _without_private_keys(inputs: ProcessorInputs) -> ProcessorInputs:
    """The inputs as the request sent them: vLLM's own hash of them leaves SemClip's carried keys out."""
    return dataclasses.replace(
        inputs,
        hf_processor_mm_kwargs={k: v for k, v in inputs.hf_processor_mm_kwargs.items() if k not in _PRIVATE_KEYS},
    )


class SemClipProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info plus SemClip's server configuration and token arithmetic."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        answer_oversized_images_with_400()  # this process serves SemClip: a bomb is a 400 here

    @cached_property
    def server_config(self) -> SemClipConfig:
        """Defaults from ``--hf-overrides`` (``semclip_config``), then ``--mm-processor-kwargs``."""
        config = server_config(self.ctx.model_config)
        check_server_psi(config)  # at start-up (profiling), not on the first request
        return config

    def request_config(self, request_kwargs: Mapping[str, object]) -> SemClipConfig:
        """The server config with one request's ``mm_processor_kwargs`` applied and checked."""
        return self.server_config.replace(request_kwargs, request=True)

    @cached_property
    def question_extractor(self) -> QuestionExtractor:
        return QuestionExtractor(self.get_tokenizer(), self.get_hf_processor().image_token)

    @cached_property
    def tile_size(self) -> int:
        return self.get_vision_encoder_info().get_image_size()

    @cached_property
    def tokens_per_tile(self) -> int:
        return super().get_num_image_tokens(image_width=self.tile_size, image_height=self.tile_size)

    @cached_property
    def pad_fill(self) -> tuple[int, int, int]:
        return mean_fill(self.get_hf_processor().image_processor.image_mean)

    def get_max_image_tokens(self) -> int:
        return (1 + self.server_config.max_crops) * self.tokens_per_tile

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}


class SemClipDummyInputsBuilder(LlavaDummyInputsBuilder[SemClipProcessingInfo]):
    """LLaVA's dummy images, processed so that each carries the most crops a request may ask for;
    in the engine stage they carry a question too, so that profiling runs ψ over every candidate
    of every image in the model's encoder step."""

    DUMMY_QUESTION = " What is in the picture?"

    def _profiles_psi(self) -> bool:
        config = self.info.server_config
        return (config.selection_stage == "engine" and config.relevance_model is not None
                and 0 < config.max_crops <= config.num_candidates)

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        text = super().get_dummy_text(mm_counts)
        return text + self.DUMMY_QUESTION if mm_counts.get("image", 0) and self._profiles_psi() else text

    def get_dummy_processor_kwargs(self) -> dict[str, object]:
        config = self.info.server_config
        most = config.max_crops
        if most == 0:
            return {"method": "overview", "boxes": None}
        if config.method == "all" and most == config.num_candidates:
            return {"method": "all"}
        if self._profiles_psi():
            return {"method": "relevance", "topk": most, "boxes": None}
        # random selection needs no question; one grid with at least `most` cells
        return {"method": "random", "topk": most, "grids": [math.ceil(math.sqrt(most))], "boxes": None}


class SemClipMultiModalProcessor(BaseLlavaMultiModalProcessor[SemClipProcessingInfo]):
    """Selects crops per image and turns each ``<image>`` into (1 + k) tiles of tokens."""

    # ---- entry point ------------------------------------------------------
    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext):
        # Validate the request's options first: a bad value is a 400, not a stack trace.
        config = self.info.request_config(inputs.hf_processor_mm_kwargs)
        num_images = len(inputs.mm_data_items.get("image", [])) if "image" in inputs.mm_data_items else 0
        questions = self.info.question_extractor(inputs.prompt, num_images) if num_images else []
        inputs = dataclasses.replace(
            inputs,
            hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, QUESTIONS_KEY: tuple(questions)},
        )
        if config.log_selections and num_images:  # the ids the log line names (a second hash: opt-in only)
            ids = tuple(str(h) for h in self._item_ids(inputs))
            inputs = dataclasses.replace(
                inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, ITEM_IDS_KEY: ids})
        return super().apply(inputs, timing_ctx)

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options) -> ProcessorInputs:
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        inputs.hf_processor_mm_kwargs = self.dummy_inputs.get_dummy_processor_kwargs()
        return inputs

    # ---- the kwargs carry the questions: split them off ---------------------
    def _split_kwargs(self, hf_kwargs: Mapping[str, object]) -> tuple[tuple[str, ...], SemClipConfig]:
        request = {k: v for k, v in hf_kwargs.items() if k not in _PRIVATE_KEYS}
        return tuple(hf_kwargs.get(QUESTIONS_KEY, ())), self.info.request_config(request)

    # ---- cache identity ---------------------------------------------------
    def _item_ids(self, inputs: ProcessorInputs) -> list[str]:
        """Each image's own identity: the request's ``uuid`` for it where given (vLLM's
        ``multi_modal_uuids``), else vLLM's hash of the image — what the selection log names."""
        count = len(inputs.mm_data_items["image"])
        uuids = list((inputs.mm_uuid_items or {}).get("image") or [None] * count)
        if all(u is not None for u in uuids):
            return [str(u) for u in uuids]
        hashes = super()._get_mm_hashes(_without_private_keys(inputs)).get("image", ())
        return [str(u) if u is not None else h for u, h in zip(uuids, hashes)]

    def _get_mm_hashes(self, inputs: ProcessorInputs):
        questions, config = self._split_kwargs(inputs.hf_processor_mm_kwargs)
        hashes = dict(super()._get_mm_hashes(_without_private_keys(inputs)))
        if "image" not in hashes:
            return hashes
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        selection = repr(config.selection_key())
        question_matters = config.method in ("relevance", "random") and config.num_crops > 0
        hashes["image"] = [
            MultiModalHasher.hash_kwargs(
                algorithm,
                item=item_hash,
                semclip_selection=selection,
                semclip_question=questions[i] if question_matters and i < len(questions) else "",
            )
            for i, item_hash in enumerate(hashes["image"])
        ]
        return hashes

    def _get_cache_missing_processor_kwargs(self, inputs: ProcessorInputs, mm_is_cached) -> Mapping[str, object]:
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        for key in _PRIVATE_KEYS:  # per-image values: keep the cache-missing images' only
            values = kwargs.get(key, ())
            if "image" in mm_is_cached and values:
                kwargs[key] = tuple(v for v, hit in zip(values, mm_is_cached["image"]) if not hit)
        return kwargs

    # ---- selection + image processor --------------------------------------
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = list(hf_data.get("images") or [])
        questions, config = self._split_kwargs(hf_kwargs)
        if len(questions) != len(images):
            questions = ("",) * len(images)
        ids = tuple(hf_kwargs.get(ITEM_IDS_KEY, ()))
        ids = ids if len(ids) == len(images) else (None,) * len(images)
        pad_fill = self.info.pad_fill if config.pad_to_square else None
        tiling = crop_tiling(pad_fill, self.info.tile_size)
        max_side = tiling["max_side"]
        engine = config.selection_stage == "engine"
        tiles: list = []
        num_tiles: list[int] = []
        engine_fields: dict[str, list] = {key: [] for key in ENGINE_FIELDS}
        for image, question, item_id in zip(images, questions, ids):
            start = time.perf_counter()
            image = to_rgb(image)  # once: ψ's views, the tiles and the engine's copy all read RGB
            if engine and config.psi_in_engine and question.strip():
                # ψ's image work waits for the model's encoder step, and so does cutting the crops
                # it chooses: send ψ's views, the overview's tile and the decoded image
                psi = prepare_psi_inputs(image, question, config)
                image_tiles = box_tiles(image, [], pad_fill, max_side)
                num_tiles.append(1 + min(config.num_crops, len(psi.candidates)))
                self._add_engine_fields(engine_fields, psi, item_id, tiling)
                self._record_front_end(config, time.perf_counter() - start, len(psi.candidates), image.size)
            else:
                selection = select_crops(image, question, config)
                seconds = time.perf_counter() - start
                observe_selection(selection, seconds, item_id=item_id, log=config.log_selections,
                                  log_question=config.log_questions)
                if timings.enabled():
                    timings.record(time=time.time(), stage="processor", selection_ms=seconds * 1000,
                                   method=config.method, candidates=len(selection.candidates),
                                   crops=selection.num_crops, width=selection.image_size[0],
                                   height=selection.image_size[1])
                image_tiles = selected_tiles(image, selection, pad_fill, max_side=max_side)
                num_tiles.append(len(image_tiles))
                if engine:
                    self._add_engine_fields(engine_fields, None, item_id)
            tiles.extend(image_tiles)
        image_processor = self.info.get_hf_processor().image_processor
        pixel_values = tile_pixel_values(image_processor, tiles, self.info.ctx.model_config.dtype)
        out = {"pixel_values": pixel_values, "num_tiles": torch.tensor(num_tiles)}
        if engine:
            out.update(engine_fields)
            out["num_candidates"] = torch.tensor(engine_fields["num_candidates"], dtype=torch.long)
        return BatchFeature(out)

    @staticmethod
    def _add_engine_fields(fields: dict[str, list], psi: PsiInputs | None, item_id: str | None,
                           tiles: Mapping[str, Any] | None = None) -> None:
        """One image's engine-stage fields; an image ψ has nothing to do for (no question, another
        method) carries empty ones and its tiles are already [overview, chosen crops]. An image ψ
        chooses for carries itself (RGB, as ``[H, W, 3]`` uint8) and how its crops are tiled."""
        if psi is None:
            fields["num_candidates"].append(0)
            fields["psi_pixel_values"].append(torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
            fields["psi_view_index"].append(torch.zeros(0, 1, dtype=torch.long))
            fields["psi_query"].append(torch.zeros(0))
            fields["selection_meta"].append(torch.zeros(0, dtype=torch.uint8))
            fields["source_image"].append(torch.zeros(0, 0, 3, dtype=torch.uint8))
            return
        fields["num_candidates"].append(len(psi.candidates))
        fields["psi_pixel_values"].append(psi.pixels)
        fields["psi_view_index"].append(psi.index)
        fields["psi_query"].append(psi.query)
        meta = json.dumps({**psi.meta(item_id), "tiles": dict(tiles)}).encode("utf-8")
        fields["selection_meta"].append(torch.frombuffer(bytearray(meta), dtype=torch.uint8))
        fields["source_image"].append(psi.image)

    @staticmethod
    def _record_front_end(config: SemClipConfig, seconds: float, candidates: int, size: tuple[int, int]) -> None:
        if timings.enabled():
            timings.record(time=time.time(), stage="front_end", prepare_ms=seconds * 1000, method=config.method,
                           candidates=candidates, width=size[0], height=size[1])

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_tiles = hf_inputs.get("num_tiles", torch.empty(0, dtype=torch.long))
        num_candidates = hf_inputs.get("num_candidates")
        # engine stage: an image ψ chooses for carries its overview's tile only (the model cuts the crops)
        pixel_tiles = num_tiles if num_candidates is None else torch.where(num_candidates > 0, 1, num_tiles)
        fields = dict(
            pixel_values=MultiModalFieldConfig.flat_from_sizes("image", pixel_tiles),
            num_tiles=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            image_embeds=MultiModalFieldConfig.batched("image"),
        )
        if num_candidates is not None:
            fields.update(
                num_candidates=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                psi_pixel_values=MultiModalFieldConfig.batched("image"),
                psi_view_index=MultiModalFieldConfig.batched("image"),
                psi_query=MultiModalFieldConfig.batched("image"),
                selection_meta=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                source_image=MultiModalFieldConfig.batched("image", keep_on_cpu=True),  # Pillow cuts it
            )
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index
        tokens_per_tile = self.info.tokens_per_tile
        out_data = out_mm_kwargs.get_data()
        num_tiles = out_data["num_tiles"].tolist() if "num_tiles" in out_data else []

        def get_replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                return [image_token_id] * images.get_feature_size(item_idx)
            return [image_token_id] * (num_tiles[item_idx] * tokens_per_tile)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=get_replacement)]
