"""The package's rooms, checked from the source (AST, nothing executed; imports inside functions count).

- The plugin core (``vllm_semclip/*.py``) imports only the standard library, vLLM and what vLLM
  itself depends on, open_clip, and other core modules: never a room below it.
- No import cycles between the package's modules; no module imports another's private name.
- The vLLM version range is written once (``plugin.SUPPORTED_VLLM``): setup.py reads it and the
  README states it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vllm_semclip"
ROOMS = ("tiny", "eval", "supervision", "bench")
# The CLI dispatches into every room (each subcommand imports its room lazily): exempt.
CORE_EXEMPT = {"cli"}
# vLLM and what vLLM itself installs, plus open_clip.
CORE_THIRD_PARTY = {"vllm", "torch", "torchvision", "transformers", "packaging", "numpy", "PIL", "tqdm",
                    "safetensors", "prometheus_client", "open_clip"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in the file, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [a.name for a in node.names]
            if node.module is None:  # from . import x: x is a module
                found += [(f"{target}.{n}", []) for n in names]
            else:
                found.append((target, names))
    return found


def test_the_core_reaches_no_room_and_no_extra_dependency():
    modules = package_modules()
    core = {m: p for m, p in modules.items() if m.count(".") <= 1 and m.split(".")[-1] not in CORE_EXEMPT
            and not any(m == f"vllm_semclip.{r}" for r in ROOMS)}
    assert {"vllm_semclip.plugin", "vllm_semclip.processor", "vllm_semclip.relevance"} <= set(core)
    bad = []
    for mod, path in core.items():
        for target, _ in imports_of(path):
            top = target.split(".")[0]
            if top == "vllm_semclip":
                if any(target == f"vllm_semclip.{r}" or target.startswith(f"vllm_semclip.{r}.") for r in ROOMS):
                    bad.append(f"{mod} imports {target}")
            elif top not in sys.stdlib_module_names and top not in CORE_THIRD_PARTY:
                bad.append(f"{mod} imports {target}")
    assert not bad, "the plugin core must not import these:\n" + "\n".join(bad)


def test_a_core_module_that_imports_a_room_is_caught(tmp_path):
    """The walk sees an import hidden in a function, relative or absolute (the check can fail)."""
    path = PACKAGE / "_layout_probe.py"
    path.write_text("def f():\n    from .tiny import build\n    import matplotlib\n")
    try:
        with pytest.raises(AssertionError, match="_layout_probe imports vllm_semclip.tiny"):
            test_the_core_reaches_no_room_and_no_extra_dependency()
    finally:
        path.unlink()


def test_no_import_cycles():
    modules = package_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, names in imports_of(path):
            for cand in [target, *(f"{target}.{n}" for n in names)]:
                if cand in modules and cand != mod:
                    graph[mod].add(cand)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_another_modules_private_name():
    bad = [f"{module_name(p)} imports {t}.{n}" for p in PACKAGE.rglob("*.py") for t, names in imports_of(p)
           if t.startswith("vllm_semclip") for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


@pytest.mark.engine
def test_importing_the_package_pulls_in_no_room_dependency():
    code = ("import sys, vllm_semclip, vllm_semclip.plugin, vllm_semclip.config, vllm_semclip.selection;"
            "print(' '.join(sorted(m for m in ('ray', 'easy_vqa', 'skimage', 'matplotlib', 'psutil', 'openai') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def test_the_vllm_range_is_written_once():
    from vllm_semclip.plugin import SUPPORTED_VLLM

    setup_py = (ROOT / "setup.py").read_text()
    assert "SUPPORTED_VLLM" in setup_py and not re.search(r"vllm(-cpu)?[<>=]=?\d", setup_py)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert SUPPORTED_VLLM in (ROOT / "README.md").read_text()
