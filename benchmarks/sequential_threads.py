"""How the thread count changes the cost of MAF/IAF's sequential direction relative to the parallel one.

At D = 64, 5 layers, hidden [256, 256]: MAF sampling against MAF ``log_prob``, IAF density of data
against IAF sampling (4096 points each), and an IAF training step on data against a MAF one (batch
512); median of 5 calls after a warm-up, input checks off.

    python benchmarks/sequential_threads.py --threads 1
    python benchmarks/sequential_threads.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (set before torch starts)

import torch  # noqa: E402

import pyro_nf  # noqa: E402
from pyro_nf.core import FlowStack  # noqa: E402
from pyro_nf.transforms import iaf, maf  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(flow: FlowStack, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    z, log_det = flow.inverse_and_log_det(x)
    (0.5 * z.square().sum(-1) - log_det).mean().backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pyro_nf.set_validation(False)
    d, n = args.dim, args.points
    flows = {"maf": maf(d, [256, 256], 5), "iaf": iaf(d, [256, 256], 5)}
    for flow in flows.values():
        for p in flow.parameters():
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(n, d)
    with torch.no_grad():
        maf_density = median_seconds(lambda: flows["maf"].inverse_and_log_det(x), args.repeats)
        maf_sample = median_seconds(lambda: flows["maf"].forward_and_log_det(x), args.repeats)
        iaf_sample = median_seconds(lambda: flows["iaf"].forward_and_log_det(x), args.repeats)
        iaf_density = median_seconds(lambda: flows["iaf"].inverse_and_log_det(x), args.repeats)
    batch = torch.randn(512, d)
    steps = {}
    for name, flow in flows.items():
        optimizer = torch.optim.Adam(flow.parameters())
        steps[name] = median_seconds(lambda f=flow, o=optimizer: train_step(f, o, batch), args.repeats)
    print(
        f"threads={args.threads} D={d}: "
        f"MAF sample / log_prob = {maf_sample / maf_density:.2f}x ({n / maf_sample:.0f}/s vs {n / maf_density:.0f}/s); "
        f"IAF density / sample = {iaf_density / iaf_sample:.2f}x ({n / iaf_density:.0f}/s vs {n / iaf_sample:.0f}/s); "
        f"IAF / MAF train step = {steps['iaf'] / steps['maf']:.2f}x "
        f"({steps['iaf'] * 1e3:.1f} ms vs {steps['maf'] * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
