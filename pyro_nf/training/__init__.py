"""Fit, evaluate and sample flow density models: the engine behind the ``pyro-nf`` command line.

:func:`~pyro_nf.training.loop.train` takes a :class:`~pyro_nf.training.config.TrainConfig`
(plain, typed values; nothing from :mod:`argparse`), builds the data, the flow
and an Adam optimizer, and runs the loop

.. math::

    \\theta \\leftarrow \\theta - \\mathrm{Adam}\\Big(\\nabla_\\theta \\frac{1}{B}\\sum_{i=1}^{B}
    -\\big[\\log p_Z(f_\\theta^{-1}(y_i)) + \\log|\\det \\partial f_\\theta^{-1}/\\partial y_i|
    + \\log|\\det \\partial y_i / \\partial x_i|\\big]\\Big)

where ``y = g(x)`` is the fixed preprocessing (standardization of vectors,
uniform dequantization and scaling of images) whose log-determinant is
counted, so the loss is the negative log-likelihood of the data in its own
units: nats per sample for vectors, bits per dimension
``NLL / (D log 2)`` for images (with dequantization, an upper bound on the
discrete NLL, as reported in the RealNVP and Glow papers).

Everything a run writes goes to one folder: ``config.json`` (the full
resolved configuration), ``train.log``, ``history.csv`` (loss per logged
step), ``checkpoint.pt`` (see :mod:`pyro_nf.checkpoint`), periodic
validation figures in ``figures/``, ``curves.png`` and ``metrics.json``.
The folder is locked while a run runs, holds one run at a time, and a
SIGTERM or SIGINT stops the run with a checkpoint
(:mod:`~pyro_nf.training.run_folder`); a resume checks that the data are
the run's (:mod:`~pyro_nf.training.run_record`). The CNFs can be trained by
flow matching instead of the likelihood (:mod:`~pyro_nf.training.objective`).

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`; every process holds the
data, draws the same shuffled order and takes its slice of each global batch,
so the gradient is that of the whole batch and the run matches a
one-process run up to floating-point rounding. Only rank 0 writes files.

The package has one module per job: :mod:`~pyro_nf.training.config` (the
options, their defaults and checks), :mod:`~pyro_nf.training.data` (splits and
preprocessing), :mod:`~pyro_nf.training.model` (the flow and its metric),
:mod:`~pyro_nf.training.distributed` (``torchrun``), :mod:`~pyro_nf.training.loop`
(:func:`~pyro_nf.training.loop.train`), :mod:`~pyro_nf.training.figures` and
:mod:`~pyro_nf.training.trained` (:func:`~pyro_nf.training.trained.evaluate`,
:func:`~pyro_nf.training.trained.sample`).
"""

from __future__ import annotations

from pyro_nf.registry import FLOWS
from pyro_nf.training.config import (
    IMAGE_DATASETS,
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    TrainingInterrupted,
    merge_resume,
    resolve_config,
)
from pyro_nf.training.loop import TrainResult, train
from pyro_nf.training.trained import evaluate, sample

__all__ = [
    "FLOWS",
    "IMAGE_DATASETS",
    "ConfigError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "evaluate",
    "merge_resume",
    "resolve_config",
    "sample",
    "train",
]
