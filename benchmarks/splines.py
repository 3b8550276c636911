"""Benchmark pyro_nf's neural spline flows against zuko's NSF and Pyro's spline flows, side by side in one run.

Run ``python benchmarks/splines.py`` (writes its tables into ``docs/families/splines.md``; ``--output FILE``
writes them there instead). Every flow is built by ``benchmarks/anchors.py`` with the same sizes in each
library: 5 layers, hidden widths ``[256, 256]`` per network, rational-quadratic splines of 8 bins on
``[-5, 5]``, a standard Normal base, float32 on the CPU:

- ``NSF``: autoregressive, density of data in one pass (pyro_nf ``nsf``, zuko ``NSF``, Pyro
  ``SplineAutoregressive(order="quadratic")`` used through ``.inv``);
- ``NSF-IAF``: autoregressive, sampling in one pass (pyro_nf ``nsf(parallel="forward")``, zuko
  ``LazyInverse`` of each layer, Pyro ``SplineAutoregressive``);
- ``NSF-coupling``: coupling layers (pyro_nf ``nsf(coupling=True)``, zuko ``NSF(passes=2)``, Pyro
  ``SplineCoupling(order="quadratic")``).

Speed: points per second of ``log_prob`` (no gradients), sampling (no gradients) and a training step (NLL,
backward, Adam) at D = 8 and 64; the libraries take turns within every repeat so that the machine's load hits
them alike, and the median of the repeats is reported. Rows marked *seq* are the sequential direction,
measured on fewer points (``benchmarks/sequential.py --family spline`` measures those in detail).

Quality at a fixed budget, with the settings of ``benchmarks/run.py`` (1000 Adam steps, batch 256, learning
rate 1e-3, fresh samples from the same seeded stream for every library): the KL gap on the Gaussian mixtures
``gmm8`` and ``gmm21`` and the test NLL on the 2D toys, for each of ``--seeds`` seeds (the seed sets the
initialisation and the data stream). The IAF direction is fitted on the 2D toys only.

``--smoke-test`` runs every row at tiny sizes in well under a minute and writes nothing unless ``--output``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts: set before the import

import torch  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from anchors import SPLINE_FLOWS, SPLINE_LIBRARIES, build, check_directions, interleaved_median_seconds  # noqa: E402
from run import Config as QualityConfig  # noqa: E402
from run import _cycling, _fit, _no_grad, _score_copy, _Target, _train_step  # noqa: E402
from sequential import write_doc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "families" / "splines.md"
MARKERS = {
    "speed": ("<!-- spline-speed-benchmark:start -->", "<!-- spline-speed-benchmark:end -->"),
    "quality": ("<!-- spline-quality-benchmark:start -->", "<!-- spline-quality-benchmark:end -->"),
}
ANCHORS = tuple(lib for lib in SPLINE_LIBRARIES if lib != "pyro_nf")
METRICS = ("log_prob", "sample", "train step")


@dataclass(frozen=True)
class Config:
    """Sizes of one run."""

    dims: tuple[int, ...] = (8, 64)
    hidden_dims: tuple[int, ...] = (256, 256)
    num_transforms: int = 5
    points: int = 4096
    seq_points: int = 256
    batch: int = 512
    seq_batch: int = 128
    warmup: int = 2
    repeats: int = 5
    seq_repeats: int = 3
    quality: QualityConfig = field(default_factory=QualityConfig)
    targets: tuple[str, ...] = ("moons", "8gaussians", "checkerboard", "gmm8", "gmm21")
    seeds: tuple[int, ...] = (1, 2)
    threads: int = 1
    flows: tuple[str, ...] = SPLINE_FLOWS


SMOKE = Config(
    dims=(4, 8),
    hidden_dims=(16, 16),
    num_transforms=2,
    points=64,
    seq_points=8,
    batch=32,
    seq_batch=8,
    warmup=1,
    repeats=1,
    seq_repeats=1,
    quality=replace(QualityConfig(), quality_steps=3, quality_batch=16, quality_test=64, quality_hidden_dims=(32, 32)),
    seeds=(1,),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sequential(flow: str, metric: str) -> bool:
    return (flow == "NSF" and metric == "sample") or (flow == "NSF-IAF" and metric != "sample")


def run_speed(cfg: Config) -> list[tuple[str, int, str, int, dict[str, float]]]:
    """Rows ``(flow, D, metric, points, seconds per library)``."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for flow in cfg.flows:
        for dim in cfg.dims:
            models = {
                lib: build(lib, flow, dim, hidden_dims=cfg.hidden_dims, num_transforms=cfg.num_transforms)
                for lib in SPLINE_LIBRARIES
            }
            for model in models.values():
                check_directions(model)
            for metric in METRICS:
                seq = _sequential(flow, metric)
                n = (
                    (cfg.seq_batch if seq else cfg.batch)
                    if metric == "train step"
                    else (cfg.seq_points if seq else cfg.points)
                )
                calls: dict[str, Callable[[], object]]
                if metric == "log_prob":
                    x = torch.randn(n, dim, generator=generator)
                    calls = {lib: partial(_score_copy, m.log_prob, x) for lib, m in models.items()}
                elif metric == "sample":
                    calls = {lib: partial(_no_grad, m.sample, n) for lib, m in models.items()}
                else:
                    pool = [torch.randn(n, dim, generator=generator) for _ in range(4)]
                    calls = {lib: _cycling(_train_step(m), pool) for lib, m in models.items()}
                warmup = min(cfg.warmup, 1) if seq else cfg.warmup
                seconds = interleaved_median_seconds(calls, warmup, cfg.seq_repeats if seq else cfg.repeats)
                rows.append((flow, dim, metric, n, seconds))
                log(
                    f"{flow:12s} D={dim:<3d} {metric:10s} n={n:<5d} "
                    + _rates(n, seconds)
                    + f" ratio={_ratio(seconds):.2f}"
                )
    return rows


def _rates(n: int, seconds: dict[str, float]) -> str:
    return " ".join(f"{lib}={n / t:9.0f}/s" for lib, t in seconds.items())


def _ratio(seconds: dict[str, float]) -> float:
    """pyro_nf's throughput over the fastest anchor's."""
    return min(seconds[lib] for lib in ANCHORS) / seconds["pyro_nf"]


def run_quality(cfg: Config) -> list[tuple[str, str, str, dict[str, list[float]], dict[str, float]]]:
    """Rows ``(target, flow, measure, values per library (one per seed), mean training seconds)``."""
    rows = []
    for name in cfg.targets:
        target = _Target(name)
        test = target.sample(cfg.quality.quality_test, torch.Generator().manual_seed(2))
        measure = "KL gap" if target.mixture is not None else "test NLL"
        for flow in (f for f in cfg.flows if target.dim == 2 or f != "NSF-IAF"):
            values: dict[str, list[float]] = {lib: [] for lib in SPLINE_LIBRARIES}
            seconds: dict[str, list[float]] = {lib: [] for lib in SPLINE_LIBRARIES}
            for seed in cfg.seeds:
                for lib in SPLINE_LIBRARIES:
                    hidden = cfg.quality.quality_hidden_dims
                    model = build(
                        lib, flow, target.dim, hidden_dims=hidden, num_transforms=cfg.num_transforms, seed=seed
                    )
                    value, spent = _fit(model, target, cfg.quality, test, seed=seed)
                    values[lib].append(value)
                    seconds[lib].append(spent)
            rows.append((name, flow, measure, values, {lib: statistics.mean(s) for lib, s in seconds.items()}))
            log(f"{name:12s} {flow:12s} {measure}: " + " ".join(f"{lib}={_values(v)}" for lib, v in values.items()))
    return rows


def _values(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def _rate(points_per_second: float) -> str:
    if points_per_second >= 1e4:
        return f"{points_per_second / 1e3:,.0f}k"
    return f"{points_per_second / 1e3:.1f}k" if points_per_second >= 1e3 else f"{points_per_second:.0f}"


def _header(cfg: Config, command: str, elapsed: float) -> list[str]:
    libs = ", ".join(f"{p} {version(p)}" for p in ("torch", "pyro-ppl", "zuko"))
    return [
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}; the run took {elapsed / 60:.1f} min; Python "
        f"{platform.python_version()}, {libs}  ",
        f"Machine: {platform.machine()} CPU ({os.cpu_count()} cores, shared with other jobs: absolute rates are "
        f"noisy, the libraries take turns within every repeat), torch.set_num_threads({cfg.threads}).  ",
        f"Sizes: {cfg.num_transforms} layers, 8 bins on [-5, 5].",
        "",
    ]


def speed_report(cfg: Config, speed: list, command: str, elapsed: float) -> str:  # type: ignore[type-arg]
    """The markdown block of the speed rows."""
    lines = _header(cfg, command, elapsed) + [
        f"Points per second (median of {cfg.repeats} repeats, {cfg.seq_repeats} for *seq* rows), hidden "
        f"{list(cfg.hidden_dims)}; `log_prob` of {cfg.points} points, sampling {cfg.points}, a training step on a "
        f"batch of {cfg.batch}; *seq* rows (the sequential direction) on {cfg.seq_points} points or a batch of "
        f"{cfg.seq_batch}. **ratio** = pyro_nf / the fastest of zuko and Pyro.",
        "",
        "| flow | D | measurement | n | " + " | ".join(SPLINE_LIBRARIES) + " | ratio |",
        "| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in SPLINE_LIBRARIES) + " | ---: |",
    ]
    for flow, dim, metric, n, seconds in speed:
        label = metric + (" *seq*" if _sequential(flow, metric) else "")
        rates = " | ".join(_rate(n / seconds[lib]) for lib in SPLINE_LIBRARIES)
        lines.append(f"| {flow} | {dim} | {label} | {n} | {rates} | **{_ratio(seconds):.2f}** |")
    return "\n".join(lines) + "\n"


def quality_report(cfg: Config, quality: list, command: str, elapsed: float) -> str:  # type: ignore[type-arg]
    """The markdown block of the quality rows."""
    q = cfg.quality
    lines = _header(cfg, command, elapsed) + [
        f"{q.quality_steps} Adam steps, batch {q.quality_batch}, learning rate {q.quality_lr:g}, hidden "
        f"{list(q.quality_hidden_dims)}, scored on {q.quality_test} held-out points; one value per seed "
        f"({', '.join(map(str, cfg.seeds))}: initialisation and data stream). KL gap in nats on the mixtures, "
        "test NLL on the 2D toys; lower is better. **gap** = pyro_nf's mean minus the best anchor's mean (<= 0 "
        "meets the target). Seconds: mean training time of one fit.",
        "",
        "| target | flow | measure | " + " | ".join(SPLINE_LIBRARIES) + " | gap |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in SPLINE_LIBRARIES) + " | ---: |",
    ]
    for name, flow, measure, values, seconds in quality:
        means = {lib: statistics.mean(v) for lib, v in values.items()}
        gap = means["pyro_nf"] - min(means[lib] for lib in ANCHORS)
        cells = " | ".join(f"{_values(values[lib])} ({seconds[lib]:.0f}s)" for lib in SPLINE_LIBRARIES)
        lines.append(f"| {name} | {flow} | {measure} | {cells} | **{gap:+.3f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes; writes nothing unless --output")
    parser.add_argument("--output", type=Path, default=None, help=f"markdown file to update (default {DOC})")
    parser.add_argument("--only", choices=("speed", "quality", "all"), default="all")
    parser.add_argument("--steps", type=int, default=None, help="quality budget in steps (default 1000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="quality seeds (default 1 2)")
    parser.add_argument("--targets", nargs="+", default=None, help="quality targets (gmm<D> or a 2D toy name)")
    parser.add_argument("--flows", nargs="+", choices=SPLINE_FLOWS, default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="speed dimensions (default 8 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke_test else Config()
    if args.steps is not None:
        cfg = replace(cfg, quality=replace(cfg.quality, quality_steps=args.steps))
    for name in ("seeds", "targets", "flows", "dims"):
        if getattr(args, name) is not None:
            cfg = replace(cfg, **{name: tuple(getattr(args, name))})
    if args.threads is not None:
        cfg = replace(cfg, threads=args.threads)
    torch.set_num_threads(cfg.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    command = "python benchmarks/splines.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    output = args.output if args.output is not None else (None if args.smoke_test else DOC)
    for part, run, render in (("speed", run_speed, speed_report), ("quality", run_quality, quality_report)):
        if args.only not in (part, "all"):
            continue
        start = time.perf_counter()
        rows = run(cfg)
        block = render(cfg, rows, command, time.perf_counter() - start)
        print(block, flush=True)
        if output is not None:
            write_doc(output, block, *MARKERS[part])
            log(f"wrote the {part} tables into {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
