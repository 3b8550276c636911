"""Where an FFJORD function evaluation's time goes: the solver around the field, and the field itself.

Run ``python benchmarks/ode_overhead.py`` (one thread, about a minute; ``--smoke-test`` in seconds).
Two measurements, each interleaved (the rows take turns, round after round) and reported as the
median over the rounds, in milliseconds per function evaluation:

1. **Solver overhead.** A forward solve from t = 0 to 1 at rtol = atol = 1e-5 of a field that is one
   multiplication (``f(z) = 0.1 z``, and 0 for the log-density), so nearly all the time is the
   solver's own work per evaluation: torchdiffeq's dopri5 (as pyro_nf's FFJORD calls it, on a
   ``(z, log-density)`` tuple with pyro_nf's error norm, and on one packed tensor) against zuko's
   ``odeint`` (its adaptive Dormand-Prince, on the same tuple).
2. **The field with its trace.** One Hutchinson evaluation outside any solver, as the forward solve
   of a training step makes it (the field, one vector-Jacobian product, the trace estimate; no graph
   kept): pyro_nf's :class:`~pyro_nf.nn.odefunc.AugmentedDynamics` over
   ``ODENet(D, [64, 64, 64])`` with each activation, against zuko's CNF field (an MLP of the same
   widths with ELU, reading a sinusoidal time embedding).

The batch is 512 points in D = 2, the 2D toys' setting of ``benchmarks/ffjord.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torchdiffeq import odeint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_nf.nn.divergence import AugmentedDynamics, sample_noise  # noqa: E402
from pyro_nf.nn.odefunc import ACTIVATIONS, ODENet  # noqa: E402
from pyro_nf.transforms.ode import _state_norm  # noqa: E402

TOL = 1e-5


class Counted:
    """A right-hand side that counts its calls."""

    def __init__(self, fn: Callable[..., object]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: object) -> object:
        self.calls += 1
        return self.fn(*args)


def interleaved(rows: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Milliseconds per evaluation of each row: every round runs each row once (a row returns its NFE)."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in rows.items():
            start = time.perf_counter()
            nfe = fn()
            times[name].append(1e3 * (time.perf_counter() - start) / max(1, nfe))
    return {name: statistics.median(t) for name, t in times.items()}


def solver_rows(n: int, dim: int, repeats: int) -> tuple[dict[str, Callable[[], int]], dict[str, int]]:
    from zuko.utils import odeint as zuko_odeint

    z = torch.randn(n, dim)
    zeros = torch.zeros(n)
    packed = torch.cat([z, zeros[:, None]], 1)
    times = torch.tensor([0.0, 1.0])
    pair = Counted(lambda t, s: (0.1 * s[0], 0.0 * s[1]))
    one = Counted(lambda t, s: 0.1 * s)
    zuko_pair = Counted(lambda t, x, a: (0.1 * x, 0.0 * a))
    calls = {
        "torchdiffeq dopri5, (z, log-density) tuple, pyro_nf's norm": (
            pair,
            lambda: odeint(pair, (z, zeros), times, rtol=TOL, atol=TOL, options={"norm": _state_norm}),
        ),
        "torchdiffeq dopri5, one packed tensor": (one, lambda: odeint(one, packed, times, rtol=TOL, atol=TOL)),
        "zuko odeint, (z, log-density) tuple": (
            zuko_pair,
            lambda: zuko_odeint(zuko_pair, (z, zeros), 0.0, 1.0, rtol=TOL, atol=TOL),
        ),
    }
    nfe: dict[str, int] = {}

    def row(name: str) -> Callable[[], int]:
        counter, solve = calls[name]

        def run() -> int:
            counter.calls = 0
            for _ in range(repeats):
                solve()
            nfe[name] = counter.calls // repeats
            return counter.calls

        return run

    return {name: row(name) for name in calls}, nfe


def field_rows(n: int, dim: int, repeats: int) -> dict[str, Callable[[], int]]:
    import zuko

    z = torch.randn(n, dim)
    noise = sample_noise("rademacher", z)
    t = torch.tensor(0.3)
    generator = torch.Generator().manual_seed(0)

    def perturbed(net: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():  # off the zero initialisation, so no product is trivially zero
            for p in net.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        return net

    rows: dict[str, Callable[[], int]] = {}
    for activation in ACTIVATIONS:
        dynamics = AugmentedDynamics(perturbed(ODENet(dim, [64, 64, 64], activation=activation)), "hutchinson", noise)
        state = (z, torch.zeros(n))
        rows[f"pyro_nf ODENet, {activation}"] = lambda d=dynamics, s=state: _repeat(lambda: d(t, s), repeats)
    transform = perturbed(zuko.flows.CNF(dim, hidden_features=(64, 64, 64), exact=False)).transform

    def zuko_evaluation() -> tuple[Tensor, Tensor]:
        with torch.enable_grad():  # what zuko's forward solve does per evaluation
            x = z.detach().requires_grad_()
            dx = transform.f(t, x)
            (vjp,) = torch.autograd.grad(dx, x, noise)
        return dx.detach(), (vjp * noise).sum(-1)

    rows["zuko CNF field (ELU)"] = lambda: _repeat(zuko_evaluation, repeats)
    return rows


def _repeat(fn: Callable[[], object], repeats: int) -> int:
    for _ in range(repeats):
        fn()
    return repeats


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rounds, solves, evaluations = (2, 1, 2) if args.smoke_test else (args.rounds, 10, 200)
    with torch.no_grad():
        rows, nfe = solver_rows(args.batch, 2, solves)
        solver = interleaved(rows, rounds)
        field = interleaved(field_rows(args.batch, 2, evaluations), rounds)
    lines = [
        f"Batch {args.batch}, D = 2, one thread, median of {rounds} interleaved rounds; torch {torch.__version__}.",
        "",
        "| solver (the field is one multiplication) | NFE per solve | ms per evaluation |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {nfe[name]} | {ms:.3f} |" for name, ms in solver.items()),
        "",
        "| field with its Hutchinson trace, outside a solver | ms per evaluation |",
        "| --- | ---: |",
        *(f"| {name} | {ms:.3f} |" for name, ms in field.items()),
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
