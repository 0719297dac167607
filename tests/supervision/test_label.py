"""Distant-supervision labelling: the label arithmetic, its settings, and the Ray job end to end.

The job test kills a real ``semclip label`` process (Ray, an actor, its vLLM engine) after
its first shard, runs it again, and compares with an uninterrupted run in this process.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_semclip.eval.benchdata import BenchRecord, load_bench, write_bench
from vllm_semclip.crops import candidate_boxes
from vllm_semclip.eval.metrics import crop_hit
from vllm_semclip.supervision.label import (LabelConfig, LabelError, label_row, label_statistics, load_labels, run_labelling,
                                score_condition)

QUESTIONS = 3


def test_without_an_address_the_job_starts_its_own_local_ray(monkeypatch):
    from vllm_semclip.supervision.label import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == "local"  # never a stale cluster from /tmp/ray/ray_current_cluster
    assert ray_address("10.0.0.5:6379") == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_address(None) == "ray://head:10001"


def test_wait_for_exit_waits_for_processes_that_end_and_names_those_that_do_not():
    from vllm_semclip.supervision.label import wait_for_exit

    ending = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
    staying = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = time.monotonic()
        assert wait_for_exit([ending.pid], timeout=30) == []
        assert time.monotonic() - start >= 0.5  # it waited for the end (a zombie counts as ended)
        assert wait_for_exit([staying.pid], timeout=0.5) == [staying.pid]
    finally:
        staying.kill()
        staying.wait()
        ending.wait()
    assert wait_for_exit([staying.pid], timeout=5) == []  # reaped: gone


def test_condition_scores_normalise_over_the_options():
    s = score_condition([-1.0, -2.0, -3.0, -0.5])
    assert s["loglik"] == -1.0
    assert s["logprob"] == pytest.approx(-1.0 - math.log(sum(math.exp(v) for v in (-1, -2, -3, -0.5))), abs=1e-4)
    assert s["correct"] is False
    assert score_condition([-0.1, -4.0])["correct"] is True


def test_a_crops_gain_is_its_rise_in_the_correct_options_probability():
    rec = BenchRecord("q", "direct_attributes", "/none.jpg", "What is the color of the circle?",
                      ["a", "b", "c", "d"], ["circle"], [[610, 410, 30, 30]])
    candidates = candidate_boxes(900, 600, (2, 3))
    overview = [-2.0, -1.0, -1.5, -3.0]  # the VLM prefers a wrong option without a crop
    scored = [overview] + [[-2.0, -1.0, -1.5, -3.0]] * len(candidates)
    helpful = 12  # the bottom-right 3x3 cell holds the circle
    scored[1 + helpful] = [-0.2, -3.0, -3.0, -3.0]
    row = label_row(rec, (900, 600), (2, 3), scored)
    assert len(row["crops"]) == 17 and row["best"] == helpful and row["bridges"]
    assert row["crops"][helpful]["gain"] == pytest.approx(
        score_condition(scored[1 + helpful])["logprob"] - score_condition(overview)["logprob"], abs=1e-3)
    assert row["crops"][helpful]["correct"] and not row["overview"]["correct"]
    assert all(c["gain"] == 0 for i, c in enumerate(row["crops"]) if i != helpful)
    assert [c["hit"] for c in row["crops"]] == [crop_hit([b], rec.target_boxes) for b in candidates]
    assert row["oracle"] == helpful


def test_label_statistics_count_per_category():
    rec = BenchRecord("q", "direct_attributes", "/none.jpg", "What is the color of the circle?",
                      ["a", "b", "c", "d"], ["circle"], [[610, 410, 30, 30]])
    n = len(candidate_boxes(900, 600, (2, 3)))
    wrong = [-2.0, -1.0, -1.5, -3.0]
    helped = [wrong] * (n + 1)
    helped[1 + 12] = [-0.2, -3.0, -3.0, -3.0]  # the oracle crop (bottom-right 3x3 cell) answers right
    flat = [[-0.5, -1.0, -1.5, -3.0]] * (n + 1)  # right everywhere, no crop gains
    spatial = BenchRecord("s", "relative_position", "/none.jpg", "Is the circle on the left or right side of the star?",
                          ["l", "r"], ["circle", "star"], [[10, 10, 30, 30], [700, 500, 30, 30]])
    rows = [label_row(rec, (900, 600), (2, 3), helped), label_row(rec, (900, 600), (2, 3), flat),
            label_row(spatial, (900, 600), (2, 3), [[-1.0, -0.5]] * (n + 1))]
    stats = label_statistics(rows)
    assert stats["direct_attributes"] == {"questions": 2, "overview_accuracy": 0.5, "oracle_crop_accuracy": 1.0,
                                          "best_crop_hit_rate": 0.5, "helped_questions": 1}
    assert stats["relative_position"] == {"questions": 1, "overview_accuracy": 0.0, "oracle_crop_accuracy": 0.0,
                                          "best_crop_hit_rate": 0.0, "helped_questions": 0}
    assert label_statistics(rows, min_gain=10.0)["direct_attributes"]["helped_questions"] == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"shard_size": 0}, "shard_size"), ({"actors": 0}, "actors"), ({"grids": (2, 2)}, "grids"),
    ({"limit": 0}, "limit"), ({"cpus_per_actor": 0}, "cpus_per_actor"),
])
def test_bad_settings_raise_typed_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelConfig(data="d", model="m", out="o", **kwargs)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("label")
    write_bench(root / "bench", QUESTIONS, seed=4242, progress=False)
    return root


@pytest.mark.engine
def test_labels_made_with_other_settings_are_not_mixed(bench, model_dir, tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    other = LabelConfig(data=str(bench / "bench"), model=model_dir, out=str(out), shard_size=2).manifest(QUESTIONS)
    (out / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(LabelError, match="other settings"):  # refused before Ray or vLLM start
        run_labelling(LabelConfig(data=str(bench / "bench"), model=model_dir, out=str(out), shard_size=1))


def _session_processes(sid: int) -> list[int]:
    """PIDs of every process in session ``sid`` (the killed job and whatever it started)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


@pytest.fixture(scope="module")
def interrupted_then_resumed(bench, model_dir):
    """``semclip label`` killed (with Ray and vLLM) after its first shard, then run again to the end."""
    out = bench / "resumed"
    cmd = [sys.executable, "-m", "vllm_semclip.cli", "label", "--data", str(bench / "bench"), "--model", model_dir,
           "--out", str(out), "--shard-size", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while not list(out.glob("shard-*.jsonl")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver (and what shares its process group)
        proc.wait()
    deadline = time.time() + 60  # Ray's daemons, the actor and its vLLM engine must follow the driver
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    survivors = _session_processes(proc.pid)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "processes of the killed labelling job outlived it"
    first = sorted(p.name for p in out.glob("shard-*.jsonl"))
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    return out, first, summary


@pytest.fixture(scope="module")
def uninterrupted(bench, model_dir):
    """The same job in this process, start to end, on a local Ray that it starts and stops."""
    out = bench / "straight"
    summary = run_labelling(LabelConfig(data=str(bench / "bench"), model=model_dir, out=str(out), shard_size=1),
                            progress=False)
    return out, summary


def test_an_interrupted_job_resumes_and_matches_an_uninterrupted_one(interrupted_then_resumed, uninterrupted):
    out, first, summary = interrupted_then_resumed
    assert 1 <= len(first) < QUESTIONS, "the job was not killed between its first and last shard"
    assert summary["skipped_shards"] == len(first) and summary["labelled_shards"] == QUESTIONS - len(first)
    assert json.loads((out / "manifest.json").read_text())["finished"] is True
    straight, _ = uninterrupted
    assert load_labels(out) == load_labels(straight)


def test_the_ray_job_labels_every_crop_and_shuts_ray_down(bench, uninterrupted):
    import ray

    out, summary = uninterrupted
    assert summary["labelled_shards"] == QUESTIONS and summary["skipped_shards"] == 0
    assert not ray.is_initialized()
    leftovers = subprocess.run(["pgrep", "-f", "ray::LabelWorker"], capture_output=True, text=True).stdout.split()
    assert leftovers == []
    rows = load_labels(out)
    records = {r.name: r for r in load_bench(bench / "bench")}
    assert [r["name"] for r in rows] == [r.name for r in load_bench(bench / "bench")]
    for row in rows:
        rec = records[row["name"]]
        assert len(row["crops"]) == 17 and len(row["overview"]["option_scores"]) == len(rec.options)
        for crop in row["crops"]:
            assert crop["gain"] == pytest.approx(crop["logprob"] - row["overview"]["logprob"], abs=2e-4)
            assert crop["logprob"] <= 0 and crop["hit"] == crop_hit([crop["box"]], rec.target_boxes)
        assert row["crops"][row["best"]]["gain"] == max(c["gain"] for c in row["crops"])

    # a rerun of a finished job starts nothing (no Ray, no engine) and changes nothing
    before = load_labels(out)
    start = time.time()
    again = run_labelling(LabelConfig(data=str(bench / "bench"), model=summary["model"], out=str(out), shard_size=1),
                          progress=False)
    assert again["labelled_shards"] == 0 and again["skipped_shards"] == QUESTIONS
    assert time.time() - start < 10 and not ray.is_initialized()
    assert load_labels(out) == before


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head started as a cluster is (``ray start --head``), in a session of its own; stopped after."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", head
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 30
        while _session_processes(head.pid) and time.time() < deadline:
            time.sleep(0.5)
        for pid in _session_processes(head.pid):
            os.kill(pid, signal.SIGKILL)
        # `ray start` records its cluster for later bare `ray.init()` calls; do not leave a dead one behind
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_the_same_job_runs_on_an_existing_cluster(bench, model_dir, ray_cluster, uninterrupted):
    import ray

    address, head = ray_cluster
    out = bench / "on-cluster"
    summary = run_labelling(LabelConfig(data=str(bench / "bench"), model=model_dir, out=str(out), shard_size=1,
                                        address=address), progress=False)
    assert summary["labelled_shards"] == QUESTIONS
    assert load_labels(out) == load_labels(uninterrupted[0])
    assert not ray.is_initialized()  # the driver disconnected ...
    assert head.poll() is None  # ... and left the cluster it does not own running
