"""Choosing the crops: the one function the processor, the CLI and the Python API share.

``select_crops(image, question, config)`` is exactly what the SemClip processor runs
for every image inside vLLM, so ``semclip select`` and offline analysis see the same
boxes the model was given.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .config import SemClipConfig
from .crops import Box, candidate_boxes, clip_box, crop_boxes, pad_to_square, rank_scores, to_rgb, top_indices
from .relevance import get_relevance_model, image_array


@dataclass(frozen=True)
class Selection:
    """The crops chosen for one image and one question, best first.

    ``scores`` and ``candidate_scores`` are ψ's own (cosines, less its reference texts);
    ``ranking_scores`` are what the crops were ranked by (``SemClipConfig.relevance_norm``).
    """

    boxes: list[Box]
    scores: list[float | None]
    candidates: list[Box]
    candidate_scores: list[float] | None
    method: str
    question: str
    image_size: tuple[int, int]
    ranking_scores: list[float] | None = None

    @property
    def num_crops(self) -> int:
        return len(self.boxes)

    def to_json(self) -> dict[str, Any]:
        return {
            "boxes": [list(b) for b in self.boxes],
            "scores": self.scores,
            "candidates": len(self.candidates),
            "candidate_boxes": [list(b) for b in self.candidates],
            "candidate_scores": self.candidate_scores,
            "ranking_scores": self.ranking_scores,
            "method": self.method,
            "question": self.question,
            "image_size": list(self.image_size),
        }


def _random_generator(config: SemClipConfig, question: str, size: tuple[int, int]) -> random.Random:
    """Seeded by (seed, question, image size) so a request is reproducible in any process."""
    digest = hashlib.sha256(f"{config.seed}\x00{question}\x00{size[0]}x{size[1]}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def select_crops(image: Image.Image, question: str, config: SemClipConfig | None = None) -> Selection:
    """Pick the crops of ``image`` that matter for ``question``.

    Degrades instead of failing: a prompt with no question gets no crops under
    ``relevance`` (ψ has nothing to score against); any image size works, even 1×1.
    """
    config = config or SemClipConfig()
    rgb = to_rgb(image)
    size = rgb.size
    question = question.strip()
    candidates = candidate_boxes(size[0], size[1], config.grids, config.overlap, config.bridges)
    k = min(config.num_crops, len(candidates))

    def result(indices: list[int], scores: list[float] | None, ranking: list[float] | None = None) -> Selection:
        chosen = [scores[i] for i in indices] if scores is not None else [None] * len(indices)
        return Selection(
            boxes=[candidates[i] for i in indices],
            scores=chosen,
            candidates=candidates,
            candidate_scores=scores,
            method=config.method,
            question=question,
            image_size=size,
            ranking_scores=ranking,
        )

    if config.method == "overview" or k == 0:
        return result([], None)
    if config.method == "all":
        return result(list(range(len(candidates))), None)
    if config.method == "given":
        given = [clip_box(*box, *size) for box in config.boxes or ()]
        return Selection(boxes=given, scores=[None] * len(given), candidates=candidates, candidate_scores=None,
                         method=config.method, question=question, image_size=size)
    if config.method == "random":
        return result(_random_generator(config, question, size).sample(range(len(candidates)), k), None)
    if not question:
        return result([], None)

    psi = get_relevance_model(config.require_relevance_model(), config.relevance_pretrained, config.device,
                              config.relevance_precision)
    scores = [float(s) for s in psi.score_regions(question, rgb, candidates, config.relevance_fit)]
    ranking, chosen = choose_crops(scores, config)
    return result(chosen, scores, ranking)


def choose_crops(candidate_scores: Sequence[float], config: SemClipConfig) -> tuple[list[float], list[int]]:
    """(ranking scores, the indices of the crops to keep, best first) from ψ's candidate scores.

    The one ranking rule: ``select_crops`` (processor stage, CLI, Python API) and the model's
    encoder step (engine stage) both call it, so the two stages keep the same crops for the
    same scores; ties go to the earlier candidate (``crops.top_indices``), whatever the batch.
    """
    ranking = rank_scores(candidate_scores, config.grids, config.relevance_norm, config.bridges, config.overlap)
    return ranking, top_indices(ranking, min(config.num_crops, len(ranking)))


def selected_tiles(
    image: Image.Image,
    selection: Selection,
    pad_fill: tuple[int, int, int] | None,
    max_side: int | None = None,
) -> list[Image.Image]:
    """[overview, crop_1, …, crop_k] as RGB images, padded to squares when ``pad_fill`` is given
    (:func:`box_tiles` of the selection's boxes)."""
    return box_tiles(image, selection.boxes, pad_fill, max_side)


def box_tiles(
    image: Image.Image,
    boxes: Sequence[Box],
    pad_fill: tuple[int, int, int] | None,
    max_side: int | None = None,
    overview: bool = True,
) -> list[Image.Image]:
    """[overview, one tile per box] as RGB images, padded to squares when ``pad_fill`` is given
    (without the overview when ``overview`` is false: the engine stage cuts only the chosen crops).

    With ``max_side``, a tile larger than that is first box-reduced by an integer factor (to
    between ``max_side`` and twice it): padding a 2700-px photo and letting the CLIP image
    processor resample it all the way down costs far more than the final resize from there.
    """
    rgb = to_rgb(image)
    tiles = [rgb, *crop_boxes(rgb, boxes)] if overview else crop_boxes(rgb, boxes)
    if max_side is not None:
        tiles = [t.reduce(f) if (f := max(t.size) // max_side) >= 2 else t for t in tiles]
    if pad_fill is not None:
        tiles = [pad_to_square(t, pad_fill) for t in tiles]
    return tiles


@dataclass(frozen=True)
class PsiInputs:
    """What the engine stage needs of one image and question to choose its crops there: ψ's views
    of every candidate (``pixels``), which views are whose (``index``, ``[R, V]``), the question's
    embedding (``query``), the request's ranking settings (``config``) and the decoded RGB image
    the engine cuts the chosen crops from (``image``, ``[H, W, 3]`` uint8: the array ψ's views were
    cut from, copied out of Pillow once)."""

    candidates: list[Box]
    pixels: Any  # torch.Tensor [N, 3, S, S], uint8 (RelevanceModel.region_pixels)
    index: Any  # torch.Tensor [R, V], long
    query: Any  # torch.Tensor [D], float32
    question: str
    image_size: tuple[int, int]
    config: SemClipConfig
    image: Any  # torch.Tensor [H, W, 3], uint8 (relevance.image_array)

    def meta(self, item_id: str | None = None) -> dict[str, Any]:
        """What the model needs besides tensors, as JSON: the ranking settings and what a log names."""
        c = self.config
        return {"id": item_id, "question": self.question, "image_size": list(self.image_size),
                "candidates": [list(b) for b in self.candidates], "method": c.method,
                "ranking": {"topk": c.topk, "grids": list(c.grids), "overlap": c.overlap, "bridges": c.bridges,
                            "relevance_norm": c.relevance_norm},
                "log": c.log_selections, "log_question": c.log_questions}


def prepare_psi_inputs(image: Image.Image, question: str, config: SemClipConfig) -> PsiInputs:
    """Everything of ``select_crops`` but ψ's image forward and the ranking (engine stage)."""
    rgb = to_rgb(image)
    candidates = candidate_boxes(rgb.size[0], rgb.size[1], config.grids, config.overlap, config.bridges)
    psi = get_relevance_model(config.require_relevance_model(), config.relevance_pretrained, config.device,
                              config.relevance_precision, image_tower=False)  # the engine holds the image tower
    array = image_array(rgb)
    pixels, index = psi.region_views(array, candidates, config.relevance_fit)
    query = psi.text_query(question.strip())
    return PsiInputs(candidates, pixels, index, query.float().cpu().clone(), question.strip(), rgb.size, config,
                     array)


def engine_selection(meta: dict[str, Any], candidate_scores: Sequence[float]) -> Selection:
    """The engine stage's :class:`Selection` from ψ's candidate scores and :meth:`PsiInputs.meta`,
    ranked by :func:`choose_crops` exactly as ``select_crops`` ranks."""
    ranking_config = SemClipConfig(**{**meta["ranking"], "grids": tuple(meta["ranking"]["grids"])})
    scores = [float(s) for s in candidate_scores]
    ranking, chosen = choose_crops(scores, ranking_config)
    candidates = [tuple(b) for b in meta["candidates"]]
    return Selection(boxes=[candidates[i] for i in chosen], scores=[scores[i] for i in chosen],
                     candidates=candidates, candidate_scores=scores, method=meta["method"],
                     question=meta["question"], image_size=tuple(meta["image_size"]), ranking_scores=ranking)
