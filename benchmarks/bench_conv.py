"""Cost of the certified conv bounds of the paper's ConvNet (32x32 inputs) against one plain training step.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_conv.py [--repeats 7] [--batch-size 128] [--threads 1]``.

Timed in one process, alternating (so both see the same machine load), after one warm-up:

* ``fft_upper``: the FFT upper bounds of conv1-conv3 (:func:`lipverify.conv.circular_upper_bound`,
  float64, on each layer's padded input grid);
* ``plain_step``: one SGD step (forward, cross-entropy, backward, update) of the float32 ConvNet on a
  random batch of ``--batch-size`` 3x32x32 inputs;
* ``power_warm``: the three power-iteration lower bounds warm-started from the previous vectors
  (what a record along a run pays after its first), for information.

Prints a table and, last, one JSON line: min/median seconds of each, ``ratio_median =
fft_upper / plain_step`` (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lipverify.conv import circular_upper_bound, conv_operator_norm, conv_spec
from lipverify.models import build_model


def conv_inputs(model) -> dict[str, tuple[int, int, int]]:
    """Input shape (c, H, W) of each conv of the ConvNet on a 3x32x32 input."""
    shapes, hooks = {}, []
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(model, name)
        hooks.append(
            conv.register_forward_hook(lambda m, a, o, n=name: shapes.__setitem__(n, tuple(a[0].shape[1:])))
        )
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return shapes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model("convnet", seed=0)
    shapes = conv_inputs(model)
    convs = {n: getattr(model, n) for n in shapes}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    warm = {n: conv_operator_norm(c, shapes[n]).vector for n, c in convs.items()}

    def fft_upper():
        return [circular_upper_bound(conv_spec(c, shapes[n])) for n, c in convs.items()]

    def plain_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def power_warm():
        for n, c in convs.items():
            warm[n] = conv_operator_norm(c, shapes[n], v0=warm[n]).vector

    tasks = {"fft_upper": fft_upper, "plain_step": plain_step, "power_warm": power_warm}
    for f in tasks.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for r in range(args.repeats):
        order = list(tasks) if r % 2 == 0 else list(reversed(tasks))
        for k in order:
            t0 = time.perf_counter()
            tasks[k]()
            times[k].append(time.perf_counter() - t0)
    result = {k: {"min_s": min(v), "median_s": statistics.median(v)} for k, v in times.items()}
    result["ratio_median"] = result["fft_upper"]["median_s"] / result["plain_step"]["median_s"]
    result["batch_size"], result["threads"], result["repeats"] = args.batch_size, args.threads, args.repeats
    result["conv_inputs"] = {n: list(s) for n, s in shapes.items()}
    for k in tasks:
        print(
            f"{k:12s} min {result[k]['min_s'] * 1e3:9.2f} ms   median {result[k]['median_s'] * 1e3:9.2f} ms"
        )
    print(f"fft_upper / plain_step (medians): {result['ratio_median']:.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
