"""Distant supervision: the VLM itself labels which candidate crop answers a question.

For every question of a training split and every candidate crop of its image, the VLM
is run through vLLM with the plugin on *overview + that crop* (method ``given``), and
on the overview alone (method ``overview``). Each option is scored by its likelihood
(V* Bench's protocol, the same code as :mod:`vllm_semclip.eval.harness`). Recorded per
condition: every option's log-likelihood, the correct option's log-likelihood
(``loglik``), its log-probability *among the options* (``logprob``: the correct
option's score minus the log-sum-exp of all options' scores) and whether the VLM
answers correctly (``correct``: the correct option scores highest).

A crop's relevance label is its ``gain``: how much it raises the correct option's
log-probability over the overview alone. Normalising over the options is deliberate:
the raw likelihood of a sentence also rises with crops that merely make the *wording*
likelier; among the options, only evidence for the answer counts. The question's
positive crop (``best``) is the crop of largest gain.

The job runs on Ray: it starts a local Ray unless an address is given (:func:`ray_address`); each
actor (:class:`LabelWorker`) holds one vLLM engine with the plugin and labels a *shard*
(a fixed, contiguous slice of the questions in load order) per call, with one batched
``LLM.generate``. The driver writes each finished shard as JSONL — written to a temporary
name, then renamed, so a shard file is complete or absent — and a rerun skips shards that
exist: an interrupted job loses at most the shards in flight. Images travel to the actors
as bytes, so the same job runs unchanged on a cluster whose nodes do not share the
driver's disk. ``manifest.json`` records what the shards were labelled with; resuming
with other settings is refused instead of mixing labels.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_semclip.eval.benchdata import BenchRecord, load_bench
from vllm_semclip.crops import candidate_boxes
from vllm_semclip.eval.metrics import crop_hit, oracle_index

MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.jsonl"


class LabelError(ValueError):
    """Bad labelling settings, or an output directory labelled with other settings."""


@dataclass(frozen=True)
class LabelConfig:
    """What ``semclip label`` labels and how it shards the work (validated)."""

    data: str
    model: str
    out: str
    grids: tuple[int, ...] = (2, 3)
    bridges: bool = True  # SemClipConfig.bridges: the candidates labelled are the served ones
    shard_size: int = 16  # questions per shard: one ``LLM.generate`` batch, the unit of resumption
    actors: int = 1
    address: str | None = None  # an existing Ray cluster; None starts a local one
    cpus_per_actor: int | None = None  # default: this machine's cores shared among the actors
    limit: int | None = None  # label only the first N questions

    def __post_init__(self) -> None:
        from vllm_semclip.config import SemClipConfig

        if self.shard_size < 1:
            raise LabelError(f"shard_size must be at least 1, got {self.shard_size}")
        if self.actors < 1:
            raise LabelError(f"actors must be at least 1, got {self.actors}")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 1:
            raise LabelError(f"cpus_per_actor must be at least 1, got {self.cpus_per_actor}")
        if self.limit is not None and self.limit < 1:
            raise LabelError(f"limit must be at least 1, got {self.limit}")
        SemClipConfig(grids=tuple(self.grids), bridges=self.bridges)  # the plugin's own limits

    def manifest(self, questions: int) -> dict[str, Any]:
        """What the shards depend on; a resumed run must agree on all of it."""
        return {"data": str(Path(self.data).resolve()), "model": str(self.model), "grids": list(self.grids),
                "bridges": self.bridges, "shard_size": self.shard_size, "questions": questions,
                "shards": math.ceil(questions / self.shard_size)}


def shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.jsonl"


def shards(records: Sequence[BenchRecord], size: int) -> Iterator[tuple[int, list[BenchRecord]]]:
    for start in range(0, len(records), size):
        yield start // size, list(records[start:start + size])


def conditions(size: tuple[int, int], grids: Sequence[int], bridges: bool = True) -> list[dict[str, Any]]:
    """The request kwargs of every condition of one image: the overview, then each candidate crop."""
    candidates = candidate_boxes(*size, grids, bridges=bridges)
    return [{"method": "overview", "topk": 0}] + [{"method": "given", "boxes": [list(c)]} for c in candidates]


def score_condition(option_scores: Sequence[float]) -> dict[str, Any]:
    """Correct option (index 0) log-likelihood, its log-probability among the options, correctness."""
    top = max(option_scores)
    logsumexp = top + math.log(sum(math.exp(s - top) for s in option_scores))
    return {"option_scores": [round(s, 4) for s in option_scores], "loglik": round(option_scores[0], 4),
            "logprob": round(option_scores[0] - logsumexp, 4),
            "correct": max(range(len(option_scores)), key=option_scores.__getitem__) == 0}


def label_row(record: BenchRecord, size: tuple[int, int], grids: Sequence[int],
              scored: Sequence[Sequence[float]], bridges: bool = True) -> dict[str, Any]:
    """One question's labels from its conditions' option scores (overview first, then each candidate)."""
    candidates = candidate_boxes(*size, grids, bridges=bridges)
    overview = score_condition(scored[0])
    crops = []
    for box, option_scores in zip(candidates, scored[1:]):
        entry = score_condition(option_scores)
        entry["box"] = list(box)
        entry["gain"] = round(entry["logprob"] - overview["logprob"], 4)
        entry["hit"] = crop_hit([box], record.target_boxes)
        crops.append(entry)
    best = max(range(len(crops)), key=lambda i: (crops[i]["gain"], -i))
    return {"name": record.name, "category": record.category, "image": record.image, "image_size": list(size),
            "question": record.question, "options": record.options, "bbox": record.bbox, "grids": list(grids),
            "bridges": bridges, "overview": overview, "crops": crops, "best": best,
            "oracle": oracle_index(candidates, record.target_boxes)}


class LabelWorker:
    """One vLLM engine with the plugin; labels one shard per call (a Ray actor in the job)."""

    def __init__(self, model: str, grids: Sequence[int], bridges: bool = True) -> None:
        from vllm_semclip.server import runtime_env

        for key, value in runtime_env().items():  # this node's defaults (CPU or GPU), before vLLM starts
            os.environ.setdefault(key, value)
        # The engine core runs inside the actor, not in a child process of its own: when Ray kills
        # the actor (or the job dies), nothing of the engine outlives it. Its executor's workers
        # watch their parent and exit with it.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm_semclip.eval.harness import make_engine

        self.grids = tuple(grids)
        self.bridges = bridges
        # method "overview" by default; every request names its own condition (room for one crop)
        self.llm = make_engine(model, {"method": "overview", "grids": list(self.grids), "max_topk": 1})

    def label(self, records: Sequence[dict[str, Any]], images: Sequence[bytes]) -> list[dict[str, Any]]:
        """Label a shard: ``records`` as :class:`BenchRecord` fields, ``images`` their encoded files."""
        from PIL import Image
        from vllm import SamplingParams

        from vllm_semclip.eval.harness import option_scores_from_outputs, prompt_for

        tokenizer = self.llm.get_tokenizer()
        prompts, lengths, layout = [], [], []
        recs = [BenchRecord(**r) for r in records]
        for rec, data in zip(recs, images):
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert("RGB")
            prompt = prompt_for(tokenizer, rec.question)
            option_lengths = [len(tokenizer(" " + o, add_special_tokens=False)["input_ids"]) for o in rec.options]
            conds = conditions(image.size, self.grids, self.bridges)
            for kwargs in conds:
                for option, n in zip(rec.options, option_lengths):
                    prompts.append({"prompt": prompt + " " + option, "multi_modal_data": {"image": image},
                                    "mm_processor_kwargs": kwargs})
                    lengths.append(n)
            layout.append((image.size, len(conds), len(rec.options)))
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        scores = option_scores_from_outputs(self.llm.generate(prompts, params, use_tqdm=False), lengths)
        rows, k = [], 0
        for rec, (size, n_conds, n_opts) in zip(recs, layout):
            scored = [scores[k + c * n_opts:k + (c + 1) * n_opts] for c in range(n_conds)]
            rows.append(label_row(rec, size, self.grids, scored, self.bridges))
            k += n_conds * n_opts
        return rows

    def shutdown(self) -> tuple[str, int]:
        """Stop the engine; return this actor's node and process id, so that the driver can
        wait for the process to end (``ray.kill`` only asks for it)."""
        import ray

        self.llm.llm_engine.engine_core.shutdown()
        return ray.get_runtime_context().get_node_id(), os.getpid()


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    path = out / MANIFEST
    if path.exists():
        existing = json.loads(path.read_text())
        existing.pop("finished", None)
        if existing != manifest:
            raise LabelError(f"{out} holds labels made with other settings ({existing}); "
                             f"use another --out or delete it (this run: {manifest})")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=1))


def write_shard(out: Path | str, index: int, rows: Sequence[dict[str, Any]]) -> Path:
    """Atomically: a shard file is either complete or absent."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = shard_path(out, index)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


def ray_address(address: str | None) -> str:
    """Where the job runs: ``address``, else ``$RAY_ADDRESS``, else a new local Ray (``"local"``).

    Not Ray's bare ``ray.init()``: that also joins the last cluster ``ray start`` left in
    ``/tmp/ray/ray_current_cluster`` — and hangs when that cluster has since died.
    """
    return address or os.environ.get("RAY_ADDRESS") or "local"


def run_labelling(config: LabelConfig, progress: bool = True) -> dict[str, Any]:
    """Label every pending shard on Ray actors; return a summary (also written into ``manifest.json``)."""
    import ray
    from tqdm import tqdm

    records = load_bench(config.data)
    if config.limit:
        records = records[:config.limit]
    out = Path(config.out)
    manifest = config.manifest(len(records))
    _check_manifest(out, manifest)
    pending = [(i, recs) for i, recs in shards(records, config.shard_size) if not shard_path(out, i).exists()]
    skipped = manifest["shards"] - len(pending)
    start = time.time()
    if pending:
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address=ray_address(config.address), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        try:
            _label_on_ray(config, out, pending, skipped, progress)
        finally:
            if started_ray:
                ray.shutdown()
    summary = {**manifest, "labelled_shards": len(pending), "skipped_shards": skipped,
               "seconds": round(time.time() - start, 1)}
    if all(shard_path(out, i).exists() for i in range(manifest["shards"])):
        (out / MANIFEST).write_text(json.dumps({**manifest, "finished": True}, indent=1))
    if progress:
        tqdm.write(f"labelled {len(pending)} shards, skipped {skipped} finished ones, into {out}")
    return summary


def _label_on_ray(config: LabelConfig, out: Path, pending: list, skipped: int, progress: bool) -> None:
    import ray
    from tqdm import tqdm

    cpus = config.cpus_per_actor or max(1, int(ray.available_resources().get("CPU", 1)) // config.actors)
    worker_cls = ray.remote(num_cpus=cpus)(LabelWorker)
    actors = [worker_cls.remote(config.model, config.grids, config.bridges) for _ in range(min(config.actors, len(pending)))]
    queue = list(pending)
    running: dict[Any, tuple[int, Any, int]] = {}

    def submit(actor) -> None:
        index, recs = queue.pop(0)
        images = [Path(r.image).read_bytes() for r in recs]
        ref = actor.label.remote([asdict(r) for r in recs], images)
        running[ref] = (index, actor, len(recs))

    total = sum(len(r) for _, r in pending)
    bar = tqdm(total=total, desc=f"labelling ({skipped} shards done before)", unit="q", disable=not progress)
    try:
        for actor in actors:
            if queue:
                submit(actor)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            index, actor, n = running.pop(done[0])
            write_shard(out, index, ray.get(done[0]))
            bar.update(n)
            if queue:
                submit(actor)
    finally:
        bar.close()
        here = ray.get_runtime_context().get_node_id()
        local_pids = []
        for actor in actors:
            try:
                node, pid = ray.get(actor.shutdown.remote(), timeout=60)
                if node == here:
                    local_pids.append(pid)
            except Exception:  # an actor that already died has nothing to shut down
                pass
            ray.kill(actor)
        for pid in wait_for_exit(local_pids):  # asked to die a minute ago: make sure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended in the meantime
                pass


def wait_for_exit(pids: Sequence[int], timeout: float = 60.0) -> list[int]:
    """Wait until the processes ``pids`` have ended (a zombie counts as ended); return those left.

    ``ray.kill`` and ``ray.shutdown`` return before the actors' processes are gone: without
    this wait, a job that "finished" still has its actors (and their engines' memory) alive
    for a while — a caller that starts the next job at once would find them still there.
    """
    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def load_labels(path: str | Path) -> list[dict[str, Any]]:
    """Every labelled question of a labels directory, in load order (shards in index order)."""
    path = Path(path)
    files = sorted(path.glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"no label shards ({SHARD_GLOB}) in {path}")
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def helped(row: dict[str, Any], min_gain: float) -> bool:
    """Whether some crop of a labelled question gains at least ``min_gain`` (its best crop is the
    one of largest gain): the questions ψ trains on."""
    return row["crops"][row["best"]]["gain"] >= min_gain


def holds_targets(row: dict[str, Any]) -> bool:
    """Whether some crop of a labelled question holds its target boxes: the questions ψ trains on
    when taught the boxes (``train-relevance --target hit``)."""
    return any(crop["hit"] for crop in row["crops"])


def label_statistics(rows: Sequence[dict[str, Any]], min_gain: float = 0.05) -> dict[str, dict[str, Any]]:
    """What labels say about their VLM, per category: how often the overview alone is answered
    right, how often the oracle crop (the smallest covering the targets) is, how often the crop of
    largest gain contains the targets, and how many questions have a crop gaining ``min_gain``
    (those ψ trains on). Why: whether crops can help a VLM at all is read here, before ψ is trained."""
    out: dict[str, dict[str, Any]] = {}
    for category in sorted({r["category"] for r in rows}):
        group = [r for r in rows if r["category"] == category]
        n = len(group)
        out[category] = {
            "questions": n,
            "overview_accuracy": round(sum(r["overview"]["correct"] for r in group) / n, 4),
            "oracle_crop_accuracy": round(sum(r["crops"][r["oracle"]]["correct"] for r in group) / n, 4),
            "best_crop_hit_rate": round(sum(r["crops"][r["best"]]["hit"] for r in group) / n, 4),
            "helped_questions": sum(helped(r, min_gain) for r in group),
        }
    return out
