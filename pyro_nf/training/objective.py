"""The objective a run minimises: the likelihood (its metric) or, for the CNFs, flow matching; and the evaluation's NFE.

With ``objective="likelihood"`` the loss of a batch of preprocessed data ``y`` is the run's
metric, the NLL in nats per sample (bits per dimension for images); with
``objective="flow-matching"`` it is :func:`~pyro_nf.transforms.flow_matching.flow_matching_loss`
of the flow (an FFJORD, a stack of them, or the multiscale CNF) on ``y``, the data in the flow's
output space: a regression of the vector fields, with no ODE solve. Validation and the final
metrics are the likelihood in both cases (evaluation mode: one solve per batch), reported with
the number of function evaluations (NFE) of those solves.
"""

from __future__ import annotations

from torch import Tensor, nn

from pyro_nf.distributions import FlowModel
from pyro_nf.training.config import TrainConfig
from pyro_nf.training.data import PreparedData
from pyro_nf.training.model import _model_view, evaluate_nll
from pyro_nf.transforms.continuous import FFJORD
from pyro_nf.transforms.flow_matching import Coupling, Path, flow_matching_loss

__all__ = ["Objective", "evaluate_with_nfe", "evaluation_nfe"]


class Objective(nn.Module):
    """The training loss of a batch of preprocessed data, as a module (so ``DistributedDataParallel`` can wrap it).

    Its parameters are the model's. ``loss_name`` names the loss in logs and on the progress bar
    (``nll``, ``bpd`` or ``fm``).

    Example::

        >>> import torch
        >>> from pyro_nf.training import resolve_config
        >>> from pyro_nf.training.data import prepare_data
        >>> from pyro_nf.training.model import build_model
        >>> config = resolve_config({"flow": "ffjord", "objective": "flow-matching", "hidden": [8],
        ...                          "n_train": 64, "n_val": 8, "n_test": 8, "out": "r"})
        >>> data = prepare_data(config, image_flow=False)
        >>> objective = Objective(build_model(config, data), data, config)
        >>> objective.loss_name, objective(data.preprocess.to_model(data.train[:16])).shape
        ('fm loss', torch.Size([]))
    """

    def __init__(self, model: FlowModel, data: PreparedData, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.preprocess = data.preprocess
        self.flow_matching = config.objective == "flow-matching"
        self.path: Path = config.fm_path or "linear"  # type: ignore[assignment]  # checked by the configuration
        self.coupling: Coupling = config.fm_coupling or "independent"  # type: ignore[assignment]
        self.sigma_min = float(config.fm_sigma_min or 0.0)
        self.loss_name = "fm loss" if self.flow_matching else data.preprocess.metric_name

    def forward(self, y: Tensor) -> Tensor:
        """The mean loss of the batch ``y`` (preprocessed data, one sample per row)."""
        x = _model_view(self.model, y)
        if self.flow_matching:
            return flow_matching_loss(
                self.model.flow,
                x,
                path=self.path,
                coupling=self.coupling,
                sigma_min=self.sigma_min,  # type: ignore[arg-type]
            )
        return self.preprocess.metric(self.model(x)).mean()


def evaluation_nfe(model: nn.Module) -> int | None:
    """The NFE of the model's last density solve: ``nfe_inverse`` summed over its FFJORD blocks (None without one)."""
    blocks = [m for m in model.modules() if isinstance(m, FFJORD)]
    return sum(block.nfe_inverse for block in blocks) if blocks else None


def evaluate_with_nfe(
    model: FlowModel, data: PreparedData, x: Tensor, *, batch_size: int = 1024, seed: int = 0
) -> tuple[float, float | None]:
    """:func:`~pyro_nf.training.model.evaluate_nll` and the mean NFE of its solves per batch (None without a CNF)."""
    if evaluation_nfe(model) is None:
        return evaluate_nll(model, data, x, batch_size=batch_size, seed=seed), None
    counts: list[int] = []
    value = evaluate_nll(
        model, data, x, batch_size=batch_size, seed=seed, after_batch=lambda: counts.append(evaluation_nfe(model) or 0)
    )
    return value, sum(counts) / max(len(counts), 1)
