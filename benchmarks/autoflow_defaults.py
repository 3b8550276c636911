"""Do ``AutoFlow``'s defaults survive the first optimizer steps? Three models, three learning rates, several seeds.

- ``median``: Pyro's autoguide ``test_median`` model (a Normal, a LogNormal and a Beta site);
- ``wide``: a Normal(0, 5) and a LogNormal(0, 3) site, wide behind an exponential;
- ``tight``: a Normal mean and a LogNormal scale under 100 observations (a narrow posterior).

Each run is Pyro's ``test_median`` recipe: Adam(lr, betas=(0.8, 0.99)), 100 vectorized particles,
100 steps. A cell gives the runs whose loss stayed finite and the mean -ELBO of the last 10 steps over
them (for ``median`` and ``wide`` the posterior is the prior, so that is the KL divergence to it).

    OMP_NUM_THREADS=1 python benchmarks/autoflow_defaults.py                          # the defaults
    OMP_NUM_THREADS=1 python benchmarks/autoflow_defaults.py --init-scale 0.1 --log-scale-bound 3   # the old ones
    python benchmarks/autoflow_defaults.py --smoke-test
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_nf.infer import AutoFlow

DATA = torch.randn(100, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0


def median() -> None:
    pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.LogNormal(0.0, 1.0))
    pyro.sample("z", dist.Beta(2.0, 2.0))


def wide() -> None:
    pyro.sample("x", dist.Normal(0.0, 5.0))
    pyro.sample("y", dist.LogNormal(0.0, 3.0))


def tight() -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(DATA)):
        pyro.sample("obs", dist.Normal(mu, scale), obs=DATA)


MODELS = {"median": median, "wide": wide, "tight": tight}


def run(model: Any, options: dict[str, Any], lr: float, seed: int, steps: int, particles: int) -> float | None:
    """The mean loss of the last 10 steps, or None if the loss became non-finite."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoFlow(model, **options)
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, Adam({"lr": lr, "betas": (0.8, 0.99)}), elbo)
    losses = []
    for _ in range(steps):
        try:
            loss = svi.step()
        except ValueError:  # a value outside a site's support: an overflow on the way there
            return None
        if not math.isfinite(loss):
            return None
        losses.append(loss)
    tail = losses[-10:]
    return sum(tail) / len(tail)


def main(argv: list[str] | None = None) -> dict[tuple[str, float], list[float | None]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-scale", type=float, default=None, help="AutoFlow's init_scale (default: its own)")
    parser.add_argument("--log-scale-bound", type=float, default=None, help="the flow's per-layer bound")
    parser.add_argument("--flow", default="iaf")
    parser.add_argument("--lrs", default="0.05,0.02,0.005")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--particles", type=int, default=100)
    parser.add_argument("--smoke-test", action="store_true", help="a few steps of everything, to check it runs")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.steps, args.seeds, args.particles, args.lrs = 12, 1, 4, "0.05"
    options: dict[str, Any] = {"flow": args.flow}
    if args.init_scale is not None:
        options["init_scale"] = args.init_scale
    if args.log_scale_bound is not None:
        options["log_scale_bound"] = args.log_scale_bound
    lrs = [float(lr) for lr in args.lrs.split(",")]
    results: dict[tuple[str, float], list[float | None]] = {}
    print(f"AutoFlow({', '.join(f'{k}={v!r}' for k, v in options.items())}): finite runs, mean final -ELBO")
    print("| model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    print("| --- |" + " --- |" * len(lrs))
    for name, model in MODELS.items():
        cells = []
        for lr in lrs:
            with pyro.validation_enabled(False):  # an overflow shows as a non-finite loss, not a support error
                values = [run(model, options, lr, seed, args.steps, args.particles) for seed in range(args.seeds)]
            results[(name, lr)] = values
            finite = [v for v in values if v is not None]
            mean = f", {sum(finite) / len(finite):.3f}" if finite else ""
            cells.append(f"{len(finite)}/{len(values)}{mean}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return results


if __name__ == "__main__":
    main()
