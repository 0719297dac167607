"""The serving benchmark runs end to end and writes results of the documented shape.

No speed is asserted here (benchmarks report figures; tests check behaviour): this runs the
smallest possible benchmark — 2 images, concurrency 2, one repeat — against a real server
with vLLM's own client, plus the transformers baseline.
"""

import json
import subprocess
import sys

import pytest

from vllm_semclip.serve_bench import METRICS


@pytest.mark.timeout(900)
def test_serve_benchmark_smoke(tmp_path, model_dir, tokens_per_tile):
    out = subprocess.run(
        [sys.executable, "-m", "vllm_semclip.cli", "bench", "serve", "--configs", "semclip,hf", "--concurrency", "2",
         "--num-prompts", "4", "--repeats", "1", "--workload-size", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "serve_throughput.json").read_text())
    assert set(doc) >= {"semclip", "hf", "_meta", "_ratios"}
    for config in ("semclip", "hf"):
        point = doc[config]["2"]
        for metric in METRICS:
            assert point[metric] > 0, (config, metric)
        assert point["p99_e2el_ms"] >= point["p50_e2el_ms"]
    assert doc["semclip"]["2"]["visual_tokens_per_request"] == 2 * tokens_per_tile
    assert doc["hf"]["2"]["visual_tokens_per_request"] == 2 * tokens_per_tile  # same inputs, same tokens
    assert doc["semclip"]["2"]["selection_samples"] >= 4 and doc["semclip"]["2"]["p50_selection_ms"] > 0
    assert "semclip/hf@2" in doc["_ratios"]
    assert (tmp_path / "serve_throughput.png").stat().st_size > 1000
    assert "ratios of request throughput" in out.stdout
