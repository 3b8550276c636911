"""Precision of MAF, IAF and RealNVP after training on data of large scale, in float32 and float64.

Run ``python benchmarks/precision.py`` (a few minutes on one thread; ``--smoke-test`` for a
seconds-long run at tiny sizes). For every flow and data scale ``s`` in 1, 1e2, 1e3, 1e4 a
flow of 5 layers on D = 8 is trained for 100 Adam steps (lr 5e-2) on fresh batches of
``N(0, I) * s`` in float32 (the library path: nothing standardises the data), once as it is
and once with a :class:`~pyro_nf.transforms.normalization.ActNorm` first on the data
side. The trained weights are then evaluated as they are (float32) and copied to float64,
with both solvers of the sequential direction (``incremental``, the default, and the
``D``-pass ``reference``) on the same weights, on 1000 held-out points:

- **round trip**: data to noise and back, ``max|x_r - x| / max|x|`` (the sequential
  direction is MAF sampling and IAF density of data; RealNVP is one pass both ways);
- **log-det gap**: ``max|log det(x) - log det(x_r)|`` between the two directions (nats);
- **sequential error**: the sequential direction in float32 against the same weights in
  float64 from the same input, ``max|a - b| / max|b|``; for RealNVP its forward map;
- **excess NLL**: the held-out NLL (nats per point) minus the entropy of ``N(0, s^2 I)``,
  the best any model can do (how far the short training got).

Each cell is the median over ``--seeds`` trainings, with the largest in brackets.

``--diagnose`` adds a second table for MAF and IAF at the scales of ``--diagnose-scales``:
the round trip in float32 with parts of the sequential solve changed (chunk sizes, the whole
network in float64, the solve in float64, an exact float64 solve, fixed-point passes of the
parallel network after the incremental pass), the float64 round trip divided by float64's
unit roundoff (the amplification of the trained map) and the largest shift ``|mu|`` and
first-layer pre-activation the MADEs compute.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyro_nf.core import FlowStack  # noqa: E402
from pyro_nf.nn.made import MADE  # noqa: E402
from pyro_nf.transforms import iaf, maf, realnvp  # noqa: E402

FLOWS = ("MAF", "IAF", "RealNVP")
METHODS = ("incremental", "reference")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


@dataclass(frozen=True)
class Config:
    """Sizes of one run."""

    dim: int = 8
    hidden_dims: tuple[int, ...] | None = None  # the factories' default, [max(64, 4 D)] * 2
    num_transforms: int = 5
    steps: int = 100
    lr: float = 5e-2
    batch: int = 256
    points: int = 1000
    scales: tuple[float, ...] = (1.0, 1e2, 1e3, 1e4)
    seeds: int = 3
    flows: tuple[str, ...] = FLOWS
    diagnose_scales: tuple[float, ...] = (1e2, 1e4)


SMOKE = Config(dim=3, hidden_dims=(16,), num_transforms=2, steps=3, batch=32, points=20, scales=(1.0, 1e4), seeds=1)


# -- building and training ------------------------------------------------------------------------------------------
def build(flow: str, config: Config, sequential: str = "incremental", actnorm: bool = False) -> FlowStack:
    """An untrained flow; with ``actnorm`` an ActNorm sits first on the data side."""
    hidden = list(config.hidden_dims) if config.hidden_dims is not None else None
    if flow == "RealNVP":
        stack = realnvp(config.dim, hidden, config.num_transforms, actnorm=actnorm)
    else:
        factory = maf if flow == "MAF" else iaf
        stack = factory(config.dim, hidden, config.num_transforms, sequential=sequential, actnorm=actnorm)  # type: ignore[arg-type]
    return stack


def train(flow: str, scale: float, seed: int, config: Config, actnorm: bool) -> FlowStack:
    """``config.steps`` Adam steps of the NLL on fresh float32 batches of ``N(0, I) * scale``."""
    torch.manual_seed(seed)
    model = build(flow, config, actnorm=actnorm)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(config.steps):
        x = torch.randn(config.batch, config.dim, generator=generator) * scale
        z, log_det = model.inverse_and_log_det(x)
        loss = (0.5 * z.pow(2).sum(-1) + log_det).mean()  # NLL up to a constant
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def held_out(scale: float, config: Config, dtype: torch.dtype = torch.float32) -> Tensor:
    return (torch.randn(config.points, config.dim, generator=torch.Generator().manual_seed(7)) * scale).to(dtype)


def copy_as(trained: FlowStack, flow: str, config: Config, sequential: str, dtype: torch.dtype) -> FlowStack:
    """The trained weights in a flow whose sequential direction uses ``sequential``, in ``dtype``."""
    actnorm = type(trained.parts[-1]).__name__ == "ActNorm"
    model = build(flow, config, sequential, actnorm)
    model.load_state_dict(trained.state_dict())
    return model.to(dtype).eval()


def rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# -- the three measurements -----------------------------------------------------------------------------------------
@torch.no_grad()
def round_trip(model: FlowStack, x: Tensor) -> tuple[float, float]:
    """``(max|x_r - x| / max|x|, max|log det(x) - log det(x_r)|)`` for data to noise and back."""
    z, log_det_x = model.inverse_and_log_det(x)
    x_r, log_det_z = model.forward_and_log_det(z)
    return rel(x_r, x), (log_det_x - log_det_z).abs().max().item()


@torch.no_grad()
def sequential_error(flow: str, model32: FlowStack, model64: FlowStack, x: Tensor) -> float:
    """The sequential direction in float32 against float64 of the same weights, from the same input."""
    if flow == "IAF":
        return rel(model32.inverse_and_log_det(x)[0], model64.inverse_and_log_det(x.double())[0])
    z = model32.inverse_and_log_det(x)[0]  # MAF: the sequential direction is sampling, from this noise
    return rel(model32.forward_and_log_det(z)[0], model64.forward_and_log_det(z.double())[0])


@torch.no_grad()
def excess_nll(model: FlowStack, x: Tensor, scale: float) -> float:
    """The held-out NLL (nats per point) minus the entropy of the data's law ``N(0, scale^2 I)``."""
    z, log_det = model.inverse_and_log_det(x)
    dim = x.shape[-1]
    nll = (0.5 * z.double().pow(2).sum(-1) + log_det.double()).mean().item() + 0.5 * dim * math.log(2 * math.pi)
    return nll - dim * (0.5 * math.log(2 * math.pi) + math.log(scale) + 0.5)


@dataclass
class Cell:
    """One configuration's numbers over the seeds."""

    values: list[float]

    def __str__(self) -> str:
        if len(self.values) == 1:
            return f"{self.values[0]:.2g}"
        return f"{statistics.median(self.values):.2g} [{max(self.values):.2g}]"


def measure(config: Config) -> dict[tuple[str, float, str], dict[str, Cell]]:
    """``results[flow, scale, method][column]`` over the seeds."""
    results: dict[tuple[str, float, str], dict[str, Cell]] = {}
    for flow in config.flows:
        methods = ("one pass",) if flow == "RealNVP" else METHODS
        for scale in config.scales:
            for seed in range(config.seeds):
                for actnorm in (False, True):
                    trained = train(flow, scale, seed, config, actnorm)
                    x = held_out(scale, config)
                    for method in methods:
                        sequential = "incremental" if method == "one pass" else method
                        m32 = copy_as(trained, flow, config, sequential, torch.float32)
                        m64 = copy_as(trained, flow, config, sequential, torch.float64)
                        row = results.setdefault((flow, scale, method), {})
                        rt32, gap32 = round_trip(m32, x)
                        suffix = ", actnorm" if actnorm else ""
                        add(row, f"round trip f32{suffix}", rt32)
                        add(row, f"log-det gap f32{suffix}", gap32)
                        add(row, f"excess NLL{suffix}", excess_nll(m32, x, scale))
                        if not actnorm:
                            add(row, "round trip f64", round_trip(m64, x.double())[0])
                            if flow == "RealNVP":
                                with torch.no_grad():
                                    err = rel(m32(x), m64(x.double()))
                            else:
                                err = sequential_error(flow, m32, m64, x)
                            add(row, "sequential error f32", err)
            print(f"{flow} at scale {scale:g} done", file=sys.stderr, flush=True)
    return results


def add(row: dict[str, Cell], column: str, value: float) -> None:
    row.setdefault(column, Cell([])).values.append(value)


COLUMNS = (
    "round trip f32",
    "round trip f64",
    "log-det gap f32",
    "sequential error f32",
    "excess NLL",
    "round trip f32, actnorm",
    "log-det gap f32, actnorm",
    "excess NLL, actnorm",
)


def table(results: dict[tuple[str, float, str], dict[str, Cell]]) -> str:
    lines = ["| flow | scale | solver | " + " | ".join(COLUMNS) + " |"]
    lines.append("| --- | ---: | --- |" + " ---: |" * len(COLUMNS))
    for (flow, scale, method), row in results.items():
        lines.append(f"| {flow} | {scale:g} | {method} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


# -- the diagnosis: which part of the sequential solve matters ------------------------------------------------------
Solve = Callable[..., Tensor]


def _layer_solve(layer: nn.Module, forward: bool) -> Solve:
    """The element-wise solve of one affine autoregressive layer (as the layer applies it)."""
    g_map = layer.elementwise.forward if forward else layer.elementwise.inverse

    def solve(g: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return g_map(g, (a, b))[0]

    return solve


def _in_float64(solve: Solve) -> Solve:
    return lambda g, a, b: solve(g.double(), a.double(), b.double()).to(g.dtype)


def _rounded(solve: Solve) -> Solve:
    """Round every solved position to float32 (the stored solution), computing in the inputs' dtype."""
    return lambda g, a, b: solve(g, a, b).float().to(g.dtype)


def _refined(made: MADE, given: Tensor, solve: Solve, passes: int) -> Tensor:
    """The incremental solution followed by ``passes`` fixed-point passes ``x <- solve(given, MADE(x))``."""
    x = made.sequential(given, solve)[0]
    for _ in range(passes):
        x = solve(given, *made(x).view(-1, made.num_params, made.input_dim).unbind(1))
    return x


def _variant_solve(mode: str, made32: MADE, made64: MADE, given: Tensor, solve: Solve) -> Tensor:
    if mode == "reference":
        return made32.sequential(given, solve, method="reference")[0]
    if mode == "incremental":
        return made32.sequential(given, solve)[0]
    if mode == "incremental, chunk 1":
        return made32.sequential(given, solve, chunk=1)[0]
    if mode == "incremental, one chunk":
        return made32.sequential(given, solve, chunk=made32.input_dim)[0]
    if mode == "solve in f64":
        return made32.sequential(given, _in_float64(solve))[0]
    if mode == "network in f64":  # every sum in float64, each solved position stored in float32
        return made64.sequential(given.double(), _rounded(solve))[0].float()
    if mode == "exact solve":  # the float64 solution of the float32 input, rounded once
        return made64.sequential(given.double(), solve, method="reference")[0].float()
    if mode.startswith("incremental + "):
        return _refined(made32, given, solve, int(mode.split()[2]))
    raise ValueError(f"unknown mode {mode!r}")


MODES = (
    "reference",
    "incremental",
    "incremental, chunk 1",
    "incremental, one chunk",
    "solve in f64",
    "network in f64",
    "exact solve",
    "incremental + 1 pass",
    "incremental + 4 passes",
)


@torch.no_grad()
def _variant_round_trip(flow: str, model32: FlowStack, model64: FlowStack, x: Tensor, mode: str) -> float:
    """The float32 round trip with the sequential direction of every MADE layer solved by ``mode``."""
    forward = flow == "MAF"  # MAF: sampling (forward) is sequential; IAF: density (inverse)
    pairs = list(zip(model32.parts, model64.parts))

    def sequential(h: Tensor) -> Tensor:
        for layer32, layer64 in pairs if forward else reversed(pairs):
            if not hasattr(layer32, "made"):  # the actnorm or another one-pass part
                h = (layer32.forward_and_log_det if forward else layer32.inverse_and_log_det)(h)[0]
                continue
            h = _variant_solve(mode, layer32.made, layer64.made, h, _layer_solve(layer32, forward))
        return h

    if forward:
        return rel(sequential(model32.inverse_and_log_det(x)[0]), x)
    return rel(model32.forward_and_log_det(sequential(x))[0], x)


@torch.no_grad()
def _magnitudes(model: FlowStack, x: Tensor) -> tuple[float, float]:
    """The largest ``|mu|`` and first-layer pre-activation over the MADEs, along data to noise."""
    mu_max = pre_max = 0.0
    h = x
    for layer in reversed(model.parts):
        if hasattr(layer, "made"):
            made = layer.made
            inputs = h if layer.parallel == "inverse" else layer.inverse_and_log_det(h)[0]
            pre_max = max(pre_max, made.input_layer(inputs).abs().max().item())
            mu_max = max(mu_max, made(inputs)[..., : made.input_dim].abs().max().item())
        h = layer.inverse_and_log_det(h)[0]
    return mu_max, pre_max


def diagnose(config: Config) -> str:
    """The diagnosis table (see the module docstring)."""
    columns = (*MODES, "f64 amplification", "max abs mu", "max abs pre-activation")
    lines = ["| flow | scale | " + " | ".join(columns) + " |", "| --- | ---: |" + " ---: |" * len(columns)]
    for flow in (f for f in config.flows if f != "RealNVP"):
        for scale in config.diagnose_scales:
            cells: dict[str, Cell] = {c: Cell([]) for c in columns}
            for seed in range(config.seeds):
                trained = train(flow, scale, seed, config, actnorm=False)
                x = held_out(scale, config)
                m32 = copy_as(trained, flow, config, "incremental", torch.float32)
                m64 = copy_as(trained, flow, config, "incremental", torch.float64)
                for mode in MODES:
                    cells[mode].values.append(_variant_round_trip(flow, m32, m64, x, mode))
                cells["f64 amplification"].values.append(round_trip(m64, x.double())[0] / UNIT_ROUNDOFF[torch.float64])
                mu_max, pre_max = _magnitudes(m32, x)
                cells["max abs mu"].values.append(mu_max)
                cells["max abs pre-activation"].values.append(pre_max)
            lines.append(f"| {flow} | {scale:g} | " + " | ".join(str(cells[c]) for c in columns) + " |")
            print(f"diagnosis of {flow} at scale {scale:g} done", file=sys.stderr, flush=True)
    return "\n".join(lines)


def header(config: Config, command: str) -> str:
    hidden = list(config.hidden_dims) if config.hidden_dims is not None else f"[{max(64, 4 * config.dim)}] * 2"
    return (
        f"Command: `{command}`  \n"
        f"Date: {datetime.date.today()}; Python {platform.python_version()}, torch {torch.__version__}  \n"
        f"Sizes: D = {config.dim}, {config.num_transforms} layers, hidden {hidden}; {config.steps} Adam steps "
        f"(lr {config.lr:g}, batch {config.batch}) on N(0, I) * scale in float32; {config.points} held-out points; "
        f"median [max] over {config.seeds} seed(s)."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--diagnose", action="store_true", help="also the table of solver variants")
    parser.add_argument("--seeds", type=int, default=None, help="trainings per cell (default 3)")
    parser.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default 5e-2)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (default 100)")
    parser.add_argument("--dim", type=int, default=None, help="event size D (default 8)")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="data scales (default 1 1e2 1e3 1e4)")
    parser.add_argument("--diagnose-scales", type=float, nargs="+", default=None, help="(default 1e2 1e4)")
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = SMOKE if args.smoke_test else Config()
    overrides = {
        "seeds": args.seeds,
        "lr": args.lr,
        "steps": args.steps,
        "dim": args.dim,
        "scales": tuple(args.scales) if args.scales else None,
        "diagnose_scales": tuple(args.diagnose_scales) if args.diagnose_scales else None,
        "flows": tuple(args.flows) if args.flows else None,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.smoke_test:
        config = replace(config, diagnose_scales=config.scales[-1:])
    print(header(config, "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv)))
    print()
    print(table(measure(config)))
    if args.diagnose:
        print()
        print(diagnose(config))


if __name__ == "__main__":
    main()
