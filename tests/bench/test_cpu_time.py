"""CPU time by process: real processes burn known CPU, the sampler attributes it to their roles."""

import subprocess
import sys
import time

import pytest

from vllm_semclip.bench.cpu_time import ROLES, CpuSample, CpuSampler, process_role

# burns `cpu` seconds of its own CPU, then sleeps; with a title it renames itself first, as vLLM does;
# further arguments start a child running this same script with them
BURN = """
import subprocess, sys, time
cpu, title, child = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
if title != "-":
    import setproctitle
    setproctitle.setproctitle(title)
kid = subprocess.Popen([sys.executable, __file__, *child]) if child else None
while time.process_time() < cpu:
    pass
time.sleep(2.0)
if kid:
    kid.wait()
"""


def _burn(tmp_path, cpu: float, title: str = "-", *child: str) -> subprocess.Popen:
    script = tmp_path / "burn.py"
    script.write_text(BURN)
    return subprocess.Popen([sys.executable, str(script), str(cpu), title, *child])


def test_vllms_process_names_give_the_roles():
    assert process_role("VLLM::EngineCor") == "engine_core"  # /proc's comm: 15 characters
    assert process_role("VLLM::Worker_TP0") == process_role("VLLM::Worker") == "worker"
    assert process_role("python") == process_role("vllm") == "front_end"


def test_a_server_tree_and_its_client_are_counted_by_role(tmp_path):
    # the "server": a front end that burns 0.6 s and starts an engine core that burns 0.4 s
    start = time.time()
    server = _burn(tmp_path, 0.6, "-", "0.4", "VLLM::EngineCore")
    try:
        with CpuSampler(server.pid, interval=0.05) as cpu:
            client = _burn(tmp_path, 0.3)
            cpu.watch_client(client.pid)
            client.wait(timeout=60)
            server.wait(timeout=60)
            end = time.time()
    finally:
        server.kill()
    seconds = cpu.seconds_by_role(start, end)
    assert set(seconds) == set(ROLES)
    # every process is born inside the window and ends inside it: all its CPU counts (with Python's
    # start-up), less what it burnt before the first sample, when the engine core is not yet renamed
    assert 0.45 < seconds["front_end"] < 1.3 and 0.3 < seconds["engine_core"] < 0.9
    assert 0.25 < seconds["client"] < 0.8 and seconds["worker"] == 0.0
    quiet = cpu.seconds_by_role(end - 0.01, end)  # everyone asleep or gone
    assert sum(quiet.values()) < 0.05


def test_a_window_between_samples_is_interpolated_per_process():
    cpu = CpuSampler(server_pid=-1)
    cpu.samples = [CpuSample(10.0, {1: ("front_end", 1.0), 2: ("worker", 5.0)}),
                   CpuSample(12.0, {1: ("front_end", 3.0), 2: ("worker", 5.0), 3: ("client", 0.8)}),
                   CpuSample(14.0, {1: ("front_end", 3.0), 3: ("client", 1.6)})]  # the worker has ended
    seconds = cpu.seconds_by_role(11.0, 13.0)
    # front end: 2.0 at 11, 3.0 at 13; the client, born between the first two samples, 0.4 → 1.2
    assert seconds["front_end"] == pytest.approx(1.0) and seconds["client"] == pytest.approx(0.8)
    assert seconds["worker"] == 0.0 and seconds["engine_core"] == 0.0
    assert cpu.seconds_by_role(0.0, 100.0)["front_end"] == pytest.approx(2.0)  # clamped to the samples
    with pytest.raises(ValueError, match="empty window"):
        cpu.seconds_by_role(13.0, 11.0)
