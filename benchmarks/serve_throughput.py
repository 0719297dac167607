"""Serving throughput and latency of SemClip beside its alternatives (see vllm_semclip.bench.serve).

    python benchmarks/serve_throughput.py            # concurrency 1, 8, 32; 3 repeats; ~15-20 min
    python benchmarks/serve_throughput.py --quick    # concurrency 8; 2 repeats; < 5 min
    semclip bench serve [--quick]                    # the same

Writes benchmarks/results/serve_throughput.json (+ .png).
"""

import sys

from vllm_semclip.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
