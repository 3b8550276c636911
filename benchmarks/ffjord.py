"""Benchmark pyro_nf's FFJORD against zuko's CNF and a plain torchdiffeq FFJORD, and RNODE against none.

Run ``python benchmarks/ffjord.py --out outputs/ffjord.md`` (about 14 minutes on one thread of a loaded 2-core machine);
``--smoke-test`` runs every row at tiny sizes in seconds; ``--device cuda`` runs every model on the GPU.

Part 1, side by side (the same data stream, batch size, learning rate, number of steps, tolerances
``rtol = atol = 1e-5`` and vector-field size, three hidden layers of 64) on the 2D toys and on ``gmm8``,
the fixed random Gaussian mixture in D = 8 of :func:`pyro_nf.data.targets.gaussian_mixture_target`,
whose exact density gives the true NLL (the entropy estimated on the test points) and so the KL gap:

- **pyro_nf**: ``ffjord(D, [64, 64, 64])``: concat-squash layers, Hutchinson trace with Rademacher noise,
  dopri5, ``odeint_adjoint`` with the adjoint seminorm.
- **torchdiffeq**: the same concat-squash field and trace written here in plain torchdiffeq, as in
  FFJORD's reference code (``odeint_adjoint`` with its default adjoint norm).
- **zuko**: ``zuko.flows.CNF(D, hidden_features=(64, 64, 64), exact=False)``: an MLP reading a
  sinusoidal time embedding, zuko's own adaptive solver and adjoint.
- **pyro_nf-layerwise** (only with ``--libraries``): pyro_nf's FFJORD with its field evaluated layer by
  layer, each concat-squash layer computing its own gate and shift from the time, the way ``ODENet``
  evaluated before it computed them all at once: the same function and steps as ``pyro_nf``, so the two
  rows give an A/B of the cost of an evaluation.

Reported: seconds per training step (median), function evaluations (NFE) per solve in the forward
(``log_prob``) and backward (adjoint) passes over the last quarter of training, milliseconds per
function evaluation (median step time / (NFE forward + NFE backward) of the same steps) and the same
per pass (forward-pass time / forward NFE; backward time, adjoint solve and optimizer step, / adjoint
NFE: an adjoint evaluation differentiates the field's VJP, so it costs a few forward ones, and libraries
with different forward/adjoint NFE mixes compare fairly only per pass), and the test NLL (exact trace)
after the budget; ``--budget-s`` stops a row early (all libraries at the same step).

Part 2, FFJORD with and without RNODE (``kinetic_energy = jacobian_norm = λ``): test NLL every few
steps; the NFE per step and the wall time (evaluations excluded) until each run first reaches the
same test NLL, the worse of the two runs' final values. ``benchmarks/rnode.py`` is the longer study
(several λ, fixed-grid RK4 training, one process per configuration).

Part 3, flow matching against maximum likelihood (``--parts fm``), on ``--fm-toys`` (default moons,
8gaussians, checkerboard and gmm8): the same field, ``ffjord(D, [64, 64, 64])``, trained on the same data
stream and batch size by maximum likelihood (as in part 1: Hutchinson trace, dopri5, adjoint) and by flow
matching (:func:`pyro_nf.transforms.flow_matching_loss`: the linear path with ``σ_min = 0``, independent
pairs, and ``--fm-couplings ot`` adds exact minibatch-OT pairs), each for ``--fm-budget-s`` seconds of
training wall time (evaluations excluded). The runs take their steps in turn, the one that has trained
for the least time going next, so that changes of the machine's load hit all of them alike. Every run
measures the test NLL (exact trace, dopri5 at ``rtol = atol = 1e-5``) at the same training times, a
geometric grid up to the budget (ratio sqrt(2)); reported: the final test NLL and the NFE of that test
solve (how costly the learned dynamics are to solve), steps, time per step, and the first training time
at which each run's test NLL was at or below the ML run's final one, with the ML run's training time
divided by it.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_nf.data.targets import gaussian_mixture_target  # noqa: E402
from pyro_nf.data.toy import TOY_DATASETS, sample_toy  # noqa: E402
from pyro_nf.nn.odefunc import ODENet  # noqa: E402
from pyro_nf.transforms import ffjord, flow_matching_loss  # noqa: E402

HIDDEN = (64, 64, 64)
TOL = 1e-5
LOG_2PI = math.log(2 * math.pi)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- data ------------------------------------------------------------------------------------------
@dataclass
class Data:
    """A training density: a seeded sampler (on the CPU) and, where known, the true log-density."""

    name: str
    dim: int
    sample: Callable[[int, torch.Generator], Tensor]
    log_prob: Callable[[Tensor], Tensor] | None = None

    def true_nll(self, x: Tensor) -> float | None:
        """``-mean log p(x)`` under the true density (None for the toys, whose density is not known)."""
        return None if self.log_prob is None else -float(self.log_prob(x.cpu().double()).mean())


def make_data(name: str) -> Data:
    """A 2D toy of :data:`pyro_nf.data.toy.TOY_DATASETS`, or ``gmm<D>``: the Gaussian mixture target in D dims."""
    if name in TOY_DATASETS:
        return Data(name, 2, lambda n, g: sample_toy(name, n, generator=g))
    match = re.fullmatch(r"gmm(\d+)", name)
    if match is None:
        raise ValueError(f"data: expected one of {list(TOY_DATASETS)} or 'gmm<D>' (e.g. 'gmm8'), got {name!r}")
    target = gaussian_mixture_target(int(match.group(1)))
    return Data(name, target.dim, lambda n, g: target.sample(n, generator=g), target.log_prob)


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


Builder = Callable[[int, torch.device], Model]


# -- pyro_nf ---------------------------------------------------------------------------------------
def build_pyro_nf(dim: int, device: torch.device, **options: object) -> Model:
    """pyro_nf's FFJORD; ``options`` go to :func:`pyro_nf.transforms.ffjord` (RNODE weights, solver, ...)."""
    options = {"rtol": TOL, "atol": TOL, "eval_rtol": TOL, "eval_atol": TOL, **options}
    flow = ffjord(dim, list(HIDDEN), **options).to(device)  # type: ignore[arg-type]
    base = dist.Normal(torch.zeros(dim, device=device), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [flow])

    def loss(x: Tensor) -> Tensor:
        return -d.log_prob(x).mean() + flow.regularization().to(x)

    def test_nll(x: Tensor) -> float:
        flow.eval()  # exact trace up to D = 16, the evaluation solver (dopri5 at TOL unless told otherwise)
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
    def __init__(self, dim: int) -> None:
        super().__init__()
        dims = (dim, *HIDDEN, dim)
        self.layers = nn.ModuleList(_PlainConcatSquash(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            z = nn.functional.softplus(layer(t, z))
        return self.layers[-1](t, z)


class _PlainODEFunc(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.net = _PlainNet(dim)
        self.noise: Tensor | None = None
        self.exact = False

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z = state[0]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True) if not z.requires_grad else z
            dz = self.net(t, z)
            if self.exact:
                div = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(self.dim))
            else:
                assert self.noise is not None
                vjp = torch.autograd.grad(dz, z, self.noise, create_graph=True)[0]
                div = (vjp * self.noise).sum(-1)
        return dz, div  # type: ignore[return-value]


def build_plain(dim: int, device: torch.device) -> Model:
    """FFJORD written directly on torchdiffeq, as in the reference code."""
    func = _PlainODEFunc(dim).to(device)
    times = torch.tensor([1.0, 0.0], device=device)

    def log_prior_plus(z: Tensor, integral: Tensor) -> Tensor:  # integral = ∫_{t1}^{0} Tr J = -log|det|
        return -0.5 * (z.square().sum(-1) + dim * LOG_2PI) + integral

    def loss(x: Tensor) -> Tensor:
        func.noise = torch.randint(0, 2, x.shape, device=x.device).to(x).mul_(2).sub_(1)
        z, integral = odeint_adjoint(func, (x, x.new_zeros(x.shape[0])), times, rtol=TOL, atol=TOL)
        return -log_prior_plus(z[-1], integral[-1]).mean()

    def test_nll(x: Tensor) -> float:
        func.exact = True
        with torch.no_grad():
            z, integral = odeint(func, (x, x.new_zeros(x.shape[0])), times, rtol=TOL, atol=TOL)
        func.exact = False
        return -log_prior_plus(z[-1], integral[-1]).mean().item()

    return Model("torchdiffeq", func, loss, test_nll, CallCount(func.net))


# -- zuko 1.6 ---------------------------------------------------------------------------------------
def build_zuko(dim: int, device: torch.device) -> Model:
    """zuko's CNF with the same hidden widths."""
    import zuko

    flow = zuko.flows.CNF(dim, hidden_features=HIDDEN, exact=False, atol=TOL, rtol=TOL).to(device)

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


def build_pyro_nf_layerwise(dim: int, device: torch.device) -> Model:
    """pyro_nf's FFJORD with its field evaluated layer by layer, as before :meth:`ODENet.forward` was fused.

    Every :class:`~pyro_nf.nn.odefunc.ConcatSquashLinear` computes its own gate and shift from the time
    (``linear(x) * sigmoid(gate(t)) + shift(t)``): the same function and parameters as ``pyro_nf``, so
    the two rows take the same steps and differ only in the cost of an evaluation.
    """
    model = build_pyro_nf(dim, device)
    net: ODENet = model.module.net  # type: ignore[assignment]

    def layer_by_layer(t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        h = z
        for layer, act in zip(net.layers, net.activations):
            h = act(layer(t, h, context))
        return net.layers[-1](t, h, context)

    net.forward = layer_by_layer  # type: ignore[method-assign]  # called through the module, so hooks still count
    return replace(model, name="pyro_nf-layerwise")


def build_pyro_nf_fm(dim: int, device: torch.device, coupling: str = "independent") -> Model:
    """pyro_nf's FFJORD (the same field and evaluation as :func:`build_pyro_nf`) trained by flow matching."""
    model = build_pyro_nf(dim, device)
    flow = model.module

    def loss(x: Tensor) -> Tensor:
        return flow_matching_loss(flow, x, coupling=coupling)  # type: ignore[arg-type]

    return replace(model, name=f"flow matching ({coupling})", loss=loss)


BUILDERS: dict[str, Builder] = {
    "pyro_nf": build_pyro_nf,
    "torchdiffeq": build_plain,
    "zuko": build_zuko,
    "pyro_nf-layerwise": build_pyro_nf_layerwise,
}
DEFAULT_LIBRARIES = ["pyro_nf", "torchdiffeq", "zuko"]


# -- training -----------------------------------------------------------------------------------------
@dataclass
class Run:
    step_times: list[float] = field(default_factory=list)
    forward_times: list[float] = field(default_factory=list)  # the loss (the forward solve) of each step
    nfe_forward: list[int] = field(default_factory=list)
    nfe_backward: list[int] = field(default_factory=list)
    # (step, training wall seconds, cumulative training NFE, test NLL, NFE of the test solve)
    curve: list[tuple[int, float, int, float, int]] = field(default_factory=list)


class Trainer:
    """Trains one model on a data stream seeded identically for every model; times steps, counts NFE."""

    def __init__(self, model: Model, data: Data, batch: int, lr: float, device: torch.device) -> None:
        self.model, self.data, self.batch, self.device = model, data, batch, device
        self.generator = torch.Generator().manual_seed(0)  # the same data stream for every model
        self.optimizer = torch.optim.Adam(model.module.parameters(), lr=lr)
        self.run = Run()
        self.wall = 0.0
        self.total_nfe = 0
        self.steps = 0

    def step(self) -> None:
        model = self.model
        x = self.data.sample(self.batch, self.generator).to(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        before = model.counter.calls
        self.optimizer.zero_grad()
        loss = model.loss(x)
        synchronize(self.device)
        forward_elapsed = time.perf_counter() - start
        middle = model.counter.calls
        loss.backward()
        self.optimizer.step()
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        after = model.counter.calls
        self.steps += 1
        self.wall += elapsed
        self.total_nfe += after - before
        self.run.step_times.append(elapsed)
        self.run.forward_times.append(forward_elapsed)
        self.run.nfe_forward.append(middle - before)
        self.run.nfe_backward.append(after - middle)

    def evaluate(self, test: Tensor) -> float:
        before = self.model.counter.calls
        nll = self.model.test_nll(test)
        self.run.curve.append((self.steps, self.wall, self.total_nfe, nll, self.model.counter.calls - before))
        return nll


def train_in_turns(
    builders: Mapping[str, Callable[[], Model]],
    data: Data,
    steps: int,
    batch: int,
    lr: float,
    test: Tensor,
    eval_every: int,
    device: torch.device,
    budget_s: float = math.inf,
) -> dict[str, Run]:
    """Train every model one step at a time in turn, so a change of the machine's load hits all alike.

    Stops after ``steps`` steps or, at the end of a round, once ``budget_s`` wall seconds have passed;
    every model is evaluated every ``eval_every`` steps and after its last step.
    """
    trainers = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        trainers[name] = Trainer(build(), data, batch, lr, device)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for trainer in trainers.values():
            trainer.step()
        last = step == steps or time.perf_counter() - start > budget_s
        if step % eval_every == 0 or last:
            for trainer in trainers.values():
                trainer.evaluate(test)
        if last:
            break
    return {name: trainer.run for name, trainer in trainers.items()}


def train_by_time(
    builders: Mapping[str, Callable[[], Model]],
    data: Data,
    batch: int,
    lrs: Mapping[str, float],
    test: Tensor,
    budget_s: float,
    max_steps: int,
    eval_times: list[float],
    device: torch.device,
) -> dict[str, Run]:
    """Train every model for ``budget_s`` seconds of training wall time (or ``max_steps`` steps).

    The model that has trained for the least time takes the next step, so a change of the machine's
    load hits all alike; each is evaluated when its training time first passes each of ``eval_times``
    and after its last step.
    """
    trainers = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        trainers[name] = Trainer(build(), data, batch, lrs[name], device)
    pending = {name: sorted(eval_times) for name in trainers}
    while True:
        active = [name for name, t in trainers.items() if t.wall < budget_s and t.steps < max_steps]
        if not active:
            break
        name = min(active, key=lambda n: trainers[n].wall)
        trainer = trainers[name]
        trainer.step()
        while pending[name] and trainer.wall >= pending[name][0]:
            pending[name].pop(0)
            trainer.evaluate(test)
    for trainer in trainers.values():
        if not trainer.run.curve or trainer.run.curve[-1][0] != trainer.steps:
            trainer.evaluate(test)
    return {name: trainer.run for name, trainer in trainers.items()}


def flow_matching_rows(
    datasets: list[str],
    couplings: list[str],
    batch: int,
    lr: float,
    fm_lr: float,
    n_test: int,
    device: torch.device,
    budget_s: float,
    max_steps: int,
) -> list[str]:
    """Part 3: the markdown rows of flow matching against maximum likelihood at equal training time."""
    lines = []
    eval_times = sorted({budget_s * 2 ** (-k / 2) for k in range(40) if budget_s * 2 ** (-k / 2) >= 0.5})
    for name in datasets:
        data = make_data(name)
        test = data.sample(n_test, torch.Generator().manual_seed(123))
        true_nll = data.true_nll(test)
        builders: dict[str, Callable[[], Model]] = {"maximum likelihood": partial(build_pyro_nf, data.dim, device)}
        lrs = {"maximum likelihood": lr}
        for coupling in couplings:
            builders[f"flow matching ({coupling})"] = partial(build_pyro_nf_fm, data.dim, device, coupling)
            lrs[f"flow matching ({coupling})"] = fm_lr
        runs = train_by_time(builders, data, batch, lrs, test.to(device), budget_s, max_steps, eval_times, device)
        ml = runs["maximum likelihood"]
        ml_nll, ml_wall = ml.curve[-1][3], ml.curve[-1][1]
        for label, run in runs.items():
            step, wall, _, nll, eval_nfe = run.curve[-1]
            reached = next((point for point in run.curve if point[3] <= ml_nll), None)
            to_ml = "not reached" if reached is None else f"{reached[1]:.1f}"
            speedup = "—" if reached is None else f"{ml_wall / max(reached[1], 1e-9):.1f}x"
            kl = "—" if true_nll is None else f"{nll - true_nll:.3f}"
            ms = 1e3 * statistics.median(run.step_times)
            row = (
                f"| {name} | {label} | {lrs[label]} | {step} | {wall:.1f} | {ms:.1f} | "
                f"{nll:.3f} | {kl} | {eval_nfe} | {to_ml} | {speedup} |"
            )
            lines.append(row)
            print(row, flush=True)
    return lines


def last_quarter(values: list[float] | list[int]) -> float:
    tail = values[len(values) - max(1, len(values) // 4) :]
    return statistics.mean(tail)


def ms_per_nfe(run: Run) -> float:
    """Median over the last quarter of the steps of ``step time / (NFE forward + NFE backward)``, in ms."""
    start = len(run.step_times) - max(1, len(run.step_times) // 4)
    per = [t / max(1, f + b) for t, f, b in zip(run.step_times, run.nfe_forward, run.nfe_backward)][start:]
    return 1e3 * statistics.median(per)


def ms_per_nfe_by_pass(run: Run) -> tuple[float, float]:
    """Medians over the last quarter of the steps of the forward pass's time per forward NFE and of the
    backward pass's (the adjoint solve and the optimizer step) time per adjoint NFE, in ms."""
    start = len(run.step_times) - max(1, len(run.step_times) // 4)
    rows = list(zip(run.step_times, run.forward_times, run.nfe_forward, run.nfe_backward))[start:]
    forward = statistics.median(t_f / max(1, f) for _, t_f, f, _ in rows)
    backward = statistics.median((t - t_f) / max(1, b) for t, t_f, _, b in rows)
    return 1e3 * forward, 1e3 * backward


def side_by_side(
    datasets: list[str],
    steps: int,
    batch: int,
    lr: float,
    n_test: int,
    device: torch.device,
    budget_s: float,
    libraries: list[str] = DEFAULT_LIBRARIES,
) -> list[str]:
    """Part 1: the markdown rows of the side-by-side table."""
    lines = []
    for name in datasets:
        data = make_data(name)
        test = data.sample(n_test, torch.Generator().manual_seed(123))
        true_nll = data.true_nll(test)
        builders = {lib: partial(BUILDERS[lib], data.dim, device) for lib in libraries}
        runs = train_in_turns(builders, data, steps, batch, lr, test.to(device), steps, device, budget_s)
        for lib, run in runs.items():
            nll = run.curve[-1][3]
            gap = "—" if true_nll is None else f"{true_nll:.3f} / {nll - true_nll:.3f}"
            forward, backward = ms_per_nfe_by_pass(run)
            row = (
                f"| {name} | {lib} | {len(run.step_times)} | {statistics.median(run.step_times):.3f} | "
                f"{last_quarter(run.nfe_forward):.0f} | {last_quarter(run.nfe_backward):.0f} | "
                f"{ms_per_nfe(run):.2f} | {forward:.2f} | {backward:.2f} | {nll:.3f} | {gap} |"
            )
            lines.append(row)
            print(row, flush=True)
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown tables here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every model and tensor goes there)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of this process")
    parser.add_argument("--parts", nargs="+", choices=["side", "rnode", "fm"], default=["side", "rnode", "fm"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--budget-s", type=float, default=math.inf, help="wall-clock budget of each side-by-side row")
    parser.add_argument("--rnode-steps", type=int, default=300)
    parser.add_argument("--rnode-weight", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--toys", nargs="+", default=["moons", "8gaussians", "gmm8"], help="2D toys and/or gmm<D>")
    parser.add_argument("--rnode-toys", nargs="+", default=["8gaussians"])
    parser.add_argument("--fm-toys", nargs="+", default=["moons", "8gaussians", "checkerboard", "gmm8"])
    parser.add_argument("--fm-budget-s", type=float, default=45.0, help="training wall time of each part-3 run")
    parser.add_argument("--fm-lr", type=float, default=5e-3, help="learning rate of the flow-matching runs")
    parser.add_argument(
        "--fm-couplings", nargs="+", choices=["independent", "ot"], default=["independent"], help="part-3 FM runs"
    )
    parser.add_argument(
        "--libraries",
        nargs="+",
        choices=list(BUILDERS),
        default=DEFAULT_LIBRARIES,
        help="side-by-side rows (pyro_nf-layerwise: pyro_nf's field evaluated layer by layer, for an A/B of its cost)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps, rnode_steps, batch, toys, rnode_toys = args.steps, args.rnode_steps, args.batch, args.toys, args.rnode_toys
    n_test, eval_every = args.n_test, 25
    fm_toys, fm_budget, fm_steps = args.fm_toys, args.fm_budget_s, sys.maxsize
    if args.smoke_test:
        steps, rnode_steps, batch, n_test, eval_every = 1, 1, 8, 16, 1
        toys = list(dict.fromkeys([*toys[:1], *[t for t in toys if t.startswith("gmm")][:1]]))
        rnode_toys = rnode_toys[:1]
        fm_toys, fm_budget, fm_steps = fm_toys[:1], 1.0, 2
    lr = 5e-3
    where = f"{device.type}, {args.threads} CPU thread(s)" if device.type == "cpu" else str(device)
    lines = []
    if "side" in args.parts:
        lines += [
            f"Side by side, up to {steps} Adam steps (lr {lr}, batch {batch}), rtol = atol = {TOL}, "
            f"field 3 x 64, {where}; test NLL (nats, exact trace) on {n_test} held-out points; "
            "gmm8: true NLL (the entropy on the test points) / KL gap = test NLL - true NLL.",
            "",
            "| data | library | steps | s / step | NFE forward | NFE backward | ms / NFE | ms / NFE forward | "
            "ms / NFE backward | test NLL | true NLL / KL |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        print(lines[0], flush=True)
        lines += side_by_side(toys, steps, batch, lr, n_test, device, args.budget_s, args.libraries)
    if "rnode" in args.parts:
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
            data = make_data(toy)
            test = data.sample(n_test, torch.Generator().manual_seed(123)).to(device)
            weight = args.rnode_weight
            builders = {
                "FFJORD": partial(build_pyro_nf, data.dim, device),
                "FFJORD + RNODE": partial(build_pyro_nf, data.dim, device, kinetic_energy=weight, jacobian_norm=weight),
            }
            runs = train_in_turns(builders, data, rnode_steps, batch, lr, test, eval_every, device)
            target = max(run.curve[-1][3] for run in runs.values())
            for label, run in runs.items():
                reached = next(point for point in run.curve if point[3] <= target)
                nfe = [f + b for f, b in zip(run.nfe_forward, run.nfe_backward)]
                row = (
                    f"| {toy} | {label} | {run.curve[-1][3]:.3f} | {last_quarter(nfe):.0f} | {reached[0]} | "
                    f"{reached[1]:.1f} | {reached[2]} |"
                )
                lines.append(row)
                print(row, flush=True)
    if "fm" in args.parts:
        capped = "" if fm_steps == sys.maxsize else f" (up to {fm_steps} steps)"
        lines += [
            "",
            f"Flow matching against maximum likelihood, the same field (3 x 64), batch {batch}, {fm_budget:g} s of "
            f"training wall time each{capped}, {where}; test NLL (nats, exact trace) and the NFE of "
            f"that solve (dopri5, rtol = atol = {TOL}) on {n_test} held-out points; time to the ML run's final NLL "
            "(training seconds, evaluations excluded) and the ML run's training time divided by it.",
            "",
            "| data | run | lr | steps | train s | ms / step | test NLL | KL gap | eval NFE | "
            "train s to ML's NLL | ML time / that |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        print(lines[-4], flush=True)
        lines += flow_matching_rows(
            fm_toys, args.fm_couplings, batch, lr, args.fm_lr, n_test, device, fm_budget, fm_steps
        )
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
