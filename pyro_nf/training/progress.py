"""How a run shows its progress: a bar on a terminal, plain lines elsewhere, and an early estimate of its length.

A progress bar redraws itself with carriage returns, which a terminal shows as one
line and a log file keeps as hundreds; so the bar is drawn only when stderr is a
terminal, and otherwise :class:`PlainProgress` writes a plain line now and then.
:class:`TimeEstimate` measures the first steps and says how long the run will take,
with the options that make it shorter when that is long.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from pyro_nf.registry import FLOWS
from pyro_nf.training.config import TrainConfig

__all__ = ["PlainProgress", "TimeEstimate", "format_duration", "make_progress"]

LONG_RUN_SECONDS = 600.0
"""Runs estimated to take longer than this are told which options make them shorter."""


def format_duration(seconds: float) -> str:
    """``seconds`` as a person says it: ``0.35 s``, ``4.2 s``, ``42 s``, ``7.5 min``, ``33 h``.

    Example::

        >>> [format_duration(s) for s in (0.35, 4.25, 42, 450, 120000)]
        ['0.35 s', '4.2 s', '42 s', '7.5 min', '33 h']
    """
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.2g} min" if seconds < 600 else f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.2g} h" if seconds < 36000 else f"{seconds / 3600:.0f} h"


class PlainProgress:
    """The progress bar's interface (``set_postfix``, ``update``, ``close``) as plain lines.

    A line is written every ``total / lines`` steps, and at least every ``seconds``
    seconds, and at the last step; each names the step, the share done, the values of the
    last ``set_postfix`` and the time left at the mean rate so far.

    Example::

        >>> import io
        >>> stream = io.StringIO()
        >>> progress = PlainProgress(total=4, initial=0, desc="maf", stream=stream, lines=2)
        >>> for step in range(4):
        ...     progress.set_postfix({"nll": "1.5"})
        ...     progress.update(1)
        >>> print(stream.getvalue())
        maf: step 2/4 (50%), nll 1.5, 0.00 s in, 0.00 s left
        maf: step 4/4 (100%), nll 1.5, 0.00 s in, 0.00 s left
    """

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        *,
        stream: TextIO | None = None,
        lines: int = 20,
        seconds: float = 60.0,
    ) -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(1, (total - initial) // max(1, lines))
        self.seconds = seconds
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.perf_counter()
        self.initial = self.last_step = initial

    def set_postfix(self, values: dict[str, Any], refresh: bool = False) -> None:
        self.postfix = dict(values)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n - self.last_step >= self.every or now - self.last >= self.seconds or self.n >= self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last, self.last_step = now, self.n
        elapsed = now - self.start
        done = self.n - self.initial
        left = elapsed / done * (self.total - self.n) if done else float("nan")
        values = "".join(f", {key} {value}" for key, value in self.postfix.items())
        share = 100 * self.n / max(self.total, 1)
        print(
            f"{self.desc}: step {self.n}/{self.total} ({share:.0f}%){values}, {format_duration(elapsed)} in, "
            f"{format_duration(left) if done else '?'} left",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.n != self.last_step:
            self._line(time.perf_counter())


def make_progress(config: TrainConfig, start: int, main: bool, stream: TextIO | None = None) -> Any:
    """The progress display of a run: None (off, or not rank 0), a bar on a terminal, else plain lines."""
    if not (config.progress and main):
        return None
    stream = stream if stream is not None else sys.stderr
    if not stream.isatty():
        return PlainProgress(config.steps, start, config.flow, stream=stream)
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=config.flow, unit="step", dynamic_ncols=True, file=stream)


class TimeEstimate:
    """Times the first steps of a run and says once how long the rest will take.

    The first step is not timed (it allocates, and may compile); after ``min_steps``
    timed steps and ``min_seconds`` of them (or ``max_steps`` steps, whichever comes
    first), :meth:`observe` returns the message, and None before and after.

    Example::

        >>> from pyro_nf.training import resolve_config
        >>> config = resolve_config({"flow": "glow", "data": "mnist", "device": "cpu"})
        >>> estimate = TimeEstimate(config, start=0, device="cpu", min_seconds=0.0)
        >>> estimate.observe(1, now=0.0), estimate.observe(2, now=6.0), estimate.observe(3, now=12.0)
        (None, None, None)
        >>> print(estimate.observe(4, now=18.0))  # doctest: +NORMALIZE_WHITESPACE
        pyro-nf: about 6.0 s per step on cpu: the remaining 19996 steps take about 33 h (validations not counted).
        Shorter: fewer --steps, a smaller --batch-size (now 64), --depth (now 16) or --hidden-channels (now 256),
        or a GPU (--device cuda)
    """

    def __init__(
        self,
        config: TrainConfig,
        start: int,
        device: object,
        *,
        min_steps: int = 3,
        min_seconds: float = 10.0,
        max_steps: int = 50,
    ) -> None:
        self.config, self.device = config, str(device)
        self.start = start
        self.min_steps, self.min_seconds, self.max_steps = min_steps, min_seconds, max_steps
        self.origin: tuple[int, float] | None = None
        self.said = False

    def observe(self, done: int, now: float | None = None) -> str | None:
        """Record that step ``done`` is finished; the estimate when it is due, else None."""
        if self.said:
            return None
        now = time.perf_counter() if now is None else now
        if self.origin is None:
            self.origin = (done, now)
            return None
        steps, seconds = done - self.origin[0], now - self.origin[1]
        if steps < self.min_steps or (seconds < self.min_seconds and steps < self.max_steps):
            return None
        self.said = True
        return self.message(seconds / steps, self.config.steps - done)

    def message(self, per_step: float, remaining: int) -> str:
        """What is said for ``per_step`` seconds a step and ``remaining`` steps to go."""
        config = self.config
        total = per_step * remaining
        text = (
            f"pyro-nf: about {format_duration(per_step)} per step on {self.device}: the remaining {remaining} steps "
            f"take about {format_duration(total)} (validations not counted)."
        )
        if total < LONG_RUN_SECONDS:
            return text
        if FLOWS[config.flow].kind == "image":
            size = f"--depth (now {config.depth}) or --hidden-channels (now {config.hidden_channels})"
        else:
            size = f"--hidden (now {config.hidden or 'the default'}) or --num-transforms (now {config.num_transforms})"
        gpu = ", or a GPU (--device cuda)" if self.device.startswith("cpu") else ""
        return f"{text} Shorter: fewer --steps, a smaller --batch-size (now {config.batch_size}), {size}{gpu}"
