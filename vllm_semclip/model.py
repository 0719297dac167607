"""SemClipLlavaForConditionalGeneration: vLLM's LLaVA, fed [overview, crop_1..crop_k] per image.

The network is LLaVA's, unchanged (and so are its weights: no retraining). Only the
input side differs: each image arrives as ``1 + k`` tiles (``pixel_values`` is flat
over all tiles, ``num_tiles`` says how many belong to each image), every tile goes
through the vision tower and projector in one batch, and an image's embedding is
its tiles' tokens one after the other — the overview's first.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaForConditionalGeneration, LlavaImageEmbeddingInputs
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from .processor import SemClipDummyInputsBuilder, SemClipMultiModalProcessor, SemClipProcessingInfo


class SemClipImagePixelInputs(TensorSchema):
    """Dimensions:
        - bnt: Batch size * number of images * tiles per image (1 + k, varying)
        - bn: Batch size * number of images
        - h, w: the vision tower's input size
    """

    type: Literal["pixel_values"] = "pixel_values"
    pixel_values: Annotated[torch.Tensor, TensorShape("bnt", 3, "h", "w")]
    num_tiles: Annotated[torch.Tensor, TensorShape("bn")]


@MULTIMODAL_REGISTRY.register_processor(
    SemClipMultiModalProcessor,
    info=SemClipProcessingInfo,
    dummy_inputs=SemClipDummyInputsBuilder,
)
class SemClipLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with semantic crop selection (architecture name for ``--hf-overrides``)."""

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

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...] | torch.Tensor:
        if image_input["type"] == "image_embeds":
            return image_input["data"]
        features = self._image_pixels_to_features(self.vision_tower, image_input["pixel_values"])
        embeds = self.multi_modal_projector(features)  # (tiles, tokens_per_tile, hidden)
        tokens_per_tile = embeds.shape[1]
        embeds = embeds.reshape(-1, embeds.shape[-1])
        sizes = [int(n) * tokens_per_tile for n in image_input["num_tiles"].tolist()]
        return embeds.split(sizes)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        return self._process_image_input(image_input)
