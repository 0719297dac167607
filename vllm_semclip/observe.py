"""What SemClip did, seen from a running server: Prometheus metrics and an opt-in selection log.

Metrics are recorded where the work happens — the multimodal processor in the API server
process, or the model in the engine (``selection_stage``) — with ``prometheus_client``'s default registry, which is what vLLM's ``/metrics``
serves (with several API servers vLLM sets ``PROMETHEUS_MULTIPROC_DIR`` before starting them and
serves the multiprocess collector, which gathers these too). Names follow vLLM's
(``vllm:…``) with SemClip's own prefix:

* ``semclip:selection_seconds`` (histogram, by ``method``): ``select_crops`` per image;
* ``semclip:selections_total`` (counter, by ``method``): images selected for;
* ``semclip:candidates_scored_total``: candidates ψ scored;
* ``semclip:crops_chosen_total``: crops kept beside the overviews;
* ``semclip:psi_batch_images`` and ``semclip:psi_batch_seconds`` (histograms, engine stage):
  images per ψ forward in the model's encoder step, and that forward's time.

In the engine stage these are recorded in the engine-core process (and the selection seconds of
an image are its batch's). Prometheus there reaches the API server's ``/metrics`` only through
``prometheus_client``'s multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` set, before vLLM starts,
to an empty directory — which ``semclip serve`` does, and vLLM itself does with
``--api-server-count`` > 1.

The log line (``log_selections``) goes through vLLM's logger at INFO, one per image: an id tying
it to its request (the item's cache identity, which a request's ``multi_modal_uuids`` sets),
the method, the chosen boxes and their ψ scores, milliseconds, and the question as a hash unless
``log_questions`` is on. Never the image.
"""

from __future__ import annotations

import hashlib
import json

from prometheus_client import Counter, Histogram
from vllm.logger import init_logger

from .selection import Selection

logger = init_logger("vllm.semclip")  # under vLLM's logger: its handler and level apply

SELECTION_SECONDS = Histogram(
    "semclip:selection_seconds", "SemClip crop selection (select_crops) per image, in seconds.",
    labelnames=["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
SELECTIONS = Counter("semclip:selections", "Images SemClip selected crops for.", labelnames=["method"])
CANDIDATES_SCORED = Counter("semclip:candidates_scored", "Candidate crops psi scored.")
CROPS_CHOSEN = Counter("semclip:crops_chosen", "Crops SemClip kept beside the overviews.")


# engine stage: ψ's forwards in the model's encoder step
PSI_BATCH_IMAGES = Histogram(
    "semclip:psi_batch_images", "Images whose candidates one psi forward in the engine scored together.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
PSI_BATCH_SECONDS = Histogram(
    "semclip:psi_batch_seconds", "One engine-stage psi forward and ranking, in seconds.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))


def observe_psi_batch(images: int, views: int, seconds: float) -> None:
    """Record one engine-stage ψ forward over ``images`` images (``views`` views in all)."""
    PSI_BATCH_IMAGES.observe(images)
    PSI_BATCH_SECONDS.observe(seconds)


def question_hash(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]


def observe_selection(selection: Selection, seconds: float, *, item_id: str | None = None,
                      log: bool = False, log_question: bool = False) -> None:
    """Record one image's selection in the metrics, and log it when ``log`` is on."""
    SELECTION_SECONDS.labels(method=selection.method).observe(seconds)
    SELECTIONS.labels(method=selection.method).inc()
    if selection.candidate_scores is not None:
        CANDIDATES_SCORED.inc(len(selection.candidate_scores))
    CROPS_CHOSEN.inc(selection.num_crops)
    if not log:
        return
    fields = {
        "id": item_id, "method": selection.method, "image_size": list(selection.image_size),
        "candidates": len(selection.candidates), "boxes": [list(b) for b in selection.boxes],
        "scores": [None if s is None else round(float(s), 4) for s in selection.scores],
        "ms": round(seconds * 1000, 1),
        "question" if log_question else "question_sha256": (
            selection.question if log_question else question_hash(selection.question)),
    }
    logger.info("semclip selection %s", json.dumps(fields))
