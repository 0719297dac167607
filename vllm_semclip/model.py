"""SemClipLlavaForConditionalGeneration: vLLM's LLaVA, fed [overview, crop_1..crop_k] per image.

The network is LLaVA's, unchanged (and so are its weights: no retraining). Only the
input side differs: each image arrives as tiles (``pixel_values`` is flat over all tiles,
``num_tiles`` says how many of an image's tiles reach the language model), every chosen tile
goes through the vision tower and projector in one batch, and an image's embedding is its
tiles' tokens one after the other — the overview's first.

In the engine stage (``SemClipConfig.selection_stage``) an image arrives with its overview's
tile, ψ's views of the candidates, the question's embedding and the decoded image; the model
runs ψ's image tower once for all images of the scheduled batch, scores each image's
candidates (``relevance.candidate_scores``), keeps the top-k (``selection.choose_crops``, the
rule ``select_crops`` ranks by), cuts only those crops from the image with the processor's own
functions (``processor.crop_pixel_values``) and encodes [overview + chosen tiles]. The token
count per image is (1 + k) × tokens-per-tile either way, fixed before scheduling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Literal

import torch

from vllm.config import VllmConfig
from vllm.distributed import get_tp_group
from vllm.distributed.parallel_state import GroupCoordinator
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaForConditionalGeneration, LlavaImageEmbeddingInputs
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from . import timings
from .config import server_config
from .observe import logger, observe_psi_batch, observe_selection
from .processor import (SemClipDummyInputsBuilder, SemClipMultiModalProcessor, SemClipProcessingInfo,
                        crop_pixel_values)
from .relevance import RelevanceModel, candidate_scores
from .selection import Selection, engine_selection


class SemClipImagePixelInputs(TensorSchema):
    """Dimensions:
        - bnt: Batch size * number of images * tiles per image (1 + k, or 1 + candidates in the engine stage)
        - bn: Batch size * number of images
        - h, w: the vision tower's input size
    """

    type: Literal["pixel_values"] = "pixel_values"
    pixel_values: Annotated[torch.Tensor, TensorShape("bnt", 3, "h", "w")]
    num_tiles: Annotated[torch.Tensor, TensorShape("bn")]


@dataclass
class PsiBatch:
    """The engine stage's per-image inputs (lists over the batch's images; empty where an image's
    tiles are already chosen): candidates, ψ's views, view index, query, selection settings and
    the decoded image the chosen crops are cut from."""

    num_candidates: list[int]
    pixels: list[torch.Tensor]
    view_index: list[torch.Tensor]
    query: list[torch.Tensor]
    meta: list[dict | None]
    images: list[torch.Tensor]


def _per_item(value) -> list:
    """A batched field as one entry per image, whether vLLM stacked it or kept a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else list(value.unbind(0))


def parse_psi_batch(kwargs: dict) -> PsiBatch | None:
    """Pop the engine-stage fields (``processor.ENGINE_FIELDS``) from a batch's multimodal kwargs;
    ``None`` when the batch came from the processor stage."""
    num_candidates = kwargs.pop("num_candidates", None)
    fields = {key: _per_item(kwargs.pop(key, None))
              for key in ("psi_pixel_values", "psi_view_index", "psi_query", "selection_meta", "source_image")}
    if num_candidates is None:
        return None
    meta = [json.loads(bytes(m.to(torch.uint8).cpu().tolist()).decode("utf-8")) if m.numel() else None
            for m in fields["selection_meta"]]
    return PsiBatch([int(n) for n in _per_item(num_candidates)], fields["psi_pixel_values"],
                    fields["psi_view_index"], fields["psi_query"], meta, fields["source_image"])


def choose_tiles(psi: RelevanceModel | None, pixel_values: torch.Tensor, num_tiles: Sequence[int],
                 batch: PsiBatch, image_processor, tp_group: GroupCoordinator | None = None
                 ) -> tuple[torch.Tensor, dict[int, Selection], int]:
    """The tiles that reach the language model — [overview + chosen crops] of every image — with the
    selections made and the number of ψ views run: ψ over all the batch's views in one forward,
    then each image's candidates scored and ranked as ``select_crops`` scores and ranks them, and
    its chosen crops cut from its image by the LLaVA's ``image_processor``.

    Under tensor parallelism (``tp_group``, vLLM's ``GroupCoordinator``) ψ runs on the group's first
    rank only and its scores are broadcast: every rank then ranks the same numbers and cuts the same
    crops, by construction rather than by every rank rounding alike."""
    todo = [i for i, n in enumerate(batch.num_candidates) if n > 0]
    selections: dict[int, Selection] = {}
    views = 0
    if todo:
        if psi is None:
            raise RuntimeError("an image arrived for engine-stage selection but no ψ was loaded with the model")
        shared = tp_group is not None and tp_group.world_size > 1
        counts = [batch.num_candidates[i] for i in todo]
        if not shared or tp_group.rank_in_group == 0:
            pixels = torch.cat([batch.pixels[i] for i in todo])
            views = int(pixels.shape[0])
            with torch.inference_mode():
                features = psi.image_features(pixels)
            per_image, offset = [], 0
            for i in todo:
                n = batch.pixels[i].shape[0]
                per_image.append(candidate_scores(features[offset:offset + n],
                                                  batch.view_index[i].to(features.device),
                                                  batch.query[i].to(features.device, torch.float32)).float())
                offset += n
            scores = torch.cat(per_image)
        else:
            scores = torch.empty(sum(counts), dtype=torch.float32, device=psi.device)
        if shared:
            tp_group.broadcast(scores, src=0)
        for i, image_scores in zip(todo, scores.cpu().split(counts)):
            selections[i] = engine_selection(batch.meta[i], image_scores.tolist())
    parts: list[torch.Tensor] = []
    start = 0
    for i, tiles in enumerate(num_tiles):
        if i in selections:  # the overview arrived; the chosen crops are cut here
            parts.append(pixel_values[start:start + 1])
            if selections[i].boxes:
                crops = crop_pixel_values(batch.images[i], selections[i].boxes, batch.meta[i]["tiles"],
                                          image_processor, pixel_values.dtype)
                parts.append(crops.to(pixel_values.device))
            start += 1
        else:
            parts.append(pixel_values[start:start + tiles])
            start += tiles
    if start != pixel_values.shape[0]:
        raise ValueError(f"{pixel_values.shape[0]} tiles arrived for the {start} the images declare")
    return (torch.cat(parts) if len(parts) != 1 else parts[0]), selections, views


@MULTIMODAL_REGISTRY.register_processor(
    SemClipMultiModalProcessor,
    info=SemClipProcessingInfo,
    dummy_inputs=SemClipDummyInputsBuilder,
)
class SemClipLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with semantic crop selection (architecture name for ``--hf-overrides``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.semclip_config = server_config(vllm_config.model_config)
        # ψ is held outside the module tree: its weights come from open_clip, not from the LLaVA
        # checkpoint, so vLLM's weight loaders (dummy included) must neither fill nor expect them.
        self.__dict__["_psi"] = self._load_psi()
        self._model_config = vllm_config.model_config

    def _load_psi(self) -> RelevanceModel | None:
        config = self.semclip_config
        if config.selection_stage != "engine" or config.relevance_model is None:
            return None
        device = next(self.parameters()).device
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # vLLM builds the model under its dtype; ψ keeps its own
        try:
            psi = RelevanceModel.from_pretrained(config.relevance_model, config.relevance_pretrained,
                                                 str(device), config.relevance_precision)
        finally:
            torch.set_default_dtype(default_dtype)
        psi.drop_text_tower()  # the front end embeds the question; the engine scores images only
        rank = get_tp_group().rank_in_group
        if rank != 0:  # the first rank scores and broadcasts (``choose_tiles``): here the tower is dead weight
            psi.drop_image_tower()
        logger.info("semclip: ψ %s on %s for the engine stage (TP rank %d, image tower %s; text tower in the "
                    "front end)", config.relevance_model, device, rank,
                    "loaded" if psi.has_image_tower else "not loaded: rank 0 scores")
        return psi

    @property
    def psi(self) -> RelevanceModel | None:
        """ψ, loaded with the model on its device (engine stage), else ``None``."""
        return self.__dict__["_psi"]

    @cached_property
    def image_processor(self):
        """The LLaVA's image processor, as the front end loads it: the engine stage tiles the chosen crops."""
        from vllm.transformers_utils.processor import cached_image_processor_from_config

        return cached_image_processor_from_config(self._model_config)

    def _parse_and_validate_image_input(self, **kwargs: object) -> SemClipImagePixelInputs | LlavaImageEmbeddingInputs | None:
        pixel_values = kwargs.pop("pixel_values", None)
        num_tiles = kwargs.pop("num_tiles", None)
        image_embeds = kwargs.pop("image_embeds", None)
        if pixel_values is None and image_embeds is None:
            return None
        if pixel_values is None:
            return LlavaImageEmbeddingInputs(type="image_embeds", data=image_embeds)
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        if isinstance(num_tiles, (list, tuple)):
            num_tiles = torch.as_tensor([int(n) for n in num_tiles])
        size = self.config.vision_config.image_size
        return SemClipImagePixelInputs(
            type="pixel_values",
            pixel_values=pixel_values,
            num_tiles=num_tiles.reshape(-1),
            resolve_bindings={"h": size, "w": size},
        )

    def _choose_tiles(self, pixel_values: torch.Tensor, num_tiles: Sequence[int], batch: PsiBatch) -> torch.Tensor:
        start = time.perf_counter()
        tp_group = get_tp_group()
        kept, selections, views = choose_tiles(self.psi, pixel_values, num_tiles, batch, self.image_processor,
                                               tp_group)
        if not selections or tp_group.rank_in_group != 0:
            return kept  # every rank chose the same crops; the first one reports them, once
        seconds = time.perf_counter() - start
        observe_psi_batch(len(selections), views, seconds)
        for i, selection in selections.items():
            meta = batch.meta[i]
            observe_selection(selection, seconds, item_id=meta.get("id"), log=meta.get("log", False),
                              log_question=meta.get("log_question", False))
        if timings.enabled():
            timings.record(time=time.time(), stage="engine", selection_ms=seconds * 1000, images=len(selections),
                           views=views)
        return kept

    def _process_image_input(self, image_input, psi_batch: PsiBatch | None = None) -> tuple[torch.Tensor, ...] | torch.Tensor:
        if image_input["type"] == "image_embeds":
            return image_input["data"]
        pixel_values = image_input["pixel_values"]
        num_tiles = [int(n) for n in image_input["num_tiles"].tolist()]
        if psi_batch is not None:
            pixel_values = self._choose_tiles(pixel_values, num_tiles, psi_batch)
        features = self._image_pixels_to_features(self.vision_tower, pixel_values)
        embeds = self.multi_modal_projector(features)  # (tiles, tokens_per_tile, hidden)
        tokens_per_tile = embeds.shape[1]
        embeds = embeds.reshape(-1, embeds.shape[-1])
        return embeds.split([n * tokens_per_tile for n in num_tiles])

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        psi_batch = parse_psi_batch(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        return self._process_image_input(image_input, psi_batch)
