"""The training loop: set-up, steps, validation, checkpoints and the final metrics, in that order.

:func:`train` builds a :class:`_Run` and runs its phases:

1. :meth:`_Run.set_up` — the device (resolved once), the data, the model and the optimizer,
   the checkpoint of a resumed run, the run folder, ``config.json``;
2. :meth:`_Run.step` — one optimizer step (warm-up, clipping, the NaN / inf stop);
3. :meth:`_Run.validate` — the validation metric, a figure and the curves;
4. :meth:`_Run.save` — a checkpoint;
5. :meth:`_Run.finish` — the final validation and test metrics, ``metrics.json``, the figures.

See :mod:`pyro_nf.training` for the objective and the files a run writes.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from pyro_nf.checkpoint import Checkpoint, save_checkpoint
from pyro_nf.checks import validation
from pyro_nf.registry import FLOWS
from pyro_nf.rng import capture_rng_state, restore_rng_state
from pyro_nf.training.config import ConfigError, NonFiniteLossError, TrainConfig, TrainingInterrupted
from pyro_nf.training.data import batch_order, on_device, prepare_data, preprocess_from_state
from pyro_nf.training.distributed import DistributedContext
from pyro_nf.training.figures import _figures
from pyro_nf.training.model import _generator, _metric, _metric_name, build_model
from pyro_nf.training.objective import Objective, evaluate_with_nfe
from pyro_nf.training.progress import TimeEstimate, make_progress
from pyro_nf.training.run_folder import RunFolder, RunOptions, StopSignals, remove_run_temporaries, stopped_error
from pyro_nf.training.run_log import (
    RunLog,
    append_history,
    atomic_write_text,
    history_rows,
    write_config,
    write_history,
)
from pyro_nf.training.run_record import load_model_state, open_run
from pyro_nf.training.step import TrainingStep, read_interval, training_step

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What :func:`train` reports."""

    out: Path
    steps: int
    metrics: dict[str, float]
    files: list[Path] = field(default_factory=list)


def train(
    config: TrainConfig, *, resume: bool = False, overwrite: bool = False, allow_new_data: bool = False
) -> TrainResult:
    """Run (or resume) the training that ``config`` describes; see :mod:`pyro_nf.training`.

    A folder that already holds a run is continued with ``resume=True``
    or deleted and started again with ``overwrite=True``; otherwise it is
    left alone. The folder is locked while the run runs (a second run there
    is refused). A resume on data that differ from the run's (its
    fingerprint) is refused unless ``allow_new_data=True``. SIGTERM and
    SIGINT stop the run after the current step with a checkpoint
    (:class:`~pyro_nf.training.config.TrainingInterrupted`).

    Raises:
        ConfigError: the configuration cannot run on this data, or the run folder cannot be used.
        NonFiniteLossError: the loss or gradient became NaN or infinite.
        TrainingInterrupted: a signal stopped the run.

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
    context = DistributedContext.from_env(config.device)
    try:
        with StopSignals() as stop:
            run = _Run(config, context, resume, RunOptions(overwrite, allow_new_data, stop))
            try:
                run.set_up()
                run.run()
                result = run.finish()
            except (TrainingInterrupted, OSError) as error:
                raise stopped_error(error, run.out, run.last_saved, resume) from None
            finally:
                run.close()
    except BaseException:
        context.close(wait=False)
        raise
    context.close()
    return result


class _Run:
    """One training run, phase by phase (see the module docstring)."""

    def __init__(self, config: TrainConfig, context: DistributedContext, resume: bool, options: RunOptions) -> None:
        self.config = config
        self.context = context
        self.resume = resume
        self.options = options
        self.folder: RunFolder | None = None
        self.val_nfe: dict[int, float | None] = {}  # the NFE of each validation's solves (CNFs)
        self.device = context.device
        self.out = Path(config.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.history_path = self.out / "history.csv"
        self.main = context.is_main
        self.image_flow = FLOWS[config.flow].kind == "image"
        self.curves: dict[str, list[float]] = {"steps": [], "train": [], "val": []}
        self.interval: list[float] = []  # training losses since the last validation
        self.last_saved: int | None = None
        self.start = 0
        self.log = RunLog(None)
        self.progress: Any = None
        self.trainer: TrainingStep | None = None
        self.train_on_device: Tensor | None = None

    # -- 1. set-up -----------------------------------------------------------------------
    def set_up(self) -> None:
        """Data, the run folder (locked), the resumed state, model, optimizer and ``config.json``."""
        config, context = self.config, self.context
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        self.data = data = prepare_data(config, image_flow=self.image_flow)
        if config.batch_size % context.world_size:
            raise ConfigError(
                f"--batch-size {config.batch_size} must be a multiple of the number of processes ({context.world_size})"
            )
        self.per_epoch = len(data.train) // config.batch_size
        if self.per_epoch < 1:
            raise ConfigError(
                f"--batch-size {config.batch_size} is larger than the training set ({len(data.train)} samples)"
            )
        if config.epochs is not None and not config.steps:
            config.steps = config.epochs * self.per_epoch
        opened = open_run(config, context, self.resume, self.options, data)
        self.folder, checkpoint, self.fingerprint = opened.folder, opened.checkpoint, opened.fingerprint
        if checkpoint is not None:
            data.preprocess = preprocess_from_state(checkpoint.extra["preprocess"])
        self.model = build_model(config, data).to(self.device)
        self.objective = Objective(self.model, data, config)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        if checkpoint is not None:
            load_model_state(self.model, checkpoint, self.checkpoint_path)
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.start = self.last_saved = checkpoint.step
            if self.start > config.steps:
                raise ConfigError(
                    f"the checkpoint is at step {self.start}, past --steps {config.steps}; give more steps"
                )
        if self.main:
            (self.out / "figures").mkdir(exist_ok=True)
        self.log = RunLog(self.out if self.main else None)
        for note in opened.notes:
            self.log.info(f"pyro-nf: {note}")
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self._begin()
        if self.main:
            self._write_config()
        self.ddp: nn.Module = self.objective
        if context.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.objective, device_ids=device_ids)

    def _restore(self, checkpoint: Checkpoint) -> None:
        """Curves, history and random states of a resumed run."""
        self.curves = {key: list(map(float, values)) for key, values in checkpoint.extra["curves"].items()}
        if self.main:
            write_history(
                self.history_path, [r for r in history_rows(self.history_path) if int(r["step"]) <= self.start]
            )
        rank_states = checkpoint.extra.get("rank_rng")
        restore_rng_state(checkpoint.rng)
        if rank_states is not None and len(rank_states) == self.context.world_size:
            torch.set_rng_state(rank_states[self.context.rank])
        config, data = self.config, self.data
        self.log.info(f"pyro-nf: resuming {config.flow} on {data.description} at step {self.start} of {config.steps}")

    def _begin(self) -> None:
        """A new run: an empty history and the data-dependent initialisation (ActNorm)."""
        config, data, context = self.config, self.data, self.context
        if self.main:
            write_history(self.history_path, [])
        if config.objective == "likelihood":
            # Data-dependent initialisation (ActNorm) sees the first global batch, on every process alike.
            # Flow matching trains CNF fields only (no ActNorm): it skips this pass, a full ODE solve.
            first = next(batch_order(len(data.train), config.batch_size, config.seed, 0))[1]
            with torch.no_grad():
                x0 = data.train[first].to(self.device)
                _metric(self.model, data, data.preprocess.to_model(x0, _generator(config.seed, -1)))
        if context.world_size > 1:
            torch.manual_seed(config.seed + 7919 * context.rank)
        processes = f" x {context.world_size} processes" if context.world_size > 1 else ""
        how = " by flow matching" if config.objective == "flow-matching" else ""
        self.log.info(
            f"pyro-nf: training {config.flow}{how} on {data.description} ({len(data.train)} train, "
            f"{len(data.val)} val, {len(data.test)} test, shape {data.event_shape}) for {config.steps} steps "
            f"on {self.device}{processes}"
        )

    def _write_config(self) -> None:
        data = self.data
        resolved = {
            "event_shape": list(data.event_shape),
            "n_train": len(data.train),
            "n_val": len(data.val),
            "n_test": len(data.test),
            "steps_per_epoch": self.per_epoch,
            "world_size": self.context.world_size,
            "device": str(self.device),
            "preprocess": data.preprocess.state(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "data": self.fingerprint,
        }
        write_config(self.out / "config.json", self.config.to_dict(), resolved)

    # -- 2. to 4.: the steps, with validation and checkpoints -----------------------------
    def run(self) -> None:
        """Every step from the start (or the resumed step) to ``config.steps``."""
        config = self.config
        self.progress = make_progress(config, self.start, self.main)
        self.estimate = TimeEstimate(config, self.start, self.device)
        self.window = (time.perf_counter(), 0)
        self.model.train()
        read_every = read_interval(self.device, config)
        pending: list[tuple[int, Tensor, float]] = []
        for step, indices in batch_order(len(self.data.train), config.batch_size, config.seed, self.start):
            self._stop_if_asked(step)
            if step >= config.steps:
                break
            reported, lr = self.step(step, indices)
            done = step + 1
            pending.append((done, reported, lr))
            due = {"val": done % config.val_every == 0, "save": done % config.checkpoint_every == 0}
            if done % read_every == 0 or any(due.values()) or done == config.steps:
                self._read(pending)
                pending = []
            if due["val"] or done == config.steps:
                self.validate(done)
            if due["save"] or done == config.steps:
                self.save(done)
        if self.progress is not None:
            self.progress.close()

    def step(self, step: int, indices: Tensor) -> tuple[Tensor, float]:
        """One optimizer step on the global batch ``indices``: ``[loss, gradient norm]`` on the device, and the rate."""
        config, data, context = self.config, self.data, self.context
        lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
        trainer = self._trainer()
        trainer.set_lr(lr)
        share = config.batch_size // context.world_size
        x = self._train_batch(indices)
        # The data were checked when loaded; unchecked layers and base let a NaN reach the loss test in _read.
        with validation(False), pyro.validation_enabled(False):
            # The whole global batch is preprocessed (same noise as one process would draw), then sliced.
            y = data.preprocess.to_model(x, _generator(config.seed, step, x.device))[
                context.rank * share : (context.rank + 1) * share
            ]
            reported = trainer(y)
        return context.mean(reported), lr

    def _trainer(self) -> TrainingStep:
        """The training step in the modes the configuration and the device ask for (built at the first step)."""
        if self.trainer is None:

            def loss(y: Tensor) -> Tensor:
                return self.ddp(y)  # the objective: the NLL, or the flow-matching loss

            self.trainer = training_step(self.config, self.model, self.optimizer, loss, self.device, self.context)
        return self.trainer

    def _train_batch(self, indices: Tensor) -> Tensor:
        """The batch in data units on the device; on a GPU the training set is held there when it fits."""
        if self.device.type == "cpu":
            return self.data.train[indices]
        if self.train_on_device is None:
            self.train_on_device = on_device(self.data.train, self.device)
        if self.train_on_device.device == self.device:
            return self.train_on_device[indices.to(self.device, non_blocking=True)]
        return self.data.train[indices].to(self.device)

    def _read(self, pending: list[tuple[int, Tensor, float]]) -> None:
        """Read the losses of the steps since the last read (one synchronisation), stop on a NaN, report them."""
        if not pending:
            return
        values = torch.stack([reported for _, reported, _ in pending]).tolist()
        for (done, _, lr), (loss, norm) in zip(pending, values):
            if not math.isfinite(loss):
                self._stop(f"the loss became {loss} at step {done}")
            if not math.isfinite(norm):
                self._stop(f"the gradient norm became {norm} at step {done}")
            self._report(done, loss, norm, lr)

    def _report(self, done: int, loss: float, norm: float, lr: float) -> None:
        """The history line and the progress bar of a step."""
        config = self.config
        self.interval.append(loss)
        if self.main and (done % config.log_every == 0 or done == config.steps):
            append_history(self.history_path, done, loss, lr, norm)
        estimate = self.estimate.observe(done)
        if estimate is not None:
            self.log.info(estimate)
        if self.progress is None:
            return
        start, steps = self.window[0], self.window[1] + 1
        elapsed = max(time.perf_counter() - start, 1e-9)
        rate = f"{steps * config.batch_size / elapsed:.0f}"
        self.progress.set_postfix({self.objective.loss_name: f"{loss:.4f}", "samples/s": rate}, refresh=False)
        self.progress.update(1)
        self.window = (time.perf_counter(), 0) if elapsed > 5.0 else (start, steps)

    def validate(self, done: int) -> None:
        """The validation metric, the curves and a figure (rank 0)."""
        if self.main:
            metric = _metric_name(self.data)
            val, nfe = evaluate_with_nfe(self.model, self.data, self.data.val, seed=self.config.seed + 1)
            self.val_nfe[done] = nfe
            train_value = float(np.mean(self.interval))
            self.curves["steps"].append(float(done))
            self.curves["train"].append(train_value)
            self.curves["val"].append(val)
            solve = "" if nfe is None else f" (NFE {nfe:.0f})"
            train_name = self.objective.loss_name
            self.log.info(f"step {done}: train {train_name} {train_value:.4f}, val {metric} {val:.4f}{solve}")
            with torch.random.fork_rng(devices=[]):
                _figures(self.model, self.data, self.out, self.config, f"figures/step_{done:06d}.png", self.curves)
        self.interval = []

    def save(self, done: int) -> None:
        """A checkpoint at step ``done``; every process takes part (their generator states are gathered)."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            self._stop(f"the parameters became non-finite at step {done}")
        context = self.context
        rank_rng: list[Tensor] | None = None
        if context.world_size > 1:
            state = torch.get_rng_state()
            gathered = [torch.empty_like(state) for _ in range(context.world_size)]
            torch_dist.all_gather_object(gathered, state)
            rank_rng = [t.cpu() for t in gathered]
        if context.is_main:
            data = self.data
            extra: dict[str, Any] = {
                "preprocess": data.preprocess.state(),
                "event_shape": list(data.event_shape),
                "data_kind": data.kind,
                "curves": {key: list(values) for key, values in self.curves.items()},
            }
            if rank_rng is not None:
                extra["rank_rng"] = rank_rng
            extra["data_fingerprint"] = self.fingerprint
            state_dict = {key: value.detach().cpu() for key, value in self.model.state_dict().items()}
            rng = capture_rng_state()
            checkpoint = Checkpoint(state_dict, self.optimizer.state_dict(), done, rng, self.config.to_dict(), extra)
            save_checkpoint(self.checkpoint_path, checkpoint)
        self.last_saved = done

    def _stop(self, what: str) -> None:
        config = self.config
        kept = f"the last good checkpoint (step {self.last_saved}) is kept at {self.checkpoint_path}"
        if self.last_saved is None:
            kept = "no checkpoint had been written yet"
        message = (
            f"{what}; training stopped and {kept}. Try a lower --lr (now {config.lr:g}), more --warmup-steps "
            f"(now {config.warmup_steps}), gradient clipping (--grad-clip, now {config.grad_clip:g})"
            + (", or --coupling additive" if self.image_flow else "")
        )
        self.log.info(f"pyro-nf: error: {message}", console=False)  # the command line prints it
        raise NonFiniteLossError(message)

    def _stop_if_asked(self, done: int) -> None:
        """After ``done`` steps: if a signal asked to stop (on any process), save a checkpoint and stop."""
        if not self.context.any_true(self.options.stop.signum is not None):
            return
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.last_saved != done:
            self.save(done)
        if self.main and self.folder is not None:
            remove_run_temporaries(self.out)
        signum = self.options.stop.signum or signal.SIGTERM
        self.log.info(f"pyro-nf: stopped by {signal.Signals(signum).name} at step {done}", console=False)
        raise TrainingInterrupted(f"stopped by {signal.Signals(signum).name} at step {done}", signum)

    # -- 5. finish ------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        """The final metrics, ``metrics.json`` and the figures (rank 0)."""
        config, data, out = self.config, self.data, self.out
        self._stop_if_asked(config.steps)
        if not self.main:
            return TrainResult(out, config.steps, {}, [])
        metric = _metric_name(data)
        last_figure = out / "figures" / f"step_{config.steps:06d}.png"
        validated = self.curves["steps"] and self.curves["steps"][-1] == config.steps and last_figure.exists()
        if validated and config.steps in self.val_nfe:
            # The validation at the last step already scored this model and drew its figure.
            val_value, val_nfe = self.curves["val"][-1], self.val_nfe[config.steps]
            shutil.copyfile(last_figure, out / "samples.png")
            files = [out / "samples.png", out / "curves.png"]
        else:
            val_value, val_nfe = evaluate_with_nfe(self.model, data, data.val, seed=config.seed + 1)
            with torch.random.fork_rng(devices=[]):
                files = _figures(self.model, data, out, config, "samples.png", self.curves)
        test_value, test_nfe = evaluate_with_nfe(self.model, data, data.test, seed=config.seed + 2)
        metrics = {f"val_{metric}": val_value, f"test_{metric}": test_value}
        if val_nfe is not None and test_nfe is not None:
            metrics.update(val_nfe=val_nfe, test_nfe=test_nfe)  # the mean NFE of the evaluation solves
        atomic_write_text(out / "metrics.json", json.dumps({"step": config.steps, **metrics}, indent=2) + "\n")
        files += [out / name for name in ("metrics.json", "checkpoint.pt", "config.json", "train.log")]
        unit = "bits/dim" if metric == "bpd" else "nats"
        solves = "" if test_nfe is None else f" (evaluation NFE {test_nfe:.0f})"
        self.log.info(
            f"pyro-nf: done, {config.steps} steps. val {metric} {val_value:.4f} {unit}, "
            f"test {metric} {test_value:.4f} {unit}{solves}"
        )
        self.log.info(f"pyro-nf: outputs in {out}/: " + ", ".join(p.name for p in files))
        return TrainResult(out, config.steps, metrics, files)

    def close(self) -> None:
        self.log.close()
        if self.folder is not None:
            self.folder.close()
