"""CPU time by process while a benchmark runs: what each part of a vLLM server spends on a request.

Where the API server (vLLM's front end, where the multimodal processor runs), the engine core, its
worker and the benchmark's client share a few cores, throughput follows the CPU all of them spend per
request, not one stage's latency. :class:`CpuSampler` reads the cumulative CPU seconds (user +
system) of every process of a server's tree, and of the processes it is told to watch (the client),
every ``interval`` seconds on a thread. A run's share is the difference across its time window,
taken per process and interpolated between the samples around each end; a process born inside the
window counts from zero, one that ended inside it up to its last reading.

The front end's and the client's figures are work. The engine core's and the worker's are not only
work: vLLM's shared-memory queues between them (``shm_broadcast.MessageQueue``) wait by spinning on
``sched_yield`` for up to a second after each message, so on a busy host those two take whatever
CPU the others leave. Read them together as the engine's share of the host, not as its cost.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field

ROLES = ("front_end", "engine_core", "worker", "client")


def process_role(name: str) -> str:
    """The role of a server process by its name: vLLM names its engine processes (``VLLM::EngineCore``,
    ``VLLM::Worker…``); every other process of the tree serves the API (the front end)."""
    if "EngineCor" in name:  # /proc's comm keeps 15 characters: "VLLM::EngineCor"
        return "engine_core"
    if "Worker" in name:
        return "worker"
    return "front_end"


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds of each process at one moment: ``{pid: (role, seconds)}``."""

    time: float
    cpu: Mapping[int, tuple[str, float]]


@dataclass
class CpuSampler:
    """Samples the CPU seconds of ``server_pid``'s process tree and of watched processes on a thread.

    Use as a context manager around the work; :meth:`seconds_by_role` then answers for any time
    window inside it (``time.time()`` seconds)."""

    server_pid: int
    interval: float = 0.2
    samples: list[CpuSample] = field(default_factory=list)
    _clients: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def watch_client(self, pid: int) -> None:
        """Count ``pid`` (and its children) as the client from the next sample on."""
        self._clients.add(pid)

    def sample(self) -> CpuSample:
        import psutil

        cpu: dict[int, tuple[str, float]] = {}
        roots = [(self.server_pid, None)] + [(pid, "client") for pid in list(self._clients)]
        for root, fixed_role in roots:
            try:
                parent = psutil.Process(root)
                procs = [parent] + parent.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for proc in procs:
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        role = fixed_role or process_role(proc.name())
                except psutil.NoSuchProcess:
                    continue
                cpu[proc.pid] = (role, times.user + times.system)
        return CpuSample(time.time(), cpu)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self.sample())

    def __enter__(self) -> CpuSampler:
        self.samples.append(self.sample())
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(self.sample())

    def _cpu_at(self, t: float) -> dict[int, tuple[str, float]]:
        """Each process's cumulative CPU seconds at ``t``: interpolated between the samples around ``t``
        where both saw it, else its last reading before ``t`` (a process that has ended keeps it)."""
        times = [s.time for s in self.samples]
        i = bisect_left(times, t)
        out: dict[int, tuple[str, float]] = {}
        for sample in self.samples[:max(i, 1)]:  # before the first sample: its readings
            out.update(sample.cpu)
        if 0 < i < len(times):
            before, after = self.samples[i - 1], self.samples[i]
            w = (t - before.time) / max(after.time - before.time, 1e-9)
            for pid, (role, late) in after.cpu.items():
                early = before.cpu.get(pid, (role, 0.0))[1]  # born between the samples: from zero
                out[pid] = (role, early + w * (late - early))
        return out

    def seconds_by_role(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each role spent between ``start`` and ``end``."""
        if not self.samples or end < start:
            raise ValueError(f"no samples, or an empty window ({start} … {end})")
        first, last = self._cpu_at(start), self._cpu_at(end)
        out = dict.fromkeys(ROLES, 0.0)
        for pid, (role, seconds) in last.items():
            out[role] += max(0.0, seconds - first.get(pid, (role, 0.0))[1])
        return out
