"""RNODE study: does kinetic + Jacobian regularisation make FFJORD's field cheaper to solve, at equal NLL?

Run ``python benchmarks/rnode.py --out outputs/rnode.md --plot outputs/rnode.png`` (``--device cuda`` for the
GPU; ``--smoke-test`` runs every configuration at tiny sizes in seconds).

Each configuration trains pyro_nf's FFJORD (``ffjord(2, [64, 64, 64])``, Hutchinson trace, adjoint) in its
own process (one CPU thread each, or all sharing one GPU), so the runs go in parallel:

- ``ffjord``: no regularisation, dopri5 at ``rtol = atol = 1e-5``;
- ``rnode-λ``: ``kinetic_energy = jacobian_norm = λ`` (Finlay et al. 2020), dopri5;
- ``rk4-…``: the same trained on a fixed RK4 grid (``step_size`` 0.25, four steps), as RNODE does.

Every ``--eval-every`` steps a run measures the test NLL (exact trace) and the number of function
evaluations (NFE) of that test solve, always with dopri5 at ``rtol = atol = 1e-5``: the evaluation NFE is
how costly the learned dynamics are to solve, whatever the training solver. A run stops after ``--steps``
steps or once ``--budget-s`` wall seconds have passed, and still reports.

Reported per data set: at the last evaluation step every run reached, the test NLL and the evaluation
NFE (and its ratio to the unregularised run's); the training NFE per step (forward + adjoint) and the
time per step; and, for a common target NLL (the worst of the runs' best test NLL, so that every run
reaches it), the step, training wall time and cumulative training NFE at which each run first reached it.
One PNG shows the test NLL and the evaluation NFE over the steps.

Grathwohl et al., "FFJORD", ICLR 2019. Finlay et al., "How to train your neural ODE: the world of Jacobian
and kinetic regularization", ICML 2020.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ffjord import TOL, Trainer, build_pyro_nf, make_data, ms_per_nfe, synchronize  # noqa: E402

CONFIG = re.compile(r"(rk4-)?(ffjord|rnode-(\d+(?:\.\d*)?(?:e-?\d+)?))")
DEFAULT_CONFIGS = ["ffjord", "rnode-0.01", "rnode-0.1", "rnode-1", "rk4-rnode-0.1"]


def config_options(config: str) -> dict[str, object]:
    """The :func:`pyro_nf.transforms.ffjord` options of a configuration name such as ``rk4-rnode-0.1``."""
    match = CONFIG.fullmatch(config)
    if match is None:
        raise ValueError(f"config: expected '[rk4-]ffjord' or '[rk4-]rnode-<λ>' (e.g. 'rnode-0.1'), got {config!r}")
    options: dict[str, object] = {}
    if match.group(1):
        options.update(solver="rk4", step_size=0.25, eval_solver="dopri5")
    if match.group(3):
        weight = float(match.group(3))
        options.update(kinetic_energy=weight, jacobian_norm=weight)
    return options


def worker(args: argparse.Namespace) -> None:
    """Train one configuration on one data set; write its record as JSON to ``args.record``."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    device = torch.device(args.device)
    data = make_data(args.data)
    test = data.sample(args.n_test, torch.Generator().manual_seed(123)).to(device)
    torch.manual_seed(args.seed)
    trainer = Trainer(build_pyro_nf(data.dim, device, **config_options(args.config)), data, args.batch, args.lr, device)
    trainer.evaluate(test)
    synchronize(device)
    error = ""
    try:
        while trainer.steps < args.steps:
            trainer.step()
            out_of_time = time.perf_counter() - started > args.budget_s
            if trainer.steps % args.eval_every == 0 or out_of_time:
                trainer.evaluate(test)
                print(f"{args.data} {args.config} step {trainer.steps}: {trainer.run.curve[-1]}", flush=True)
            if out_of_time:
                break
        if trainer.run.curve[-1][0] != trainer.steps:
            trainer.evaluate(test)
    except (AssertionError, RuntimeError, ValueError) as exc:  # "underflow in dt", a non-finite state: keep the curve
        error = f"{type(exc).__name__}: {exc}"[:80]
        print(f"{args.data} {args.config} stopped at step {trainer.steps}: {error}", flush=True)
    run, nan = trainer.run, math.nan
    record = {
        "data": args.data,
        "config": args.config,
        "seed": args.seed,
        "device": str(device),
        "steps": trainer.steps,
        "curve": run.curve,
        "ms_per_step": 1e3 * statistics.median(run.step_times[len(run.step_times) // 2 :]) if run.step_times else nan,
        "ms_per_nfe": ms_per_nfe(run) if run.step_times else nan,
        "nfe_train": statistics.mean(f + b for f, b in zip(run.nfe_forward[-100:], run.nfe_backward[-100:]))
        if run.step_times
        else nan,  # the last 100 steps
        "seconds": time.perf_counter() - started,
        "error": error,
    }
    Path(args.record).write_text(json.dumps(record))


def launch(args: argparse.Namespace, folder: Path) -> list[dict]:
    """Run every (data set, configuration) in its own process, at most ``args.jobs`` at once."""
    jobs = [(data, config, seed) for seed in args.seeds for data in args.data for config in args.configs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, records = list(jobs), []
    running: list[tuple[subprocess.Popen[bytes], Path, IO[str]]] = []
    shared = [
        *("--device", args.device, "--steps", str(args.steps), "--batch", str(args.batch)),
        *("--lr", str(args.lr), "--eval-every", str(args.eval_every), "--n-test", str(args.n_test)),
        *("--budget-s", str(args.budget_s)),
    ]
    while pending or running:
        while pending and len(running) < args.jobs:
            data, config, seed = pending.pop(0)
            record = folder / f"{data}-{config}-{seed}.json"
            command = [sys.executable, __file__, "--worker", "--data", data, "--config", config, "--seed", str(seed)]
            command += [*shared, "--record", str(record)]
            out: IO[str] = open(folder / f"{data}-{config}-{seed}.log", "w")  # noqa: SIM115
            running.append((subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT), record, out))
        time.sleep(0.2)
        for item in list(running):
            process, record, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            if process.returncode == 0 and record.exists():
                records.append(json.loads(record.read_text()))
            else:
                tail = Path(log.name).read_text()[-2000:]
                print(f"{record.stem} failed (exit {process.returncode}):\n{tail}", file=sys.stderr, flush=True)
    return records


def report(records: list[dict], args: argparse.Namespace) -> str:
    """The markdown table of the study."""
    lines = [
        f"RNODE study: pyro_nf FFJORD, field 3 x 64, Hutchinson trace, adjoint; up to {args.steps} Adam steps "
        f"(lr {args.lr}, batch {args.batch}) or {args.budget_s:.0f} s per run, one process per run on "
        f"{args.device}{' (1 thread each)' if args.device == 'cpu' else ''}. Test NLL (nats, exact trace) and "
        f"evaluation NFE with dopri5 at rtol = atol = {TOL} on {args.n_test} held-out points. "
        "Target = the worst of the runs' best test NLL.",
        "",
        "| data | seed | run | steps | NLL @ S | eval NFE @ S | NFE ratio | train NFE / step | ms / step | "
        "ms / NFE | target | step to target | train s to target | train NFE to target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = [(data, seed) for seed in args.seeds for data in args.data]
    for data, seed in groups:
        runs = [r for r in records if r["data"] == data and r["seed"] == seed]
        if not runs:
            continue
        common = min(r["curve"][-1][0] for r in runs)  # the last step every run evaluated (S)
        at_common = {r["config"]: max((p for p in r["curve"] if p[0] <= common), key=lambda p: p[0]) for r in runs}
        trained = [_trained(r["curve"]) for r in runs]
        target = max((min(p[3] for p in points) for points in trained if points), default=math.nan)
        baseline = at_common.get("ffjord")
        for r, points in zip(runs, trained):
            point = at_common[r["config"]]
            ratio = f"{baseline[4] / max(1, point[4]):.2f}x" if baseline is not None else "—"
            reached = next((f"{p[0]} | {p[1]:.1f} | {p[2]}" for p in points if p[3] <= target), "— | — | —")
            steps = f"{r['steps']} (stopped: {r['error']})" if r["error"] else str(r["steps"])
            lines.append(
                f"| {data} | {seed} | {r['config']} | {steps} | {point[3]:.3f} (S={point[0]}) | {point[4]} | {ratio} | "
                f"{r['nfe_train']:.0f} | {r['ms_per_step']:.1f} | {r['ms_per_nfe']:.2f} | {target:.3f} | {reached} |"
            )
    lines += ["", *pairwise(records, groups)]
    return "\n".join(lines) + "\n"


def _trained(curve: list[list[float]]) -> list[list[float]]:
    """The evaluations after training started (step > 0) with a finite test NLL."""
    return [p for p in curve if p[0] > 0 and math.isfinite(p[3])]


def _first_reaching(curve: list[list[float]], target: float) -> list[float] | None:
    return next((p for p in _trained(curve) if p[3] <= target), None)


def pairwise(records: list[dict], groups: list[tuple[str, int]]) -> list[str]:
    """Each run against the unregularised ``ffjord`` run of the same data and seed, at a common NLL.

    The target is the worse of the two runs' best test NLL, so both reach it; the table gives what
    each spent to get there (training NFE, training seconds) and the evaluation NFE of the test solve
    at that point, with the ratios ffjord / run (above 1: the run is cheaper).
    """
    lines = [
        "Against plain FFJORD (same data and seed): target = the worse of the two runs' best test NLL; "
        "ratios are ffjord / run.",
        "",
        "| data | seed | run | target NLL | train NFE to target (ffjord → run) | ratio | "
        "train s to target (ffjord → run) | ratio | eval NFE there (ffjord → run) | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for data, seed in groups:
        runs = {r["config"]: r for r in records if r["data"] == data and r["seed"] == seed}
        base = runs.get("ffjord")
        if base is None:
            continue
        for config, r in runs.items():
            if config == "ffjord":
                continue
            best = [min((p[3] for p in _trained(run["curve"])), default=math.nan) for run in (base, r)]
            target = max(best)
            a, b = _first_reaching(base["curve"], target), _first_reaching(r["curve"], target)
            if a is None or b is None:
                lines.append(f"| {data} | {seed} | {config} | {target:.3f} | — | — | — | — | — | — |")
                continue
            lines.append(
                f"| {data} | {seed} | {config} | {target:.3f} | {a[2]} → {b[2]} | {a[2] / max(1, b[2]):.2f}x | "
                f"{a[1]:.1f} → {b[1]:.1f} | {a[1] / max(1e-9, b[1]):.2f}x | {a[4]} → {b[4]} | "
                f"{a[4] / max(1, b[4]):.2f}x |"
            )
    return lines


def plot(records: list[dict], datasets: list[str], path: Path) -> None:
    """Test NLL and evaluation NFE over the steps, one row per data set, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in datasets if any(r["data"] == d for r in records)]
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.2 * len(datasets)), squeeze=False)
    for row, data in zip(axes, datasets):
        several = len({r["seed"] for r in records}) > 1
        for r in (r for r in records if r["data"] == data):
            steps = [p[0] for p in r["curve"]]
            label = f"{r['config']} (seed {r['seed']})" if several else r["config"]
            row[0].plot(steps, [p[3] for p in r["curve"]], label=label)
            row[1].plot(steps, [p[4] for p in r["curve"]], label=label)
        nll = [p[3] for r in records if r["data"] == data for p in r["curve"] if p[0] > 0]
        if nll:
            low = min(nll)
            row[0].set_ylim(low - 0.05, min(max(nll), low + 1.5) + 0.05)
        row[0].set(title=f"{data}: test NLL", xlabel="step", ylabel="nats")
        row[1].set(title=f"{data}: NFE of the dopri5 test solve", xlabel="step", ylabel="NFE")
        row[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--data", nargs="+", default=["8gaussians", "moons"], help="2D toys and/or gmm<D>")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="[rk4-]ffjord or [rk4-]rnode-<λ>")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--budget-s", type=float, default=math.inf, help="wall seconds per run (it still reports)")
    parser.add_argument("--jobs", type=int, default=0, help="processes at once (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of a run (with --seeds: ignored)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run every configuration once per seed")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--plot", type=Path, default=None, help="write the PNG here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.data = args.data if isinstance(args.data, str) else args.data[0]
        worker(args)
        return ""
    args.seeds = args.seeds or [args.seed]
    for config in args.configs:
        config_options(config)  # a bad name fails here, not in every worker
    for data in args.data:
        make_data(data)
    if args.smoke_test:
        args.data, args.steps, args.batch, args.eval_every, args.n_test = args.data[:1], 2, 16, 1, 32
    runs = len(args.data) * len(args.configs) * len(args.seeds)
    args.jobs = args.jobs or runs
    with tempfile.TemporaryDirectory() as folder:
        records = launch(args, Path(folder))
    records.sort(
        key=lambda r: (args.seeds.index(r["seed"]), args.data.index(r["data"]), args.configs.index(r["config"]))
    )
    text = report(records, args)
    print(text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.plot is not None and records:
        plot(records, args.data, args.plot)
    if len(records) < runs:
        raise SystemExit(f"{runs - len(records)} run(s) failed")
    return text


if __name__ == "__main__":
    main()
