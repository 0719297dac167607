"""The `semclip` command: select (JSON + overlay), argument errors, serve's command line, the demo."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vllm_semclip import select_crops
from vllm_semclip.config import SemClipConfig
from vllm_semclip.server import serve_command
from conftest import PSI


def semclip(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vllm_semclip.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory, photo):
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    photo.save(path)
    return path


@pytest.mark.engine
def test_select_json_matches_the_python_api(model_dir, photo_path, photo):
    question = "What is the color of the flag?"
    out = semclip("select", str(photo_path), question, "--topk", "2", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(doc) == {"boxes", "scores", "candidates"}
    assert doc["candidates"] == 17 and len(doc["boxes"]) == 2 == len(doc["scores"])
    expected = select_crops(photo, question, SemClipConfig(relevance_model=PSI, topk=2))
    assert doc["boxes"] == [list(b) for b in expected.boxes]
    assert doc["scores"] == pytest.approx(expected.scores, abs=1e-6)
    for x0, y0, x1, y1 in doc["boxes"]:
        assert 0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height


@pytest.mark.engine
def test_select_relevance_precision_flag(model_dir, photo_path, photo):
    question = "What is the color of the flag?"
    out = semclip("select", str(photo_path), question, "--relevance-precision", "bf16", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    expected = select_crops(photo, question, SemClipConfig(relevance_model=PSI, relevance_precision="bf16"))
    assert doc["scores"] == pytest.approx(expected.scores, abs=1e-6)
    assert doc["scores"] != pytest.approx(select_crops(photo, question, SemClipConfig(relevance_model=PSI)).scores, abs=1e-7)


@pytest.mark.engine
def test_select_overlay_draws_heatmap_and_boxes(model_dir, photo_path, tmp_path):
    overlay = tmp_path / "overlay.png"
    out = semclip("select", str(photo_path), "What is the astronaut holding?", "--out", str(overlay), "--grids", "2")
    assert out.returncode == 0, out.stderr
    assert "#1 box=" in out.stdout and str(overlay) in out.stdout
    drawn = np.asarray(Image.open(overlay).convert("RGB")).astype(int)
    original = np.asarray(Image.open(photo_path).convert("RGB")).astype(int)
    assert drawn.shape == original.shape
    assert np.abs(drawn - original).mean() > 5  # the heatmap is blended in
    green = (drawn[..., 1] == 255) & (drawn[..., 0] == 0) & (drawn[..., 2] == 80)
    assert green.sum() > 100  # the chosen box is outlined


@pytest.mark.parametrize(
    "args, words",
    [(("--topk", "11"), "topk must be an integer in 0..8"), (("--grids", "2,x"), "grids"),
     (("--overlap", "0.9"), "overlap"), (("--relevance-precision", "int4"), "relevance_precision must be one of"),
     (("--relevance-fit", "stretch"), "--relevance-fit"), (("--relevance-norm", "softmax"), "--relevance-norm")],
)
@pytest.mark.engine
def test_select_bad_options_exit_2_with_message(model_dir, photo_path, args, words):
    out = semclip("select", str(photo_path), "q", *args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr


@pytest.mark.engine
def test_select_corrupt_and_oversized_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = semclip("select", str(bad), "q")
    assert out.returncode == 2 and "cannot read an image" in out.stderr
    big = tmp_path / "big.png"
    Image.new("1", (20000, 10000)).save(big)
    out = semclip("select", str(big), "q")
    assert out.returncode == 2 and "pixels" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.engine
def test_serve_refuses_bad_flags_before_starting():
    out = semclip("serve", "--topk", "12", timeout=60)
    assert out.returncode == 2 and "topk" in out.stderr


@pytest.mark.engine
@pytest.mark.parametrize("args, words", [
    (["--relevance-model", "/no/such/psi"], "relevance_model='/no/such/psi'"),
    (["--relevance-model", "ViT-B-16", "--relevance-pretrained", "no-such-tag"], "relevance_pretrained='no-such-tag'"),
    (["--relevance-device", "gpu0"], "device='gpu0'"),
    (["--max-candidates", "0"], "max_candidates"),
])
def test_serve_refuses_a_psi_that_cannot_load_in_one_line(model_dir, args, words):
    out = semclip("serve", model_dir, *args, timeout=120)
    assert out.returncode == 2 and words in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.mark.engine
def test_serving_another_model_without_a_psi_names_the_flag_and_the_recommended_psi(tmp_path):
    """A model whose config names no ψ (a hub name here; nothing is fetched: the check comes first)."""
    out = semclip("serve", "llava-hf/llava-1.5-7b-hf", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--relevance-model" in out.stderr and "ViT-B-16" in out.stderr and "openai" in out.stderr


@pytest.mark.engine
def test_demo_refuses_a_negative_tally_before_starting(tmp_path):
    out = semclip("demo", "--tally", "-1", "--out", str(tmp_path / "o"), timeout=120)
    assert out.returncode == 2 and "--tally" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()  # no server was started, nothing written


@pytest.mark.engine
@pytest.mark.parametrize("topk,words", [("1,two", "--topk"), ("1,12", "topk")])
def test_eval_refuses_a_bad_k_sweep_before_starting(tmp_path, topk, words):
    out = semclip("eval", "--data", str(tmp_path), "--method", "clip", "--topk", topk, "--out", str(tmp_path / "o"),
                  timeout=120)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.engine
def test_train_vlm_refuses_heads_narrower_than_32_before_training():
    out = semclip("train", "vlm", "--text-hidden-size", "160", "--text-heads", "8", "--out", "/nonexistent/x",
                  timeout=120)
    assert out.returncode == 2 and "32 wide" in out.stderr


@pytest.mark.engine
def test_train_vlm_takes_the_learning_rate():
    """--lr reaches VlmTrainConfig (a continuation with --init is run at a lower rate): out of range, it is refused."""
    out = semclip("train", "vlm", "--lr", "0", "--out", "/nonexistent/x", timeout=120)
    assert out.returncode == 2 and "lr must be in (0, 1)" in out.stderr


@pytest.mark.engine
def test_train_vlm_takes_the_spatial_fraction():
    """--spatial-fraction reaches VlmTrainConfig: outside 0-1 it is refused by name, before any training."""
    out = semclip("train", "vlm", "--spatial-fraction", "1.5", "--out", "/nonexistent/x", timeout=120)
    assert out.returncode == 2 and "spatial_fraction must be a fraction" in out.stderr


@pytest.mark.engine
def test_train_relevance_takes_the_unlocked_groups():
    """--lock-image-unlocked-groups reaches RelevanceTrainConfig: with the tower unlocked whole it is refused
    by name, before any labels are read."""
    out = semclip("train-relevance", "--labels", "/nonexistent/labels", "--unlock-image",
                  "--lock-image-unlocked-groups", "2", timeout=120)
    assert out.returncode == 2 and "lock_image_unlocked_groups" in out.stderr


@pytest.mark.engine
def test_help_is_plain_words_and_lists_every_subcommand():
    out = semclip("--help")
    assert out.returncode == 0, out.stderr
    for command in ("serve", "select", "demo", "bench-data", "bench", "eval", "label", "train-relevance", "train",
                    "build-models"):
        assert f"    {command} " in out.stdout or f"    {command}\n" in out.stdout, command
    assert "``" not in out.stdout and ":func:" not in out.stdout
    for command in (["serve"], ["select"], ["eval"], ["bench", "serve"], ["train", "clip"], ["demo"]):
        sub = semclip(*command, "--help")
        assert sub.returncode == 0 and f"usage: semclip {' '.join(command)}" in sub.stdout, (command, sub.stderr)
        assert "``" not in sub.stdout


@pytest.mark.engine
def test_a_failing_command_prints_one_line_and_the_traceback_only_with_v(tmp_path):
    missing = str(tmp_path / "missing.png")
    out = semclip("select", missing, "q")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"semclip select: error: cannot read an image from {missing}: [Errno 2] No such file or directory: "
        f"'{missing}'"]
    verbose = semclip("-v", "select", missing, "q")
    assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr
    assert semclip("select", missing, "q", "--no-such-flag").returncode == 2
    assert semclip("no-such-command").returncode == 2


def test_serve_command_translates_flags():
    cmd = serve_command("/m", {"topk": 2, "grids": (2, 3)}, port=9000,
                        vllm_args=["--hf-overrides", '{"semclip_config": {"overlap": 0.1}, "foo": 1}', "--max-model-len", "2048"])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["SemClipLlavaForConditionalGeneration"], "foo": 1,
                         "semclip_config": {"overlap": 0.1, "topk": 2, "grids": [2, 3]}}
    assert cmd.count("--max-model-len") == 1 and cmd[cmd.index("--max-model-len") + 1] == "2048"
    assert "--trust-request-mm-kwargs" in cmd and cmd[cmd.index("--port") + 1] == "9000"


@pytest.mark.engine
def test_demo_answers_and_writes_overlays(model_dir, tmp_path, tokens_per_tile):
    """`make demo`'s command: a real server, benchmark scenes, the openai client; the server is stopped after."""
    out = semclip("demo", "--out", str(tmp_path), "--tally", "4", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    records = json.loads((tmp_path / "demo.json").read_text())
    assert len(records) == 4
    # the tally: four more scenes, asked concurrently, two of each kind, none of them a shown one
    tally = json.loads((tmp_path / "tally.json").read_text())
    assert [r["kind"] for r in tally] == ["attribute", "spatial"] * 2
    assert not {r["name"] for r in tally} & {r["name"] for r in records}
    assert all(isinstance(r[k], bool) for r in tally for k in ("correct", "stock_correct", "crop_hit"))
    right, stock = sum(r["correct"] for r in tally), sum(r["stock_correct"] for r in tally)
    assert f"SemClip right on {right}/4, stock LLaVA on {stock}/4" in out.stdout
    for i, rec in enumerate(records):
        assert isinstance(rec["answer"], str) and isinstance(rec["stock_answer"], str)
        assert rec["visual_tokens"] == 2 * tokens_per_tile and len(rec["boxes"]) == 1
        assert (tmp_path / f"{i}_{rec['name']}.png").is_file()
        # the trained bundled LLaVA answers in the benchmark's own sentences
        assert rec["answer"].strip().startswith("The "), rec["answer"]
    assert "server stopped" in out.stdout
    import re

    pid = int(re.search(r"pid (\d+)", out.stdout).group(1))
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
