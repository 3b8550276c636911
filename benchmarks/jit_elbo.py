"""The time of one SVI step of an ``AutoFlow`` guide with Pyro's eager and JIT-compiled ELBOs.

The model is a small regression (``D`` coefficients and a noise scale, ``N`` observations); the guide
is ``AutoFlow`` with each vector flow. Each configuration runs a warm-up (the JIT ELBOs compile then),
and then ``--steps`` timed steps; the table gives milliseconds per step and the JIT speed-up. One torch
thread, so the numbers are the per-step overhead a single core sees.

    OMP_NUM_THREADS=1 python benchmarks/jit_elbo.py
    python benchmarks/jit_elbo.py --smoke-test
"""

from __future__ import annotations

import argparse
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_nf.infer import AutoFlow

ELBOS = {
    "Trace_ELBO": (Trace_ELBO, JitTrace_ELBO),
    "TraceMeanField_ELBO": (TraceMeanField_ELBO, JitTraceMeanField_ELBO),
}


def make_model(dim: int, n: int) -> tuple[object, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=generator)
    y = x @ torch.linspace(-1.0, 1.0, dim) + 0.3 * torch.randn(n, generator=generator)

    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        w = pyro.sample("w", dist.Normal(torch.zeros(dim), 1.0).to_event(1))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, sigma), obs=y)

    return model, x, y


def time_steps(flow: str, elbo: pyro.infer.ELBO, args: argparse.Namespace) -> float:
    """Seconds per SVI step after the warm-up."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, x, y = make_model(args.dim, args.n)
    guide = AutoFlow(model, flow, hidden_dims=[args.hidden, args.hidden], num_transforms=args.layers)
    svi = SVI(model, guide, Adam({"lr": 0.01}), elbo)
    for _ in range(args.warmup):
        svi.step(x, y)
    start = time.perf_counter()
    for _ in range(args.steps):
        svi.step(x, y)
    return (time.perf_counter() - start) / args.steps


def main(argv: list[str] | None = None) -> list[tuple[str, str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", default="iaf,maf,realnvp", help="comma-separated AutoFlow flows")
    parser.add_argument("--dim", type=int, default=8, help="regression coefficients (the latent size is one more)")
    parser.add_argument("--n", type=int, default=100, help="observations")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--particles", type=int, default=1, help="ELBO particles (vectorized when > 1)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (the JIT compiles there)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps")
    parser.add_argument("--smoke-test", action="store_true", help="a few steps of everything, to check it runs")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.warmup, args.steps, args.hidden, args.layers = 3, 3, 8, 2
    torch.set_num_threads(1)
    options = {"num_particles": args.particles, "vectorize_particles": args.particles > 1}
    rows = []
    print(f"| flow | ELBO | eager ms/step | JIT ms/step | speed-up |  (D = {args.dim + 1}, N = {args.n})")
    print("| --- | --- | --- | --- | --- |")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and torch.jit's deprecation warnings
        for flow in args.flows.split(","):
            for name, (eager, jit) in ELBOS.items():
                t_eager = time_steps(flow, eager(**options), args)
                t_jit = time_steps(flow, jit(ignore_jit_warnings=True, **options), args)
                rows.append((flow, name, t_eager, t_jit))
                print(f"| {flow} | {name} | {1e3 * t_eager:.2f} | {1e3 * t_jit:.2f} | {t_eager / t_jit:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
