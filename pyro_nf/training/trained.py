"""Use a trained run: score it on a split or a file (:func:`evaluate`), draw samples from it (:func:`sample`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pyro_nf.checkpoint import Checkpoint, load_checkpoint
from pyro_nf.data.files import as_images, as_vectors, load_file
from pyro_nf.distributions import FlowModel
from pyro_nf.registry import FLOWS
from pyro_nf.training.config import ConfigError, TrainConfig, data_kind
from pyro_nf.training.data import PreparedData, prepare_data, preprocess_from_state
from pyro_nf.training.distributed import resolve_device
from pyro_nf.training.figures import _plot_sample_picture, _samples
from pyro_nf.training.model import _metric_name, build_model, evaluate_nll

__all__ = ["evaluate", "sample"]


def _load_run(checkpoint_path: Path, device: str) -> tuple[FlowModel, TrainConfig, PreparedData | None, Checkpoint]:
    checkpoint = load_checkpoint(checkpoint_path)
    config = TrainConfig.from_dict(checkpoint.config)
    extra = checkpoint.extra
    shape = tuple(int(s) for s in extra["event_shape"])
    empty = torch.zeros((0, *shape))
    shell = PreparedData(extra["data_kind"], empty, empty, empty, preprocess_from_state(extra["preprocess"]), "")
    model = build_model(config, shell)
    model.load_state_dict(checkpoint.model)
    model.to(resolve_device(device))
    model.eval()
    return model, config, shell, checkpoint


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
    path = _checkpoint_file(checkpoint_path)
    model, config, shell, _ = _load_run(path, device)
    assert shell is not None
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
    shell.train = x[:1]
    metric = _metric_name(shell)
    value = evaluate_nll(model, shell, x, batch_size=batch_size, seed=config.seed + 2)
    return {"metric": metric, "value": value, "data": source, "samples": len(x), "checkpoint": str(path)}


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

    Returns:
        The paths of the ``.npy`` file and of the ``.png`` picture.
    """
    path = _checkpoint_file(checkpoint_path)
    if num < 1:
        raise ConfigError(f"--num: expected a positive integer, got {num}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature: expected a positive number, got {temperature}")
    output = Path(output)
    if output.suffix != ".npy":
        raise ConfigError(f"--output: expected a .npy file name, got {str(output)!r}")
    model, config, shell, _ = _load_run(path, device)
    assert shell is not None
    torch.manual_seed(seed)
    x = _samples(model, shell, num, temperature)
    output.parent.mkdir(parents=True, exist_ok=True)
    array = x.numpy().astype(np.uint8 if shell.kind == "image" and shell.preprocess.n_levels <= 256 else np.float32)  # type: ignore[union-attr]
    np.save(output, array)
    picture = output.with_suffix(".png")
    _plot_sample_picture(x, shell, picture, f"{num} samples of {config.flow} (T = {temperature:g})")
    return output, picture


def _checkpoint_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path
