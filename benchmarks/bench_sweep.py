"""Benchmark: wall time of one ``lipverify sweep`` on the local process pool against the Ray backend
(a local Ray instance started by the command), and the scaling of a small CPU sweep from 1 to 2
workers on each backend.

Every measurement is one fresh ``python -m lipverify.cli sweep`` process into a fresh directory, so
it includes interpreter, torch and (for Ray) cluster start-up: what a user waits for. The sweep is
``--runs`` real MLP runs (``seed_sampling`` 0..runs-1) of ``--steps`` steps on ``--train-size``
MNIST-5k samples. The smoke sweep is the same config with ``--smoke`` (at most 6 steps per run).
Prints one JSON line per measurement and a table. On a shared machine the numbers move with the
other load: report the minimum over ``--repeats``.

Usage: python benchmarks/bench_sweep.py [--runs 4 --steps 200 --train-size 256 --repeats 1
--backends local,ray --workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep_toml(runs: int, steps: int, train_size: int) -> str:
    seeds = ", ".join(str(s) for s in range(runs))
    return (
        'claim = "trajectories"\n'
        f"[base]\nmodel = 'mlp'\ntrain_size = {train_size}\nbatch_size = 16\nsteps = {steps}\n"
        f"checkpoint_every = {max(1, steps // 2)}\n"
        f"[grid]\nseed_sampling = [{seeds}]\n"
    )


def timed_sweep(toml: Path, backend: str, workers: int, smoke: bool, root: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=root))
    cmd = [sys.executable, "-m", "lipverify.cli", "sweep", str(toml), "--out", str(out / "s")]
    cmd += ["--backend", backend, "--jobs", str(workers)] + (["--smoke"] if smoke else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({backend}, {workers} workers):\n{proc.stdout}\n{proc.stderr}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--backends", default="local,ray")
    p.add_argument("--workers", default="1,2")
    args = p.parse_args()
    backends = args.backends.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        toml = root / "bench.toml"
        toml.write_text(sweep_toml(args.runs, args.steps, args.train_size))
        cases = [(b, max(workers), True) for b in backends]  # smoke: overhead of the backend
        cases += [(b, w, False) for b in backends for w in workers]  # scaling
        for backend, w, smoke in cases:
            walls = [timed_sweep(toml, backend, w, smoke, root) for _ in range(args.repeats)]
            row = {
                "backend": backend,
                "workers": w,
                "smoke": smoke,
                "runs": args.runs,
                "steps": 6 if smoke else args.steps,
                "wall_s_min": round(min(walls), 2),
                "wall_s_all": [round(x, 2) for x in walls],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ncpus: {os.cpu_count()}, load average: {os.getloadavg()}")
    print(f"{'sweep':>8} {'backend':>8} {'workers':>8} {'wall s (min)':>13}")
    for r in rows:
        kind = "smoke" if r["smoke"] else f"{r['steps']} st"
        print(f"{kind:>8} {r['backend']:>8} {r['workers']:>8} {r['wall_s_min']:>13.2f}")
    for b in backends:
        by_w = {r["workers"]: r["wall_s_min"] for r in rows if r["backend"] == b and not r["smoke"]}
        if 1 in by_w and 2 in by_w:
            print(f"{b}: speed-up 1 -> 2 workers {by_w[1] / by_w[2]:.2f}x")


if __name__ == "__main__":
    main()
