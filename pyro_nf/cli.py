"""The ``pyro-nf`` command line: train, evaluate and sample flow density models.

.. code-block:: text

    pyro-nf train --flow maf --data moons --out runs/moons
    pyro-nf train --flow realnvp --data my_points.csv --steps 3000
    pyro-nf evaluate runs/moons
    pyro-nf sample runs/moons --num 5000 --output runs/moons/samples.npy
    pyro-nf list

The parser turns the arguments into plain typed values (a :class:`TrainArgs`,
:class:`EvaluateArgs`, :class:`SampleArgs` or :class:`ListArgs`); nothing
below this module sees :mod:`argparse`. Exit codes: 0 on success, 2 for bad
input (an unknown flow or dataset, a file that cannot be used, a corrupted
checkpoint, a bad option), 3 when training stopped on a NaN or infinite loss.
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
    what.add_argument("--flow", help="maf, iaf, realnvp, ffjord, glow or realnvp-multiscale (default maf)")
    what.add_argument(
        "--data",
        help="a 2D toy (moons, circles, ...), digits, mnist, fashion-mnist, or a .npy/.npz/.csv file (default moons)",
    )
    what.add_argument("--out", help="output folder (default runs/DATA-FLOW)")
    what.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    what.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run")
    length = what.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps in total")
    length.add_argument("--epochs", type=int, help="passes over the training set (instead of --steps)")
    optim = train.add_argument_group("optimization")
    optim.add_argument("--batch-size", type=int)
    optim.add_argument("--lr", type=float, help="learning rate after warm-up")
    optim.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    optim.add_argument("--grad-clip", type=float, help="largest gradient norm; 0 turns clipping off")
    optim.add_argument("--seed", type=int)
    optim.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    speed = train.add_argument_group("speed (the model and its numbers stay the same)")
    speed.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="compile the flow's blocks with torch.compile"
    )
    speed.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="capture the whole training step in a CUDA graph and replay it (one GPU)",
    )
    speed.add_argument(
        "--precision", choices=["fp32", "bf16"], help="bf16: coupling networks in bfloat16, log-dets in float32"
    )
    speed.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="convolution weights in the channels_last memory format (default: off)",
    )
    arch = train.add_argument_group("architecture")
    arch.add_argument("--hidden", type=_int_list, help="vector flows: hidden widths, e.g. 128,128")
    arch.add_argument("--num-transforms", type=int, help="vector flows: number of layers")
    arch.add_argument("--levels", type=int, help="image flows: number of scales")
    arch.add_argument("--depth", type=int, help="glow: steps per level")
    arch.add_argument("--hidden-channels", type=int, help="image flows: channels of the coupling networks")
    arch.add_argument("--coupling", choices=["affine", "additive"], help="glow: coupling type")
    data = train.add_argument_group("data")
    data.add_argument("--n-levels", type=int, help="images: pixel levels (default from the data)")
    data.add_argument("--data-dir", help="mnist, fashion-mnist: a folder with the standard IDX files")
    data.add_argument("--n-train", type=int, help="2D toys: training points")
    data.add_argument("--n-val", type=int, help="2D toys: validation points")
    data.add_argument("--n-test", type=int, help="2D toys: test points")
    out = train.add_argument_group("outputs")
    out.add_argument("--val-every", type=int, help="steps between validations (figure, curves)")
    out.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default --val-every)")
    out.add_argument("--log-every", type=int, help="steps between lines of history.csv (default 10)")
    out.add_argument("--num-samples", type=int, help="samples drawn for figures")
    out.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")

    evaluate = commands.add_parser("evaluate", help="test NLL or bits/dim of a trained model")
    evaluate.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    evaluate.add_argument("--split", choices=["train", "val", "test"], default="test")
    evaluate.add_argument("--data", help="score this .npy/.npz/.csv file instead of a split")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--batch-size", type=int, default=1024)
    evaluate.add_argument("--json", dest="json_output", action="store_true", help="print one JSON object")

    sample = commands.add_parser("sample", help="draw samples from a trained model")
    sample.add_argument("checkpoint", help="a run folder or its checkpoint.pt")
    sample.add_argument("--output", help="the .npy file to write (default RUN/samples.npy); a .png goes beside it")
    sample.add_argument("--num", type=int, default=1000)
    sample.add_argument("--temperature", type=float, default=1.0, help="scale of the base noise")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="auto")

    commands.add_parser("list", help="the flows and datasets this installation knows")
    return parser


_TRAIN_KEYS = (
    "flow data out steps epochs batch_size lr warmup_steps grad_clip seed device hidden num_transforms levels depth "
    "hidden_channels coupling n_levels data_dir n_train n_val n_test val_every checkpoint_every log_every num_samples "
    "progress compile cuda_graphs precision channels_last"
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
        return TrainArgs(options, resume=namespace.resume, overwrite=namespace.overwrite)
    record = {"evaluate": EvaluateArgs, "sample": SampleArgs, "list": ListArgs}[namespace.command]
    return record(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(record)})


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pyro-nf`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    from pyro_nf.checkpoint import CheckpointError
    from pyro_nf.training import NonFiniteLossError

    try:
        command = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else EXIT_USAGE
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
    except (ValueError, TypeError, CheckpointError) as error:
        # Bad input (ConfigError, DataFileError, CheckpointError are ValueErrors) gets its message and code 2.
        print(f"pyro-nf: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _train(command: TrainArgs) -> int:
    from pathlib import Path

    from pyro_nf.checkpoint import load_checkpoint
    from pyro_nf.training import ConfigError, merge_resume, resolve_config, train

    options = dict(command.options)
    if command.resume:
        if options.get("out") is None:
            raise ConfigError("--resume needs --out, the folder of the run to continue")
        saved = load_checkpoint(Path(options["out"]) / "checkpoint.pt")
        config = merge_resume(saved.config, options)
        config.out = options["out"]
    else:
        config = resolve_config(options)
    if command.resume and command.overwrite:
        raise ConfigError("give --resume or --overwrite, not both")
    train(config, resume=command.resume, overwrite=command.overwrite)
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
        print(f"{name} on {result['data']} ({result['samples']} samples): {result['value']:.4f} {unit}")
    return 0


def _sample(command: SampleArgs) -> int:
    from pathlib import Path

    from pyro_nf.training import sample

    run = Path(command.checkpoint)
    output = command.output or str((run if run.is_dir() else run.parent) / "samples.npy")
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
    from pyro_nf.training import FLOWS, IMAGE_DATASETS

    print("flows (--flow):")
    for name, spec in FLOWS.items():
        print(f"  {name:<20} {spec.kind:<7} {spec.summary}")
    print("datasets (--data):")
    for name in TOY_DATASETS:
        print(f"  {name:<20} 2D toy density")
    for name, summary in IMAGE_DATASETS.items():
        print(f"  {name:<20} {summary}")
    print("  PATH.npy|.npz|.csv   your own data: (N, D) vectors, or (N, [C,] H, W) images for image flows")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
