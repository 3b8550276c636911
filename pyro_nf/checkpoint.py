"""Training checkpoints: atomic writes, checksums, a previous copy, safe loading, and every random state to resume.

A checkpoint is one file written with :func:`torch.save` that holds only
tensors and plain containers (dicts, lists, tuples, sets, strings, numbers,
bytes), so it is read back with ``torch.load(..., weights_only=True)``:
loading a checkpoint never runs code from the file. It holds

* ``format`` / ``version``: marks the file as a pyro_nf checkpoint;
* ``model`` and ``optimizer``: their ``state_dict()``;
* ``step``: the number of optimizer steps taken;
* ``rng``: the states of torch's (CPU and CUDA), NumPy's and Python's global
  random generators, encoded as tensors and lists (:func:`pyro_nf.rng.capture_rng_state`);
* ``config``: the resolved run configuration, a dict of plain values;
* ``extra``: anything else the trainer needs (data statistics as tensors,
  the loss history);
* ``checksum``: SHA-256 digests of all of the above (layout version 2).

**Checksums** (:mod:`pyro_nf.digests`): SHA-256 digests of every tensor and of
every entry's layout and plain values, saved in the file; :func:`load_checkpoint`
recomputes them and checks every zip record's CRC-32, and refuses a mismatch
naming the entry.

**Layout versions.** This module writes version 2 and reads versions 1 and
2. Version-1 files (written before checksums, e.g. by pyro_nf 0.1.0) are
still loaded, so that runs saved by earlier releases stay usable and can be
resumed; refusing them would strand every saved run for no gain in safety
over what the CRCs give. They are verified by the zip records' CRC-32 only
(unless they were written with ``torch.serialization.set_crc32_options(False)``,
then not at all), which catches damaged bytes but not a file re-packed with
new CRCs. The first save of a resumed run writes version 2.

**Atomic writes and the previous checkpoint.** :func:`save_checkpoint`
writes a temporary file ``.<name>.<pid>.tmp`` in the same directory, flushes
it to disk (``fsync``), keeps the checkpoint it replaces as
``<stem>.prev<suffix>`` (``checkpoint.prev.pt``) and renames the temporary
over the target with :func:`os.replace`, which is atomic. A crash at any
moment leaves the old checkpoint or the new one, never a truncated file; and
one bad write (a file damaged on its way to the disk) does not lose the run:
:func:`load_latest_checkpoint` falls back to the previous checkpoint, and
says so. :func:`pyro_nf.training.run_folder.remove_stale_temporaries` removes the
temporaries of a process killed in the middle of a save.
"""

from __future__ import annotations

import os
import pickle
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyro_nf.digests import ALGORITHM, damaged_records, digest_mismatches, payload_digests

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "LatestCheckpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "previous_checkpoint_path",
    "save_checkpoint",
]

FORMAT = "pyro_nf.checkpoint"
"""The value of the ``format`` entry of every pyro_nf checkpoint."""

VERSION = 2
"""The checkpoint layout version this module writes (it reads this one and version 1)."""

_READABLE_VERSIONS = (1, 2)

_SLEEP_BEFORE_RENAME = "PYRO_NF_TEST_SLEEP_BEFORE_RENAME"
# Seconds to sleep between writing the temporary file and renaming it; lets the
# test suite kill a process in the middle of a save. Unset in normal use.


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupted, truncated or not written by pyro_nf."""


class CheckpointCorruptedError(CheckpointError):
    """A checkpoint file whose bytes are damaged: truncated, unreadable, or not matching its checksums."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint (see the module docstring)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    step: int
    rng: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LatestCheckpoint:
    """What :func:`load_latest_checkpoint` found: the checkpoint, the file it came from, and why if not the newest.

    ``note`` is ``None`` when the newest checkpoint was used; otherwise it says
    which file was refused and why, and which one was used instead. The caller
    shows it to the user.
    """

    checkpoint: Checkpoint
    path: Path
    note: str | None = None


def previous_checkpoint_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaces: ``<stem>.prev<suffix>`` next to ``path``.

    Example::

        >>> previous_checkpoint_path("runs/moons/checkpoint.pt").as_posix()
        'runs/moons/checkpoint.prev.pt'
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_checkpoint(path: str | Path, checkpoint: Checkpoint, *, keep_previous: bool = True) -> None:
    """Write ``checkpoint`` to ``path`` atomically, with its checksums, keeping the one it replaces.

    The steps: compute the digests (see the module docstring), write a
    temporary file next to ``path`` and ``fsync`` it, keep the current
    ``path`` as :func:`previous_checkpoint_path` (a hard link renamed into
    place, so ``path`` exists at every moment; where the file system has no
    hard links, a rename), then rename the temporary over ``path``. An
    exception (or ``KeyboardInterrupt``) removes the temporary file.

    Args:
        path: the checkpoint file to write, e.g. ``<run>/checkpoint.pt``.
        checkpoint: what to write; it may hold only tensors (dense, not
            quantized) and plain values, as ``torch.load(weights_only=True)``
            reads back.
        keep_previous: keep the checkpoint being replaced as the fallback
            (default); ``False`` overwrites it and leaves any older fallback as it is.

    Raises:
        TypeError: the checkpoint holds something else (the entry is named);
            nothing is written then.

    Example::

        >>> import tempfile
        >>> net = torch.nn.Linear(2, 1)
        >>> ckpt = Checkpoint(net.state_dict(), {}, 3, {}, {"lr": 0.1})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_checkpoint(Path(tmp, "run.pt"), ckpt)
        ...     save_checkpoint(Path(tmp, "run.pt"), Checkpoint(net.state_dict(), {}, 4, {}, {"lr": 0.1}))
        ...     loaded, previous = load_checkpoint(Path(tmp, "run.pt")), load_checkpoint(Path(tmp, "run.prev.pt"))
        >>> loaded.step, previous.step, loaded.config
        (4, 3, {'lr': 0.1})
    """
    path = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": checkpoint.model,
        "optimizer": checkpoint.optimizer,
        "step": int(checkpoint.step),
        "rng": checkpoint.rng,
        "config": checkpoint.config,
        "extra": checkpoint.extra,
    }
    payload["checksum"] = {
        "algorithm": ALGORITHM,
        "digests": {key: digest for key, digest, _ in payload_digests(payload)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        delay = os.environ.get(_SLEEP_BEFORE_RENAME)
        if delay:
            time.sleep(float(delay))
        if keep_previous and path.is_file():
            _keep_as_previous(path)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _keep_as_previous(path: Path) -> None:
    previous = previous_checkpoint_path(path)
    link = _temporary_path(previous)
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        # No hard links on this file system (FAT, some network shares): move it. Until the new file is
        # renamed into place only the previous checkpoint exists, and load_latest_checkpoint falls back to it.
        os.replace(path, previous)
        return
    try:
        os.replace(link, previous)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


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
    """Read a checkpoint written by :func:`save_checkpoint`, safely (``weights_only=True``), and verify it.

    Every record of the zip archive is checked against its CRC-32, and every
    entry of a version-2 file against the SHA-256 digests saved with it (see
    the module docstring); a file that fails either is refused, never used.
    Version-1 files (written before checksums) are loaded with the CRC-32
    check only, so that runs saved by earlier releases stay usable.

    Args:
        path: the checkpoint file.
        map_location: where to put the tensors (as in :func:`torch.load`).

    Raises:
        CheckpointCorruptedError: the file is truncated, unreadable, or does
            not match its checksums; the message names what is damaged and
            points to the previous checkpoint.
        CheckpointError: the file is missing, holds anything but tensors and
            plain containers, or was not written by pyro_nf (or by a newer
            layout version).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_checkpoint(Path(tmp, "checkpoint.pt"), Checkpoint({"w": torch.ones(3)}, {}, 7, {}, {}))
        ...     damaged = bytearray(Path(tmp, "checkpoint.pt").read_bytes())
        ...     offset = damaged.index(torch.ones(3).numpy().tobytes())  # the tensor's bytes in the file
        ...     damaged[offset + 1] ^= 0xFF
        ...     _ = Path(tmp, "checkpoint.pt").write_bytes(damaged)
        ...     try:
        ...         load_checkpoint(Path(tmp, "checkpoint.pt"))
        ...     except CheckpointCorruptedError as error:
        ...         for line in str(error).replace(tmp, "<run>").split("; "):
        ...             print(line)
        <run>/checkpoint.pt: the checkpoint is corrupted and is not used: model['w'] (a torch.float32 tensor ...
        the zip record archive/data/0 fails its CRC-32 check. There is no previous checkpoint ...
    """
    path = Path(path)
    try:
        return _read(path, map_location)
    except CheckpointCorruptedError as error:
        raise CheckpointCorruptedError(f"{error}. {_advice(path)}") from None


def _advice(path: Path) -> str:
    previous = previous_checkpoint_path(path)
    if path.stem.endswith(".prev"):
        return "Restore the file from a copy, or start the run again"
    if previous.is_file():
        return f"The previous checkpoint {previous} may still be good: use it instead (pass it in place of this file)"
    return (
        f"There is no previous checkpoint ({previous.name}) next to it: restore the file from a copy, "
        "or start the run again"
    )


def _read(path: Path, map_location: str | torch.device) -> Checkpoint:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointCorruptedError(
            f"{path}: cannot read the checkpoint, it is corrupted or truncated (not a torch.save file)"
        )
    try:
        damaged = damaged_records(path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointCorruptedError(
            f"{path}: cannot read the checkpoint, it is corrupted or truncated ({first_line})"
        ) from None
    damage = [f"the zip record {name} fails its CRC-32 check" for name in damaged]
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if damage:
            raise _corrupted(path, damage) from None
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = f"a {unsupported.group(1)} object" if unsupported else "objects other than tensors and plain containers"
        raise CheckpointError(
            f"{path}: not a pyro_nf checkpoint: it holds {what}, which is not loaded for safety "
            "(a pyro_nf checkpoint holds only tensors and plain containers)"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as error:
        if damage:
            raise _corrupted(path, damage) from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointCorruptedError(
            f"{path}: cannot read the checkpoint, it is corrupted or truncated ({first_line})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        if damage:
            raise _corrupted(path, damage)
        found = (
            f"a dict with keys {sorted(map(str, payload))[:8]}" if isinstance(payload, dict) else type(payload).__name__
        )
        raise CheckpointError(f"{path}: not a pyro_nf checkpoint (expected format {FORMAT!r}, found {found})")
    version = payload.get("version")
    if type(version) is not int or version not in _READABLE_VERSIONS:
        if damage:
            raise _corrupted(path, damage)
        raise CheckpointError(
            f"{path}: checkpoint layout version {version!r}; this pyro_nf reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))} (a newer pyro_nf wrote it?)"
        )
    if version >= 2:
        damage = digest_mismatches(payload) + damage
    if damage:
        raise _corrupted(path, damage)
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


def _corrupted(path: Path, damage: list[str], shown: int = 4) -> CheckpointCorruptedError:
    listed = "; ".join(damage[:shown]) + (f"; and {len(damage) - shown} more" if len(damage) > shown else "")
    return CheckpointCorruptedError(f"{path}: the checkpoint is corrupted and is not used: {listed}")


def load_latest_checkpoint(
    run: str | Path, *, map_location: str | torch.device = "cpu", set_aside: bool = False
) -> LatestCheckpoint:
    """The newest good checkpoint of a run: ``checkpoint.pt``, or the previous one if that is unusable.

    A refused newest file (missing, corrupted, or not a pyro_nf checkpoint)
    is never used: the previous checkpoint (:func:`previous_checkpoint_path`)
    is loaded instead, and :attr:`LatestCheckpoint.note` says which file was
    refused and why, and which one was used. The caller shows the note.

    Args:
        run: a run folder (its ``checkpoint.pt`` is read) or a checkpoint file.
        map_location: where to put the tensors (as in :func:`torch.load`).
        set_aside: when the previous checkpoint is used, rename the refused
            file to ``<stem>.bad<suffix>`` (kept for inspection), so that the
            next :func:`save_checkpoint` does not move it over the good
            previous checkpoint. For a training loop that resumes the run
            (and holds its lock); read-only users (evaluate, sample) leave it ``False``.

    Raises:
        CheckpointError: neither file is usable (both reasons are given), or
            there is no previous checkpoint and the newest is unusable.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for step in (10, 20):
        ...         save_checkpoint(Path(tmp, "checkpoint.pt"), Checkpoint({}, {}, step, {}, {}))
        ...     _ = Path(tmp, "checkpoint.pt").write_bytes(b"damaged")
        ...     latest = load_latest_checkpoint(tmp)
        ...     for line in latest.note.replace(tmp, "<run>").split("; "):
        ...         print(line)
        <run>/checkpoint.pt: cannot read the checkpoint, it is corrupted or truncated (not a torch.save file)
        using the previous checkpoint <run>/checkpoint.prev.pt (step 10) instead
        >>> latest.checkpoint.step, latest.path.name
        (10, 'checkpoint.prev.pt')
    """
    run = Path(run)
    newest = run / "checkpoint.pt" if run.is_dir() else run
    previous = previous_checkpoint_path(newest)
    try:
        return LatestCheckpoint(_read(newest, map_location), newest)
    except CheckpointError as error:
        if newest.stem.endswith(".prev") or not previous.is_file():
            if isinstance(error, CheckpointCorruptedError):
                raise CheckpointCorruptedError(f"{error}. {_advice(newest)}") from None
            raise
        refused = error
    try:
        checkpoint = _read(previous, map_location)
    except CheckpointError as error:
        raise type(error)(
            f"no usable checkpoint: {refused}; and the previous checkpoint is unusable too: {error}. "
            "Restore a copy, or start the run again"
        ) from None
    note = f"{refused}; using the previous checkpoint {previous} (step {checkpoint.step}) instead"
    if set_aside and newest.exists():
        aside = newest.with_name(f"{newest.stem}.bad{newest.suffix}")
        os.replace(newest, aside)
        _fsync_directory(newest.parent)
        note += f" (the refused file is kept as {aside})"
    return LatestCheckpoint(checkpoint, previous, note)
