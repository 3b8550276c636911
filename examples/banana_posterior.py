"""Flow guides on a posterior with a known answer: the KL gap of Gaussian and flow guides.

The model has two latents and a curved ("banana") posterior::

    a, b ~ Normal(0, 1),    y_i ~ Normal(a + b^2, 0.3),  i = 1..4.

Its log evidence ``log p(y)`` is computed by quadrature on a fine grid (in
float64), so for every guide ``KL(q || p(.|y)) = log p(y) - ELBO(q)`` is known.
The script trains a mean-field Gaussian (``AutoNormal``), a full-covariance
Gaussian (``AutoMultivariateNormal``) and pyro_nf's ``AutoFlow`` with an IAF, a
MAF, a RealNVP and a neural spline flow in the IAF direction (``nsf`` with
``parallel="forward"``: sampling and the density of its samples in one pass; ``--guides``
picks some), prints each one's ELBO and KL gap, and plots the grid posterior against
samples of each guide.

    python examples/banana_posterior.py --steps 3000 --out banana_posterior.png
    python examples/banana_posterior.py --smoke-test
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.optim import ClippedAdam

from pyro_nf.infer import AutoFlow

Y = torch.tensor([1.2, 0.9, 1.4, 1.1])
NOISE = 0.3
BOX = ((-7.0, 4.0), (-4.5, 4.5))  # the grid over (a, b): the posterior's mass lies well inside


def model(y: torch.Tensor = Y) -> None:
    zero = y.new_zeros(())
    a = pyro.sample("a", dist.Normal(zero, 1.0))
    b = pyro.sample("b", dist.Normal(zero, 1.0))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(a + b**2, NOISE), obs=y)


def log_joint(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor = Y) -> torch.Tensor:
    """``log p(y, a, b)`` on a grid of ``(a, b)`` values."""
    y = y.to(a.dtype)
    prior = dist.Normal(0.0, 1.0).log_prob(a) + dist.Normal(0.0, 1.0).log_prob(b)
    return prior + dist.Normal((a + b**2).unsqueeze(-1), NOISE).log_prob(y).sum(-1)


def quadrature(points: int) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log evidence by the midpoint rule on ``points x points`` cells; also the grid and its log density."""
    (a0, a1), (b0, b1) = BOX
    da, db = (a1 - a0) / points, (b1 - b0) / points
    a = torch.linspace(a0 + da / 2, a1 - da / 2, points, dtype=torch.float64)
    b = torch.linspace(b0 + db / 2, b1 - db / 2, points, dtype=torch.float64)
    aa, bb = torch.meshgrid(a, b, indexing="ij")
    lj = log_joint(aa, bb)
    log_z = torch.logsumexp(lj.reshape(-1), 0) + math.log(da * db)
    return log_z.item(), aa, bb, lj - log_z


def elbo(guide: Callable[..., object], particles: int, repeats: int) -> tuple[float, float]:
    """Monte Carlo ELBO of a trained guide: mean and standard error over ``repeats`` batches."""
    estimator = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    values = torch.tensor([-estimator.loss(model, guide) for _ in range(repeats)])
    return values.mean().item(), (values.std() / math.sqrt(repeats)).item() if repeats > 1 else float("nan")


def make_guides(hidden: int, layers: int = 4) -> dict[str, Callable[[], object]]:
    return {
        "AutoNormal": lambda: AutoNormal(model, init_scale=0.1),
        "AutoMultivariateNormal": lambda: AutoMultivariateNormal(model, init_scale=0.1),
        "AutoFlow iaf": lambda: AutoFlow(model, "iaf", hidden_dims=[hidden, hidden], num_transforms=layers),
        "AutoFlow maf": lambda: AutoFlow(model, "maf", hidden_dims=[hidden, hidden], num_transforms=layers),
        "AutoFlow realnvp": lambda: AutoFlow(model, "realnvp", hidden_dims=[hidden, hidden], num_transforms=layers),
        "AutoFlow nsf": lambda: AutoFlow(
            model, "nsf", hidden_dims=[hidden, hidden], num_transforms=layers, parallel="forward"
        ),
    }


def train(guide: Callable[..., object], steps: int, lr: float, particles: int) -> None:
    # the learning rate decays to 1% of its start over the run
    optim = ClippedAdam({"lr": lr, "lrd": 0.01 ** (1.0 / max(steps, 1)), "clip_norm": 10.0})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(steps):
        svi.step()


def guide_samples(guide: Callable[..., object], n: int) -> torch.Tensor:
    with torch.no_grad(), pyro.plate("samples", n, dim=-2):
        values = guide()
    return torch.stack([values["a"].reshape(-1), values["b"].reshape(-1)], -1)  # type: ignore[index]


def plot(path: str, aa: torch.Tensor, bb: torch.Tensor, log_post: torch.Tensor, results: dict, samples: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3.4), sharex=True, sharey=True)
    density = log_post.exp().numpy()
    axes[0].contourf(bb.numpy(), aa.numpy(), density, levels=20, cmap="Blues")
    axes[0].set_title("posterior (grid)")
    for ax, name in zip(axes[1:], names):
        ax.contour(bb.numpy(), aa.numpy(), density, levels=8, colors="0.6", linewidths=0.6)
        s = samples[name].numpy()
        ax.scatter(s[:, 1], s[:, 0], s=2, alpha=0.3, color="C3")
        ax.set_title(f"{name}\nKL gap {results[name]['kl']:.3f}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("b")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-6, 2.5)
    axes[0].set_ylabel("a")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps per guide")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--hidden", type=int, default=32, help="hidden width of the flows' networks")
    parser.add_argument("--layers", type=int, default=4, help="layers of each flow (the same for all three)")
    parser.add_argument("--grid", type=int, default=1200, help="quadrature points per axis")
    parser.add_argument("--eval-particles", type=int, default=20000, help="samples per ELBO estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="banana_posterior.png", help="where to write the plot (PNG)")
    parser.add_argument(
        "--guides",
        default=None,
        help="comma-separated guide names to train (default: all), e.g. AutoNormal,AutoFlow iaf",
    )
    parser.add_argument("--smoke-test", action="store_true", help="a few steps of everything, to check it runs")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.steps, args.grid, args.eval_particles, args.hidden = 5, 200, 200, 8

    log_z, aa, bb, log_post = quadrature(args.grid)
    log_z_half, *_ = quadrature(args.grid // 2)
    print(f"log evidence by quadrature: {log_z:.5f} ({args.grid}^2 cells; {log_z_half:.5f} with half as many per axis)")

    results: dict[str, dict[str, float]] = {}
    samples: dict[str, torch.Tensor] = {}
    guides = make_guides(args.hidden, args.layers)
    if args.guides is not None:
        chosen = [g.strip() for g in args.guides.split(",") if g.strip()]
        unknown = sorted(set(chosen) - set(guides))
        if unknown or not chosen:
            parser.error(f"--guides: expected names from {list(guides)}, got {args.guides!r}")
        guides = {name: guides[name] for name in chosen}
    for name, make in guides.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = make()
        start = time.perf_counter()
        train(guide, args.steps, args.lr, particles=8)
        seconds = time.perf_counter() - start
        value, stderr = elbo(guide, args.eval_particles, repeats=5)
        results[name] = {"elbo": value, "stderr": stderr, "kl": log_z - value, "seconds": seconds}
        samples[name] = guide_samples(guide, 2000)
        print(f"{name:24s} ELBO {value:9.4f} ± {stderr:.4f}   KL gap {log_z - value:7.4f}   ({seconds:.0f} s)")

    for reference in ("AutoNormal", "AutoMultivariateNormal"):
        if reference in results:
            gap = results[reference]["kl"]
            for name, r in results.items():
                if name.startswith("AutoFlow"):
                    print(f"{name} closes {100 * (1 - r['kl'] / gap):.0f}% of {reference}'s KL gap")
    plot(args.out, aa, bb, log_post, results, samples)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
