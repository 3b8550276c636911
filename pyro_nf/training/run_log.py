"""What a run writes as it goes: its log (``train.log`` and the console), ``history.csv``, atomic text files."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "RunLog",
    "append_history",
    "atomic_write_text",
    "history_rows",
    "write_config",
    "write_history",
]


class _ConsoleHandler(logging.Handler):
    """Prints to stdout through ``tqdm.write``, so messages do not tear a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a closed or broken stdout must not stop training
            self.handleError(record)


class RunLog:
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


def history_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_history(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "loss", "lr", "grad_norm"])
        writer.writeheader()
        writer.writerows(rows)


def append_history(path: Path, step: int, loss: float, lr: float, norm: float) -> None:
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerow([step, repr(loss), repr(lr), repr(norm)])


def atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_config(path: Path, config: dict[str, Any], resolved: dict[str, Any]) -> None:
    """``config.json``: the configuration, and under ``"resolved"`` what was derived (tensors as lists)."""
    from pyro_nf import __version__

    plain = {
        key: {k: v.tolist() if isinstance(v, Tensor) else v for k, v in value.items()}
        if isinstance(value, dict)
        else value
        for key, value in resolved.items()
    }
    record = {**config, "resolved": {**plain, "pyro_nf_version": __version__}}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value.tolist() if isinstance(value, Tensor) else value
