"""Cost of the dynamics probe against a plain SGD step and the torch.func reference.

Every variant runs in its own subprocess (so the peak-memory numbers do not mix): a fixed random
batch, ``--warmup`` untimed steps, then the median wall time of ``--repeats`` steps (on CUDA: of
blocks of ``CUDA_BLOCK`` steps issued back to back and synchronised once, per step, so that work of
one step may overlap the next as in training). Memory on CPU
is the growth of the process's peak RSS from just after the imports to the end of the timed steps
(model, batch, activations, probe state): on Linux ``VmHWM`` of /proc/self/status, reset after the
imports through /proc/self/clear_refs; elsewhere ``ru_maxrss``, which getrusage(2) carries across
``execve``, so it starts from the launching process's peak. On CUDA it is
``torch.cuda.max_memory_allocated`` over the whole run.

Variants: ``plain`` (zero_grad, forward, backward, SGD step); ``probe`` (the same step with the
full probe every step with its defaults: hooks, Theorem 14/15 terms, cross-layer diagnostic and
the discrete truth; ``decomposition="resolvent"``: warm-started top pair and deflated Cholesky
factor instead of a full decomposition per step, its fallback counts are printed; the full-data
gradient is a separate pass over the data and not included); ``probe-f32`` (spectral parts in
float32); ``probe-gram`` and ``probe-gram-f32`` (the same with ``decomposition="gram"``, a full
decomposition of every weight per step); ``probe-conv`` and ``probe-unfold`` (ConvNet,
``conv_method="conv"`` / ``"unfold"`` instead of the default ``"shifted"`` conv projections);
``probe-device`` (``route="device"``: the code CUDA runs, torch only, no host synchronisation in the
steady state; on CUDA ``probe`` already takes it); ``probe-graphs`` (the device route with
``cuda_graphs=True``: the spectra replayed from a CUDA graph; on CPU its eager stand-in);
``probe-side`` (the device route with ``side_stream=True``: ``after_step`` and the next
``before_step`` on a side stream overlapping the next forward and backward; on CPU the same work in
order); every probe variant reads a step's results one step later (as a training loop that logs them
would, and as the side stream needs);
``floor-f64`` and ``floor-f32`` (a plain step plus only the dense kernels the resolvent route cannot
avoid: per layer one Gram product, two Cholesky factorisations and one b-column triangular solve; the
lower bound of ``probe`` / ``probe-f32`` on this machine; its ratio is against the plain step timed
in the same subprocess, no memory figure); ``reference`` (torch.func
``vmap(grad)`` per-sample gradients, ``layer_terms`` with full SVDs, then the step).

``--interleaved`` times the chosen variants round-robin in one process instead (each its own model,
optimiser and probe; one step of each per round), so that a machine whose load changes during the
run slows all of them alike: the ratio is the median over rounds of a variant's step time over the
plain step's in the same round, with its quartiles. No memory figure and no floor rows there.

    python benchmarks/bench_probe.py                     # MLP and ConvNet, b = 128, CPU
    python benchmarks/bench_probe.py --model convnet --variants probe,probe-conv --interleaved
    python benchmarks/bench_probe.py --device cuda --model convnet --batch-size 256 --json out.json

Besides time and memory every row reports ``ops``, the ATen operations of one steady-state step,
``kernels``, those of them that run a kernel (views and metadata left out: on a GPU, the launches),
and ``syncs``, the host synchronisations among them (:class:`lipverify.probe.interpose.SyncCounter`,
counted on one extra step after the timed ones).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_bytes(reset: bool = False) -> int:
    """Peak resident set size of this process so far (after ``reset``: the current RSS)."""
    status = Path("/proc/self/status")
    if status.exists():
        if reset:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _setup(args: argparse.Namespace, variant: str):
    """One variant's model (seed 0), fixed batch and SGD step, after one untimed plain step.
    Returns ``(step, sync, probe, model)``."""
    import torch
    import torch.nn.functional as F

    from lipverify.dynamics import network_terms
    from lipverify.models import build_model
    from lipverify.probe import DynamicsProbe, reference_layer_terms

    device = torch.device(args.device)
    model = build_model(args.model, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    shape = (784,) if args.model == "mlp" else (3, 32, 32)
    x = torch.rand(args.batch_size, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    lr = 0.01
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = None
    if variant.startswith("probe"):
        probe = DynamicsProbe(
            model,
            route="device" if variant in ("probe-device", "probe-graphs", "probe-side") else "auto",
            cuda_graphs=variant == "probe-graphs",
            side_stream=variant == "probe-side",
            compute_dtype=torch.float32 if variant.endswith("-f32") else torch.float64,
            conv_method={"probe-unfold": "unfold", "probe-conv": "conv"}.get(variant, "shifted"),
            decomposition="gram" if variant.startswith("probe-gram") else "resolvent",
            population_size=60000,
        )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    pending = []  # the previous step's results, read one step later

    def step():
        if probe is not None:
            probe.before_step()
            opt.zero_grad(set_to_none=True)
            with probe.capture():
                F.cross_entropy(model(x), y).backward()
            probe.after_backward()
            terms = probe.compute(lr)
            opt.step()
            truth = probe.after_step(lr)
            for t, d in pending:
                network_terms(t), dict(d)
            pending[:] = [(terms, truth)]
            return
        if variant == "reference":
            reference_layer_terms(model, x, y, F.cross_entropy, lr, mode="vmap", dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sync()
    return step, sync, probe, model


def _worker(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base_rss = _peak_rss_bytes(reset=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, sync, probe, model = _setup(args, args.variant)
    if args.variant.startswith("floor"):
        return _kernel_floor(args, model, step, sync)
    times = _step_times(step, sync, args.warmup, args.repeats, CUDA_BLOCK if device.type == "cuda" else 1)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated()
    else:
        mem = _peak_rss_bytes() - base_rss
    out = {"median_s": statistics.median(times), "min_s": min(times), "peak_mem_bytes": mem}
    out.update(_op_counts(step, sync))
    if probe is not None and probe.decomposition == "resolvent":
        out["resolvent_stats"] = probe.resolvent_stats
    if probe is not None and probe.cuda_graphs:
        out["graph_status"] = probe.graph_status
    return out


def _interleaved(args: argparse.Namespace, variants: list[str]) -> dict:
    """``--interleaved``: every variant in this one process (its own model, optimiser and probe),
    timed round-robin, one step (on CUDA one block) of each per round, so that a change of the
    machine's load hits all of them alike. Per variant the median step time and the median over
    rounds of its time divided by the plain step's of the same round; no memory figure."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    block = CUDA_BLOCK if args.device.startswith("cuda") else 1
    setups = {v: _setup(args, v) for v in variants}
    for step, sync, *_ in setups.values():  # warm-up only, untimed
        for _ in range(args.warmup):
            step()
        sync()
    rounds = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v, (step, sync, *_) in setups.items():
            rounds[v] += _step_times(step, sync, 0, block, block)
    out = {}
    for v, times in rounds.items():
        ratios = [t / p for t, p in zip(times, rounds["plain"], strict=True)]
        out[v] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "median_ratio": statistics.median(ratios),
        }
        out[v]["ratio_quartiles"] = (
            statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else [ratios[0]] * 2
        )
    return out


#: Steps per synchronised block when timing on CUDA (a sync after every step would forbid the overlap
#: of one step's probe work with the next step that ``probe-side`` is for).
CUDA_BLOCK = 5


def _op_counts(step, sync) -> dict:
    """ATen operations and host synchronisations of one more (steady-state) step."""
    from lipverify.probe.interpose import counting

    with counting() as c:
        step()
    sync()
    return {"aten_ops": c.op_count, "kernel_ops": c.compute_op_count, "host_syncs": c.sync_count}


def _step_times(fn, sync, warmup: int, repeats: int, block: int = 1) -> list[float]:
    """Wall times (s) per call of ``fn`` after ``warmup`` untimed calls: ``repeats`` synchronised
    calls, or with ``block`` > 1 blocks of ``block`` calls synchronised once (about ``repeats`` calls
    in all), each block's time divided by ``block``."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(1, -(-repeats // block))):
        t0 = time.perf_counter()
        for _ in range(block):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / block)
    return times


def _median_time(fn, sync, warmup: int, repeats: int) -> float:
    return statistics.median(_step_times(fn, sync, warmup, repeats))


def _kernel_floor(args: argparse.Namespace, model, step, sync) -> dict:
    """``floor-f64`` / ``floor-f32``: a plain step plus only the dense kernels the resolvent route
    cannot avoid, per probed layer (k = min(m, n) of its weight matrix): one Gram product (``syrk``),
    two Cholesky factorisations of k x k (phase 1 and the deflated factor; ``eigh`` and one
    factorisation for k <= RESOLVENT_DIRECT_K) and one triangular solve with b columns (the
    quadratic forms of psi). No iteration, projection or Python work: a lower bound on the probe."""
    import torch

    from lipverify import _linalg
    from lipverify.probe import RESOLVENT_DIRECT_K, find_layers, weight_matrix

    dtype = torch.float32 if args.variant.endswith("f32") else torch.float64
    plain_s = _median_time(step, sync, args.warmup, args.repeats)
    kernels_s = 0.0
    with _linalg.single_threaded_blas():
        for module, _ in find_layers(model).values():
            W = weight_matrix(module).to(dtype)
            G = _linalg.gram(W)
            k = G.shape[0]
            shift = 1.01 * float(torch.linalg.matrix_norm(W, 2)) ** 2  # positive definite shift
            B = torch.randn(k, args.batch_size, dtype=dtype, device=W.device)
            L = _linalg.shifted_cholesky(G, shift)
            direct = k <= RESOLVENT_DIRECT_K
            kernels = [  # (kernel, calls per probe step)
                (lambda W=W: _linalg.gram(W), 1),
                (lambda G=G, s=shift: _linalg.shifted_cholesky(G, s), 1 if direct else 2),
                (lambda L=L, B=B: _linalg.solve_lower(L, B), 1),
                (lambda G=G: torch.linalg.eigh(G), 1 if direct else 0),
            ]
            for fn, calls in kernels:
                if calls:
                    kernels_s += calls * _median_time(fn, sync, args.warmup, args.repeats)
    total = plain_s + kernels_s
    return {"median_s": total, "min_s": total, "peak_mem_bytes": 0, "plain_s": plain_s}


def _run_variant(args: argparse.Namespace, model: str, variant: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        model,
        "--variant",
        variant,
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--repeats",
        str(args.repeats if variant != "reference" else max(3, args.repeats // 5)),
        "--warmup",
        str(args.warmup if variant != "reference" else 1),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise SystemExit(f"{model}/{variant} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _variants(args: argparse.Namespace, model: str) -> list[str]:
    variants = ["plain", "probe", "probe-device", "probe-graphs", "probe-side", "probe-f32"]
    variants += ["probe-gram", "probe-gram-f32"]
    if model == "convnet":
        variants += ["probe-conv", "probe-unfold"]
    if not args.interleaved:  # the floor times its own plain step; memory needs a process each
        variants += ["floor-f64", "floor-f32"]
    if not args.no_reference:
        variants.append("reference")
    if args.variants:
        wanted = set(args.variants.split(",")) | {"plain"}
        variants = [v for v in variants if v in wanted]
    return variants


def _main_interleaved(args: argparse.Namespace, models: list[str], everything: dict) -> None:
    print("interleaved: all variants in one process, one step of each per round; ratio = median over rounds")
    print(f"{'model':8s} {'variant':14s} {'median ms':>10s} {'x plain':>8s} {'quartiles':>13s}")
    for model in models:
        args.model = model
        results = _interleaved(args, _variants(args, model))
        everything["models"][model] = results
        for v, r in results.items():
            lo, hi = r["ratio_quartiles"]
            ms = 1e3 * r["median_s"]
            print(f"{model:8s} {v:14s} {ms:10.2f} {r['median_ratio']:8.2f} {lo:6.2f}-{hi:<6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="both", choices=["mlp", "convnet", "both"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) torch.func reference")
    p.add_argument("--variants", default="", help="comma-separated variants to run (default: all)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument(
        "--interleaved",
        action="store_true",
        help="time the variants round-robin in one process (ratios robust to load; no memory, no floor)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.model = "mlp" if args.model == "both" else args.model
        print(json.dumps(_worker(args)))
        return
    models = ["mlp", "convnet"] if args.model == "both" else [args.model]
    threads = args.threads or "default"
    print(f"device={args.device} batch={args.batch_size} threads={threads} repeats={args.repeats}")
    everything = {"device": args.device, "batch_size": args.batch_size, "threads": threads, "models": {}}
    if args.interleaved:
        return _main_interleaved(args, models, everything)
    head = ("model", "variant", "median ms", "x plain", "peak MB", "x plain mem")
    print(
        f"{head[0]:8s} {head[1]:14s} {head[2]:>10s} {head[3]:>8s} {head[4]:>9s} {head[5]:>11s}"
        f" {'ops':>6s} {'x plain':>7s} {'kernels':>7s} {'x plain':>7s} {'syncs':>5s}"
    )
    for model in models:
        variants = _variants(args, model)
        results = {v: _run_variant(args, model, v) for v in variants}
        everything["models"][model] = results
        plain = results["plain"]
        for v, r in results.items():
            base = r.get("plain_s", plain["median_s"])  # a floor row: its own plain step
            mem_ratio = (
                "n/a"
                if plain["peak_mem_bytes"] <= 0 or r["peak_mem_bytes"] <= 0
                else f"{r['peak_mem_bytes'] / plain['peak_mem_bytes']:.2f}"
            )
            ops = r.get("aten_ops")
            op_cols = (
                f" {ops:6d} {ops / plain['aten_ops']:7.1f} {r['kernel_ops']:7d}"
                f" {r['kernel_ops'] / plain['kernel_ops']:7.1f} {r['host_syncs']:5d}"
                if ops is not None
                else f" {'n/a':>6s} {'n/a':>7s} {'n/a':>7s} {'n/a':>7s} {'n/a':>5s}"
            )
            print(
                f"{model:8s} {v:14s} {1e3 * r['median_s']:10.2f} {r['median_s'] / base:8.2f} "
                f"{r['peak_mem_bytes'] / 2**20:9.1f} {mem_ratio:>11s}"
                + op_cols
                + (f"  {r['resolvent_stats']}" if "resolvent_stats" in r else "")
                + (f"  graphs: {r['graph_status']}" if "graph_status" in r else "")
            )
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
