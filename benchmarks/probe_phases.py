"""Where one steady-state step of the dynamics probe spends its time, per phase.

Times the phases of a training step with the full probe (``before_step``, forward/backward inside
``capture``, ``after_backward``, ``compute``, the optimiser step, ``after_step``, reading the previous
step's results) on a fixed random batch: median over ``--steps`` steps after ``--warmup`` untimed ones.
``--profile`` adds a cProfile listing of the same steps (functions by cumulative time), which splits
``after_step`` into the Gram product, the Cholesky factorisations and the two iterations of
:func:`lipverify.probe.resolvent_spectrum`. ``--ops`` adds torch.profiler's self CPU time per ATen
operation inside the probe's own phases (``before_step``, ``after_backward``, ``compute``,
``after_step``; not the forward/backward), per step; the rows ``probe.<phase>`` are the time spent
between torch operations (Python, numpy, scipy). ``--op-sites`` counts the ATen operations of one
steady-state step (after the timed steps) by the lipverify function that issued them
(:class:`lipverify.probe.interpose.SyncCounter` with ``sites=True``), next to a plain step's count in
the same process: where the device route's launches come from (``--route device``).

    OMP_NUM_THREADS=1 python benchmarks/probe_phases.py --model mlp --threads 1
    OMP_NUM_THREADS=1 python benchmarks/probe_phases.py --model mlp --threads 1 --profile
    python benchmarks/probe_phases.py --model convnet --threads 2 --ops
    python benchmarks/probe_phases.py --model mlp --route device --batch-size 16 --steps 3 --op-sites
"""

from __future__ import annotations

import argparse
import collections
import contextlib
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
    p.add_argument(
        "--lr",
        type=float,
        default=0.01,
        help="SGD learning rate (the update's size against each layer's gap decides which branch of "
        "update_exceeds_gap runs; lipverify train's default is 0.05)",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--profile", action="store_true", help="also print a cProfile listing of the steps")
    p.add_argument(
        "--ops",
        action="store_true",
        help="also print the self CPU time per ATen operation of the probe's phases",
    )
    p.add_argument(
        "--op-sites",
        action="store_true",
        help="also count one step's ATen operations by the lipverify function that issued them",
    )
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
    lr = args.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = DynamicsProbe(
        model, compute_dtype=getattr(torch, args.compute_dtype), route=args.route, population_size=60000
    )
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    pending = []

    ops_time: collections.Counter = collections.Counter()  # --ops: self CPU microseconds per key
    ops_calls: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def phase(name: str, ops: bool):
        """One probe phase; with ``ops``, under torch.profiler (its self CPU time per key added up)."""
        if not ops:
            yield
            return
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.profiler.record_function(f"probe.{name}"):
                yield
        for event in prof.key_averages():
            ops_time[event.key] += event.self_cpu_time_total
            ops_calls[event.key] += event.count

    def step(record: bool, ops: bool = False) -> None:
        t = [time.perf_counter()]
        with phase("before_step", ops):
            probe.before_step()
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        with probe.capture():
            F.cross_entropy(model(x), y).backward()
        t.append(time.perf_counter())
        with phase("after_backward", ops):
            probe.after_backward()
        t.append(time.perf_counter())
        with phase("compute", ops):
            terms = probe.compute(lr)
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        with phase("after_step", ops):
            truth = probe.after_step(lr)
        t.append(time.perf_counter())
        for old_terms, old_truth in pending:  # the previous step's results, read a step later
            network_terms(old_terms), dict(old_truth)
        pending[:] = [(terms, truth)]
        t.append(time.perf_counter())
        if record:
            for name, start, end in zip(PHASES, t[:-1], t[1:], strict=True):
                times[name].append(end - start)

    def plain_step() -> None:
        """The same training step without the probe (the model's weights move: run it last)."""
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step(False)
    for _ in range(args.steps):
        step(True)
    total = 0.0
    print(
        f"model={args.model} batch={args.batch_size} compute_dtype={args.compute_dtype} route={args.route} "
        f"lr={lr:g}"
    )
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
    if args.ops:
        for _ in range(args.steps):
            step(False, ops=True)
        total = sum(ops_time.values())
        between = sum(v for k, v in ops_time.items() if k.startswith("probe."))
        per_step, between_per_step = total / args.steps / 1e3, between / args.steps / 1e3
        print(
            f"\ntorch.profiler, the probe's phases, per step (mean of {args.steps} steps; the profiler adds "
            f"its own overhead): {per_step:.2f} ms, of which {between_per_step:.2f} ms "
            f"({100 * between / total:.0f}%) between torch operations"
        )
        for key, value in ops_time.most_common(30):
            print(f"{key:45s} {value / args.steps / 1e3:8.3f} ms {ops_calls[key] / args.steps:7.1f} calls")
    if args.op_sites:
        _print_op_sites(step, plain_step)


def _print_op_sites(step, plain_step) -> None:
    """One probed step's ATen operations by issuing lipverify function, and a plain step's count."""
    from lipverify.probe.interpose import OUTSIDE, counting

    with counting(sites=True) as probed:
        step(False)  # this step's own work and the previous step's results read on the host
    plain_step()  # one uncounted call first, as tests/test_probe_sync.py counts a plain step
    with counting() as plain:
        plain_step()
    model_ops = sum(n for site, n in probed.sites.items() if site == OUTSIDE or site.startswith("models.py:"))
    ratio = probed.op_count / plain.op_count
    print(
        f"\nATen operations of one step: plain step {plain.op_count} ({plain.compute_op_count} run a "
        f"kernel), probed step {probed.op_count} ({probed.compute_op_count} run a kernel; {ratio:.1f}x the "
        f"plain step), of which {probed.op_count - model_ops} issued by the probe; by issuing function:"
    )
    for site, count in probed.sites.most_common():
        print(f"{count:6d}  {site}")


if __name__ == "__main__":
    main()
