"""The training loop: warm-up, clipping, logging, progress, validation, checkpoints and the final metrics.

See :mod:`pyro_nf.training` for the objective and the files a run writes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from pyro_nf.checkpoint import Checkpoint, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from pyro_nf.checks import validation
from pyro_nf.registry import FLOWS
from pyro_nf.training.config import ConfigError, NonFiniteLossError, TrainConfig
from pyro_nf.training.data import PreparedData, prepare_data, preprocess_from_state
from pyro_nf.training.distributed import DistributedContext, _resolve_device
from pyro_nf.training.figures import _figures
from pyro_nf.training.model import _generator, _metric, _metric_name, build_model, evaluate_nll

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What :func:`train` reports."""

    out: Path
    steps: int
    metrics: dict[str, float]
    files: list[Path] = field(default_factory=list)


class _ConsoleHandler(logging.Handler):
    """Prints to stdout through ``tqdm.write``, so messages do not tear a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a closed or broken stdout must not stop training
            self.handleError(record)


class _RunLog:
    """``train.log`` (and the console) for rank 0; silent elsewhere."""

    def __init__(self, out: Path | None) -> None:
        self.logger = logging.getLogger(f"pyro_nf.train.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.handlers: list[logging.Handler] = []
        if out is not None:
            file_handler = logging.FileHandler(out / "train.log", mode="a", encoding="utf-8")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            console: logging.Handler = _ConsoleHandler()
            console.setFormatter(logging.Formatter("%(message)s"))
            console.addFilter(lambda record: getattr(record, "console", True))
            self.handlers = [file_handler, console]
        else:
            self.handlers = [logging.NullHandler()]
        for handler in self.handlers:
            self.logger.addHandler(handler)

    def info(self, message: str, *, console: bool = True) -> None:
        self.logger.info(message, extra={"console": console})

    def close(self) -> None:
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()


def _batches(n: int, batch_size: int, seed: int, start_step: int) -> Iterator[tuple[int, Tensor]]:
    """``(step, indices of the global batch)`` from ``start_step`` on; each epoch is a fresh permutation.

    The order is a function of (seed, epoch) only, so a resumed run and every
    process of a distributed run draw the same batches.
    """
    per_epoch = n // batch_size
    step = start_step
    epoch, permutation = -1, torch.empty(0, dtype=torch.long)
    while True:
        current, offset = divmod(step, per_epoch)
        if current != epoch:
            epoch = current
            permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch + 1))
        yield step, permutation[offset * batch_size : (offset + 1) * batch_size]
        step += 1


def _history_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run (or resume) the training that ``config`` describes; see :mod:`pyro_nf.training`.

    A folder that already holds a checkpoint is continued with ``resume=True``
    or replaced with ``overwrite=True``; otherwise it is left alone.

    Raises:
        ConfigError: the configuration cannot run on this data.
        NonFiniteLossError: the loss or gradient became NaN or infinite.

    Example::

        >>> import tempfile
        >>> from pyro_nf.training import resolve_config
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     config = resolve_config({"flow": "realnvp", "data": "moons", "out": tmp, "steps": 5,
        ...                              "n_train": 512, "n_val": 256, "n_test": 256, "hidden": [8],
        ...                              "num_transforms": 2, "progress": False, "num_samples": 100})
        ...     result = train(config)  # doctest: +ELLIPSIS
        pyro-nf: ...
        >>> result.steps, sorted(result.metrics)
        (5, ['test_nll', 'val_nll'])
    """
    existing = Path(config.out) / "checkpoint.pt"
    if not resume and not overwrite and existing.exists():
        raise ConfigError(
            f"{config.out} already holds a run ({existing}); pass --resume to continue it, --overwrite to "
            "start again in it, or choose another --out"
        )
    context = DistributedContext.from_env(config.device)
    try:
        return _train(config, context, resume)
    finally:
        context.close()


def _train(config: TrainConfig, context: DistributedContext, resume: bool) -> TrainResult:
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    device = _resolve_device(config.device, context)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    image_flow = FLOWS[config.flow].kind == "image"

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    data = prepare_data(config, image_flow=image_flow)
    if config.batch_size % context.world_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} must be a multiple of the number of processes ({context.world_size})"
        )
    per_epoch = len(data.train) // config.batch_size
    if per_epoch < 1:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the training set ({len(data.train)} samples)"
        )
    if config.epochs is not None and not config.steps:
        config.steps = config.epochs * per_epoch

    checkpoint: Checkpoint | None = None
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        data.preprocess = preprocess_from_state(checkpoint.extra["preprocess"])
    model = build_model(config, data).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model)
        optimizer.load_state_dict(checkpoint.optimizer)
        start = checkpoint.step
        if start > config.steps:
            raise ConfigError(f"the checkpoint is at step {start}, past --steps {config.steps}; give more steps")

    main = context.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures").mkdir(exist_ok=True)
    log = _RunLog(out if main else None)
    history_path = out / "history.csv"
    curves: dict[str, list[float]] = {"steps": [], "train": [], "val": []}
    metric = _metric_name(data)
    try:
        if checkpoint is not None:
            curves = {key: list(map(float, values)) for key, values in checkpoint.extra["curves"].items()}
            if main:
                rows = [row for row in _history_rows(history_path) if int(row["step"]) <= start]
                _write_history(history_path, rows)
            rank_states = checkpoint.extra.get("rank_rng")
            restore_rng_state(checkpoint.rng)
            if rank_states is not None and len(rank_states) == context.world_size:
                torch.set_rng_state(rank_states[context.rank])
            log.info(f"pyro-nf: resuming {config.flow} on {data.description} at step {start} of {config.steps}")
        else:
            if main:
                _write_history(history_path, [])
            # Data-dependent initialisation (ActNorm) sees the first global batch, on every process alike.
            first = next(_batches(len(data.train), config.batch_size, config.seed, 0))[1]
            with torch.no_grad():
                x0 = data.train[first].to(device)
                _metric(model, data, data.preprocess.to_model(x0, _generator(config.seed, -1)))
            if context.world_size > 1:
                torch.manual_seed(config.seed + 7919 * context.rank)
            log.info(
                f"pyro-nf: training {config.flow} on {data.description} ({len(data.train)} train, "
                f"{len(data.val)} val, {len(data.test)} test, shape {data.event_shape}) for {config.steps} steps "
                f"on {device}" + (f" x {context.world_size} processes" if context.world_size > 1 else "")
            )
        if main:
            resolved = {
                **config.to_dict(),
                "resolved": {
                    "event_shape": list(data.event_shape),
                    "n_train": len(data.train),
                    "n_val": len(data.val),
                    "n_test": len(data.test),
                    "steps_per_epoch": per_epoch,
                    "world_size": context.world_size,
                    "device": str(device),
                    "preprocess": _jsonable(data.preprocess.state()),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "pyro_nf_version": _version(),
                },
            }
            _atomic_write_text(out / "config.json", json.dumps(resolved, indent=2) + "\n")

        ddp: nn.Module = model
        if context.world_size > 1:
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

        share = config.batch_size // context.world_size
        lo, hi = context.rank * share, (context.rank + 1) * share
        interval: list[float] = []
        last_saved = start if checkpoint is not None else None
        progress = _progress(config, start, main)
        window_start, window_steps = time.perf_counter(), 0
        clip = config.grad_clip if config.grad_clip > 0 else math.inf
        model.train()
        batches = _batches(len(data.train), config.batch_size, config.seed, start)

        def stop(what: str) -> None:
            kept = f"the last good checkpoint (step {last_saved}) is kept at {checkpoint_path}"
            if last_saved is None:
                kept = "no checkpoint had been written yet"
            message = (
                f"{what}; training stopped and {kept}. Try a lower --lr (now {config.lr:g}), more --warmup-steps "
                f"(now {config.warmup_steps}), gradient clipping (--grad-clip, now {config.grad_clip:g})"
                + (", or --coupling additive" if image_flow else "")
            )
            log.info(f"pyro-nf: error: {message}", console=False)  # the command line prints it
            raise NonFiniteLossError(message)

        for step, indices in batches:
            if step >= config.steps:
                break
            lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = data.train[indices].to(device)
            # The whole global batch is preprocessed (same noise as one process would draw), then sliced.
            y = data.preprocess.to_model(x, _generator(config.seed, step))[lo:hi]
            # The data were checked when loaded; unchecked layers and base let a NaN reach the loss test below.
            with validation(False), pyro.validation_enabled(False):
                loss = _metric(ddp, data, y).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            reported = context.mean(torch.stack([loss.detach(), grad_norm.detach().to(loss)]))
            loss_value, norm_value = float(reported[0]), float(reported[1])
            if not math.isfinite(loss_value):
                stop(f"the loss became {loss_value} at step {step + 1}")
            if not math.isfinite(norm_value):
                stop(f"the gradient norm became {norm_value} at step {step + 1}")
            optimizer.step()
            done = step + 1
            interval.append(loss_value)
            window_steps += 1
            if main and (done % config.log_every == 0 or done == config.steps):
                _append_history(history_path, done, loss_value, lr, norm_value)
            if progress is not None:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                progress.set_postfix(
                    {metric: f"{loss_value:.4f}", "samples/s": f"{window_steps * config.batch_size / elapsed:.0f}"},
                    refresh=False,
                )
                progress.update(1)
                if elapsed > 5.0:
                    window_start, window_steps = time.perf_counter(), 0
            if done % config.val_every == 0 or done == config.steps:
                if main:
                    val = evaluate_nll(model, data, data.val, seed=config.seed + 1)
                    curves["steps"].append(float(done))
                    curves["train"].append(float(np.mean(interval)))
                    curves["val"].append(val)
                    log.info(f"step {done}: train {metric} {np.mean(interval):.4f}, val {metric} {val:.4f}")
                    with torch.random.fork_rng(devices=[]):
                        _figures(model, data, out, config, f"figures/step_{done:06d}.png", curves)
                interval = []
            if done % config.checkpoint_every == 0 or done == config.steps:
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    stop(f"the parameters became non-finite at step {done}")
                _save(checkpoint_path, model, optimizer, done, config, data, curves, context)
                last_saved = done
        if progress is not None:
            progress.close()
        metrics: dict[str, float] = {}
        files: list[Path] = []
        if main:
            last_figure = out / "figures" / f"step_{config.steps:06d}.png"
            if curves["steps"] and curves["steps"][-1] == config.steps and last_figure.exists():
                # The validation at the last step already scored this model and drew its figure.
                val_value = curves["val"][-1]
                shutil.copyfile(last_figure, out / "samples.png")
                files = [out / "samples.png", out / "curves.png"]
            else:
                val_value = evaluate_nll(model, data, data.val, seed=config.seed + 1)
                with torch.random.fork_rng(devices=[]):
                    files = _figures(model, data, out, config, "samples.png", curves)
            metrics = {
                f"val_{metric}": val_value,
                f"test_{metric}": evaluate_nll(model, data, data.test, seed=config.seed + 2),
            }
            _atomic_write_text(out / "metrics.json", json.dumps({"step": config.steps, **metrics}, indent=2) + "\n")
            files += [out / name for name in ("metrics.json", "checkpoint.pt", "config.json", "train.log")]
            unit = "bits/dim" if metric == "bpd" else "nats"
            log.info(
                f"pyro-nf: done, {config.steps} steps. val {metric} {metrics[f'val_{metric}']:.4f} {unit}, "
                f"test {metric} {metrics[f'test_{metric}']:.4f} {unit}"
            )
            log.info(f"pyro-nf: outputs in {out}/: " + ", ".join(p.name for p in files))
        return TrainResult(out, config.steps, metrics, files)
    finally:
        log.close()


def _version() -> str:
    from pyro_nf import __version__

    return __version__


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value.tolist() if isinstance(value, Tensor) else value for key, value in state.items()}


def _progress(config: TrainConfig, start: int, main: bool) -> Any:
    if not (config.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=f"{config.flow}", unit="step", dynamic_ncols=True)


def _write_history(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "loss", "lr", "grad_norm"])
        writer.writeheader()
        writer.writerows(rows)


def _append_history(path: Path, step: int, loss: float, lr: float, norm: float) -> None:
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerow([step, repr(loss), repr(lr), repr(norm)])


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _save(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    data: PreparedData,
    curves: dict[str, list[float]],
    context: DistributedContext,
) -> None:
    """Every process takes part (their generator states are gathered); rank 0 writes."""
    rank_rng: list[Tensor] | None = None
    if context.world_size > 1:
        state = torch.get_rng_state()
        gathered = [torch.empty_like(state) for _ in range(context.world_size)]
        torch_dist.all_gather_object(gathered, state)
        rank_rng = [t.cpu() for t in gathered]
    if not context.is_main:
        return
    extra: dict[str, Any] = {
        "preprocess": data.preprocess.state(),
        "event_shape": list(data.event_shape),
        "data_kind": data.kind,
        "curves": {key: list(values) for key, values in curves.items()},
    }
    if rank_rng is not None:
        extra["rank_rng"] = rank_rng
    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    save_checkpoint(
        path,
        Checkpoint(state_dict, optimizer.state_dict(), step, capture_rng_state(), config.to_dict(), extra),
    )
