"""The benchmark scripts run (tiny sizes; their timings are not checked here, only that each
variant completes and reports what the README's tables are made of)."""

from __future__ import annotations

import json
import os
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
    cmd += ["--steps", "2", "--warmup", "1", "--ops", "--op-sites", "--lr", "0.05"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    lines = out.stdout.splitlines()
    assert lines[0].endswith("lr=0.05")
    for phase in ("before_step", "forward+backward", "compute", "after_step"):
        (row,) = [line for line in lines if line.startswith(phase + " ")]
        assert float(row.split()[-2]) > 0
    match = re.search(r"per step .*: ([\d.]+) ms, of which ([\d.]+) ms \((\d+)%\) between", out.stdout)
    assert match and 0 < float(match[2]) < float(match[1]) and 0 < int(match[3]) < 100
    rows = {
        line.split()[0]: float(line.split()[1]) for line in lines if line.startswith(("aten::", "probe."))
    }
    assert {"probe.compute", "probe.after_step"} <= set(rows) and any(k.startswith("aten::") for k in rows)
    # --op-sites: the per-function counts add up to the step's count, the plain step's own operations
    # (outside lipverify and the model's forward) are the plain step's count, the rest the probe's
    match = re.search(
        r"plain step (\d+) .*probed step (\d+) .*of which (\d+) issued by the probe", out.stdout
    )
    plain, probed, by_probe = (int(g) for g in match.groups())
    header = next(i for i, line in enumerate(lines) if line.endswith("by issuing function:"))
    sites = {site: int(count) for count, site in (line.split(maxsplit=1) for line in lines[header + 1 :])}
    assert sum(sites.values()) == probed and probed - by_probe == plain
    assert sites["probe/resolvent.py:quadratic_form"] > 0 and not any("interpose" in site for site in sites)


DEVICE_ENV = BENCH_PROBE.parent / "device_env.py"
DEVICE_CHECK = BENCH_PROBE.parent / "device_check.sh"


def _load_device_env():
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_env", DEVICE_ENV)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_env_accepts_this_environment_and_names_what_is_missing():
    # the GPU machine is offline: device_check.sh installs nothing when this says nothing is missing
    out = subprocess.run([sys.executable, str(DEVICE_ENV)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("missing: nothing")
    env = _load_device_env()
    found, missing = env.missing_requirements(("numpy", "no_such_module_lipverify"))
    assert found[0].startswith("numpy ") and missing == [
        "no_such_module_lipverify (ModuleNotFoundError: No module named 'no_such_module_lipverify')"
    ]
    # a torch older than the package's own requirement is missing, whatever it imports
    _, missing = env.missing_requirements(("torch",), min_torch=(99, 0))
    assert missing and missing[0].startswith("torch >= 99.0 (found ")
    # the list and torch's floor are pyproject.toml's, not a copy of them
    modules, floor = env.runtime_requirements()
    assert floor == (2, 4) and modules[0] == "torch" and modules[-2:] == ("pytest", "hypothesis")
    assert {"numpy", "scipy", "sympy", "threadpoolctl", "filelock"} <= set(modules)
    assert env.release("2.11.0+cu130") == (2, 11)
    assert env.release("2.13.0a0+git1234") == (2, 13)
    assert env.release("2.4") == (2, 4)


def test_device_env_refuses_a_pyproject_without_a_torch_floor(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torch", "numpy>=1.24"]\n')
    with pytest.raises(SystemExit, match=re.escape("no 'torch>=X.Y'")):
        _load_device_env().runtime_requirements(pyproject)
    pyproject.write_text('[project]\ndependencies = ["torch>=2.6", "numpy>=1.24"]\n')
    assert _load_device_env().runtime_requirements(pyproject) == (
        ("torch", "numpy", "pytest", "hypothesis"),
        (2, 6),
    )


@pytest.mark.slow
def test_device_check_dry_run_completes_every_step(tmp_path):
    # the prepared GPU script, on CPU at tiny sizes: every step but nvidia-smi exits 0, nothing is
    # installed (this environment has everything), and the files the device tool brings back are there
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    cmd = ["bash", str(DEVICE_CHECK)]
    subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True)
    log = (tmp_path / "device_check.log").read_text()
    codes = re.findall(r"rc=(\d+): (\S+)", log)
    assert len(codes) >= 6
    assert all(rc == "0" for rc, cmd in codes if not cmd.endswith("nvidia-smi")), codes
    assert "everything imports: no install" in log and "missing: nothing" in log
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"\d+ passed", summary) and not re.search(r"\d+ failed", summary), summary
    for name in ("probe_device_tests.xml", "bench_convnet_b16.json", "bench_mlp_b16.json", "summary.txt"):
        assert (tmp_path / name).is_file(), name
