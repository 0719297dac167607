"""Load and fuzz: a real `semclip serve` under concurrency 32, three rounds of one mix of malformed,
odd-but-valid and ordinary requests, over real HTTP.

Every malformed request is a 4xx whose message names the problem; every valid one a 200 with the
answer it gets alone; no 5xx, no hang; the server's memory does not grow between the last two
rounds by more than 5% (a bound, not a timing); two questions about one image, also under one
client uuid, each get their own crops. A second server with two API front ends serves the mix too.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import MAX_TOPK, PSI
from PIL import Image

from vllm_semclip.config import SemClipConfig
from vllm_semclip.images import to_data_url
from vllm_semclip.selection import select_crops

pytestmark = pytest.mark.engine

CONCURRENCY = 32
ROUNDS = 3
QUESTION = "What is the color of the flag?"
# Refusals that vLLM itself answers with another status than 4xx, before SemClip sees the request:
# a non-base64 data URL is vLLM's 501 Not Implemented (vllm/multimodal/media/connector.py).
VLLM_OWN_STATUS = {"no-base64-marker": 501}


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width × height`` and whose data is a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _image_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _body(model: str, images=(), question: str | None = QUESTION, mm=None, max_tokens: int = 4, uuids=None, **extra):
    content = []
    for i, image in enumerate(images):
        part = {"type": "image_url", "image_url": {"url": image if isinstance(image, str) else to_data_url(image)}}
        if uuids:
            part["uuid"] = uuids[i]
        content.append(part)
    if question is not None:
        content.append({"type": "text", "text": question})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0.0, **extra}
    if mm is not None:
        body["mm_processor_kwargs"] = mm
    return body


def _post(base_url: str, body, timeout: float = 180.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base_url + "/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except json.JSONDecodeError:
            return exc.code, {"error": {"message": raw.decode(errors="replace")}}


def _message(doc: dict) -> str:
    error = doc.get("error", doc)
    if isinstance(error, dict):
        return json.dumps(error)
    return str(error)


def malformed(model: str, photo: Image.Image) -> dict[str, tuple[bytes | dict, tuple[str, ...]]]:
    """name → (request body, words of which one must appear in the error message)."""
    png = _png_bytes(photo.resize((64, 48)))
    jpeg = _image_bytes(photo.resize((64, 48)), "JPEG")
    ok = to_data_url(photo.resize((320, 240)))

    def mm(kwargs, words):
        return _body(model, [ok], mm=kwargs), words

    cases: dict[str, tuple[bytes | dict, tuple[str, ...]]] = {
        # image data
        "not-base64": (_body(model, ["data:image/png;base64,!!!not base64!!!"]), ("base64", "image", "decode")),
        "empty-image-data": (_body(model, ["data:image/png;base64,"]), ("image",)),
        "truncated-png": (_body(model, [_url(png[: len(png) // 3])]), ("image",)),
        "truncated-jpeg": (_body(model, [_url(jpeg[: len(jpeg) // 3], "image/jpeg")]), ("image",)),
        "text-as-image": (_body(model, [_url(b"hello, I am not a picture")]), ("image",)),
        "garbage-after-png-magic": (_body(model, [_url(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)]), ("image",)),
        "png-declaring-60000x60000": (_body(model, [_url(_png_declaring(60000, 60000))]), ("pixels",)),
        "bomb-16000x12000": (_body(model, [_url(_png_bytes(Image.new("1", (16000, 12000))))]), ("pixels",)),
        "no-base64-marker": (_body(model, ["data:image/png,abcd"]), ("base64",)),
        "image-url-not-a-url": (_body(model, ["not a url at all"]), ("url", "image")),
        "image-part-without-url": ({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {}}, {"type": "text", "text": QUESTION}]}]}, ("url",)),
        "too-many-images": (_body(model, [ok] * 9), ("at most 8", "limit", "image")),
        "prompt-over-the-context": (_body(model, [ok], question="flag " * 12000), ("context", "length", "token")),
        # mm_processor_kwargs: unknown, server-only, mistyped, out of range
        "unknown-key": mm({"topk_crops": 2}, ("topk_crops",)),
        "server-only-relevance-model": mm({"relevance_model": "/etc"}, ("relevance_model",)),
        "server-only-relevance-pretrained": mm({"relevance_pretrained": "openai"}, ("relevance_pretrained",)),
        "server-only-precision": mm({"relevance_precision": "bf16"}, ("relevance_precision",)),
        "server-only-device": mm({"device": "cuda"}, ("device",)),
        "server-only-max-topk": mm({"max_topk": 8}, ("max_topk",)),
        "server-only-max-candidates": mm({"max_candidates": 174}, ("max_candidates",)),
        "topk-bool": mm({"topk": True}, ("topk",)),
        "topk-float": mm({"topk": 1.5}, ("topk",)),
        "topk-string": mm({"topk": "two"}, ("topk",)),
        "topk-list": mm({"topk": [1]}, ("topk",)),
        "topk-null": mm({"topk": None}, ("topk",)),
        "topk-negative": mm({"topk": -1}, ("topk",)),
        "topk-out-of-range": mm({"topk": 99}, ("topk",)),
        "topk-above-server-max": mm({"topk": MAX_TOPK + 1}, (f"at most {MAX_TOPK}",)),
        "grids-string": mm({"grids": "x"}, ("grids",)),
        "grids-zero": mm({"grids": [0]}, ("grids",)),
        "grids-too-fine": mm({"grids": [9]}, ("grids",)),
        "grids-repeated": mm({"grids": [2, 2]}, ("grids",)),
        "grids-too-many": mm({"grids": [1, 2, 3, 4, 5]}, ("grids",)),
        "grids-nested": mm({"grids": [[2]]}, ("grids",)),
        "grids-over-the-candidate-cap": mm({"grids": [5, 6, 7, 8]}, ("max_candidates",)),
        "overlap-string": mm({"overlap": "a"}, ("overlap",)),
        "overlap-out-of-range": mm({"overlap": 0.9}, ("overlap",)),
        "method-unknown": mm({"method": "bogus"}, ("method",)),
        "method-all-above-server-max": mm({"method": "all"}, ("method 'all'",)),
        "seed-negative": mm({"seed": -1}, ("seed",)),
        "seed-string": mm({"seed": "x"}, ("seed",)),
        "pad-to-square-string": mm({"pad_to_square": "yes"}, ("pad_to_square",)),
        "relevance-fit-unknown": mm({"relevance_fit": "stretch"}, ("relevance_fit",)),
        "relevance-norm-unknown": mm({"relevance_norm": "zscore"}, ("relevance_norm",)),
        "given-without-boxes": mm({"method": "given"}, ("boxes",)),
        "given-inverted-box": mm({"method": "given", "boxes": [[9, 9, 1, 1]]}, ("boxes", "x1 > x0")),
        "given-negative-box": mm({"method": "given", "boxes": [[-5, 0, 10, 10]]}, ("boxes", "non-negative")),
        "given-box-not-a-list": mm({"method": "given", "boxes": "x"}, ("boxes",)),
        "given-too-many-boxes": mm({"method": "given", "boxes": [[0, 0, 10, 10]] * 9}, ("boxes",)),
        "boxes-without-given": mm({"boxes": [[0, 0, 10, 10]]}, ("boxes",)),
        "kwargs-a-list": mm([1, 2], ("mm_processor_kwargs", "object", "dict")),
        "kwargs-a-string": mm("topk=2", ("mm_processor_kwargs", "object", "dict")),
        # the request itself
        "invalid-json": (b'{"model": "x", "messages": [', ("json", "decode", "expecting")),
        "messages-missing": ({"model": model, "max_tokens": 4}, ("messages",)),
    }
    nan = _body(model, [ok], mm={"overlap": math.nan})
    cases["overlap-nan"] = (json.dumps(nan).encode(), ("overlap", "nan", "json"))
    topk_nan = _body(model, [ok], mm={"topk": math.nan})
    cases["topk-nan"] = (json.dumps(topk_nan).encode(), ("topk", "nan", "json"))
    return cases


def odd_but_valid(model: str, photo: Image.Image) -> dict[str, dict]:
    small = photo.resize((320, 240))
    return {
        "1x1": _body(model, [Image.new("RGB", (1, 1), (200, 10, 10))]),
        "10x3000": _body(model, [small.resize((10, 3000))]),
        "3000x10": _body(model, [small.resize((3000, 10))]),
        "grayscale": _body(model, [small.convert("L")]),
        "cmyk-jpeg": _body(model, [_url(_image_bytes(small.convert("CMYK"), "JPEG"), "image/jpeg")]),
        "palette": _body(model, [small.convert("P")]),
        "16-bit": _body(model, [_url(_png_bytes(small.convert("L").convert("I;16")))]),
        "rgba": _body(model, [small.convert("RGBA")]),
        "webp": _body(model, [_url(_image_bytes(small, "WEBP"), "image/webp")]),
        "no-question": _body(model, [small], question=None),
        "whitespace-question": _body(model, [small], question="   \n\t "),
        "non-latin-question": _body(model, [small], question="旗子是什么颜色？ Какого цвета флаг?"),
        "text-only": _body(model, [], question="What is a flag?"),
        "eight-images": _body(model, [small] * 8),
        "three-images-with-two-crops": _body(model, [small] * 3, mm={"topk": 2}),
        "grids-reshaped-within-the-cap": _body(model, [small], mm={"grids": [3, 2], "topk": 1}),
        "plain": _body(model, [small]),
        "method-random": _body(model, [small], mm={"method": "random", "topk": 2}),
    }


def _server_rss_kib(pid: int) -> int:
    """Resident memory of the server and every process of its session (API server, engine core)."""
    out = subprocess.run(["ps", "-eo", "sid=,rss="], capture_output=True, text=True, check=True).stdout
    return sum(int(rss) for sid, rss in (line.split() for line in out.splitlines() if line.strip()) if int(sid) == pid)


def run_mix(base_url: str, bad: dict, good: dict, expected: dict | None) -> dict[str, tuple[int, str]]:
    """Send the whole mix at once at CONCURRENCY; check every answer; return the valid ones' texts."""
    jobs = [("bad", name, body) for name, (body, _) in bad.items()] + [("good", n, b) for n, b in good.items()]
    jobs += [("good", f"plain-{i}", good["plain"]) for i in range(CONCURRENCY)]  # the crowd
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda job: (job, _post(base_url, job[2])), jobs))
    texts = {}
    problems = []
    for (kind, name, _), (status, doc) in results:
        if status >= 500 and status != VLLM_OWN_STATUS.get(name):
            problems.append(f"{name}: {status} {_message(doc)[:300]}")
        elif kind == "bad":
            words = bad[name][1]
            message = _message(doc).lower()
            refused = status == VLLM_OWN_STATUS.get(name) or 400 <= status < 500
            if not refused or not any(w.lower() in message for w in words):
                problems.append(f"{name}: {status}, expected a 4xx naming one of {words}: {_message(doc)[:300]}")
        elif status != 200:
            problems.append(f"{name}: {status} {_message(doc)[:300]}")
        else:
            texts[name] = doc["choices"][0]["message"]["content"]
    assert not problems, "\n".join(problems)
    if expected is not None:
        differ = {n: (texts[n], expected[n.split("-")[0] if n.startswith("plain-") else n])
                  for n in texts if texts[n] != expected[n.split("-")[0] if n.startswith("plain-") else n]}
        assert not differ, f"answers in the crowd differ from alone: {differ}"
    return texts


@pytest.fixture(scope="module")
def mix(server, photo):
    model = json.loads(urllib.request.urlopen(server.base_url + "/v1/models", timeout=30).read())["data"][0]["id"]
    return model, malformed(model, photo), odd_but_valid(model, photo)


def test_the_mix_has_forty_kinds_of_malformed_requests(mix):
    _, bad, good = mix
    assert len(bad) >= 40 and len(good) >= 14


def test_three_rounds_at_concurrency_32_keep_answers_and_memory(server, mix):
    model, bad, good = mix
    alone = {name: _post(server.base_url, body)[1]["choices"][0]["message"]["content"] for name, body in good.items()}
    rss = []
    for _ in range(ROUNDS):
        run_mix(server.base_url, bad, good, alone)
        rss.append(_server_rss_kib(server.pid))
    assert server.process.poll() is None and server.is_healthy()
    assert rss[-1] <= 1.05 * rss[-2], f"server memory grew between the last two rounds: {rss} KiB"


def _logprob_trace(base_url: str, body: dict) -> list[float]:
    """The top-5 logprobs at each of 8 greedy positions: what the model saw, to within numerics."""
    status, doc = _post(base_url, {**body, "logprobs": True, "top_logprobs": 5, "max_tokens": 8})
    assert status == 200, doc
    return [alt["logprob"] for pos in doc["choices"][0]["logprobs"]["content"] for alt in pos["top_logprobs"]]


def _same(a: list[float], b: list[float], tol: float = 1e-3) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.mark.parametrize("uuid", [None, "one-client-uuid"])
def test_two_questions_about_one_image_get_their_own_crops(server, mix, photo, uuid):
    """Checked through the model: a question's answer has the logprob of sending its own crop
    (method given, the box select_crops picks), not the other question's."""
    model, _, _ = mix
    image = photo.resize((640, 480))
    by_box = {}
    for q in ("What is the color of the flag?", "What is the astronaut holding?", "What color is the helmet?",
              "Is the rocket on the left or right side of the woman?", "What is written on the patch?",
              "Is the star on the left or right side of the circle?", "What is the color of the triangle?"):
        by_box.setdefault(tuple(select_crops(image, q, SemClipConfig(relevance_model=PSI)).boxes), q)
    assert len(by_box) >= 2, "ψ picks the same crop for every question; cannot tell requests apart"
    (box_a, qa), (box_b, qb) = list(by_box.items())[:2]
    questions, boxes = (qa, qb), (box_a, box_b)
    uuids = [uuid] if uuid else None
    for q, own, other in ((questions[0], boxes[0], boxes[1]), (questions[1], boxes[1], boxes[0])):
        served = _logprob_trace(server.base_url, _body(model, [image], question=q, uuids=uuids))
        given = _logprob_trace(server.base_url, _body(model, [image], question=q,
                                                      mm={"method": "given", "boxes": [list(b) for b in own]}))
        wrong = _logprob_trace(server.base_url, _body(model, [image], question=q,
                                                      mm={"method": "given", "boxes": [list(b) for b in other]}))
        assert _same(served, given) and not _same(served, wrong)


def test_two_api_front_ends_serve_the_mix(model_dir, mix, tmp_path):
    from vllm_semclip.server import ServerProcess

    _, bad, good = mix  # the same model directory, so the same served name
    with ServerProcess(model_dir, {"max_topk": MAX_TOPK}, vllm_args=["--api-server-count", "2"],
                       log_path=tmp_path / "two-front-ends.log") as two:
        run_mix(two.base_url, bad, good, None)
        assert two.process.poll() is None
