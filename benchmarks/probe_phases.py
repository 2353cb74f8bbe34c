"""Where one steady-state step of the dynamics probe spends its time, per phase.

Times the phases of a training step with the full probe (``before_step``, forward/backward inside
``capture``, ``after_backward``, ``compute``, the optimiser step, ``after_step``, reading the previous
step's results) on a fixed random batch: median over ``--steps`` steps after ``--warmup`` untimed ones.
``--profile`` adds a cProfile listing of the same steps (functions by cumulative time), which splits
``after_step`` into the Gram product, the Cholesky factorisations and the two iterations of
:func:`lipverify.probe.resolvent_spectrum`.

    OMP_NUM_THREADS=1 python benchmarks/probe_phases.py --model mlp --threads 1
    OMP_NUM_THREADS=1 python benchmarks/probe_phases.py --model mlp --threads 1 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

PHASES = (
    "before_step",
    "forward+backward",
    "after_backward",
    "compute",
    "optimizer.step",
    "after_step",
    "read",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=["mlp", "convnet"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--compute-dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--route", default="auto", choices=["auto", "host", "device"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--profile", action="store_true", help="also print a cProfile listing of the steps")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from lipverify.dynamics import network_terms
    from lipverify.models import build_model
    from lipverify.probe import DynamicsProbe

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, seed=0)
    g = torch.Generator().manual_seed(0)
    shape = (784,) if args.model == "mlp" else (3, 32, 32)
    x = torch.rand(args.batch_size, *shape, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    lr = 0.01
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = DynamicsProbe(
        model, compute_dtype=getattr(torch, args.compute_dtype), route=args.route, population_size=60000
    )
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    pending = []

    def step(record: bool) -> None:
        t = [time.perf_counter()]
        probe.before_step()
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        with probe.capture():
            F.cross_entropy(model(x), y).backward()
        t.append(time.perf_counter())
        probe.after_backward()
        t.append(time.perf_counter())
        terms = probe.compute(lr)
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        truth = probe.after_step(lr)
        t.append(time.perf_counter())
        for old_terms, old_truth in pending:  # the previous step's results, read a step later
            network_terms(old_terms), dict(old_truth)
        pending[:] = [(terms, truth)]
        t.append(time.perf_counter())
        if record:
            for name, start, end in zip(PHASES, t[:-1], t[1:], strict=True):
                times[name].append(end - start)

    for _ in range(args.warmup):
        step(False)
    for _ in range(args.steps):
        step(True)
    total = 0.0
    print(f"model={args.model} batch={args.batch_size} compute_dtype={args.compute_dtype} route={args.route}")
    for name in PHASES:
        median = 1e3 * statistics.median(times[name])
        total += median
        print(f"{name:18s} {median:8.2f} ms")
    print(f"{'sum of medians':18s} {total:8.2f} ms   resolvent_stats {probe.resolvent_stats}")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step(False)
        profiler.disable()
        print(f"\ncProfile of {args.steps} steps (divide the times by {args.steps} for one step):")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
