"""Benchmark: scalar geometric Brownian motion ``dK = a K dt + b K dB`` with Euler–Maruyama,
float64, lipverify.sde.integrate against torchsde.sdeint(method='euler') on the same problem.

Prints path-steps per second of both and the ratio. torchsde runs on fewer paths/steps (it is
slower per step); its rate is measured on that smaller run and compared per path-step (the
scaling is stated in the output). Usage: python benchmarks/bench_sde.py [--paths N --steps M
--device cpu --threads T --torchsde-paths N --torchsde-steps M].
"""

from __future__ import annotations

import argparse
import time

import torch

from lipverify.problems import LognormalBound
from lipverify.sde import integrate


def gbm(a: float = 0.3, b: float = 0.5) -> LognormalBound:
    return LognormalBound(lambda t: a, lambda t: b, 1.0, int_a=lambda t: a * t, int_b2=lambda t: b * b * t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--torchsde-paths", type=int, default=100_000)
    p.add_argument("--torchsde-steps", type=int, default=100)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sde = gbm()
    T = 1.0
    dt = T / args.steps
    x0 = torch.tensor([1.0], dtype=torch.float64)
    integrate(sde, x0, dt, steps=10, paths=1000, seed=0, device=args.device)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sol = integrate(sde, x0, dt, steps=args.steps, paths=args.paths, seed=0, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    rate_ours = args.paths * args.steps / t_ours
    K = sol.finite_final.flatten()
    print(
        f"lipverify Euler-Maruyama: {args.paths} paths x {args.steps} steps, float64, {args.device}, "
        f"{torch.get_num_threads()} threads: {t_ours:.2f} s, {rate_ours:.3e} path-steps/s "
        f"(E[K_T] = {float(K.mean()):.4f}, closed form {sde.mean(T):.4f})"
    )
    try:
        import torchsde  # noqa: F401
    except ImportError:
        print("torchsde not installed (pip install 'lipverify[sde]'): no comparison")
        return
    import torchsde as ts

    from lipverify.simulation import _torchsde_wrappers

    _, Wrapped = _torchsde_wrappers(ts)
    P, S = args.torchsde_paths, args.torchsde_steps
    h = T / S
    y0 = torch.ones(P, 1, dtype=torch.float64, device=args.device)
    bm = ts.BrownianInterval(t0=0.0, t1=T, size=(P, 1), dtype=torch.float64, device=args.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        ys = ts.sdeint(
            Wrapped(sde), y0, torch.tensor([0.0, T], dtype=torch.float64), bm=bm, method="euler", dt=h
        )
    t_ts = time.perf_counter() - t0
    rate_ts = P * S / t_ts
    print(
        f"torchsde sdeint(method='euler', BrownianInterval): {P} paths x {S} steps: {t_ts:.2f} s, "
        f"{rate_ts:.3e} path-steps/s (E[K_T] = {float(ys[-1].mean()):.4f})"
    )
    print(
        f"speed ratio lipverify / torchsde = {rate_ours / rate_ts:.1f}x per path-step "
        f"(torchsde measured on {P} x {S} and scaled per path-step, not run at {args.paths} x {args.steps})"
    )


if __name__ == "__main__":
    main()
