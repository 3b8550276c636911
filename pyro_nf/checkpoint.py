"""Training checkpoints: atomic writes, safe loading, and every random state needed to resume exactly.

A checkpoint is one file written with :func:`torch.save` that holds only
tensors and plain containers (dicts, lists, tuples, strings, numbers), so it
is read back with ``torch.load(..., weights_only=True)``: loading a
checkpoint never runs code from the file. It holds

* ``format`` / ``version``: marks the file as a pyro_nf checkpoint;
* ``model`` and ``optimizer``: their ``state_dict()``;
* ``step``: the number of optimizer steps taken;
* ``rng``: the states of torch's (CPU and CUDA), NumPy's and Python's global
  random generators, encoded as tensors and lists (:func:`capture_rng_state`);
* ``config``: the resolved run configuration, a dict of plain values;
* ``extra``: anything else the trainer needs (data statistics as tensors,
  the loss history).

:func:`save_checkpoint` writes a temporary file in the same directory,
flushes it to disk (``fsync``) and renames it over the target with
:func:`os.replace`, which is atomic: a crash at any moment leaves either the
old checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "pyro_nf.checkpoint"
"""The value of the ``format`` entry of every pyro_nf checkpoint."""

VERSION = 1
"""The checkpoint layout version this module writes and reads."""

_SLEEP_BEFORE_RENAME = "PYRO_NF_TEST_SLEEP_BEFORE_RENAME"
# Seconds to sleep between writing the temporary file and renaming it; lets the
# test suite kill a process in the middle of a save. Unset in normal use.


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupted, truncated or not written by pyro_nf."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint (see the module docstring)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    step: int
    rng: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng_state() -> dict[str, Any]:
    """The states of torch's, NumPy's and Python's global generators, as tensors and lists.

    Example::

        >>> state = capture_rng_state()
        >>> a = torch.rand(3), np.random.rand(), random.random()
        >>> restore_rng_state(state)
        >>> b = torch.rand(3), np.random.rand(), random.random()
        >>> torch.equal(a[0], b[0]) and a[1:] == b[1:]
        True
    """
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators to a state from :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename).

    Example::

        >>> import tempfile
        >>> net = torch.nn.Linear(2, 1)
        >>> ckpt = Checkpoint(net.state_dict(), {}, 3, capture_rng_state(), {"lr": 0.1})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_checkpoint(Path(tmp, "run.pt"), ckpt)
        ...     loaded = load_checkpoint(Path(tmp, "run.pt"))
        >>> loaded.step, loaded.config
        (3, {'lr': 0.1})
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": checkpoint.model,
        "optimizer": checkpoint.optimizer,
        "step": int(checkpoint.step),
        "rng": checkpoint.rng,
        "config": checkpoint.config,
        "extra": checkpoint.extra,
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        delay = os.environ.get(_SLEEP_BEFORE_RENAME)
        if delay:
            time.sleep(float(delay))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, safely (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated or corrupted, holds
            anything but tensors and plain containers, or was not written by
            pyro_nf (or by a newer layout version).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(
            f"{path}: cannot read the checkpoint, it is corrupted or truncated (not a torch.save file)"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = f"a {unsupported.group(1)} object" if unsupported else "objects other than tensors and plain containers"
        raise CheckpointError(
            f"{path}: not a pyro_nf checkpoint: it holds {what}, which is not loaded for safety "
            "(a pyro_nf checkpoint holds only tensors and plain containers)"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: cannot read the checkpoint, it is corrupted or truncated ({first_line})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = (
            f"a dict with keys {sorted(map(str, payload))[:8]}" if isinstance(payload, dict) else type(payload).__name__
        )
        raise CheckpointError(f"{path}: not a pyro_nf checkpoint (expected format {FORMAT!r}, found {found})")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint layout version {payload.get('version')!r}; this pyro_nf reads version {VERSION}"
        )
    missing = [key for key in ("model", "optimizer", "step", "rng", "config") if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: incomplete pyro_nf checkpoint, missing {', '.join(missing)}")
    return Checkpoint(
        model=payload["model"],
        optimizer=payload["optimizer"],
        step=int(payload["step"]),
        rng=payload["rng"],
        config=payload["config"],
        extra=payload.get("extra", {}),
    )
