"""SemClipConfig: the one validated configuration of crop selection.

Where values come from, later ones overriding earlier ones:

1. the dataclass defaults below;
2. the server's defaults: the ``semclip_config`` mapping of the model's HF config
   (``--hf-overrides '{"semclip_config": {"topk": 2}}'``, which ``semclip serve``
   writes from its flags), then server-wide ``--mm-processor-kwargs``;
3. each request's ``mm_processor_kwargs`` (offline) or the same field of an
   OpenAI request body, with the same field names (``{"topk": 2}``).

Some fields only make sense for the whole server — which ψ is loaded, where, and
how many crops memory was profiled for — so a request that sets them is refused.
Every bad value raises :class:`SemClipConfigError`, a ``VLLMValidationError``
(HTTP 400 with ``param`` set to the field) that is also a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from vllm.exceptions import VLLMValidationError

from .crops import RELEVANCE_FITS, RELEVANCE_NORMS, num_candidates

Method = Literal["relevance", "random", "overview", "all", "given"]
METHODS: tuple[str, ...] = ("relevance", "random", "overview", "all", "given")
MAX_TOPK = 8
MAX_GRID = 8
MAX_GRIDS = 4
MAX_OVERLAP = 0.5
HF_CONFIG_KEY = "semclip_config"

# Fields that fix what the server loaded or profiled; a request may not change them.
SERVER_ONLY_FIELDS = frozenset({"relevance_model", "relevance_pretrained", "relevance_precision", "device", "max_topk",
                                "max_candidates", "log_selections", "log_questions", "selection_stage"})
# The most candidates grids can make (MAX_GRIDS sizes of at most MAX_GRID): the cap's own bound.
MAX_CANDIDATES = sum(g * g for g in range(MAX_GRID, MAX_GRID - MAX_GRIDS, -1))
# open_clip's ``precision`` values: fp32, or low-precision weights with fp32 layer norms
# ("bf16"/"fp16", OpenAI CLIP's own mixed precision), or every tensor low ("pure_*").
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16")
RelevanceFit = Literal["windows", "pad", "center"]
RelevanceNorm = Literal["grid", "none"]
SelectionStage = Literal["engine", "processor"]
SELECTION_STAGES: tuple[str, ...] = ("engine", "processor")


class SemClipConfigError(VLLMValidationError, ValueError):
    """A SemClip option is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class SemClipConfig:
    """How SemClip picks crops for one image.

    Attributes:
        topk: crops kept next to the overview (0–8). 0 is stock LLaVA.
        grids: grid sizes whose cells are the candidates; (2, 3) gives 4 + 9 = 13 cells.
        overlap: widen each cell by this fraction of its size on every side (0–0.5).
        bridges: add a candidate on each crossing of two grids' lines that no cell covers
            (``crops.bridge_boxes``; 4 for ``[2, 3]``, so 17 candidates), so that every object up
            to 1/6 of the image's short side lies wholly inside some candidate.
        method: ``relevance`` (ψ scores, the default), ``random`` (seeded),
            ``overview`` (no crops), ``all`` (every candidate, AnyRes-like) or
            ``given`` (the ``boxes`` the caller chose: an oracle, another method's crops).
        relevance_model: ψ — an open_clip model name, or a directory in open_clip's
            local-dir format. No default: the served model's ``config.json`` may name it
            (``semclip_config.relevance_model``, a path relative to the model directory),
            otherwise the server or caller must (method ``relevance`` refuses to run without).
        relevance_pretrained: open_clip ``pretrained`` tag or checkpoint path for a
            named ``relevance_model`` (e.g. ``openai`` for ``ViT-L-14-336``).
        relevance_precision: ψ's numeric precision, open_clip's ``precision``
            argument (``fp32``, ``bf16``, ``fp16``, ``pure_bf16``, ``pure_fp16``).
            ``bf16`` cuts ψ's time where matmuls have bf16 units and may pick another crop
            on near ties; fp32 stays the default for exact results.
        device: where ψ runs (``cpu``, ``cuda``, ``cuda:1``…).
        seed: seed of the ``random`` method (mixed with the image and question).
        max_topk: the most crops per image a request may ask for; memory is
            profiled for ``1 + max(max_topk, topk)`` tiles per image (or for every
            candidate when the server's method is ``all``). Server-only.
        pad_to_square: pad the overview and each crop to a square before the image
            processor (LLaVA-1.5's ``expand2square``), so the center crop of the
            CLIP preprocessing cuts nothing off. The VLM's tiles only: how ψ sees a
            region is ``relevance_fit``.
        relevance_fit: how ψ fits a non-square candidate to its square input.
            ``windows`` (default): the region's score is the best of the fewest squares
            of its short side that cover it (``crops.square_windows``) — every pixel, at its
            own aspect, no padding. ``pad``: padded to a square with the CLIP mean colour, as
            the VLM's tiles are — a CLIP trained on square images reads the grey band as
            content (docs/design.md). ``center``: the centre square only.
        relevance_norm: how ψ's scores are compared across grids before the top-k.
            ``grid`` (default): each candidate's score standardised among its own grid's
            cells (``crops.rank_scores``) — a coarse cell's raw score is on another scale and
            won where the VLM reads a finer cell better (docs/design.md). ``none``: ψ's raw
            scores.
        max_candidates: the most candidates per image a request may make (ψ scores each one, in
            the preprocessing worker every request waits on); default: as many as the server's
            own ``grids`` make (17 for ``[2, 3]`` with bridges). A request may reshape its grids within it.
            Server-only.
        log_selections: log one INFO line per image through vLLM's logger — an id tying it to its
            request, method, boxes, scores, milliseconds, the question as a hash (``observe``).
            Server-only.
        log_questions: put the question itself in that line instead of its hash. Server-only.
        selection_stage: where ψ looks at the candidates. ``engine`` (default): the processor
            prepares every candidate's pixels and the question's text embedding, and the model
            runs ψ's image tower for all images of a scheduled batch in one forward, inside
            vLLM's encoder step, then encodes [overview + chosen crops] — ψ batches across
            requests and loads with the model, on its device. ``processor``: ψ runs per request
            in vLLM's front-end preprocessing worker (what a data-dependent number of crops
            would need). Both rank with :func:`selection.choose_crops`. Server-only.
        boxes: with method ``given``, the crops as ``[x0, y0, x1, y1]`` pixel boxes
            (at most 8, clipped to each image); the same boxes apply to every image
            of the request.
    """

    topk: int = 1
    grids: tuple[int, ...] = (2, 3)
    overlap: float = 0.0
    bridges: bool = True
    method: Method = "relevance"
    relevance_model: str | None = None
    relevance_pretrained: str | None = None
    relevance_precision: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    max_topk: int | None = None
    max_candidates: int | None = None
    pad_to_square: bool = True
    relevance_fit: RelevanceFit = "windows"
    relevance_norm: RelevanceNorm = "grid"
    log_selections: bool = False
    log_questions: bool = False
    selection_stage: SelectionStage = "engine"
    boxes: tuple[tuple[int, int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        _check_int("topk", self.topk, 0, MAX_TOPK)
        if not isinstance(self.grids, tuple) or not 1 <= len(self.grids) <= MAX_GRIDS:
            raise SemClipConfigError(
                f"grids must be 1 to {MAX_GRIDS} grid sizes, got {self.grids!r}", parameter="grids"
            )
        for g in self.grids:
            _check_int("grids", g, 1, MAX_GRID)
        if len(set(self.grids)) != len(self.grids):
            raise SemClipConfigError(f"grids must not repeat a size, got {list(self.grids)}", parameter="grids")
        _check_float("overlap", self.overlap, 0.0, MAX_OVERLAP)
        _check_choice("method", self.method, METHODS)
        if self.relevance_model is not None:
            _check_str("relevance_model", self.relevance_model)
        if self.relevance_pretrained is not None:
            _check_str("relevance_pretrained", self.relevance_pretrained)
        _check_choice("relevance_precision", self.relevance_precision, PRECISIONS)
        _check_str("device", self.device)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.max_topk is not None:
            _check_int("max_topk", self.max_topk, 0, MAX_TOPK)
        if self.max_candidates is not None:
            _check_int("max_candidates", self.max_candidates, 1, MAX_CANDIDATES)
        for flag in ("bridges", "pad_to_square", "log_selections", "log_questions"):
            _check_bool(flag, getattr(self, flag))
        _check_choice("relevance_fit", self.relevance_fit, RELEVANCE_FITS)
        _check_choice("relevance_norm", self.relevance_norm, RELEVANCE_NORMS)
        _check_choice("selection_stage", self.selection_stage, SELECTION_STAGES)
        self._check_boxes()

    def _check_boxes(self) -> None:
        if self.method == "given" and not self.boxes:
            raise SemClipConfigError("method 'given' needs boxes: [[x0, y0, x1, y1], ...]", parameter="boxes")
        if self.boxes is None:
            return
        if self.method != "given":
            raise SemClipConfigError(f"boxes are only used with method 'given', not {self.method!r}",
                                     parameter="boxes")
        if not isinstance(self.boxes, tuple) or not 1 <= len(self.boxes) <= MAX_TOPK:
            raise SemClipConfigError(f"boxes must be 1 to {MAX_TOPK} boxes, got {self.boxes!r}", parameter="boxes")
        for box in self.boxes:
            ok = isinstance(box, tuple) and len(box) == 4 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in box)
            if not ok or box[2] <= box[0] or box[3] <= box[1]:
                raise SemClipConfigError(
                    f"each box must be [x0, y0, x1, y1] non-negative integers with x1 > x0 and y1 > y0, got {box!r}",
                    parameter="boxes",
                )

    # ---- derived values -------------------------------------------------
    @property
    def num_candidates(self) -> int:
        return num_candidates(self.grids, self.bridges, self.overlap)

    @property
    def num_crops(self) -> int:
        """Crops this configuration encodes per image (before the question is known)."""
        if self.method == "overview":
            return 0
        if self.method == "all":
            return self.num_candidates
        if self.method == "given":
            return len(self.boxes or ())
        return min(self.topk, self.num_candidates)

    @property
    def max_crops(self) -> int:
        """The most crops per image this (server) configuration accepts: what is profiled."""
        limit = max(self.topk, self.max_topk if self.max_topk is not None else 0)
        if self.method == "all":
            limit = max(limit, self.num_candidates)
        if self.method == "given":
            limit = max(limit, len(self.boxes or ()))
        return limit

    @property
    def psi_in_engine(self) -> bool:
        """Whether ψ scores this configuration's candidates in the model's encoder step."""
        return self.selection_stage == "engine" and self.method == "relevance" and self.num_crops > 0

    @property
    def candidate_cap(self) -> int:
        """The most candidates per image this (server) configuration lets a request make."""
        return self.max_candidates if self.max_candidates is not None else self.num_candidates

    def selection_key(self) -> tuple:
        """What the selection depends on, for the multimodal cache key."""
        return (self.topk, self.grids, self.overlap, self.bridges, self.method, self.relevance_model,
                self.relevance_pretrained, self.relevance_precision, self.seed, self.pad_to_square, self.relevance_fit,
                self.relevance_norm, self.boxes, self.selection_stage)

    # ---- construction ---------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, overrides: Mapping[str, Any] | None, *, request: bool = False, source: str = "mm_processor_kwargs") -> SemClipConfig:
        """A copy with ``overrides`` applied and validated.

        With ``request=True`` server-only fields are refused, and the result must fit
        the memory this (server) configuration profiled for.
        """
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise SemClipConfigError(f"{source} must be a JSON object, got {type(overrides).__name__}")
        names = self.field_names()
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in names:
                raise SemClipConfigError(
                    f"unknown {source} key {key!r}; SemClip accepts: {', '.join(sorted(names))}", parameter=str(key)
                )
            if request and key in SERVER_ONLY_FIELDS:
                raise SemClipConfigError(
                    f"{key} is fixed when the server starts and cannot be set per request", parameter=key
                )
            values[key] = _coerce(key, value)
        new = dataclasses.replace(self, **values)
        if request:
            self.check_fits(new)
        return new

    def check_fits(self, requested: SemClipConfig) -> None:
        """Refuse a request that would make more candidates than the server allows, or encode more
        crops than it profiled memory for."""
        cap = self.candidate_cap
        if requested.method not in ("overview", "given") and requested.num_candidates > cap:
            raise SemClipConfigError(
                f"grids {list(requested.grids)} make {requested.num_candidates} candidates per image, but this "
                f"server allows at most {cap} (max_candidates); start it with a larger --max-candidates",
                parameter="grids")
        limit = self.max_crops
        if requested.num_crops <= limit:
            return
        if requested.method == "all":
            raise SemClipConfigError(
                f"method 'all' on grids {list(requested.grids)} encodes {requested.num_crops} crops per image, "
                f"but this server was started for at most {limit} (max_topk); start it with --method all "
                f"or a larger --max-topk",
                parameter="method",
            )
        if requested.method == "given":
            raise SemClipConfigError(
                f"{requested.num_crops} boxes given, but this server was started for at most {limit} crops per "
                f"image (max_topk)", parameter="boxes")
        raise SemClipConfigError(
            f"topk must be at most {limit}, the maximum this server was started with (max_topk); "
            f"got {requested.topk}",
            parameter="topk",
        )

    def require_relevance_model(self) -> str:
        """ψ's name or path, refusing a configuration that needs ψ and names none."""
        if self.relevance_model is None:
            raise SemClipConfigError(
                "relevance_model is not set: name ψ with --relevance-model (an open_clip model such as "
                "ViT-B-16 with --relevance-pretrained openai, or a local-dir directory), or in the model's "
                f"config.json as {HF_CONFIG_KEY}.relevance_model", parameter="relevance_model")
        return self.relevance_model

    @classmethod
    def from_hf_config(cls, hf_config: Any, model_path: str | Path | None = None) -> SemClipConfig:
        """Server defaults: the model directory's own ``config.json`` ``semclip_config``, then the
        HF config's (``--hf-overrides`` replaces that mapping whole, so the file's is read too).

        A relative ``relevance_model`` that is not a path from the working directory but is one
        inside ``model_path`` names ψ shipped beside the model.
        """
        config = cls().replace(model_file_config(model_path), source=f"{model_path}/config.json {HF_CONFIG_KEY}")
        config = config.replace(getattr(hf_config, HF_CONFIG_KEY, None), source=f"hf_overrides {HF_CONFIG_KEY}")
        return dataclasses.replace(config, relevance_model=resolve_relevance_model(config.relevance_model, model_path))


def server_config(model_config: Any) -> SemClipConfig:
    """A server's configuration from vLLM's ``ModelConfig``: the model's ``semclip_config`` (file, then
    ``--hf-overrides``), then ``--mm-processor-kwargs``. The processor and the model both read it."""
    config = SemClipConfig.from_hf_config(model_config.hf_config, model_config.model)
    mm_config = getattr(model_config, "multimodal_config", None)
    return config.replace(getattr(mm_config, "mm_processor_kwargs", None) or {}, source="--mm-processor-kwargs")


def model_file_config(model_path: str | Path | None) -> dict[str, Any]:
    """The ``semclip_config`` mapping of a local model directory's ``config.json`` (empty if none)."""
    if model_path is None or not (Path(model_path) / "config.json").is_file():
        return {}
    raw = json.loads((Path(model_path) / "config.json").read_text()).get(HF_CONFIG_KEY)
    return raw if isinstance(raw, dict) else {}


def resolve_relevance_model(name: str | None, model_path: str | Path | None) -> str | None:
    """A relative path found only inside the model directory becomes absolute; anything else is kept."""
    if name is None or model_path is None or Path(name).is_absolute() or Path(name).exists():
        return name
    beside = Path(model_path) / name
    return str(beside.resolve()) if beside.exists() else name


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SemClipConfigError(
            f"{name} must be an integer in {lo}..{hi}, got {value!r} ({type(value).__name__})", parameter=name
        )
    if not lo <= value <= hi:
        raise SemClipConfigError(f"{name} must be an integer in {lo}..{hi}, got {value}", parameter=name)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SemClipConfigError(f"{name} must be true or false, got {value!r}", parameter=name)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise SemClipConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}", parameter=name)


def _check_float(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SemClipConfigError(f"{name} must be a number in [{lo}, {hi}], got {value!r}", parameter=name)
    if not lo <= value <= hi:
        raise SemClipConfigError(f"{name} must be a number in [{lo}, {hi}], got {value}", parameter=name)


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise SemClipConfigError(f"{name} must be a non-empty string, got {value!r}", parameter=name)


def _coerce(key: str, value: Any) -> Any:
    """JSON gives lists where the dataclass keeps tuples; the CLI gives '2,3'. Nothing else is coerced."""
    if key == "grids":
        if isinstance(value, str):
            try:
                value = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise SemClipConfigError(f"grids must be grid sizes like [2, 3], got {value!r}", parameter="grids")
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            return tuple(value)
        raise SemClipConfigError(f"grids must be a list of grid sizes like [2, 3], got {value!r}", parameter="grids")
    if key == "boxes" and isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(tuple(b) if isinstance(b, Sequence) and not isinstance(b, (str, bytes)) else b for b in value)
    if key == "overlap" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
