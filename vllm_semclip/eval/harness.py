"""The evaluation harness: V*-style questions through vLLM with the plugin, method by method.

Methods (each one a SemClip configuration sent per request, so one engine serves all):

* ``overview`` — stock LLaVA: the whole image as one tile, no crops;
* ``random``   — ``topk`` random candidate crops (seeded);
* ``all``      — every candidate crop (AnyRes-like; the most tokens);
* ``clip``     — SemClip with ψ (method ``relevance``; the bundled zero-shot ψ by default);
* ``trained``  — SemClip with the ψ trained by distant supervision (``semclip train-relevance``;
  the bundled trained ψ by default);
* ``oracle``   — the candidate that best covers the target boxes (the paper's upper bound),
  sent as method ``given`` with that box.

Protocols: ``likelihood`` (V* Bench's official one, the default) scores each option by the
sum of its tokens' log-probabilities given image and question — vLLM's ``prompt_logprobs``
on "prompt + option" — and counts the question right when the first option scores
highest; ``generate`` decodes greedily and counts it right when the answer is closest to
the first option. All prompts of a run go to ``LLM.generate`` at once (vLLM batches them;
the multimodal cache processes each image/question once for all its options).

Reported: accuracy overall and per V* category, crop hit rate (a chosen crop contains
every target box), mean visual tokens per question (counted in the prompt vLLM ran), and
every question's record. The boxes are recomputed client-side with ``select_crops`` — the
function the processor runs, deterministic — so the record shows what the model saw.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_semclip.eval.benchdata import CATEGORIES, BenchRecord, load_bench
from vllm_semclip.config import SemClipConfig
from vllm_semclip.crops import candidate_boxes
from vllm_semclip.eval.metrics import crop_hit, oracle_index

EVAL_METHODS = ("overview", "random", "all", "clip", "trained", "oracle")
PSI_METHODS = ("clip", "trained")
TOPK_METHODS = ("random", *PSI_METHODS)  # the methods whose crop count is k
PROTOCOLS = ("likelihood", "generate")


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation run's choices (validated)."""

    method: str
    topk: int = 1
    protocol: str = "likelihood"
    grids: tuple[int, ...] = (2, 3)
    bridges: bool = True  # SemClipConfig.bridges: the candidates every method draws from
    overlap: float | None = None  # SemClipConfig.overlap; None: the model's config's (evaluate_records resolves it)
    relevance_norm: str | None = None  # SemClipConfig.relevance_norm of clip/trained; None: the engine's default
    relevance_model: str | None = None  # ψ of ``clip``/``trained``; the bundled zero-shot/trained one when None
    seed: int = 0
    max_topk: int | None = None  # the engine's room for crops (a k sweep shares one engine); ``topk`` when None

    def __post_init__(self) -> None:
        if self.method not in EVAL_METHODS:
            raise ValueError(f"method must be one of {', '.join(EVAL_METHODS)}; got {self.method!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        SemClipConfig(topk=self.topk, grids=tuple(self.grids), bridges=self.bridges, overlap=self.overlap or 0.0,
                      relevance_norm=self.relevance_norm or "grid", max_topk=self.max_topk)
        if self.max_topk is not None and self.max_topk < self.topk:
            raise ValueError(f"max_topk {self.max_topk} is below topk {self.topk}")

    def request_kwargs(self, record: BenchRecord, size: tuple[int, int]) -> dict[str, Any]:
        """The request's ``mm_processor_kwargs`` for this method and record."""
        if self.method == "overview":
            return {"method": "overview", "topk": 0}
        if self.method == "all":
            return {"method": "all", **self.candidates}
        if self.method == "random":
            return {"method": "random", "topk": self.topk, **self.candidates, "seed": self.seed}
        if self.method in PSI_METHODS:
            norm = {} if self.relevance_norm is None else {"relevance_norm": self.relevance_norm}
            return {"method": "relevance", "topk": self.topk, **self.candidates, **norm}
        if self.overlap is None:
            raise ValueError("oracle needs the candidates' overlap: resolve it from the engine's config first")
        candidates = candidate_boxes(*size, self.grids, self.overlap, self.bridges)
        return {"method": "given", "boxes": [list(candidates[oracle_index(candidates, record.target_boxes)])]}

    @property
    def candidates(self) -> dict[str, Any]:
        """The ``SemClipConfig`` fields that make the candidates, as a request sends them (no overlap: the
        engine's default, which the model's ``config.json`` may set)."""
        fields: dict[str, Any] = {"grids": list(self.grids), "bridges": self.bridges}
        return fields if self.overlap is None else {**fields, "overlap": self.overlap}

    @property
    def psi(self) -> str | None:
        """The ψ this method's engine loads (None: not a ψ method, or the one the model's config names)."""
        if self.method == "trained":
            from vllm_semclip.tiny.bundled import DEFAULT_TRAINED_RELEVANCE_DIR

            return self.relevance_model or str(DEFAULT_TRAINED_RELEVANCE_DIR)
        return self.relevance_model if self.method == "clip" else None

    def server_config(self) -> dict[str, Any]:
        """The engine's SemClip defaults: room for every candidate (``all``), ψ if one was named.

        ψ is fixed when an engine starts, so methods with different ψ need their own engine.
        """
        room = max(1, self.max_topk or self.topk)  # __post_init__ keeps max_topk >= topk
        config: dict[str, Any] = {"method": "all", **self.candidates, "max_topk": room}
        if self.psi:
            config["relevance_model"] = self.psi
        return config


def prompt_for(tokenizer, question: str) -> str:
    """The model's own chat template around one image and the question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def choose_option(text: str, options: Sequence[str]) -> int:
    """The option a generated answer is closest to (exact match first, then string similarity)."""
    norm = text.strip().lower()
    for i, opt in enumerate(options):
        if norm == opt.strip().lower():
            return i
    ratios = [difflib.SequenceMatcher(None, norm, opt.strip().lower()).ratio() for opt in options]
    return max(range(len(options)), key=ratios.__getitem__)


def option_scores_from_outputs(outputs, option_lengths: Sequence[int]) -> list[float]:
    """Sum of each option's token log-probs: the last ``n`` entries of vLLM's ``prompt_logprobs``."""
    scores = []
    for out, n in zip(outputs, option_lengths):
        ids = out.prompt_token_ids[-n:]
        entries = out.prompt_logprobs[-n:]
        scores.append(float(sum(entry[t].logprob for entry, t in zip(entries, ids))))
    return scores


def _selected_boxes(kwargs: dict[str, Any], image, question: str, base: SemClipConfig) -> list[list[int]]:
    """The boxes the processor will pick for this request (same function, same config)."""
    from vllm_semclip.selection import select_crops

    return [list(b) for b in select_crops(image, question, base.replace(kwargs)).boxes]


def evaluate_records(llm, records: Sequence[BenchRecord], settings: EvalSettings, progress: bool = True) -> dict:
    """Run one method over ``records`` on an engine started with ``settings.server_config()``."""
    from tqdm import tqdm
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    image_token_id = llm.llm_engine.model_config.hf_config.image_token_index
    # the engine's own defaults (the model's config.json may name ψ), then this method's
    base = SemClipConfig.from_hf_config(None, llm.llm_engine.model_config.model).replace(settings.server_config())
    if settings.overlap is None:
        settings = dataclasses.replace(settings, overlap=base.overlap)
    if settings.relevance_norm is None:
        settings = dataclasses.replace(settings, relevance_norm=base.relevance_norm)
    prompts, lengths, per_record = [], [], []
    start = time.time()
    for i, rec in enumerate(tqdm(records, desc=f"preparing {settings.method}", disable=not progress)):
        image = rec.load_image()
        kwargs = settings.request_kwargs(rec, image.size)
        prompt = prompt_for(tokenizer, rec.question)
        boxes = _selected_boxes(kwargs, image, rec.question, base)
        per_record.append({"boxes": boxes})
        texts = [prompt + " " + opt for opt in rec.options] if settings.protocol == "likelihood" else [prompt]
        for j, text in enumerate(texts):
            prompts.append({"prompt": text, "multi_modal_data": {"image": image}, "mm_processor_kwargs": kwargs})
            if settings.protocol == "likelihood":
                lengths.append(len(tokenizer(" " + rec.options[j], add_special_tokens=False)["input_ids"]))
    if settings.protocol == "likelihood":
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    else:
        params = SamplingParams(max_tokens=24, temperature=0.0)
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    if settings.protocol == "likelihood":
        scores = option_scores_from_outputs(outputs, lengths)
    results: list[dict] = []
    k = 0  # outputs come back in prompt order: each record's options are consecutive
    for i, rec in enumerate(records):
        n = len(rec.options) if settings.protocol == "likelihood" else 1
        outs = outputs[k:k + n]
        visual_tokens = sum(t == image_token_id for t in outs[0].prompt_token_ids)
        entry = {"name": rec.name, "category": rec.category, "group": record_group(rec), "question": rec.question,
                 "answer": rec.answer, "visual_tokens": int(visual_tokens), **per_record[i]}
        if settings.protocol == "likelihood":
            s = scores[k:k + n]
            choice = max(range(n), key=s.__getitem__)
            entry["option_scores"] = [round(v, 4) for v in s]
        else:
            text = outs[0].outputs[0].text
            choice = choose_option(text, rec.options)
            entry["generated"] = text
        entry["choice"] = choice
        entry["correct"] = choice == 0
        entry["crop_hit"] = crop_hit(entry["boxes"], rec.target_boxes)
        results.append(entry)
        k += n
    return summarize(results, settings, seconds=time.time() - start)


GROUPS: tuple[str, ...] = ("attribute_inside", "attribute_border", "spatial_near", "spatial_far")


def record_group(record: BenchRecord) -> str:
    """Where a question's targets lie: an attribute target inside one cell or across a cell line; a
    spatial pair inside one 3×3 cell (``near``) or farther apart (``far``). The legacy split (and a
    real V* Bench) carries no such marks: its pairs count as near and its targets as inside."""
    if record.category == "direct_attributes":
        return "attribute_border" if record.extra.get("border") else "attribute_inside"
    return "spatial_far" if record.extra.get("pair") == "far" else "spatial_near"


def summarize(results: list[dict], settings: EvalSettings, seconds: float | None = None) -> dict:
    """The results document: headline figures first, every question's record after."""
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    by_category = {c: mean(r["correct"] for r in results if r["category"] == c)
                   for c in CATEGORIES if any(r["category"] == c for r in results)}
    return {
        "method": settings.method,
        "topk": settings.topk if settings.method in TOPK_METHODS else None,
        "relevance_model": settings.psi,
        "protocol": settings.protocol,
        "grids": list(settings.grids),
        "bridges": settings.bridges,
        "overlap": settings.overlap,
        "relevance_norm": settings.relevance_norm if settings.method in PSI_METHODS else None,
        "questions": len(results),
        "overall_accuracy": mean(r["correct"] for r in results),
        "accuracy_by_category": by_category,
        "accuracy_by_group": {g: mean(r["correct"] for r in results if r.get("group") == g)
                              for g in GROUPS if any(r.get("group") == g for r in results)},
        "crop_hit_rate": mean(r["crop_hit"] for r in results),
        "crop_hit_by_category": {c: mean(r["crop_hit"] for r in results if r["category"] == c)
                                 for c in CATEGORIES if any(r["category"] == c for r in results)},
        "mean_visual_tokens": mean(r["visual_tokens"] for r in results),
        "seconds": round(seconds, 1) if seconds is not None else None,
        "records": results,
    }


def plot_accuracy_vs_tokens(results: Sequence[dict], path: Path | str) -> Path:
    """Accuracy (overall and per category) against visual tokens per question, one point per method."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    markers = {"overall": "o", "direct_attributes": "s", "relative_position": "^"}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours: dict[str, str] = {}
    for doc in results:
        colours.setdefault(doc["method"], cycle[len(colours) % len(cycle)])
    for method, colour in colours.items():  # a method run at several k: its points joined, fewest tokens first
        sweep = sorted((d for d in results if d["method"] == method), key=lambda d: d["mean_visual_tokens"])
        if len(sweep) > 1:
            ax.plot([d["mean_visual_tokens"] for d in sweep], [100 * d["overall_accuracy"] for d in sweep],
                    c=colour, alpha=0.5, lw=1)
    seen: dict[int, int] = {}  # methods at the same token count get their labels stacked
    for doc in sorted(results, key=lambda d: (d["mean_visual_tokens"], d["overall_accuracy"])):
        label = doc["method"] + (f" k={doc['topk']}" if doc.get("topk") else "") + f" ({100 * doc['overall_accuracy']:.0f}%)"
        x = doc["mean_visual_tokens"]
        j = seen.get(round(x), 0)
        seen[round(x)] = j + 1
        ax.scatter([x], [100 * doc["overall_accuracy"]], marker=markers["overall"], s=60, color=colours[doc["method"]])
        ax.annotate(label, (x, 100 * doc["overall_accuracy"]), textcoords="offset points", xytext=(8, -4 + 11 * j),
                    fontsize=8, arrowprops={"arrowstyle": "-", "alpha": 0.3} if j else None)
        for cat, acc in doc["accuracy_by_category"].items():
            ax.scatter([x], [100 * acc], marker=markers[cat], s=22, c="gray", alpha=0.7)
    ax.scatter([], [], marker="o", c="k", label="overall")
    ax.scatter([], [], marker="s", c="gray", label="attribute")
    ax.scatter([], [], marker="^", c="gray", label="spatial")
    ax.set_xscale("log")
    ticks = sorted({round(d["mean_visual_tokens"]) for d in results})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("visual tokens per question (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("SemClip V*-style benchmark: accuracy vs visual tokens")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# the multimodal cache only has to keep one question's image while its options are scored (they are
# submitted together); vLLM's default (4 GiB in the front end and as much again in the engine) fills
# with decoded images in the engine stage and put two labelling engines past a 24 GiB host
ENGINE_MM_CACHE_GB = 1.0


def make_engine(model: str, server_config: dict[str, Any], max_model_len: int = 8192):
    """An offline vLLM engine with the SemClip architecture and ``server_config`` as its defaults."""
    from vllm import LLM

    from vllm_semclip.plugin import ARCHITECTURE

    return LLM(model=model, hf_overrides={"architectures": [ARCHITECTURE], "semclip_config": server_config},
               dtype="bfloat16", enforce_eager=True, max_model_len=max_model_len,
               limit_mm_per_prompt={"image": 1}, mm_processor_cache_gb=ENGINE_MM_CACHE_GB, seed=0)


def run(data: str | Path, methods: Sequence[str], out: str | Path, *, model: str | None = None,
        topk: int | Sequence[int] = 1,
        protocol: str = "likelihood", grids: Sequence[int] = (2, 3), bridges: bool = True,
        overlap: float | None = None, relevance_norm: str | None = None, relevance_model: str | None = None,
        clip_model: str | None = None, limit: int | None = None, progress: bool = True) -> list[dict]:
    """Evaluate ``methods`` on the benchmark at ``data``; write results and the plot; return the documents.

    ``relevance_model`` is the ψ of ``trained`` (default: the bundled trained ψ), ``clip_model``
    the ψ of ``clip`` (default: the bundled zero-shot ψ). ``topk`` is one k, or several for a
    sweep: ``random``, ``clip`` and ``trained`` then run once per k (``METHOD-kK.json``), the
    other methods once, all with room for the largest k so that one engine per ψ serves them.
    ``out`` is a ``.json`` file for one run, or a directory (``METHOD.json`` each) for several.
    Runs go one after the other; consecutive ones that need the same engine (same ψ) share it.
    """
    import os

    from vllm_semclip.server import runtime_env
    from vllm_semclip.tiny.bundled import DEFAULT_MODEL_DIR
    from vllm_semclip.tiny.build import ensure_default_models

    ks = sorted({topk} if isinstance(topk, int) else set(topk))
    if not ks:
        raise ValueError("topk: give at least one k")
    sweep = len(ks) > 1
    settings = [EvalSettings(m, topk=k, protocol=protocol, grids=tuple(grids), bridges=bridges, overlap=overlap,
                             relevance_norm=relevance_norm, max_topk=ks[-1] if sweep else None,
                             relevance_model=relevance_model if m == "trained" else clip_model if m == "clip" else None)
                for m in methods for k in (ks if m in TOPK_METHODS else ks[:1])]
    records = load_bench(data)
    if limit:
        records = records[:limit]
    out = Path(out)
    if len(settings) > 1 and out.suffix == ".json":
        raise ValueError("several methods (or k) write one file each: give --out a directory")
    files = [out] if out.suffix == ".json" else [
        out / (f"{s.method}-k{s.topk}.json" if sweep and s.method in TOPK_METHODS else f"{s.method}.json")
        for s in settings]
    files[0].parent.mkdir(parents=True, exist_ok=True)
    for key, value in runtime_env().items():
        os.environ.setdefault(key, value)
    ensure_default_models()
    for s in settings:
        if s.psi and not Path(s.psi).exists() and s.method == "trained" and s.relevance_model is None:
            raise FileNotFoundError(f"no trained ψ at {s.psi}: run `semclip train-relevance` or give --relevance-model")
    docs = []
    engine, engine_config = None, None
    try:
        for s, path in zip(settings, files):
            if s.server_config() != engine_config:
                if engine is not None:
                    engine.llm_engine.engine_core.shutdown()
                engine_config = s.server_config()
                engine = make_engine(model or str(DEFAULT_MODEL_DIR), engine_config)
            doc = evaluate_records(engine, records, s, progress)
            doc.update({"data": str(data), "model": model or str(DEFAULT_MODEL_DIR)})
            path.write_text(json.dumps(doc, indent=1))
            docs.append(doc)
            if progress:
                print(format_row(doc))
    finally:
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
    everything = [json.loads(p.read_text()) for p in sorted(files[0].parent.glob("*.json"))]
    everything = [d for d in everything if isinstance(d, dict) and "overall_accuracy" in d and "mean_visual_tokens" in d]
    plot_accuracy_vs_tokens(everything, files[0].parent / "accuracy_vs_tokens.png")
    return docs


def format_row(doc: dict) -> str:
    cats = doc["accuracy_by_category"]
    groups = doc.get("accuracy_by_group", {})
    hits = doc.get("crop_hit_by_category", {})
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    label = doc["method"] + (f" (k={doc['topk']})" if doc.get("topk") else "")
    return (f"| {label} | {pct(cats.get('direct_attributes'))} | {pct(groups.get('spatial_near'))} | "
            f"{pct(groups.get('spatial_far'))} | {pct(doc['overall_accuracy'])} | "
            f"{pct(hits.get('direct_attributes'))} | {doc['mean_visual_tokens']:.0f} |")


TABLE_HEADER = ("| method | attribute | spatial near | spatial far | overall | attribute crop hit "
                "| visual tokens / question |\n|---|---|---|---|---|---|---|")
