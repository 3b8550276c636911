"""Benchmark the sequential direction of MAF and IAF: pyro_nf's incremental MADE pass against the rest.

Run ``python benchmarks/sequential.py`` (writes the tables into ``docs/families/fast-sequential.md``).
Everything runs in this one process, side by side: for each measurement the libraries take turns,
repeat after repeat, so a change in the machine's load hits all of them alike; the median of the
repeats is reported. 5 layers, MADE hidden widths [256, 256], D = 8 and 64, 2 threads:

- MAF sampling and MAF ``log_prob`` throughput (points/s, no gradients);
- IAF ``log_prob`` of arbitrary points and IAF sampling throughput (points/s, no gradients);
- one training step on data, ``-log_prob(batch).mean()``, backward, Adam step, for IAF and MAF (ms).

Rows: pyro_nf with ``sequential="incremental"`` (the default), pyro_nf with ``sequential="reference"``
(``D`` MADE passes), zuko, nflows, normflows and Pyro's built-ins (built by ``benchmarks/anchors.py``).

``--family spline`` measures the same columns for the neural spline flows (rational-quadratic splines, 8 bins
on ``[-5, 5]``): pyro_nf's ``nsf`` in the MAF direction (``parallel="inverse"``) and in the IAF direction
(``parallel="forward"``), against zuko's ``NSF`` and Pyro's ``SplineAutoregressive`` (the libraries that have
them), and writes its tables into ``docs/families/splines.md``.

With ``--device cuda`` everything runs on the GPU (timed calls end with a synchronisation) and one
more row is added: pyro_nf incremental with each call recorded once in a CUDA graph and replayed
(:mod:`pyro_nf.graphs`), which removes the launch overhead of the ``D`` small steps.

``--smoke-test`` runs every row at tiny sizes (a few seconds) and writes nothing unless ``--output``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (set before torch starts): on a machine whose cores
# other jobs share, spinning threads make every multi-threaded op wait for a descheduled peer.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from anchors import Model, build, interleaved_median_seconds  # noqa: E402

from pyro_nf import FlowModel  # noqa: E402
from pyro_nf.transforms import iaf, maf, nsf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "families" / "fast-sequential.md"
START, END = "<!-- sequential-benchmark:start -->", "<!-- sequential-benchmark:end -->"
ROWS = ("pyro_nf incremental", "pyro_nf reference", "zuko", "nflows", "normflows", "pyro")
GRAPHED = "pyro_nf incremental, CUDA graph"
COLUMNS = ("MAF sample", "MAF log_prob", "IAF log_prob", "IAF sample", "IAF train step", "MAF train step")


@dataclass(frozen=True)
class Family:
    """The rows of one family of flows, the anchors' names of its two directions, and where its tables go."""

    rows: tuple[str, ...]
    flows: dict[str, str]  # "MAF" / "IAF" (the direction) -> the flow's name in benchmarks/anchors.py
    doc: Path
    markers: tuple[str, str]


FAMILIES = {
    "affine": Family(ROWS, {"MAF": "MAF", "IAF": "IAF"}, DOC, (START, END)),
    "spline": Family(
        ("pyro_nf incremental", "pyro_nf reference", "zuko", "pyro"),
        {"MAF": "NSF", "IAF": "NSF-IAF"},
        ROOT / "docs" / "families" / "splines.md",
        ("<!-- spline-sequential-benchmark:start -->", "<!-- spline-sequential-benchmark:end -->"),
    ),
}


@dataclass(frozen=True)
class Config:
    """Sizes of one run."""

    dims: tuple[int, ...] = (8, 64)
    hidden_dims: tuple[int, ...] = (256, 256)
    num_transforms: int = 5
    points: int = 4096
    batch: int = 512
    warmup: int = 1
    repeats: int = 5
    threads: int = 2
    device: str = "cpu"
    family: str = "affine"


SMOKE = Config(dims=(4,), hidden_dims=(16, 16), num_transforms=2, points=64, batch=32, warmup=1, repeats=1)


def _pyro_nf(flow: str, dim: int, config: Config, sequential: str) -> Model:
    hidden, layers = list(config.hidden_dims), config.num_transforms
    if config.family == "spline":
        parallel = "inverse" if flow == "MAF" else "forward"
        transform = nsf(dim, hidden, layers, parallel=parallel, sequential=sequential)  # type: ignore[arg-type]
    else:
        transform = (maf if flow == "MAF" else iaf)(dim, hidden, layers, sequential=sequential)  # type: ignore[arg-type]
    model = FlowModel(transform, (dim,))
    return Model(
        "pyro_nf", flow, dim, model, model.log_prob, lambda n: model.sample((n,)), flow == "MAF", flow == "IAF"
    )


def make(row: str, flow: str, dim: int, config: Config) -> Model:
    """The model of one row of the table, on the configured device."""
    torch.manual_seed(0)
    if row.startswith("pyro_nf"):
        model = _pyro_nf(flow, dim, config, row.split()[1].rstrip(","))
        model.module.to(config.device)
        return model
    name = FAMILIES[config.family].flows[flow]
    return build(
        row, name, dim, hidden_dims=config.hidden_dims, num_transforms=config.num_transforms, device=config.device
    )


def rows(config: Config) -> tuple[str, ...]:
    """The rows measured on the configured device."""
    return FAMILIES[config.family].rows + ((GRAPHED,) if config.device.startswith("cuda") else ())


def _perturb(module: nn.Module) -> None:
    """Move every parameter off its (often zero) initialisation, so that no map is the identity."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * 0.01)


def _synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn`` followed by a wait for the GPU, so that a timer around it measures the work."""
    if not device.startswith("cuda"):
        return fn

    def call() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def _train_step(model: Model, data: Tensor, graphed: bool = False) -> Callable[[], object]:
    optimizer = torch.optim.Adam(model.module.parameters(), lr=1e-4)
    log_prob = model.log_prob
    if graphed:
        from pyro_nf.graphs import capture_module

        log_prob = capture_module(model.module, data)

    def step() -> None:
        optimizer.zero_grad(set_to_none=not graphed)
        loss = -log_prob(data.clone()).mean()  # a fresh tensor: Pyro's caches keep graphs by identity
        loss.backward()
        optimizer.step()

    return step


def _graphed_calls(model: Model, x: Tensor, points: int) -> dict[str, Callable[[], object]]:
    """The no-gradient calls of one pyro_nf model, each recorded once in a CUDA graph."""
    from pyro_nf.graphs import capture, capture_sampler

    sample = capture_sampler(model.module, (points,))
    log_prob = capture(model.log_prob, x, copy_outputs=False)
    return {"sample": sample, "log_prob": lambda: log_prob(x)}


def measure(dim: int, config: Config) -> dict[str, dict[str, float]]:
    """``results[row][column]``: points/s for throughputs, ms for training steps."""
    names = rows(config)
    models = {(row, flow): make(row, flow, dim, config) for row in names for flow in ("MAF", "IAF")}
    for m in models.values():
        _perturb(m.module)
    x = torch.randn(config.points, dim, device=config.device)
    data = torch.randn(config.batch, dim, device=config.device)
    graphed = {
        flow: _graphed_calls(models[GRAPHED, flow], x, config.points) for flow in ("MAF", "IAF") if GRAPHED in names
    }
    results: dict[str, dict[str, float]] = {row: {} for row in names}

    def throughput(column: str, flow: str, fn: Callable[[Model], Callable[[], object]]) -> None:
        calls = {row: fn(models[row, flow]) for row in names if row != GRAPHED}
        if GRAPHED in names:
            calls[GRAPHED] = graphed[flow][column.split()[1]]
        calls = {row: _synchronized(call, config.device) for row, call in calls.items()}
        with torch.no_grad():
            t = interleaved_median_seconds(calls, config.warmup, config.repeats)
        for row in names:
            results[row][column] = config.points / t[row]

    throughput("MAF sample", "MAF", lambda m: lambda: m.sample(config.points))
    # fresh tensors: Pyro's transforms would otherwise serve the repeated x from their caches
    throughput("MAF log_prob", "MAF", lambda m: lambda: m.log_prob(x.clone()))
    throughput("IAF log_prob", "IAF", lambda m: lambda: m.log_prob(x.clone()))
    throughput("IAF sample", "IAF", lambda m: lambda: m.sample(config.points))
    for flow in ("IAF", "MAF"):
        steps = {row: _train_step(models[row, flow], data, graphed=row == GRAPHED) for row in names}
        steps = {row: _synchronized(step, config.device) for row, step in steps.items()}
        t = interleaved_median_seconds(steps, config.warmup, config.repeats)
        for row in names:
            results[row][f"{flow} train step"] = 1e3 * t[row]
    return results


def _fmt(column: str, value: float) -> str:
    if column.endswith("train step"):
        return f"{value:.1f} ms"
    return f"{value / 1e3:.1f}k/s" if value >= 1e3 else f"{value:.0f}/s"


def _label(column: str, family: str) -> str:
    """The column's name in the table: the flow of the family in that direction (``NSF-IAF log_prob``)."""
    direction, what = column.split(" ", 1)
    return f"{FAMILIES[family].flows[direction]} {what}"


def table(dim: int, results: dict[str, dict[str, float]], family: str = "affine") -> str:
    """A markdown table of one dimension's results."""
    labels = [_label(c, family) for c in COLUMNS]
    lines = [f"| D = {dim} | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for row in results:
        lines.append(f"| {row} | " + " | ".join(_fmt(c, results[row][c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def ratios(results: dict[str, dict[str, float]], family: str = "affine") -> dict[str, float]:
    """The target ratios: speed-ups over the fastest anchor, and slowdowns against the parallel direction."""
    anchors = [results[row] for row in FAMILIES[family].rows[2:]]
    out = {}
    for row in ("pyro_nf incremental", GRAPHED):
        if row not in results:
            continue
        ours = results[row]
        tag = "" if row == "pyro_nf incremental" else " (CUDA graph)"
        maf_, iaf_ = FAMILIES[family].flows["MAF"], FAMILIES[family].flows["IAF"]
        out |= {
            f"{maf_} sampling / fastest anchor's{tag}": ours["MAF sample"] / max(a["MAF sample"] for a in anchors),
            f"{maf_} log_prob / {maf_} sampling{tag}": ours["MAF log_prob"] / ours["MAF sample"],
            f"{iaf_} density / fastest anchor's{tag}": ours["IAF log_prob"] / max(a["IAF log_prob"] for a in anchors),
            f"{iaf_} sampling / {iaf_} density{tag}": ours["IAF sample"] / ours["IAF log_prob"],
            f"{iaf_} train step / {maf_} train step{tag}": ours["IAF train step"] / ours["MAF train step"],
        }
    ours = results["pyro_nf incremental"]
    name = FAMILIES[family].flows["MAF"]
    out[f"incremental / reference, {name} sampling"] = ours["MAF sample"] / results["pyro_nf reference"]["MAF sample"]
    return out


def _machine(config: Config) -> str:
    if config.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(config.device))} (torch {torch.__version__}), float32"
    return f"{platform.machine()} CPU ({os.cpu_count()} cores), torch.set_num_threads({config.threads}); no GPU"


def report(config: Config, all_results: dict[int, dict[str, dict[str, float]]], command: str) -> str:
    """The markdown block written into the docs."""
    libs = ", ".join(f"{name} {version(name)}" for name in ("torch", "pyro-ppl", "zuko", "nflows", "normflows"))
    parts = [
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}; Python {platform.python_version()}, {libs}  ",
        f"Machine: {_machine(config)}.  ",
        f"Sizes: {config.num_transforms} layers, hidden {list(config.hidden_dims)}, {config.points} points per "
        f"throughput call, training batch {config.batch}; median of {config.repeats} repeats after "
        f"{config.warmup} warm-up.",
        "",
    ]
    for dim, results in all_results.items():
        parts += [table(dim, results, config.family), ""]
        parts.append(f"Ratios at D = {dim} (pyro_nf incremental):")
        parts.append("")
        parts += [f"- {name}: {value:.2f}" for name, value in ratios(results, config.family).items()]
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def write_doc(path: Path, block: str, start: str = START, end: str = END) -> None:
    """Replace the block between the markers ``start`` and ``end`` of ``path`` (append it when they are missing)."""
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = f"{head}{start}\n{block}{end}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{start}\n{block}{end}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes; writes nothing unless --output")
    parser.add_argument("--output", type=Path, default=None, help=f"markdown file to update (default {DOC})")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="event sizes D (default 8 64)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--points", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="affine", help="affine (default) or spline")
    args = parser.parse_args(argv)
    config = SMOKE if args.smoke_test else Config()
    if args.dims:
        config = Config(**{**config.__dict__, "dims": tuple(args.dims)})
    if args.repeats:
        config = Config(**{**config.__dict__, "repeats": args.repeats})
    if args.points:
        config = Config(**{**config.__dict__, "points": args.points})
    if args.device:
        config = Config(**{**config.__dict__, "device": args.device})
    if args.threads:
        config = Config(**{**config.__dict__, "threads": args.threads})
    config = Config(**{**config.__dict__, "family": args.family})
    family = FAMILIES[config.family]
    torch.set_num_threads(config.threads)
    all_results = {}
    for dim in config.dims:
        all_results[dim] = measure(dim, config)
        print(table(dim, all_results[dim], config.family), flush=True)
        for name, value in ratios(all_results[dim], config.family).items():
            print(f"  {name}: {value:.2f}")
    command = "python benchmarks/sequential.py" + (" " + " ".join(argv) if argv else "")
    output = args.output if args.output is not None else (None if args.smoke_test else family.doc)
    if output is not None:
        write_doc(output, report(config, all_results, command), *family.markers)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
