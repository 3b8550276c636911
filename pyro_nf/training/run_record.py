"""What a checkpoint records about its run, and the checks that a resumed, evaluated or sampled run fits it.

``pyro-nf train`` keeps in each checkpoint's ``extra`` the training record (:data:`TRAINING_RECORD`:
the preprocessing, the event shape, the kind of data, the curves) and the data's fingerprint
(:func:`data_fingerprint`: path, size, a SHA-256 of every split). A resume compares the
fingerprint with the data it is given and refuses changed data unless asked
(:func:`resumed_record`); a run folder whose ``config.json`` describes another run than its
checkpoint is refused (:func:`check_folder_config`), naming both files and what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pyro_nf.checkpoint import Checkpoint, CheckpointError, LatestCheckpoint, load_latest_checkpoint
from pyro_nf.training.config import RESUMABLE, ConfigError, TrainConfig
from pyro_nf.training.data import PreparedData
from pyro_nf.training.distributed import DistributedContext
from pyro_nf.training.run_folder import RunFolder, RunFolderError, RunOptions

__all__ = [
    "TRAINING_RECORD",
    "OpenedRun",
    "changed_options",
    "check_folder_config",
    "check_training_record",
    "config_differences",
    "data_fingerprint",
    "fingerprint_change",
    "load_model_state",
    "open_run",
    "resumed_record",
]


def data_fingerprint(source: str, splits: dict[str, Tensor]) -> dict[str, Any]:
    """What identifies a run's data: where it came from, the file's size, the splits' sizes and a SHA-256 of them.

    The hash covers every value of every split (in data units, as the run sees them, in
    order), so a changed, reordered or re-split file changes it; the path and size are kept
    to say what changed.

    Example::

        >>> import torch
        >>> a = data_fingerprint("moons", {"train": torch.zeros(4, 2), "val": torch.ones(2, 2)})
        >>> a["samples"], a["event_shape"], len(a["sha256"])
        ({'train': 4, 'val': 2}, [2], 64)
        >>> fingerprint_change(a, a) is None
        True
        >>> print(fingerprint_change(a, data_fingerprint("moons", {"train": torch.zeros(6, 2)})))  # doctest: +ELLIPSIS
        moons: 6 samples of shape (2,), SHA-256 ..., now moons: 6 samples of shape (2,), SHA-256 ...
    """
    digest = hashlib.sha256()
    for name, split in splits.items():
        values = split.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(values.shape)}{values.dtype};".encode())
        digest.update(values.reshape(-1).numpy().data)
    path = Path(source)
    first = next(iter(splits.values()))
    return {
        "source": source,
        "bytes": path.stat().st_size if path.is_file() else None,
        "samples": {name: len(split) for name, split in splits.items()},
        "event_shape": list(first.shape[1:]),
        "sha256": digest.hexdigest(),
    }


def _describe(fingerprint: dict[str, Any]) -> str:
    size = f" ({fingerprint['bytes']} bytes)" if fingerprint.get("bytes") is not None else ""
    count = sum(fingerprint["samples"].values())
    shape = tuple(fingerprint["event_shape"])
    return f"{fingerprint['source']}{size}: {count} samples of shape {shape}, SHA-256 {fingerprint['sha256'][:12]}..."


def fingerprint_change(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """None when two :func:`data_fingerprint` records name the same data; else what the data were and are."""
    if saved.get("sha256") == now["sha256"]:
        return None
    return f"{_describe(saved)}, now {_describe(now)}"


_ARCHITECTURE = ("flow", "hidden", "num_transforms", "levels", "depth", "hidden_channels", "coupling", "actnorm")

TRAINING_RECORD = ("preprocess", "event_shape", "data_kind", "curves")
"""The entries of a checkpoint's ``extra`` that ``pyro-nf train`` writes and resume, evaluate and sample read."""


def check_training_record(checkpoint: Checkpoint, path: Path) -> None:
    """A :class:`~pyro_nf.checkpoint.CheckpointError` unless the checkpoint holds :data:`TRAINING_RECORD`."""
    missing = [key for key in TRAINING_RECORD if key not in checkpoint.extra]
    if missing:
        raise CheckpointError(
            f"{path}: the checkpoint lacks the training record that pyro-nf train writes (extra entries "
            f"{', '.join(missing)} are missing), so the command line cannot rebuild its data and model"
        )


def check_folder_config(folder: Path, checkpoint: Checkpoint, path: Path, advice: str) -> None:
    """A :class:`RunFolderError` when the folder's ``config.json`` and the checkpoint describe different runs."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    try:
        saved = json.loads(config_path.read_text())
        saved.pop("resolved", None)
        differences = config_differences(saved, checkpoint.config)
    except (ValueError, TypeError, AttributeError) as error:
        raise RunFolderError(f"{config_path}: not a readable run configuration ({error}); {advice}") from None
    if differences:
        raise RunFolderError(
            f"{config_path} and {path} describe different runs ({'; '.join(differences)}, the first value is "
            f"config.json's); {advice}"
        )


def resumed_record(
    latest: LatestCheckpoint, folder: Path, fingerprint: dict[str, Any], event_shape: tuple[int, ...], new_data: bool
) -> list[str]:
    """Check that a resumed run's checkpoint fits its folder and its data; returns what to tell the user.

    Raises:
        CheckpointError: the checkpoint lacks its training record.
        RunFolderError: the folder's ``config.json`` describes another run.
        ConfigError: the data changed (unless ``new_data``), or their shape did.
    """
    checkpoint, path = latest.checkpoint, latest.path
    check_training_record(checkpoint, path)
    check_folder_config(
        folder, checkpoint, path, "the folder mixes two runs: start again with --overwrite, or restore the files"
    )
    saved_shape = tuple(int(s) for s in checkpoint.extra["event_shape"])
    if saved_shape != tuple(event_shape):
        raise ConfigError(
            f"--data {fingerprint['source']}: samples of shape {tuple(event_shape)}, but the run's model (in {path}) "
            f"takes samples of shape {saved_shape}; a resumed run keeps its model: start a new run with --overwrite "
            "or another --out"
        )
    saved = checkpoint.extra.get("data_fingerprint")
    if saved is None:
        return [f"{path} holds no fingerprint of its data (an older pyro_nf wrote it): the data are not compared"]
    change = fingerprint_change(saved, fingerprint)
    if change is None:
        return []
    if not new_data:
        raise ConfigError(
            f"the data changed since the checkpoint {path}: {change}; pass --allow-new-data to continue on the new "
            "data (the standardisation fitted on the old data is kept), or start a new run with --overwrite or "
            "another --out"
        )
    return [f"continuing on new data (--allow-new-data): {change}"]


@dataclass
class OpenedRun:
    """What :func:`open_run` gives: the held folder (None on processes other than 0), the checkpoint to resume
    from (None for a new run), the data's fingerprint and what to tell the user."""

    folder: RunFolder | None
    checkpoint: Checkpoint | None
    fingerprint: dict[str, Any]
    notes: list[str]


def open_run(
    config: TrainConfig, context: DistributedContext, resume: bool, options: RunOptions, data: PreparedData
) -> OpenedRun:
    """Lock and prepare the run folder (process 0), then read and check a resumed run's checkpoint (every process).

    Process 0 sets a refused newest checkpoint aside (``checkpoint.bad.pt``) before the others
    read; a failure on process 0 stops every process.
    """
    out = Path(config.out)
    fingerprint = data_fingerprint(config.data, {"train": data.train, "val": data.val, "test": data.test})
    opened = OpenedRun(None, None, fingerprint, [])
    failure: Exception | None = None
    if context.is_main:
        try:
            opened.folder = RunFolder.open(out, resume=resume, overwrite=options.overwrite)
            if opened.folder.removed:
                what = "the old run's files and stale temporaries" if options.overwrite else "stale temporaries"
                opened.notes.append(f"removed {len(opened.folder.removed)} files ({what}) from {out}")
        except Exception as error:  # noqa: BLE001 (raised below, once the other processes know)
            failure = error
    if not context.all_ok(failure is None):
        raise failure or RunFolderError(f"{out}: process 0 could not open the run folder")
    if not resume:
        return opened
    try:
        latest = load_latest_checkpoint(out, set_aside=context.is_main)
        opened.notes += [latest.note] if latest.note else []
        opened.notes += resumed_record(latest, out, fingerprint, data.event_shape, options.allow_new_data)
        opened.notes += changed_options(latest.checkpoint.config, config, latest.checkpoint.step)
    except BaseException:
        if opened.folder is not None:
            opened.folder.close()
        raise
    opened.checkpoint = latest.checkpoint
    return opened


def load_model_state(model: nn.Module, checkpoint: Checkpoint, path: Path) -> None:
    """``model.load_state_dict`` of the checkpoint's weights; a :class:`CheckpointError` saying how they disagree."""
    try:
        model.load_state_dict(checkpoint.model)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        config = checkpoint.config
        built = ", ".join(f"{key} {config.get(key)!r}" for key in _ARCHITECTURE if config.get(key) is not None)
        raise CheckpointError(
            f"{path}: the weights it holds do not fit the model its configuration describes ({built}): "
            f"{' '.join(lines[:3])[:600]}"
        ) from None


def config_differences(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """The options two saved configurations disagree on, beyond what a resume may change (empty when they agree).

    Both are :meth:`TrainConfig.to_dict` records (older layouts are migrated first); entries
    read ``"flow: 'maf' against 'realnvp'"``.

    Example::

        >>> from pyro_nf.training import resolve_config
        >>> a = resolve_config({"flow": "maf", "out": "r"}).to_dict()
        >>> config_differences(a, {**a, "hidden": [16], "steps": 5})
        ['hidden: [128, 128] against [16]']
    """
    one, two = TrainConfig.from_dict(first).to_dict(), TrainConfig.from_dict(second).to_dict()
    ignored = RESUMABLE | {"out", "config_version"}
    return [f"{key}: {one[key]!r} against {two[key]!r}" for key in one if key not in ignored and one[key] != two[key]]


def changed_options(saved: dict[str, Any], config: TrainConfig, step: int) -> list[str]:
    """What a resume changes of the run's training (learning rate, objective, data, ...), said once in the log."""
    before = TrainConfig.from_dict(saved).to_dict()
    quiet = {"steps", "epochs", "progress", "device", "val_every", "checkpoint_every", "log_every", "num_samples"}
    return [
        f"--{key.replace('_', '-')} changes from {before[key]!r} to {value!r} at step {step}"
        for key, value in config.to_dict().items()
        if key in RESUMABLE - quiet and before[key] != value
    ]
