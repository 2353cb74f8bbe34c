"""The benchmark scripts run (tiny sizes; their timings are not checked here, only that each
variant completes and reports what the README's tables are made of)."""

from __future__ import annotations

import json
import re
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


def test_probe_phases_reports_each_phase_and_the_probes_operations():
    script = BENCH_PROBE.parent / "probe_phases.py"
    cmd = [sys.executable, str(script), "--model", "mlp", "--batch-size", "8", "--threads", "1"]
    cmd += ["--steps", "2", "--warmup", "1", "--ops"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    lines = out.stdout.splitlines()
    for phase in ("before_step", "forward+backward", "compute", "after_step"):
        (row,) = [line for line in lines if line.startswith(phase + " ")]
        assert float(row.split()[-2]) > 0
    match = re.search(r"per step .*: ([\d.]+) ms, of which ([\d.]+) ms \((\d+)%\) between", out.stdout)
    assert match and 0 < float(match[2]) < float(match[1]) and 0 < int(match[3]) < 100
    rows = {
        line.split()[0]: float(line.split()[1]) for line in lines if line.startswith(("aten::", "probe."))
    }
    assert {"probe.compute", "probe.after_step"} <= set(rows) and any(k.startswith("aten::") for k in rows)
