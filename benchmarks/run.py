"""Benchmark pyro_nf's vector flows against zuko, nflows, normflows and Pyro's built-ins.

Run ``python benchmarks/run.py --out docs/benchmarks.md`` (``make bench``). Everything runs in this one
process, side by side: for each measurement the five libraries take turns, repeat after repeat, so a
change in the machine's load hits all of them alike, and the median of the repeats is reported.

Speed (MAF, IAF, RealNVP at D = 8 and 64, 5 layers, hidden [256, 256], 2 threads):

- ``log_prob`` of arbitrary points (standard Normal draws), without gradients;
- sampling, without gradients;
- one training step: ``-log_prob(batch).mean()``, backward, Adam step.

The sequential directions (MAF sampling, IAF density, so also IAF training on data) cost D network
passes per layer in every library; they are measured on fewer points so the run stays bounded.

Quality at a fixed budget (the same steps, batch size, learning rate and data stream for every
library): on fixed random Gaussian mixtures (D = 8 and 21) the KL gap ``mean(log p(x) - log q(x))``
over held-out points (test NLL minus the true entropy); on the 2D toys, whose entropy is unknown, the
test NLL. IAF is fitted on the 2D toys only: fitting an IAF to data costs D passes per layer per step.

``--smoke-test`` runs every row at tiny sizes (well under a minute).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from importlib.metadata import version
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores other jobs also use, spinning
# threads make every multi-threaded op wait for a descheduled peer (measured 10x slower at 2 threads).
# Read once, when torch starts, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

# The anchors module next to this file, and the checkout itself (works without installing pyro_nf).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from anchors import FLOWS, LIBRARIES, Model, build, check_directions, interleaved_median_seconds  # noqa: E402

from pyro_nf.data.targets import gaussian_mixture_target  # noqa: E402
from pyro_nf.data.toy import sample_toy  # noqa: E402

ANCHORS = tuple(lib for lib in LIBRARIES if lib != "pyro_nf")
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
    repeats: int = 7
    seq_repeats: int = 3
    quality_steps: int = 1000
    quality_batch: int = 256
    quality_lr: float = 1e-3
    quality_test: int = 20_000
    quality_hidden_dims: tuple[int, ...] = (256, 256)
    threads: int = 2
    targets: tuple[str, ...] = ("gmm8", "gmm21", "moons", "8gaussians")
    flows: tuple[str, ...] = FLOWS


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
    quality_steps=3,
    quality_batch=16,
    quality_test=64,
    quality_hidden_dims=(32, 32),
)


@dataclass
class SpeedRow:
    flow: str
    dim: int
    metric: str
    points: int
    sequential: bool
    seconds: dict[str, float] = field(default_factory=dict)

    def rate(self, lib: str) -> float:
        return self.points / self.seconds[lib]

    @property
    def ratio(self) -> float:
        """pyro_nf's throughput over that of the fastest anchor."""
        return self.rate("pyro_nf") / max(self.rate(lib) for lib in ANCHORS)


@dataclass
class QualityRow:
    target: str
    flow: str
    measure: str  # "KL gap" or "test NLL"
    values: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """pyro_nf's value minus the best anchor's (lower is better; <= 0 meets the target)."""
        return self.values["pyro_nf"] - min(self.values[lib] for lib in ANCHORS)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- speed -----------------------------------------------------------------------------------------------------
def _train_step(model: Model) -> Callable[[Tensor], None]:
    optimizer = torch.optim.Adam(model.module.parameters(), lr=1e-4)

    def step(x: Tensor) -> None:
        loss = -model.log_prob(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_speed(cfg: Config) -> list[SpeedRow]:
    rows: list[SpeedRow] = []
    generator = torch.Generator().manual_seed(0)
    for flow in cfg.flows:
        for dim in cfg.dims:
            models = {
                lib: build(lib, flow, dim, hidden_dims=cfg.hidden_dims, num_transforms=cfg.num_transforms)
                for lib in LIBRARIES
            }
            for model in models.values():
                check_directions(model)
            for metric in METRICS:
                sequential = (metric == "sample" and flow == "MAF") or (metric != "sample" and flow == "IAF")
                if metric == "train step":
                    n = cfg.seq_batch if sequential else cfg.batch
                else:
                    n = cfg.seq_points if sequential else cfg.points
                repeats = cfg.seq_repeats if sequential else cfg.repeats
                warmup = min(cfg.warmup, 1) if sequential else cfg.warmup
                calls: dict[str, Callable[[], object]]
                if metric == "log_prob":
                    x = torch.randn(n, dim, generator=generator)
                    # A fresh copy per call: Pyro's transforms would otherwise serve the cached result.
                    calls = {lib: partial(_score_copy, m.log_prob, x) for lib, m in models.items()}
                elif metric == "sample":
                    calls = {lib: partial(_no_grad, m.sample, n) for lib, m in models.items()}
                else:
                    # Distinct batches, cycled: a library that caches on tensor identity never sees a stale hit.
                    pool = [torch.randn(n, dim, generator=generator) for _ in range(4)]
                    calls = {lib: _cycling(_train_step(m), pool) for lib, m in models.items()}
                row = SpeedRow(flow, dim, metric, n, sequential, interleaved_median_seconds(calls, warmup, repeats))
                rows.append(row)
                log(
                    f"{flow:8s} D={dim:<3d} {metric:10s} n={n:<5d} "
                    + " ".join(f"{lib}={row.rate(lib):9.0f}/s" for lib in LIBRARIES)
                    + f"  ratio={row.ratio:.2f}"
                )
    return rows


def _no_grad(fn: Callable[[object], Tensor], arg: object) -> Tensor:
    with torch.no_grad():
        return fn(arg)


def _score_copy(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with torch.no_grad():
        return log_prob(x.clone())


def _cycling(step: Callable[[Tensor], None], pool: Sequence[Tensor]) -> Callable[[], None]:
    state = {"i": 0}

    def call() -> None:
        step(pool[state["i"] % len(pool)])
        state["i"] += 1

    return call


# -- quality ---------------------------------------------------------------------------------------------------
class _Target:
    """A data source: seeded batches, held-out points, and the true log-density where known."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name.startswith("gmm"):
            self.mixture = gaussian_mixture_target(int(name[3:]), seed=0)
            self.dim = self.mixture.dim
        else:
            self.mixture = None
            self.dim = 2

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        if self.mixture is not None:
            return self.mixture.sample(n, generator)
        return sample_toy(self.name, n, generator=generator)

    def score(self, log_q: Tensor, x: Tensor) -> float:
        """KL gap (mean log p - log q) where p is known, else test NLL."""
        if self.mixture is not None:
            return self.mixture.kl_from(log_q, x)
        return -float(log_q.double().mean())


def _fit(model: Model, target: _Target, cfg: Config, test: Tensor, seed: int = 1) -> tuple[float, float]:
    optimizer = torch.optim.Adam(model.module.parameters(), lr=cfg.quality_lr)
    generator = torch.Generator().manual_seed(seed)  # the same data stream for every library
    start = time.perf_counter()
    for step in range(cfg.quality_steps):
        loss = -model.log_prob(target.sample(cfg.quality_batch, generator)).mean()
        if not torch.isfinite(loss):
            log(f"  {model.library} {model.flow} on {target.name}: non-finite loss at step {step}")
            return math.inf, time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        log_q = torch.cat([model.log_prob(chunk) for chunk in test.split(4096)])
    if not bool(torch.isfinite(log_q).all()):
        return math.inf, seconds
    return target.score(log_q, test), seconds


def run_quality(cfg: Config) -> list[QualityRow]:
    rows: list[QualityRow] = []
    for name in cfg.targets:
        target = _Target(name)
        test = target.sample(cfg.quality_test, torch.Generator().manual_seed(2))
        flows = [f for f in cfg.flows if target.dim == 2 or f != "IAF"]
        for flow in flows:
            row = QualityRow(name, flow, "KL gap" if target.mixture is not None else "test NLL")
            for lib in LIBRARIES:
                model = build(
                    lib, flow, target.dim, hidden_dims=cfg.quality_hidden_dims, num_transforms=cfg.num_transforms
                )
                row.values[lib], row.seconds[lib] = _fit(model, target, cfg, test)
            rows.append(row)
            log(
                f"{name:10s} {flow:8s} {row.measure}: "
                + " ".join(f"{lib}={row.values[lib]:.3f} ({row.seconds[lib]:.0f}s)" for lib in LIBRARIES)
            )
    return rows


# -- report ----------------------------------------------------------------------------------------------------
def _rate(points_per_second: float) -> str:
    if points_per_second >= 1e4:
        return f"{points_per_second / 1e3:,.0f}k"
    if points_per_second >= 1e3:
        return f"{points_per_second / 1e3:.1f}k"
    return f"{points_per_second:.0f}"


TARGETED = {
    ("MAF", "log_prob"),
    ("MAF", "train step"),
    ("RealNVP", "log_prob"),
    ("RealNVP", "train step"),
    ("IAF", "sample"),
}


def render(
    cfg: Config, speed: list[SpeedRow], quality: list[QualityRow], command: str, smoke: bool, elapsed: float
) -> str:
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "pyro-ppl", "zuko", "nflows", "normflows"))
    lines = [
        "# Benchmarks: vector flows against the anchors",
        "",
        "pyro_nf's MAF, IAF and RealNVP measured side by side, in one process, with the same architecture",
        "built in [zuko](https://github.com/probabilists/zuko), [nflows](https://github.com/bayesiains/nflows),",
        "[normflows](https://github.com/VincentStimper/normalizing-flows) and Pyro's built-in",
        "`AffineAutoregressive` / `AffineCoupling` (`benchmarks/anchors.py` builds them all).",
        "",
        f"- Command: `{command}`" + (" (smoke test: tiny sizes, numbers meaningless)" if smoke else ""),
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; "
        f"whole run {elapsed / 60:.1f} min",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs (`{platform.processor() or platform.platform()}`), "
        f"torch threads {cfg.threads} (`OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}`); "
        f"Python {platform.python_version()}; {versions}; pyro_nf {_pyro_nf_version()}",
        "- The machine was shared with other jobs while this ran: absolute rates are noisy. Libraries take turns",
        "  within every repeat, so ratios measured in the same run are the numbers to read.",
        f"- Architecture: {cfg.num_transforms} layers, hidden {list(cfg.hidden_dims)} per network, standard Normal "
        "base, float32, CPU.",
        "",
        "## Speed",
        "",
        f"Points per second (median of {cfg.repeats} repeats after {cfg.warmup} warm-up calls; "
        f"{cfg.seq_repeats} repeats for sequential rows). `log_prob` scores {cfg.points} standard-Normal "
        f"points, sampling draws {cfg.points}, a training step is NLL + backward + Adam on a batch of "
        f"{cfg.batch}. Rows marked *seq* are the sequential direction (D network passes per layer in every "
        f"anchor; pyro_nf solves it incrementally), measured on {cfg.seq_points} points or a batch of {cfg.seq_batch}. "
        "**ratio** = pyro_nf / fastest anchor; rows in bold are the targets (ratio >= 1.0).",
        "",
        "| flow | D | measurement | n | " + " | ".join(LIBRARIES) + " | ratio |",
        "| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in LIBRARIES) + " | ---: |",
    ]
    for row in speed:
        metric = row.metric + (" *seq*" if row.sequential else "")
        ratio = f"{row.ratio:.2f}"
        if (row.flow, row.metric) in TARGETED:
            ratio = f"**{ratio}**"
        lines.append(
            f"| {row.flow} | {row.dim} | {metric} | {row.points} | "
            + " | ".join(_rate(row.rate(lib)) for lib in LIBRARIES)
            + f" | {ratio} |"
        )
    lines += [
        "",
        "## Quality at a fixed budget",
        "",
        f"Every library: {cfg.quality_steps} Adam steps, batch {cfg.quality_batch}, learning rate "
        f"{cfg.quality_lr:g}, the same seeded stream of fresh samples, hidden {list(cfg.quality_hidden_dims)}, "
        f"{cfg.num_transforms} layers; scored on {cfg.quality_test} held-out points. `gmmD` is "
        "`pyro_nf.data.targets.gaussian_mixture_target(D, seed=0)` (8 anisotropic components): the value is "
        "the KL gap `mean(log p(x) - log q(x))` = test NLL minus the true entropy, in nats (0 is perfect). On "
        "the 2D toys (`pyro_nf.data.toy.sample_toy`) the true entropy is unknown and the value is the test "
        "NLL. Lower is better; **gap** = pyro_nf minus the best anchor (target: <= 0). IAF is fitted on the "
        "2D toys only (its density costs D passes per layer). Seconds are the training wall time.",
        "",
        "| target | flow | measure | " + " | ".join(LIBRARIES) + " | gap |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in LIBRARIES) + " | ---: |",
    ]
    for qrow in quality:
        lines.append(
            f"| {qrow.target} | {qrow.flow} | {qrow.measure} | "
            + " | ".join(f"{qrow.values[lib]:.3f} ({qrow.seconds[lib]:.0f}s)" for lib in LIBRARIES)
            + f" | {qrow.gap:+.3f} |"
        )
    lines += ["", "## Against the targets", ""]
    for row in speed:
        if (row.flow, row.metric) in TARGETED:
            verdict = "met" if row.ratio >= 1.0 else "short"
            lines.append(f"- {row.flow} D={row.dim} {row.metric}: ratio {row.ratio:.2f} ({verdict})")
    for qrow in quality:
        verdict = "met" if qrow.gap <= 0 else "short"
        lines.append(f"- {qrow.target} {qrow.flow} {qrow.measure}: gap {qrow.gap:+.3f} ({verdict})")
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def _pyro_nf_version() -> str:
    import pyro_nf

    return pyro_nf.__version__


NOTES = """## Reading the numbers

- **Parallel directions are mostly compute-bound.** With hidden [256, 256], a layer's network (three
  matrix products, biases, ReLUs) takes most of its time in every library, so the rows land close
  together. One cost found in pyro_nf and removed: an out-of-place ReLU in the MADE (and the coupling
  MLP) wrote a fresh 4 MB activation buffer per hidden layer for 4096 points; with the in-place ReLU it
  now uses on fresh linear outputs, MAF `log_prob` at D = 64 on one thread went from 200 to 154 ms for
  4096 points (best of 15; zuko 148 to 157 ms). The element-wise work pyro_nf adds per layer is small: the soft
  clamp `B tanh(b / B)` (about 1.5% of a layer at D = 64, 0.3% at D = 8), the `weight * mask` products of
  the MADE (under 0.1%), and once per call the input check `isfinite().all()` (0.2%;
  `pyro_nf.set_validation(False)` removes it). RealNVP's `"half"` masks are split with slices, not gathers
  (no scatter in the backward pass).
- **The ratio is against the fastest of four anchors**, each measured with noise: on a shared machine the
  largest of four equals comes out several percent above any one of them, so parallel rows with a ratio a
  few percent under 1.0 are within noise, not a cost pyro_nf adds; repeat the run on a quiet machine to
  separate them.
- **The sequential directions differ by design.** pyro_nf's MAF sampling and IAF density use an
  incremental MADE solve (`pyro_nf.nn.MADE.sequential`) instead of D full network passes, hence the
  ratios of about 2 to 5 on those rows; every anchor runs the full network D times (zuko D + 1).
- **Quality** differences at a fixed budget come from the scale map and the initialisation: nflows and
  normflows' autoregressive layers use `sigmoid(u + 2) + 1e-3`, a scale that can only contract on the
  density side; pyro_nf's soft-clamped log-scale (and zuko's) can expand and contract, and pyro_nf starts
  every layer at the identity (zero-initialised last layer).

## How each anchor is built

The directions are named as in pyro_nf (forward maps noise to data); `benchmarks/anchors.py` checks every
model before it is timed by counting network passes (one for a parallel direction; D or more for a
sequential one, or none where pyro_nf's incremental solve works on slices of the weights).

- **pyro_nf**: `maf`, `iaf`, `realnvp` inside a `FlowModel`; input checks on (the default).
- **zuko 1.6**: `zuko.flows.MAF` (a MAF: zuko's transforms map data to noise in one pass); IAF is
  `Flow([LazyInverse(MaskedAutoregressiveTransform(...)), ...])`; `zuko.flows.RealNVP` (checkered masks).
  zuko's sequential direction costs D + 1 passes (one more for the log-det).
- **nflows 0.14**: `MaskedAffineAutoregressiveTransform` (MAF) with `ReversePermutation` between layers;
  IAF is `InverseTransform` of it; RealNVP is `AffineCouplingTransform` with a plain MLP conditioner.
  Its MADE with `num_blocks=1, use_residual_blocks=False` has hidden widths [h, h]. Scale
  `sigmoid(u + 2) + 1e-3`.
- **normflows 1.7.3**: its `MaskedAffineAutoregressive` is documented as MAF but runs the MADE D times for
  density: it is an IAF here, and `nf.flows.Reverse` of it is the MAF. RealNVP is `AffineCouplingBlock`
  (exp scale) with a zero-initialised `nf.nets.MLP` and `Permute(mode="swap")` between layers.
- **Pyro 1.9**: `AffineAutoregressive(AutoRegressiveNN)` is an IAF; its `.inv` (layers in reverse order)
  is the MAF. RealNVP is `AffineCoupling` with a `DenseNN` and a reversing `Permute` between layers.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes: every row, in well under a minute")
    parser.add_argument("--only", choices=("speed", "quality", "all"), default="all")
    parser.add_argument("--steps", type=int, default=None, help="override the quality budget (steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=None, help="measure only these flows")
    parser.add_argument("--targets", nargs="+", default=None, help="quality targets (gmm<D> or a 2D toy name)")
    parser.add_argument("--dims", nargs="+", type=int, default=None, help="override the speed dimensions")
    args = parser.parse_args(argv)

    cfg = SMOKE if args.smoke_test else Config()
    if args.steps is not None:
        cfg = replace(cfg, quality_steps=args.steps)
    if args.flows is not None:
        cfg = replace(cfg, flows=tuple(args.flows))
    if args.threads is not None:
        cfg = replace(cfg, threads=args.threads)
    if args.targets is not None:
        cfg = replace(cfg, targets=tuple(args.targets))
    if args.dims is not None:
        cfg = replace(cfg, dims=tuple(args.dims))
    torch.set_num_threads(cfg.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    start = time.perf_counter()
    speed = run_speed(cfg) if args.only in ("speed", "all") else []
    quality = run_quality(cfg) if args.only in ("quality", "all") else []
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(cfg, speed, quality, command, args.smoke_test, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
