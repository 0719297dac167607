"""`semclip serve` on 127.0.0.1, spoken to by the `openai` client and plain HTTP.

Odd input is served with graceful selection; bad input gets a 4xx naming the
problem; and after every bad request the server still answers good ones.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import MAX_TOPK
from PIL import Image

from vllm_semclip.images import to_data_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served_model(client):
    return client.models.list().data[0].id


def _messages(images, question="What is the color of the flag?"):
    content = [{"type": "image_url", "image_url": {"url": u if isinstance(u, str) else to_data_url(u)}} for u in images]
    if question:
        content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def _text_tokens(tokenizer, num_images, question="What is the color of the flag?"):
    """Prompt tokens without the image placeholders."""
    content = [{"type": "image"}] * num_images + ([{"type": "text", "text": question}] if question else [])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    return len(ids) - num_images


def _ask(client, model, images, question="What is the color of the flag?", **extra):
    return client.chat.completions.create(
        model=model, messages=_messages(images, question), max_tokens=4, temperature=0.0, extra_body=extra or None
    )


def _assert_still_serving(server, client, model, photo):
    assert server.process.poll() is None, "server process died"
    assert server.is_healthy()
    reply = _ask(client, model, [photo])
    assert reply.choices[0].message.content is not None


def test_openai_client_answers_base64_image(server, client, served_model, photo, tokenizer, tokens_per_tile):
    reply = _ask(client, served_model, [photo])
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens >= 1
    assert reply.usage.prompt_tokens == _text_tokens(tokenizer, 1) + 2 * tokens_per_tile  # overview + 1 crop


@pytest.mark.parametrize("topk", [0, 2, MAX_TOPK])
def test_request_body_mm_processor_kwargs(client, served_model, photo, tokenizer, tokens_per_tile, topk):
    reply = _ask(client, served_model, [photo], mm_processor_kwargs={"topk": topk})
    assert reply.usage.prompt_tokens == _text_tokens(tokenizer, 1) + (1 + topk) * tokens_per_tile


def test_given_boxes_are_the_crops(client, served_model, photo, tokenizer, tokens_per_tile):
    """Method 'given' (how the harness sends the oracle crop): one tile per box, the same as SemClip's layout."""
    boxes = [[0, 0, 100, 100], [50, 50, 300, 200]]
    reply = _ask(client, served_model, [photo], mm_processor_kwargs={"method": "given", "boxes": boxes})
    assert reply.usage.prompt_tokens == _text_tokens(tokenizer, 1) + 3 * tokens_per_tile


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _odd_image(kind: str):
    if kind == "1x1":
        return Image.new("RGB", (1, 1), (255, 0, 0))
    if kind == "10x3000":
        return Image.new("RGB", (10, 3000), (0, 128, 255))
    if kind == "smaller-than-a-cell":
        return Image.new("RGB", (5, 4), (0, 200, 0))
    if kind == "grayscale":
        return Image.linear_gradient("L").resize((300, 200))
    if kind == "rgba":
        return Image.new("RGBA", (120, 80), (255, 0, 0, 100))
    if kind == "palette":
        return Image.new("RGB", (120, 80), (10, 200, 30)).convert("P")
    if kind == "cmyk-jpeg":
        buf = io.BytesIO()
        Image.new("CMYK", (120, 80), (0, 255, 255, 0)).save(buf, format="JPEG")
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    if kind == "16-bit":
        return Image.new("I;16", (120, 80), 50000)
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["1x1", "10x3000", "smaller-than-a-cell", "grayscale", "rgba", "palette", "cmyk-jpeg", "16-bit"]
)
def test_odd_images_are_served(client, served_model, tokenizer, tokens_per_tile, kind):
    reply = _ask(client, served_model, [_odd_image(kind)])
    assert reply.usage.prompt_tokens == _text_tokens(tokenizer, 1) + 2 * tokens_per_tile


def test_image_only_prompt_is_overview_only(client, served_model, photo, tokenizer, tokens_per_tile):
    reply = _ask(client, served_model, [photo], question=None, mm_processor_kwargs={"topk": 3})
    assert reply.usage.prompt_tokens == _text_tokens(tokenizer, 1, question=None) + tokens_per_tile


def test_eight_images_in_one_prompt(client, served_model, tokenizer, tokens_per_tile):
    from vllm_semclip.tiny.scenes import load_photo as sample_photo

    photos = [sample_photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket")] * 2
    reply = _ask(client, served_model, photos, question="Which picture shows a cat?")
    assert reply.usage.prompt_tokens == _text_tokens(tokenizer, 8, "Which picture shows a cat?") + 8 * 2 * tokens_per_tile


def _bomb_png() -> str:
    """A 16000x12000 image (192 M pixels, over vLLM's 178 M limit) that compresses to a few KB."""
    return "data:image/png;base64," + base64.b64encode(_png(Image.new("1", (16000, 12000)))).decode()


BAD_REQUESTS = {
    "corrupt-image": ({"images": ["data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()]}, "image"),
    "over-pixel-limit": ({"images": ["BOMB"]}, "pixels"),
    "topk-out-of-range": ({"mm": {"topk": 99}}, "topk must be an integer in 0..8"),
    "topk-wrong-type": ({"mm": {"topk": "two"}}, "topk must be an integer"),
    "grids-wrong-type": ({"mm": {"grids": "x"}}, "grids"),
    "unknown-key": ({"mm": {"topk_crops": 2}}, "unknown mm_processor_kwargs key 'topk_crops'"),
    "topk-above-server-max": ({"mm": {"topk": MAX_TOPK + 1}}, f"at most {MAX_TOPK}"),
    "method-all-above-server-max": ({"mm": {"method": "all"}}, "method 'all'"),
    "server-only-field": ({"mm": {"relevance_model": "/etc"}}, "fixed when the server starts"),
    "given-without-boxes": ({"mm": {"method": "given"}}, "needs boxes"),
    "given-bad-box": ({"mm": {"method": "given", "boxes": [[9, 9, 1, 1]]}}, "x1 > x0"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_a_clear_4xx_and_server_keeps_serving(server, client, served_model, photo, name):
    spec, words = BAD_REQUESTS[name]
    images = [(_bomb_png() if u == "BOMB" else u) for u in spec.get("images", [photo])]
    extra = {"mm_processor_kwargs": spec["mm"]} if "mm" in spec else {}
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, served_model, images, **extra)
    assert info.value.status_code == 400
    message = info.value.body["message"] if isinstance(info.value.body, dict) else str(info.value)
    assert words.lower() in message.lower(), message
    assert "Traceback" not in message
    _assert_still_serving(server, client, served_model, photo)


def test_bad_input_over_raw_http_names_the_parameter(server, served_model, photo):
    body = {"model": served_model, "messages": _messages([photo]), "max_tokens": 2,
            "mm_processor_kwargs": {"topk": -3}}
    req = urllib.request.Request(server.base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 400
    error = json.loads(info.value.read())["error"]
    assert error["param"] == "topk" and "0..8" in error["message"]


def test_bad_requests_do_not_lose_concurrent_good_ones(server, client, served_model, photo, tokenizer, tokens_per_tile):
    def good(i):
        return _ask(client, served_model, [photo], question=f"What is object number {i}?").usage.prompt_tokens

    def bad(i):
        try:
            _ask(client, served_model, [photo], mm_processor_kwargs={"topk": 50 + i})
        except openai.BadRequestError as exc:
            return exc.status_code
        return 200

    with ThreadPoolExecutor(max_workers=8) as pool:
        goods = [pool.submit(good, i) for i in range(8)]
        bads = [pool.submit(bad, i) for i in range(8)]
        good_tokens = [f.result(timeout=300) for f in goods]
        bad_codes = [f.result(timeout=300) for f in bads]
    assert bad_codes == [400] * 8
    assert all(t > 2 * tokens_per_tile for t in good_tokens)
    _assert_still_serving(server, client, served_model, photo)


@pytest.mark.engine
def test_plain_vllm_server_with_hf_overrides(model_dir, photo, tokenizer, tokens_per_tile, tmp_path):
    """No wrapper: the documented vLLM command line, the plugin found through its entry point."""
    from vllm_semclip.server import ServerProcess

    overrides = {"architectures": ["SemClipLlavaForConditionalGeneration"], "semclip_config": {"topk": 2}}
    plain = ServerProcess(model_dir, stock=True, log_path=tmp_path / "plain.log",
                          vllm_args=["--hf-overrides", json.dumps(overrides), "--max-model-len", "4096"])
    assert plain.command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "vllm_semclip.cli" not in " ".join(plain.command)
    with plain:
        c = openai.OpenAI(base_url=plain.base_url + "/v1", api_key="EMPTY", max_retries=0)
        reply = _ask(c, model_dir, [photo])
        assert reply.usage.prompt_tokens == _text_tokens(tokenizer, 1) + 3 * tokens_per_tile  # server-wide topk=2
    assert plain.process.poll() is not None


def test_semclip_serve_leaves_the_hub_setting_to_the_caller():
    """HF_HUB_OFFLINE is the caller's choice: semclip serve adds only the CPU settings."""
    from vllm_semclip.server import runtime_env

    assert "HF_HUB_OFFLINE" not in runtime_env({"PATH": "/usr/bin"})
    assert runtime_env({"HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "0"


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s, stat in (line.split()[:3] for line in out.splitlines() if line.strip())
            if int(s) == sid and not stat.startswith("Z")]


@pytest.mark.engine
def test_sigterm_with_requests_in_flight_leaves_no_process_behind(model_dir, photo, tmp_path):
    """SIGTERM to `semclip serve` itself (as a service manager sends it) while requests run: each
    finishes or fails cleanly (no hang), the server exits, and no engine or worker outlives it."""
    from vllm_semclip.server import ServerProcess

    server = ServerProcess(model_dir, {"max_topk": MAX_TOPK}, log_path=tmp_path / "server.log").start()
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        assert len(_session_pids(server.pid)) >= 2  # the API server and its engine core

        def ask(i):
            try:
                reply = client.chat.completions.create(model=model, messages=_messages([photo], f"Question {i}?"),
                                                       max_tokens=64, temperature=0.0)
                return "answered" if reply.choices[0].message.content is not None else "empty"
            except (openai.APIConnectionError, openai.APIStatusError):  # refused or cut off: clean, no hang
                return "clean error"

        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(ask, i) for i in range(16)]
            time.sleep(1.0)
            os.kill(server.pid, signal.SIGTERM)
            outcomes = [f.result(timeout=120) for f in futures]  # none hangs
        assert server.process.wait(timeout=60) is not None
        assert set(outcomes) <= {"answered", "clean error"}
        deadline = time.monotonic() + 30
        while _session_pids(server.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _session_pids(server.pid) == [], "processes of the server outlived it"
    finally:
        server.stop()


def _metrics(server) -> dict[tuple[str, tuple], float]:
    """vLLM's /metrics, as (sample name, labels) → value, SemClip's samples only."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    assert "vllm:" in text  # vLLM's own metrics beside SemClip's: one endpoint
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) if family.name.startswith("semclip:")
            for s in family.samples}


def test_metrics_and_the_selection_log_say_what_semclip_did(server, client, served_model, photo):
    """A few requests move SemClip's counters in vLLM's /metrics by exactly their images, crops and
    candidates; each image gets one log line naming the request's uuid, method, boxes and scores,
    the question as a hash only — never the image."""
    import hashlib

    question = "What is the color of the sign near the metrics test?"
    before = _metrics(server)
    url = to_data_url(photo)
    for i, topk in enumerate((1, 2)):
        content = [{"type": "image_url", "image_url": {"url": url}, "uuid": f"metrics-test-{i}"},
                   {"type": "text", "text": question}]
        client.chat.completions.create(model=served_model, messages=[{"role": "user", "content": content}],
                                       max_tokens=2, temperature=0.0, extra_body={"mm_processor_kwargs": {"topk": topk}})
    after = _metrics(server)
    delta = lambda name, **labels: after.get((name, tuple(sorted(labels.items()))), 0.0) - before.get(  # noqa: E731
        (name, tuple(sorted(labels.items()))), 0.0)
    assert delta("semclip:selections_total", method="relevance") == 2
    assert delta("semclip:selection_seconds_count", method="relevance") == 2
    assert delta("semclip:selection_seconds_sum", method="relevance") > 0
    assert delta("semclip:crops_chosen_total") == 3
    assert delta("semclip:candidates_scored_total") == 2 * 17
    # ψ ran in the engine (the default stage): its forwards reach this endpoint from the engine process
    assert delta("semclip:psi_batch_images_sum") == 2 and delta("semclip:psi_batch_images_count") >= 1
    lines = [json.loads(line.split("semclip selection ", 1)[1]) for line in server.log_path.read_text().splitlines()
             if "semclip selection " in line and "metrics-test-" in line]
    assert sorted(entry["id"] for entry in lines) == ["metrics-test-0", "metrics-test-1"]
    for entry in lines:
        assert entry["method"] == "relevance" and entry["candidates"] == 17 and entry["ms"] > 0
        assert len(entry["boxes"]) == len(entry["scores"]) in (1, 2)
        assert entry["question_sha256"] == hashlib.sha256(question.encode()).hexdigest()[:12]
    text = server.log_path.read_text()
    assert question not in text and url[30:90] not in text


def test_psi_batches_images_of_concurrent_requests(server, client, served_model, photo):
    """Eight requests at once (eight questions: no cache hits): ψ's forwards in the engine take
    several images each, where the front end would have run eight forwards one after another."""
    import concurrent.futures

    before = _metrics(server)
    url = to_data_url(photo)

    def ask(i: int):
        content = [{"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": f"Where is the object number {i} of the batching test?"}]
        return client.chat.completions.create(model=served_model, messages=[{"role": "user", "content": content}],
                                              max_tokens=1, temperature=0.0)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    assert all(r.choices[0].finish_reason for r in replies)
    after = _metrics(server)
    images = after[("semclip:psi_batch_images_sum", ())] - before.get(("semclip:psi_batch_images_sum", ()), 0.0)
    forwards = after[("semclip:psi_batch_images_count", ())] - before.get(("semclip:psi_batch_images_count", ()), 0.0)
    assert images == 8 and 1 <= forwards < 8
