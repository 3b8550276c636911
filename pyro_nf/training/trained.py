"""Use a trained run: score it on a split or a file (:func:`evaluate`), draw samples from it (:func:`sample`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pyro_nf.checkpoint import CheckpointError, load_checkpoint
from pyro_nf.data.files import DataFileError, as_images, as_vectors, csv_columns, is_data_file, load_file
from pyro_nf.distributions import FlowModel
from pyro_nf.registry import FLOWS
from pyro_nf.training.config import ConfigError, TrainConfig, data_kind
from pyro_nf.training.data import PreparedData, prepare_data, preprocess_from_state
from pyro_nf.training.distributed import resolve_device
from pyro_nf.training.figures import _plot_sample_picture, _samples
from pyro_nf.training.model import _metric_name, build_model
from pyro_nf.training.objective import evaluate_with_nfe
from pyro_nf.training.run_record import check_folder_config, check_training_record, load_model_state

__all__ = ["evaluate", "sample"]


def _load_run(given: str | Path, device: str) -> tuple[FlowModel, TrainConfig, PreparedData, Path]:
    """The model of a run folder or checkpoint file, checked against its configuration (and the folder's).

    A damaged checkpoint is refused (naming what is damaged and the previous checkpoint to use
    instead, ``checkpoint.prev.pt``): scores and samples always come from the file asked for.
    """
    path = _checkpoint_file(given)
    torch_device = resolve_device(device)
    checkpoint = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(checkpoint.config)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    check_training_record(checkpoint, path)
    if Path(given).is_dir():
        advice = f"pass {path} itself to use the checkpoint alone"
        check_folder_config(Path(given), checkpoint, path, advice)
    extra = checkpoint.extra
    shape = tuple(int(s) for s in extra["event_shape"])
    empty = torch.zeros((0, *shape))
    shell = PreparedData(extra["data_kind"], empty, empty, empty, preprocess_from_state(extra["preprocess"]), "")
    try:
        model = build_model(config, shell)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: its configuration does not build a model ({error})") from None
    load_model_state(model, checkpoint, path)
    model.to(torch_device)
    model.eval()
    return model, config, shell, path


def evaluate(
    checkpoint_path: str | Path,
    *,
    split: Literal["val", "test", "train"] = "test",
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 1024,
) -> dict[str, Any]:
    """The mean NLL (nats per sample) or bits per dimension of a trained model on a split or on other data.

    Args:
        checkpoint_path: a ``checkpoint.pt`` written by :func:`~pyro_nf.training.loop.train` (or its run folder).
        split: which split of the training data to score.
        data: score this ``.npy``/``.npz``/``.csv`` file (all of it) instead.
        device: where to run.
        batch_size: samples per forward pass.
    """
    _positive_option(batch_size, "--batch-size")
    model, config, shell, path = _load_run(checkpoint_path, device)
    if data is not None:
        if data_kind(data) != "file":
            raise ConfigError(f"--data for evaluate: expected a .npy, .npz or .csv file, got {data!r}")
        loaded = load_file(data)
        if shell.kind == "image":
            arrays, _ = as_images(loaded, n_levels=shell.preprocess.n_levels)  # type: ignore[union-attr]
        else:
            arrays = as_vectors(loaded)
        values = torch.as_tensor(np.concatenate(list(arrays.values())), dtype=torch.float32)
        if tuple(values.shape[1:]) != shell.event_shape:
            raise ConfigError(
                f"{data}: expected samples of shape {shell.event_shape} (as the model was trained on), "
                f"got {tuple(values.shape[1:])}"
            )
        x, source = values, str(loaded.path)
    else:
        prepared = prepare_data(config, image_flow=FLOWS[config.flow].kind == "image")
        prepared.preprocess = shell.preprocess
        x, source = {"train": prepared.train, "val": prepared.val, "test": prepared.test}[split], f"{split} split"
    if len(x) == 0:
        raise ConfigError(f"{source}: no samples to score")
    shell.train = x[:1]
    metric = _metric_name(shell)
    value, nfe = evaluate_with_nfe(model, shell, x, batch_size=batch_size, seed=config.seed + 2)
    result = {"metric": metric, "value": value, "data": source, "samples": len(x), "checkpoint": str(path)}
    if nfe is not None:
        result["nfe"] = nfe  # the mean NFE of the density solves, per batch
    return result


def sample(
    checkpoint_path: str | Path,
    output: str | Path,
    *,
    num: int = 1000,
    temperature: float = 1.0,
    seed: int = 0,
    device: str = "auto",
) -> tuple[Path, Path]:
    """Draw ``num`` samples in data units; write them as ``.npy`` and a picture beside it.

    The picture has the name of ``output`` with ``.png``; where that is one of the run's own
    figures (``RUN/samples.png``, ``RUN/curves.png``) it is ``NAME-sampled.png`` instead.

    Returns:
        The paths of the ``.npy`` file and of the ``.png`` picture.
    """
    _positive_option(num, "--num")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed: expected an integer >= 0, got {seed!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature: expected a positive number, got {temperature}")
    output = Path(output)
    if output.suffix != ".npy" or output.is_dir():
        what = "a folder" if output.is_dir() else repr(str(output))
        raise ConfigError(f"--output {output}: expected the name of a .npy file to write, got {what}")
    model, config, shell, path = _load_run(checkpoint_path, device)
    torch.manual_seed(seed)
    x = _samples(model, shell, num, temperature)
    array = x.numpy().astype(np.uint8 if shell.kind == "image" and shell.preprocess.n_levels <= 256 else np.float32)  # type: ignore[union-attr]
    picture = _picture_path(output, path)
    shell.columns = _columns(config) if shell.kind == "vector" else None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        np.save(output, array)
        _plot_sample_picture(x, shell, picture, f"{num} samples of {config.flow} (T = {temperature:g})")
    except OSError as error:
        blocked = next((p for p in [output.parent, *output.parents] if p.exists() and not p.is_dir()), None)
        reason = f"{blocked} is a file" if blocked is not None else error.strerror or str(error)
        raise ConfigError(f"--output {output}: cannot write it ({reason})") from None
    return output, picture


def _positive_option(value: object, flag: str) -> int:
    """``value`` if it is a positive int, else a :class:`ConfigError` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag}: expected a positive integer, got {value!r}")
    return value


def _checkpoint_file(path: str | Path) -> Path:
    """The checkpoint of a run folder (or the checkpoint itself); a data file or a folder without one is refused."""
    path = Path(path)
    if path.is_dir():
        if not (path / "checkpoint.pt").exists():
            raise ConfigError(f"{path}: not a run folder (no checkpoint.pt in it); give the --out of pyro-nf train")
        return path / "checkpoint.pt"
    if is_data_file(str(path)):
        raise ConfigError(
            f"{path}: not a run folder but a data file; give the run folder (the --out of pyro-nf train) "
            f"first, and the file as --data to score it (pyro-nf evaluate RUN --data {path})"
        )
    return path


def _picture_path(output: Path, run: Path) -> Path:
    """The picture beside ``output`` (same name, ``.png``), never one of the run's own figures."""
    picture = output.with_suffix(".png")
    if picture.resolve() in {(run.parent / name).resolve() for name in ("samples.png", "curves.png")}:
        picture = output.with_name(f"{output.stem}-sampled.png")
    return picture


def _columns(config: TrainConfig) -> tuple[str, ...] | None:
    """The feature names of a run on a CSV file with a header (None if it has none or is gone)."""
    if Path(config.data).suffix.lower() != ".csv" or not Path(config.data).is_file():
        return None
    try:
        return csv_columns(config.data)
    except DataFileError:
        return None
