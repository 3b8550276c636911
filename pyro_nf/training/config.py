"""The configuration of a training run: flows, datasets, per-data defaults, validation and resume rules."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyro_nf.data import TOY_DATASETS
from pyro_nf.data.files import is_data_file
from pyro_nf.registry import FLOWS
from pyro_nf.training.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from pyro_nf.training.validation import (
    OBJECTIVES,
    check_device_name,
    settle_objective,
    validate_objective,
    validate_step_modes,
)
from pyro_nf.transforms.image_coupling import COUPLINGS

__all__ = [
    "IMAGE_DATASETS",
    "ConfigError",
    "NonFiniteLossError",
    "OBJECTIVES",
    "TrainConfig",
    "TrainingInterrupted",
    "data_kind",
    "describe_default",
    "merge_resume",
    "resolve_config",
]

DataKind = Literal["toy", "file", "image"]


CONFIG_VERSION = 2
"""The layout of :class:`TrainConfig` records this version writes (see ``config_version``)."""

IMAGE_DATASETS: dict[str, str] = {
    "digits": "8x8 handwritten digits from scikit-learn (1797 images, 17 grey levels)",
    "mnist": "MNIST 28x28 (60000 + 10000 images)",
    "fashion-mnist": "Fashion-MNIST 28x28 (60000 + 10000 images)",
}
"""The built-in image datasets ``--data`` accepts."""


@dataclass
class TrainConfig:
    """The full, resolved configuration of a training run (every field a plain value).

    Build one with :func:`resolve_config`, which fills the defaults that depend
    on the kind of data. Fields that do not apply to the chosen flow are None.

    Fields:

    - ``flow``: a key of :data:`FLOWS`.
    - ``data``: a toy name, an image dataset name, or a path to a ``.npy``/``.npz``/``.csv`` file.
    - ``out``: the folder that receives every output.
    - ``steps``: optimizer steps in total.
    - ``epochs``: the number of passes over the training set ``steps`` came from, if given that way.
    - ``batch_size``: samples per (global) batch.
    - ``lr``: Adam's learning rate after warm-up.
    - ``warmup_steps``: the learning rate rises linearly from ``lr / warmup_steps`` over these steps.
    - ``grad_clip``: the largest gradient norm (0 turns clipping off).
    - ``seed``: seeds the model's initialisation, the data split, the shuffling and the noise.
    - ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
    - ``hidden``: hidden widths of the vector flows' networks.
    - ``num_transforms``: layers of a vector flow.
    - ``levels``: squeezes of an image flow (each halves H and W), the same in every image flow.
    - ``depth``: steps per level of an image flow.
    - ``hidden_channels``: channels of an image flow's coupling networks.
    - ``coupling``: ``"affine"``, ``"additive"`` or ``"spline"`` (image flows).
    - ``n_levels``: pixel levels of image data (None for vectors).
    - ``data_dir``: a folder with the MNIST / Fashion-MNIST IDX files (default: the offline copies).
    - ``n_train``: training points drawn from a toy density.
    - ``n_val``: validation points (toys; files use 10 %).
    - ``n_test``: test points (toys; files use 10 %).
    - ``val_every``: steps between validations (a figure, the curves and a checkpoint).
    - ``checkpoint_every``: steps between checkpoints.
    - ``log_every``: steps between lines of ``history.csv``.
    - ``num_samples``: samples drawn for figures.
    - ``progress``: show a progress bar.
    - ``actnorm``: an ActNorm first on the data side of MAF / IAF / RealNVP (False: the data are
      standardised already; None for the other flows).
    - ``objective``: ``"likelihood"`` (maximum likelihood, every flow) or ``"flow-matching"`` (the CNFs
      ``ffjord`` and ``ffjord-multiscale``: :func:`~pyro_nf.transforms.flow_matching.flow_matching_loss`).
    - ``fm_path``, ``fm_coupling``, ``fm_sigma_min``: the flow-matching path (``"linear"`` or ``"cosine"``),
      pairing (``"independent"`` or ``"ot"``) and end width ``sigma_min`` (None with the likelihood).
    - ``compile``: compile the flow's repeated blocks (``torch.compile``, see :mod:`pyro_nf.compiled`).
    - ``cuda_graphs``: capture the whole training step in a CUDA graph and replay it (one GPU, one process).
    - ``precision``: ``"fp32"`` or ``"bf16"`` (the coupling networks of an image flow under bf16 autocast;
      maps, log-dets and the loss in float32).
    - ``channels_last``: the convolution weights in the ``channels_last`` memory format.

      These four leave the model as it is; left as None,
      :func:`~pyro_nf.training.validation.step_modes` picks them for the device
      (:data:`~pyro_nf.training.validation.CPU_STEP_DEFAULTS`,
      :data:`~pyro_nf.training.validation.GPU_STEP_DEFAULTS`), and a resumed run may change them.
    - ``config_version``: the layout of this record (2: ``levels`` counts squeezes in every image flow;
      in version 1 ``levels`` of ``realnvp-multiscale`` counted scales, one more, and the vector flows had
      no ActNorm).
    """

    flow: str
    data: str
    out: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    grad_clip: float
    seed: int
    device: str
    epochs: int | None = None
    hidden: list[int] | None = None
    num_transforms: int | None = None
    levels: int | None = None
    depth: int | None = None
    hidden_channels: int | None = None
    coupling: str | None = None
    n_levels: int | None = None
    data_dir: str | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    val_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 10
    num_samples: int = 2000
    progress: bool = True
    actnorm: bool | None = None
    objective: str = "likelihood"
    fm_path: str | None = None
    fm_coupling: str | None = None
    fm_sigma_min: float | None = None
    compile: bool | None = None
    cuda_graphs: bool | None = None
    precision: str | None = None
    channels_last: bool | None = None
    config_version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict`'s output (unknown keys are an error); older layouts are migrated."""
        unknown = _unknown_fields(cls, values)
        if unknown:
            raise ConfigError(f"configuration: unknown keys {', '.join(unknown)} (written by a newer pyro_nf?)")
        missing = sorted({"flow", "data", "out"} - set(values))
        if missing:
            raise ConfigError(f"configuration: missing keys {', '.join(missing)}")
        if values["flow"] not in FLOWS:
            raise ConfigError(
                f"configuration: unknown flow {values['flow']!r}; this pyro_nf knows {', '.join(FLOWS)} "
                "(written by a newer pyro_nf?)"
            )
        values = dict(values)
        if values.setdefault("config_version", 1) == 1:
            if values.get("flow") == "realnvp-multiscale" and values.get("levels") is not None:
                values["levels"] -= 1  # version 1 counted scales: one more than squeezes
            if values.get("flow") in ("maf", "iaf", "realnvp"):
                values["actnorm"] = False  # version 1 built them without an ActNorm
            values["config_version"] = CONFIG_VERSION
        return cls(**values)


def _unknown_fields(cls: type[TrainConfig], values: dict[str, Any]) -> list[str]:
    """The keys of ``values`` that are not fields of ``cls``, sorted."""
    return sorted(set(values) - {f.name for f in dataclasses.fields(cls)})


def _flag(key: str) -> str:
    """The command-line option of a :class:`TrainConfig` field: ``warmup_steps`` -> ``--warmup-steps``."""
    return f"--{key.replace('_', '-')}"


RESUMABLE = frozenset(
    {
        "steps",
        "epochs",
        "lr",
        "warmup_steps",
        "grad_clip",
        "objective",
        "fm_path",
        "fm_coupling",
        "fm_sigma_min",
        "data",
        "data_dir",
        "val_every",
        "checkpoint_every",
        "log_every",
        "progress",
        "device",
        "num_samples",
        "compile",
        "cuda_graphs",
        "precision",
        "channels_last",
    }
)
"""Options a resumed run may change; all others (the model, the split, the seed) must match the checkpoint.

A changed ``--data`` (or ``--data-dir``) must hold the same data (the fingerprint is compared) unless the
resume is given ``--allow-new-data``.
"""


def data_kind(data: str) -> DataKind:
    """``"toy"``, ``"image"`` or ``"file"``; raises :class:`ConfigError` listing the choices otherwise."""
    if data in TOY_DATASETS:
        return "toy"
    if data in IMAGE_DATASETS:
        return "image"
    if is_data_file(data):
        return "file"
    raise ConfigError(
        f"--data: unknown dataset {data!r}; expected one of {', '.join(TOY_DATASETS)}, "
        f"{', '.join(IMAGE_DATASETS)}, or a path to a .npy, .npz or .csv file"
    )


def _defaults(flow: str, kind: DataKind, data: str) -> dict[str, Any]:
    """Per-data-kind defaults (see ``docs/families/command-line.md``)."""
    spec = FLOWS[flow]
    out: dict[str, Any] = {"seed": 0, "device": "auto", "grad_clip": 0.0, "warmup_steps": 0}
    if spec.kind == "image":
        big = data in ("mnist", "fashion-mnist")
        out.update(
            steps=20000 if big else 1500,
            batch_size=64,
            lr=1e-3,
            warmup_steps=1000 if big else 100,
            grad_clip=50.0,
            levels=(2 if big else 1) if flow == "realnvp-multiscale" else 2,
            depth=16 if big else 4,
            hidden_channels=256 if big else 32,
            coupling="affine",
            val_every=2000 if big else 250,
            num_samples=64,
        )
        if flow == "ffjord-multiscale":
            # FFJORD's image CNF: --depth is the CNF blocks before and after each squeeze (2 in the paper).
            out.update(levels=2 if big else 1, depth=2, hidden_channels=64 if big else 32, coupling=None)
        return out
    out.update(batch_size=256, lr=1e-3, val_every=500, num_samples=2000)
    if flow == "ffjord":
        out.update(steps=1000, hidden=[64, 64, 64], num_transforms=1, val_every=250)
    elif kind == "toy":
        out.update(steps=2000, hidden=[128, 128], num_transforms=6 if flow == "realnvp" else 5)
    else:
        out.update(steps=5000, hidden=None, num_transforms=6 if flow == "realnvp" else 5)
        if kind == "image":
            out.update(batch_size=128, lr=1e-4, warmup_steps=100, num_samples=64)
    if flow in ("maf", "iaf", "realnvp", "nsf", "nsf-coupling"):
        out.update(actnorm=False)  # the data are standardised already (Standardize): no ActNorm needed
    if kind == "toy":
        out.update(n_train=20000, n_val=5000, n_test=5000)
    return out


_DEFAULT_CASES = (  # (label, flow, data): the kinds of data whose defaults differ
    ("2D toys", "maf", "moons"),
    ("files", "maf", "data.csv"),
    ("vector flows on images", "maf", "digits"),
    ("image flows on digits", "glow", "digits"),
    ("image flows on mnist / fashion-mnist", "glow", "mnist"),
)
_FLOW_CASES = {"realnvp": "maf", "ffjord": "maf", "realnvp-multiscale": "glow"}  # flows whose defaults differ


def describe_default(key: str) -> str:
    """The default of a :class:`TrainConfig` field in words, per kind of data where it differs (for ``--help``).

    Example::

        >>> describe_default("seed")
        'default: 0'
        >>> describe_default("depth")
        'default: 4 (image flows on digits), 16 (image flows on mnist / fashion-mnist)'
    """

    def value(flow: str, data: str) -> Any:
        field = {f.name: f for f in dataclasses.fields(TrainConfig)}[key]
        fallback = None if field.default is dataclasses.MISSING else field.default
        return _defaults(flow, data_kind(data), data).get(key, fallback)

    def words(v: Any) -> str:
        if key == "hidden" and v is None:
            return "two layers of max(64, 4 D)"
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    groups: dict[str, list[str]] = {}
    for label, flow, data in _DEFAULT_CASES:
        v = value(flow, data)
        if v is not None or (key == "hidden" and FLOWS[flow].kind == "vector"):
            groups.setdefault(words(v), []).append(label)
        for other, like in _FLOW_CASES.items():
            if like == flow and (data == "moons" or FLOWS[flow].kind == "image"):
                if (w := value(other, data)) != v and w is not None:
                    where = f" on {data}" if FLOWS[flow].kind == "image" else ""
                    groups.setdefault(words(w), []).append(other + where)
    if len(groups) == 1:
        return f"default: {next(iter(groups))}"
    return "default: " + ", ".join(f"{text} ({', '.join(labels)})" for text, labels in groups.items())


def resolve_config(options: dict[str, Any]) -> TrainConfig:
    """Fill every option left as None with its default for the flow and kind of data.

    ``options`` holds :class:`TrainConfig` fields; ``flow`` and ``data`` may be
    None (MAF, two moons). ``epochs`` (if given) is kept and turned into steps
    once the size of the training set is known.

    Example::

        >>> config = resolve_config({"flow": "maf", "data": "moons", "out": "runs/demo"})
        >>> config.steps, config.batch_size, config.hidden
        (2000, 256, [128, 128])
    """
    unknown = _unknown_fields(TrainConfig, options)
    if unknown:
        raise ConfigError(f"unknown options {', '.join(unknown)}")
    flow = options.get("flow") or "maf"
    data = options.get("data") or "moons"
    if flow not in FLOWS:
        raise ConfigError(f"--flow: unknown flow {flow!r}; expected one of {', '.join(FLOWS)}")
    kind = data_kind(data)
    if kind == "file":
        data = str(Path(data).expanduser().resolve())
    spec = FLOWS[flow]
    if spec.kind == "image" and kind == "toy":
        raise ConfigError(
            f"--flow {flow} models images, but {data!r} is a 2D toy; use maf, iaf, realnvp, nsf or ffjord"
        )
    values = {key: value for key, value in options.items() if value is not None}
    values["flow"], values["data"] = flow, data
    merged = {**_defaults(flow, kind, data), **values}
    if "out" not in merged:
        stem = Path(data).stem if kind == "file" else data
        merged["out"] = str(Path("runs") / f"{stem}-{flow}")
    if spec.kind == "vector":
        for key in ("levels", "depth", "hidden_channels", "coupling"):
            if key in values:
                raise ConfigError(f"{_flag(key)} applies to image flows, not to {flow}")
    else:
        for key in ("hidden", "num_transforms"):
            if key in values:
                raise ConfigError(f"{_flag(key)} applies to vector flows, not to {flow}")
        if flow == "ffjord-multiscale" and "coupling" in values:
            raise ConfigError(f"--coupling applies to glow and realnvp-multiscale, not to {flow}")
    if "data_dir" in values:
        if kind != "image" or data == "digits":
            raise ConfigError(f"--data-dir applies to mnist and fashion-mnist, not to {data!r}")
        merged["data_dir"] = str(Path(values["data_dir"]).expanduser().resolve())
    if kind != "toy":
        for key in ("n_train", "n_val", "n_test"):
            if key in values:
                raise ConfigError(f"{_flag(key)} applies to the 2D toys, not to {data!r}")
    if "steps" in values and "epochs" in values:
        raise ConfigError("give either --steps or --epochs, not both")
    if "epochs" in values:
        merged["steps"] = 0  # set from the training-set size in prepare_data
    if "checkpoint_every" not in values:
        merged["checkpoint_every"] = merged.get("val_every", 500)
    config = TrainConfig(**merged)
    settle_objective(config, given=values)
    _validate(config)
    return config


def _validate(config: TrainConfig) -> None:
    positive = {
        "batch_size": config.batch_size,
        "val_every": config.val_every,
        "checkpoint_every": config.checkpoint_every,
        "log_every": config.log_every,
        "num_samples": config.num_samples,
    }
    for key in ("epochs", "num_transforms", "levels", "depth", "hidden_channels", "n_train", "n_val", "n_test"):
        value = getattr(config, key)
        if value is not None:
            positive[key] = value
    if config.epochs is None:
        positive["steps"] = config.steps
    for key, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{_flag(key)}: expected a positive integer, got {value!r}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"--lr: expected a positive number, got {config.lr!r}")
    if config.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps: expected an integer >= 0, got {config.warmup_steps!r}")
    if not (math.isfinite(config.grad_clip) and config.grad_clip >= 0):
        raise ConfigError(f"--grad-clip: expected a number >= 0 (0 turns it off), got {config.grad_clip!r}")
    if config.hidden is not None and (not config.hidden or any(h < 1 for h in config.hidden)):
        raise ConfigError(f"--hidden: expected positive widths such as 64,64, got {config.hidden!r}")
    if config.coupling is not None and config.coupling not in COUPLINGS:
        raise ConfigError(f"--coupling: expected {', '.join(COUPLINGS)}, got {config.coupling!r}")
    if config.n_levels is not None and config.n_levels < 2:
        raise ConfigError(f"--n-levels: expected an integer >= 2, got {config.n_levels!r}")
    check_device_name(config.device)
    if not isinstance(config.out, str) or not config.out.strip():
        raise ConfigError(f"--out: expected the name of a folder, got {config.out!r}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError(f"--seed: expected an integer >= 0, got {config.seed!r}")
    validate_objective(config.flow, config.objective, config.fm_path, config.fm_coupling, config.fm_sigma_min)
    validate_step_modes(config)


def merge_resume(saved: dict[str, Any], options: dict[str, Any]) -> TrainConfig:
    """The configuration of a resumed run: the checkpoint's, with the few options a resume may change.

    Raises:
        ConfigError: an option that differs from the checkpoint's and cannot change on resume.
    """
    config = TrainConfig.from_dict(saved)
    given = {}
    for key, value in options.items():
        if value is None or key in ("out",):
            continue
        if key in ("data", "data_dir") and (key == "data_dir" or data_kind(value) == "file"):
            value = str(Path(value).expanduser().resolve())
        if key in RESUMABLE:
            setattr(config, key, value)
            given[key] = value
            if key == "steps":
                config.epochs = None
        elif getattr(config, key) != value:
            flags = ", ".join(_flag(k) for k in sorted(RESUMABLE))
            raise ConfigError(
                f"{_flag(key)} {value!r} differs from the resumed run's {getattr(config, key)!r}; a resumed run keeps "
                f"its model, split and seed (only {flags} may change): to train with {_flag(key)} {value!r} start a "
                "new run, in this folder with --overwrite (the old run is deleted) or in another --out"
            )
    if options.get("epochs") is not None:
        config.steps = 0
    if data_kind(config.data) != data_kind(saved.get("data", config.data)):
        raise ConfigError(
            f"--data {config.data!r}: a resumed run keeps its kind of data (it was {saved.get('data')!r})"
        )
    settle_objective(config, given=given)
    _validate(config)
    return config
