"""Benchmark pyro_nf's FFJORD against zuko's CNF and a plain torchdiffeq FFJORD, and RNODE against none.

Run ``python benchmarks/ffjord.py --out outputs/ffjord.md`` (about 14 minutes on one thread of a loaded 2-core machine);
``--smoke-test`` runs every row at tiny sizes in seconds.

Part 1, side by side on the 2D toys (the same data stream, batch size, learning rate, number of steps,
tolerances ``rtol = atol = 1e-5`` and vector-field size, three hidden layers of 64):

- **pyro_nf**: ``ffjord(2, [64, 64, 64])``: concat-squash layers, Hutchinson trace with Rademacher noise,
  dopri5, ``odeint_adjoint`` with the adjoint seminorm.
- **torchdiffeq**: the same concat-squash field and trace written here in plain torchdiffeq, as in
  FFJORD's reference code (``odeint_adjoint`` with its default adjoint norm).
- **zuko**: ``zuko.flows.CNF(2, hidden_features=(64, 64, 64), exact=False)``: an MLP reading a
  sinusoidal time embedding, zuko's own adaptive solver and adjoint.

Reported: seconds per training step (median), function evaluations (NFE) per solve in the forward
(``log_prob``) and backward (adjoint) passes over the last quarter of training, and the test NLL
(exact trace) after the fixed budget.

Part 2, FFJORD with and without RNODE (``kinetic_energy = jacobian_norm = λ``): test NLL every few
steps; the NFE per step and the wall time (evaluations excluded) until each run first reaches the
same test NLL, the worse of the two runs' final values.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_nf.data.toy import sample_toy  # noqa: E402
from pyro_nf.transforms import ffjord  # noqa: E402

HIDDEN = (64, 64, 64)
TOL = 1e-5
LOG_2PI = math.log(2 * math.pi)


class CallCount:
    """Counts forward calls of a module (the vector field)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


@dataclass
class Model:
    name: str
    module: nn.Module
    loss: Callable[[Tensor], Tensor]  # training loss of a batch (mean NLL + any penalty)
    test_nll: Callable[[Tensor], float]  # mean NLL with the exact trace, no gradients
    counter: CallCount


# -- pyro_nf ---------------------------------------------------------------------------------------
def _pyro_nf(**options: float) -> Model:
    flow = ffjord(2, list(HIDDEN), rtol=TOL, atol=TOL, **options)  # type: ignore[arg-type]
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [flow])

    def loss(x: Tensor) -> Tensor:
        return -d.log_prob(x).mean() + flow.regularization()

    def test_nll(x: Tensor) -> float:
        flow.eval()  # exact trace at D = 2
        with torch.no_grad():
            value = -d.log_prob(x).mean().item()
        flow.train()
        return value

    return Model("pyro_nf", flow, loss, test_nll, CallCount(flow.net))


# -- plain torchdiffeq FFJORD ---------------------------------------------------------------------
class _PlainConcatSquash(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(d_in, d_out)
        self.hyper_gate = nn.Linear(1, d_out)
        self.hyper_bias = nn.Linear(1, d_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = t.reshape(1, 1)
        return self.layer(x) * torch.sigmoid(self.hyper_gate(t)) + self.hyper_bias(t)


class _PlainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        dims = (2, *HIDDEN, 2)
        self.layers = nn.ModuleList(_PlainConcatSquash(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            z = nn.functional.softplus(layer(t, z))
        return self.layers[-1](t, z)


class _PlainODEFunc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _PlainNet()
        self.noise: Tensor | None = None
        self.exact = False

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z = state[0]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True) if not z.requires_grad else z
            dz = self.net(t, z)
            if self.exact:
                div = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2))
            else:
                assert self.noise is not None
                vjp = torch.autograd.grad(dz, z, self.noise, create_graph=True)[0]
                div = (vjp * self.noise).sum(-1)
        return dz, div


def _plain() -> Model:
    func = _PlainODEFunc()
    times = torch.tensor([1.0, 0.0])

    def log_prob(x: Tensor) -> Tensor:
        func.noise = torch.randint(0, 2, x.shape).to(x).mul_(2).sub_(1)
        z, integral = odeint_adjoint(func, (x, x.new_zeros(x.shape[0])), times, rtol=TOL, atol=TOL)
        z, integral = z[-1], integral[-1]  # integral = ∫_{t1}^{0} Tr J = -log|det|
        return -0.5 * (z.square().sum(-1) + 2 * LOG_2PI) + integral

    def loss(x: Tensor) -> Tensor:
        return -log_prob(x).mean()

    def test_nll(x: Tensor) -> float:
        func.exact = True
        with torch.no_grad():
            z, integral = odeint(func, (x, x.new_zeros(x.shape[0])), times, rtol=TOL, atol=TOL)
        func.exact = False
        return -(-0.5 * (z[-1].square().sum(-1) + 2 * LOG_2PI) + integral[-1]).mean().item()

    return Model("torchdiffeq", func, loss, test_nll, CallCount(func.net))


# -- zuko 1.6 ---------------------------------------------------------------------------------------
def _zuko() -> Model:
    import zuko

    flow = zuko.flows.CNF(2, hidden_features=HIDDEN, exact=False, atol=TOL, rtol=TOL)

    def loss(x: Tensor) -> Tensor:
        return -flow().log_prob(x).mean()

    def test_nll(x: Tensor) -> float:
        flow.transform.exact = True
        flow.eval()
        with torch.no_grad():
            value = -flow().log_prob(x).mean().item()
        flow.transform.exact = False
        flow.train()
        return value

    return Model("zuko", flow, loss, test_nll, CallCount(flow.transform.ode))


BUILDERS: dict[str, Callable[[], Model]] = {"pyro_nf": _pyro_nf, "torchdiffeq": _plain, "zuko": _zuko}


# -- training -----------------------------------------------------------------------------------------
@dataclass
class Run:
    step_times: list[float]
    nfe_forward: list[int]
    nfe_backward: list[int]
    curve: list[tuple[int, float, int, float]]  # (step, wall seconds, cumulative NFE, test NLL)


def _steps(model: Model, toy: str, steps: int, batch: int, lr: float, test: Tensor, eval_every: int) -> Iterator[Run]:
    """Train ``model``, yielding its record after every step (so several models can take turns)."""
    generator = torch.Generator().manual_seed(0)  # the same data stream for every model
    optimizer = torch.optim.Adam(model.module.parameters(), lr=lr)
    run = Run([], [], [], [])
    wall, total_nfe = 0.0, 0
    for step in range(1, steps + 1):
        x = sample_toy(toy, batch, generator=generator)
        start = time.perf_counter()
        before = model.counter.calls
        optimizer.zero_grad()
        loss = model.loss(x)
        middle = model.counter.calls
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        after = model.counter.calls
        wall += elapsed
        total_nfe += after - before
        run.step_times.append(elapsed)
        run.nfe_forward.append(middle - before)
        run.nfe_backward.append(after - middle)
        if step % eval_every == 0 or step == steps:
            run.curve.append((step, wall, total_nfe, model.test_nll(test)))
        yield run


def train_in_turns(
    builders: dict[str, Callable[[], Model]], toy: str, steps: int, batch: int, lr: float, test: Tensor, eval_every: int
) -> dict[str, Run]:
    """Train every model one step at a time in turn, so a change of the machine's load hits all alike."""
    trainers = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        trainers[name] = _steps(build(), toy, steps, batch, lr, test, eval_every)
    runs: dict[str, Run] = {}
    for _ in range(steps):
        for name, trainer in trainers.items():
            runs[name] = next(trainer)
    return runs


def _last_quarter(values: list[int]) -> float:
    tail = values[len(values) - max(1, len(values) // 4) :]
    return statistics.mean(tail)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown tables here")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rnode-steps", type=int, default=300)
    parser.add_argument("--rnode-weight", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--toys", nargs="+", default=["moons", "8gaussians"])
    parser.add_argument("--rnode-toys", nargs="+", default=["8gaussians"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, rnode_steps, batch, toys, rnode_toys = args.steps, args.rnode_steps, args.batch, args.toys, args.rnode_toys
    n_test, eval_every = 2000, 25
    if args.smoke_test:
        steps, rnode_steps, batch, toys, rnode_toys = 1, 1, 8, toys[:1], rnode_toys[:1]
        n_test, eval_every = 16, 1
    lr = 5e-3
    lines = [
        f"Side by side, {steps} Adam steps (lr {lr}, batch {batch}), rtol = atol = {TOL}, "
        f"field 3 x 64, 1 CPU thread; test NLL (nats, exact trace) on {n_test} held-out points.",
        "",
        "| toy | library | s / step | NFE forward | NFE backward | test NLL |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    print(lines[0], flush=True)
    for toy in toys:
        test = sample_toy(toy, n_test, generator=torch.Generator().manual_seed(123))
        for name, run in train_in_turns(BUILDERS, toy, steps, batch, lr, test, steps).items():
            row = (
                f"| {toy} | {name} | {statistics.median(run.step_times):.3f} | "
                f"{_last_quarter(run.nfe_forward):.0f} | {_last_quarter(run.nfe_backward):.0f} | "
                f"{run.curve[-1][3]:.3f} |"
            )
            lines.append(row)
            print(row, flush=True)
    lines += [
        "",
        f"FFJORD (pyro_nf) with and without RNODE (λ_K = λ_J = {args.rnode_weight}), {rnode_steps} steps; "
        "target = the worse final test NLL of the two runs.",
        "",
        "| toy | run | final test NLL | NFE / step (last quarter) | step reaching target | "
        "wall s to target | NFE to target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for toy in rnode_toys:
        test = sample_toy(toy, n_test, generator=torch.Generator().manual_seed(123))
        weight = args.rnode_weight
        builders = {
            "FFJORD": _pyro_nf,
            "FFJORD + RNODE": partial(_pyro_nf, kinetic_energy=weight, jacobian_norm=weight),
        }
        runs = train_in_turns(builders, toy, rnode_steps, batch, lr, test, eval_every)
        target = max(run.curve[-1][3] for run in runs.values())
        for label, run in runs.items():
            reached = next(point for point in run.curve if point[3] <= target)
            nfe = [f + b for f, b in zip(run.nfe_forward, run.nfe_backward)]
            row = (
                f"| {toy} | {label} | {run.curve[-1][3]:.3f} | {_last_quarter(nfe):.0f} | {reached[0]} | "
                f"{reached[1]:.1f} | {reached[2]} |"
            )
            lines.append(row)
            print(row, flush=True)
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
