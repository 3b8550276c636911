"""Images per second of a Glow training step: pyro_nf in each mode of its training step beside normflows and nflows.

``python benchmarks/images.py --throughput`` runs :func:`throughput`. Every row times one training step
(forward, backward, gradient clipping for pyro_nf's modes, Adam) of the same Glow — by default the default MNIST
Glow of pyro_nf's training configuration, ``glow((1, 28, 28), levels=2, depth=16, hidden_channels=256)`` — at
``--batch-size`` on one fixed batch, over ``--steps`` steps after ``--warmup`` untimed ones (the first of which
compiles or captures; its time is reported apart), with a device synchronisation around the timed steps.

pyro_nf's modes are those of :class:`pyro_nf.training.step.TrainingStep`:

- ``eager``: the step as written, with ``torch.optim.Adam`` as built (as normflows' and nflows' rows);
- ``eager + fused Adam``: Adam's fused implementation (one kernel per update);
- ``eager + channels_last``: the networks' weights and the batch in the ``channels_last`` memory format;
- ``bf16``: the coupling networks under bf16 autocast (maps, log-dets and loss in float32);
- ``compiled``: the flow's blocks compiled (``pyro_nf.compiled.compile_flow``, inductor), fused Adam;
- ``compiled whole``: the whole loss compiled as one graph (``TrainingStep(compile="whole")``), fused Adam;
- ``captured``: the whole step recorded as one CUDA graph and replayed (CUDA only), capturable fused Adam;

and their combinations. A mode that fails gets its error in the table; the others keep their numbers. With
``--time-budget-s`` the modes still to run when the budget is spent are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyro_nf.metrics import bits_per_dim
from pyro_nf.training.step import TrainingStep

MNIST_SHAPE = (1, 28, 28)

MODES: dict[str, dict[str, Any]] = {
    "eager": {},
    "eager + fused Adam": {"fused_optimizer": True},
    "eager + channels_last": {"channels_last": True},
    "bf16": {"precision": "bf16"},
    "compiled": {"compile": True},
    "compiled + bf16": {"compile": True, "precision": "bf16"},
    "captured": {"cuda_graph": True},
    "captured + bf16": {"cuda_graph": True, "precision": "bf16"},
    "compiled + captured": {"compile": True, "cuda_graph": True},
    "compiled + captured + bf16": {"compile": True, "cuda_graph": True, "precision": "bf16"},
    "compiled whole": {"compile": "whole"},
    "compiled whole + captured": {"compile": "whole", "cuda_graph": True},
    "compiled whole + captured + bf16": {"compile": "whole", "cuda_graph": True, "precision": "bf16"},
}
"""pyro_nf's modes: the :class:`TrainingStep` options of each (``channels_last`` is the memory format)."""


class Clock:
    """Seconds, after a device synchronisation on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _set_up(
    make: Callable[..., Any], args: argparse.Namespace, device: torch.device, channels_last: bool
) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor], torch.optim.Optimizer, Tensor]:
    """The seeded Glow of one row on ``device`` (in ``channels_last`` if asked), its Adam and its batch."""
    torch.manual_seed(args.seed)
    model, log_prob, _ = make(args.depth, args.hidden, MNIST_SHAPE, args.levels)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, log_prob, torch.optim.Adam(model.parameters(), lr=1e-4), _batch(args, device, channels_last)


def _batch(args: argparse.Namespace, device: torch.device, channels_last: bool) -> Tensor:
    y = torch.rand(args.batch_size, *MNIST_SHAPE, generator=torch.Generator().manual_seed(args.seed)).to(device)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def _time(step: Callable[[], object], args: argparse.Namespace, clock: Clock) -> tuple[float, float]:
    """``(seconds of the first call, seconds per step over the timed steps)``."""
    start = clock()
    step()
    first = clock() - start
    for _ in range(max(0, args.warmup - 1)):
        step()
    start = clock()
    for _ in range(args.steps):
        step()
    return first, (clock() - start) / args.steps


def pyro_nf_mode(mode: str, make: Callable[..., Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One row: pyro_nf's Glow trained in ``mode`` (a key of :data:`MODES`)."""
    options = dict(MODES[mode])
    channels_last = options.pop("channels_last", False)
    if options.get("compile"):
        options["compile_options"] = {"backend": getattr(args, "compile_backend", "inductor")}
    model, log_prob, optimizer, y = _set_up(make, args, device, channels_last)
    step = TrainingStep(
        model, optimizer, lambda y: bits_per_dim(log_prob(y), MNIST_SHAPE, 256).mean(), grad_clip=50.0, **options
    )
    first, seconds = _time(lambda: step(y), args, Clock(device))
    loss = float(step(y)[0])
    return _row("pyro_nf", mode, model, seconds, first, args, loss)


def library_row(
    name: str, make: Callable[..., Any], args: argparse.Namespace, device: torch.device, channels_last: bool = False
) -> dict[str, Any]:
    """One row: another library's Glow, its plain training step (zero_grad, backward, Adam)."""
    model, log_prob, optimizer, y = _set_up(make, args, device, channels_last)
    losses: list[Tensor] = []

    def step() -> None:
        loss = bits_per_dim(log_prob(y), MNIST_SHAPE, 256).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    first, seconds = _time(step, args, Clock(device))
    mode = "eager + channels_last" if channels_last else "eager"
    return _row(name, mode, model, seconds, first, args, float(losses[-1]))


def _row(
    library: str, mode: str, model: torch.nn.Module, seconds: float, first: float, args: argparse.Namespace, loss: float
) -> dict[str, Any]:
    return {
        "library": library,
        "mode": mode,
        "parameters": sum(p.numel() for p in model.parameters()),
        "images_per_s": args.batch_size / seconds,
        "ms_per_step": 1e3 * seconds,
        "first_step_s": first,
        "loss_bpd": loss,
    }


def _failed(library: str, mode: str, why: str) -> dict[str, Any]:
    return {"library": library, "mode": mode, "error": why.replace("|", "/").replace("\n", " ")[:240]}


def throughput(args: argparse.Namespace, makers: dict[str, Callable[..., Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown table and its rows (also written to ``--output``, ``--json`` and the ``--docs`` page)."""
    device = torch.device(args.device)
    wanted = [m.strip() for m in args.modes.split(",")] if args.modes else list(MODES)
    unknown = [m for m in wanted if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown mode(s) {unknown}; expected any of {list(MODES)}")
    deadline = time.perf_counter() + args.time_budget_s if args.time_budget_s else math.inf
    rows: list[dict[str, Any]] = []

    def guarded(library: str, mode: str, run: Callable[[], dict[str, Any]]) -> None:
        if time.perf_counter() > deadline:
            rows.append(_failed(library, mode, "skipped: the time budget was spent"))
            return
        try:
            rows.append(run())
        except ImportError:
            return  # a library that is not installed is left out
        except Exception as error:  # report the failure, keep the other rows
            rows.append(_failed(library, mode, f"failed: {type(error).__name__}: {error}"))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(_format_row(rows[-1], None) if rows else "", flush=True)

    for name in ("normflows", "nflows"):
        if name in makers:
            guarded(name, "eager", lambda name=name: library_row(name, makers[name], args, device))
    for mode in wanted:
        if MODES[mode].get("cuda_graph") and device.type != "cuda":
            rows.append(_failed("pyro_nf", mode, "needs a CUDA device"))
            continue
        guarded("pyro_nf", mode, lambda mode=mode: pyro_nf_mode(mode, makers["pyro_nf"], args, device))
    if "eager + channels_last" in wanted and "normflows" in makers:
        guarded(
            "normflows",
            "eager + channels_last",
            lambda: library_row("normflows", makers["normflows"], args, device, channels_last=True),
        )
    table = format_table(rows, args, device)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header(args, device), "rows": rows}, indent=1) + "\n")
    if args.docs:
        write_docs_block(Path(args.docs), f"throughput-{device.type}", command_line() + "\n\n" + table)
    return table, rows


def header(args: argparse.Namespace, device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    return (
        f"Glow training step on MNIST (1x28x28): {args.levels} levels x depth {args.depth}, hidden {args.hidden}, "
        f"affine couplings, batch {args.batch_size}; {args.steps} timed steps after {args.warmup} warm-up steps "
        f"(the first one compiles or captures: 'first step'); {where}, torch {torch.__version__}"
    )


def _rate(images_per_s: float) -> str:
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.1f}"


def _format_row(row: dict[str, Any], reference: float | None) -> str:
    if "error" in row:
        return f"| {row['library']} | {row['mode']} | — | — | — | — | {row['error']} |"
    ratio = f"{row['images_per_s'] / reference:.2f}" if reference else "—"
    return (
        f"| {row['library']} | {row['mode']} | {row['parameters']} | {_rate(row['images_per_s'])} | "
        f"{row['ms_per_step']:.1f} | {row['first_step_s']:.1f} | {ratio} |"
    )


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> str:
    reference = next(
        (r["images_per_s"] for r in rows if r["library"] == "normflows" and r["mode"] == "eager" and "error" not in r),
        None,
    )
    lines = [
        header(args, device),
        "",
        "| library | mode | parameters | images / s | ms / step | first step, s | × normflows eager |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(lines + [_format_row(r, reference) for r in rows])


def command_line() -> str:
    """The command that ran, as a text block for the docs."""
    argv = " ".join(sys.argv[1:])
    return f"```text\npython benchmarks/{Path(sys.argv[0]).name} {argv}\n```"


def write_docs_block(path: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path`` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    page = path.read_text() if path.exists() else ""
    block = f"{start}\n{text}\n{end}"
    if start in page and end in page:
        before, rest = page.split(start, 1)
        page = before + block + rest.split(end, 1)[1]
    else:
        page = page.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(page)
