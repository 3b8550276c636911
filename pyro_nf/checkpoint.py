"""Training checkpoints: atomic writes, checksums, a previous copy, safe loading, and every random state to resume.

A checkpoint is one file written with :func:`torch.save` that holds only
tensors and plain containers (dicts, lists, tuples, sets, strings, numbers,
bytes), so it is read back with ``torch.load(..., weights_only=True)``:
loading a checkpoint never runs code from the file. It holds

* ``format`` / ``version``: marks the file as a pyro_nf checkpoint;
* ``model`` and ``optimizer``: their ``state_dict()``;
* ``step``: the number of optimizer steps taken;
* ``rng``: the states of torch's (CPU and CUDA), NumPy's and Python's global
  random generators, encoded as tensors and lists (:func:`capture_rng_state`);
* ``config``: the resolved run configuration, a dict of plain values;
* ``extra``: anything else the trainer needs (data statistics as tensors,
  the loss history);
* ``checksum``: SHA-256 digests of all of the above (layout version 2).

**Checksums.** Every tensor is hashed on its own, from its dtype, its shape
and the bytes of its values (made contiguous, on the CPU, in row-major
order), so the digest does not depend on the device, the strides or the
storage it came from. Every top-level entry also gets one digest of its
layout and plain values: the keys and their order, the container types,
every number (floats by their exact ``float.hex``), string and flag, and
each tensor's dtype and shape. :func:`load_checkpoint` recomputes them all
from what it loaded and refuses the file if one differs, naming the entry
(``model['0.weight']``, ``config``, ...). It also reads every record of the
zip archive through Python's :mod:`zipfile`, which checks the CRC-32 that
:func:`torch.save` stores for each record (PyTorch's own reader does not):
that catches a damaged byte anywhere in the file, also in storage bytes no
tensor looks at, and in files of layout version 1, which have no digests.

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
says so. :func:`remove_stale_temporaries` removes the temporaries of a
process killed in the middle of a save.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import time
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "LatestCheckpoint",
    "capture_rng_state",
    "load_checkpoint",
    "load_latest_checkpoint",
    "previous_checkpoint_path",
    "remove_stale_temporaries",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "pyro_nf.checkpoint"
"""The value of the ``format`` entry of every pyro_nf checkpoint."""

VERSION = 2
"""The checkpoint layout version this module writes (it reads this one and version 1)."""

_READABLE_VERSIONS = (1, 2)
_ALGORITHM = "sha256"
_CHUNK = 1 << 20

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
        >>> ckpt = Checkpoint(net.state_dict(), {}, 3, capture_rng_state(), {"lr": 0.1})
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
    payload["checksum"] = {"algorithm": _ALGORITHM, "digests": {key: digest for key, digest, _ in _digests(payload)}}
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
    damaged = _damaged_records(path)
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
        damage = _mismatches(payload) + damage
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


def _damaged_records(path: Path) -> list[str]:
    """The records of the zip archive whose bytes do not match their stored CRC-32.

    ``torch.serialization.set_crc32_options(False)`` writes 0 for every CRC; a file where every
    non-empty record says 0 carries no CRCs, and nothing is reported for it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(record.CRC for record in records if record.file_size):
                return []
            damaged = []
            for record in records:
                try:
                    with archive.open(record) as member:
                        while member.read(_CHUNK):
                            pass
                except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError):
                    damaged.append(record.filename)
            return damaged
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointCorruptedError(
            f"{path}: cannot read the checkpoint, it is corrupted or truncated ({first_line})"
        ) from None


def _mismatches(payload: dict[str, Any]) -> list[str]:
    """What in a loaded version-2 payload differs from the digests saved in it (empty when all match)."""
    stored = payload.get("checksum")
    expected = stored.get("digests") if isinstance(stored, dict) and stored.get("algorithm") == _ALGORITHM else None
    if not isinstance(expected, dict):
        return ["its checksum entry is missing or unreadable"]
    try:
        actual = _digests({key: value for key, value in payload.items() if key != "checksum"})
    except TypeError as error:
        return [str(error)]
    problems = []
    seen = set()
    for key, digest, what in actual:
        seen.add(key)
        if key not in expected:
            problems.append(f"{key} ({what}) is in the file but not in the checksum saved with it")
        elif expected[key] != digest:
            problems.append(f"{key} ({what}) does not match the checksum saved with it")
    problems += [
        f"{key} is missing from the file (the checksum saved with it lists it)" for key in expected if key not in seen
    ]
    return problems


_MAPPINGS = (dict, OrderedDict, Counter)
_SEQUENCES: dict[type, bytes] = {list: b"L", tuple: b"U", torch.Size: b"U"}
_TENSORS = (torch.Tensor, torch.nn.Parameter)
_PLAIN = "tensors and plain values (dicts, lists, tuples, sets, strings, numbers, bytes, None, dtypes, devices)"


def _digests(payload: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(name, SHA-256 hex digest, description)`` for each top-level entry (its layout and plain values) and tensor.

    The walk feeds an unambiguous encoding (a type tag, then lengths or a terminator) of every
    value to the entry's hash, and each tensor's dtype, shape and value bytes to a hash of its own.
    """
    found: list[tuple[str, str, str]] = []
    for key, value in payload.items():
        layout = hashlib.sha256()
        tensors: list[tuple[str, str, str]] = []
        _walk(value, str(key), layout, tensors)
        found.append((str(key), layout.hexdigest(), "its keys, layout and plain values"))
        found += tensors
    return found


def _walk(value: Any, path: str, layout: Any, tensors: list[tuple[str, str, str]]) -> None:
    kind = type(value)
    if kind in _TENSORS:
        header = _tensor_header(value, path)
        layout.update(header)
        digest = hashlib.sha256(header)
        data = value.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))
        tensors.append((path, digest.hexdigest(), f"a {value.dtype} tensor of shape {tuple(value.shape)}"))
    elif kind in _MAPPINGS:
        layout.update(b"D%d;" % len(value))
        for key, item in value.items():
            layout.update(_scalar(key, f"{path} (a key)"))
            _walk(item, f"{path}[{key!r}]", layout, tensors)
        attributes = getattr(
            value, "__dict__", {}
        )  # a state_dict's _metadata (module versions) rides along as an attribute
        layout.update(b"A%d;" % len(attributes))
        for name, item in attributes.items():
            layout.update(_scalar(name, f"{path} (an attribute name)"))
            _walk(item, f"{path}.{name}", layout, tensors)
    elif kind in _SEQUENCES:
        layout.update(_SEQUENCES[kind] + b"%d;" % len(value))
        for index, item in enumerate(value):
            _walk(item, f"{path}[{index}]", layout, tensors)
    elif kind is set:
        items = sorted(_scalar(item, f"{path} (a set item)") for item in value)
        layout.update(b"E%d;" % len(items) + b"".join(items))
    else:
        layout.update(_scalar(value, path))


def _tensor_header(tensor: torch.Tensor, path: str) -> bytes:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        raise TypeError(
            f"checkpoint entry {path}: expected a dense tensor, got a {tensor.layout} "
            f"{'quantized ' if tensor.is_quantized else ''}{'meta ' if tensor.is_meta else ''}tensor"
        )
    return b"T" + str(tensor.dtype).encode() + b"%r;" % (tuple(tensor.shape),)


def _scalar(value: Any, path: str) -> bytes:
    kind = type(value)
    if value is None:
        return b"N"
    if kind is bool:
        return b"B1" if value else b"B0"
    if kind is int:
        return b"I%d;" % value
    if kind is float:
        return b"F" + value.hex().encode() + b";"
    if kind is complex:
        return b"C" + value.real.hex().encode() + b"," + value.imag.hex().encode() + b";"
    if kind is str:
        text = value.encode("utf-8", "surrogatepass")
        return b"S%d:" % len(text) + text
    if kind in (bytes, bytearray):
        return (b"Y" if kind is bytes else b"Z") + b"%d:" % len(value) + bytes(value)
    if kind is torch.dtype:
        return b"d" + str(value).encode() + b";"
    if kind is torch.device:
        return b"v" + str(value).encode() + b";"
    raise TypeError(
        f"checkpoint entry {path}: a checkpoint holds only {_PLAIN}, got a {kind.__module__}.{kind.__qualname__}"
    )


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


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")


def remove_stale_temporaries(
    folder: str | Path, name: str = "checkpoint.pt", *, all_processes: bool = False
) -> list[Path]:
    """Remove the temporary files that saves of ``folder/name`` left behind when their process was killed.

    :func:`save_checkpoint` names its temporaries ``.<name>.<pid>.tmp`` (and
    ``.<stem>.prev<suffix>.<pid>.tmp`` for the previous checkpoint's link)
    and removes them itself on an exception; only a killed process (SIGKILL,
    power loss) leaves one.

    By default only temporaries whose process is gone are removed: safe at
    any time, even while another process saves in the folder. A temporary
    whose pid has been reused by a live process is kept (harmless); on
    Windows, where liveness cannot be tested safely, none is removed. A
    process on another machine sharing the folder over a network file system
    cannot be seen: with ``all_processes=True`` every such temporary is
    removed, which is right only for a caller that holds the run's lock
    (so no other process is saving there), e.g. a training loop at its start
    or resume.

    Returns:
        The removed files.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = Path(tmp, ".checkpoint.pt.999999999.tmp").write_bytes(b"left by a killed process")
        ...     removed = remove_stale_temporaries(tmp)
        ...     [p.name for p in removed], sorted(Path(tmp).iterdir())
        (['.checkpoint.pt.999999999.tmp'], [])
    """
    folder = Path(folder)
    names = {name, previous_checkpoint_path(name).name}
    removed = []
    for candidate in sorted(folder.glob(".*.tmp")):
        match = _TEMPORARY.fullmatch(candidate.name)
        if match is None or match["name"] not in names or not candidate.is_file():
            continue
        if all_processes or not _process_alive(int(match["pid"])):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # no process writes with such a pid (and os.kill(0, ...) would signal a process group)
    if os.name == "nt":
        return True  # os.kill(pid, 0) terminates the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    return True
