"""Opt-in timing log of SemClip's selection, measured inside the processor.

Set ``SEMCLIP_TIMINGS_FILE=/path/log.jsonl`` in the server's environment and every image
the processor selects crops for appends one JSON line: ``selection_ms`` (``select_crops``:
cut, pad, ψ forward, top-k), the image size, candidates and crops kept. Benchmarks read it
to report selection time per request; nothing is written when the variable is unset.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

ENV = "SEMCLIP_TIMINGS_FILE"
_lock = threading.Lock()


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def record(**fields: object) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps(fields) + "\n"
    with _lock, open(path, "a", encoding="utf-8") as f:
        f.write(line)


def read(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
