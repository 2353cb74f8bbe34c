"""The benchmark scripts run (tiny sizes; their timings are not checked here, only that each
variant completes and reports what the README's tables are made of)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_PROBE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_probe.py"


def _worker(variant: str, model: str = "mlp") -> dict:
    cmd = [sys.executable, str(BENCH_PROBE), "--worker", "--model", model, "--variant", variant]
    cmd += ["--batch-size", "8", "--repeats", "2", "--warmup", "1", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["plain", "probe-f32", "floor-f64"])
def test_bench_probe_variants_report_time_and_memory(variant):
    r = _worker(variant)
    assert r["median_s"] > 0 and r["min_s"] > 0
    if variant == "floor-f64":
        # the floor adds the dense kernels to a plain step timed in the same process
        assert r["median_s"] > r["plain_s"] > 0
    else:
        assert r["peak_mem_bytes"] > 0
    if variant == "probe-f32":
        stats = r["resolvent_stats"]
        assert stats["cold"] == 3 and stats["iterative"] + stats["fallback"] > 0


def test_bench_probe_memory_is_the_workers_own_growth():
    # ru_maxrss survives execve, so a worker launched from a large process (e.g. this test session)
    # would start from that process's peak and report no growth at all
    ballast = b"\x01" * (600 << 20)  # 600 MiB of touched pages in the launching process
    r = _worker("plain")
    del ballast
    assert 0 < r["peak_mem_bytes"] < 400 << 20


def test_bench_probe_interleaved_times_the_variants_in_one_process(tmp_path):
    out = tmp_path / "interleaved.json"
    cmd = [sys.executable, str(BENCH_PROBE), "--model", "convnet", "--variants", "probe,probe-conv"]
    cmd += ["--batch-size", "4", "--repeats", "3", "--warmup", "1", "--threads", "1", "--interleaved"]
    subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, check=True, timeout=300)
    results = json.loads(out.read_text())["models"]["convnet"]
    assert list(results) == ["plain", "probe", "probe-conv"]
    assert results["plain"]["median_ratio"] == 1.0
    for r in results.values():
        lo, hi = r["ratio_quartiles"]
        assert r["median_s"] > 0 and lo <= r["median_ratio"] <= hi
