"""Operations per Glow training step: pyro_nf against normflows and nflows, counted by kind and phase.

``python benchmarks/image_ops.py`` builds the default MNIST Glow of pyro_nf's training configuration,
``glow((1, 28, 28), levels=2, depth=16, hidden_channels=256)``, and the same architecture in normflows and
nflows (``benchmarks/images.py``'s builders), takes two warm-up training steps of each (ActNorm's
data-dependent initialisation, Adam's state) and counts the aten operations of the third under a
``TorchDispatchMode``: every operator call that reaches a kernel, on the CPU. The step is the same for all
three libraries: ``loss = -log_prob(x).mean()`` (forward), ``loss.backward()`` (backward), ``Adam.step()``
(optimizer: the for-each implementation, Adam's default on a GPU, asked for explicitly since the CPU's default
is a loop over the parameters; for the row ``pyro_nf, fused Adam`` the fused one of
``TrainingStep(fused_optimizer=True)``). The count does not depend on the batch size or the
device; on a GPU, where a step of this model is bound by launches, it is the number of kernels to launch
(less the views, which launch none, and a for-each operation launches one kernel per chunk of tensors).

Each operation has one kind:

- *views and metadata*: ``view``, ``permute``, ``expand``, ``detach``, ... (no data touched, no kernel);
- *copies and allocation*: ``clone``, ``cat``, ``copy_``, ``zeros``, ``fill_``, ... (memory traffic, no math);
- *host synchronisation*: ``_local_scalar_dense`` (``.item()``, ``bool(tensor)``) and the like (Adam's reads of
  its step counters are of this kind, but the counters live on the host, so on a GPU they wait for nothing);
- *arithmetic*: everything else (convolutions, element-wise math, reductions, Adam's for-each updates).

``--host-time`` also times the step where its arithmetic costs next to nothing: the same architecture with
``--host-hidden`` (8) hidden channels on a batch of one, every operation on a few hundred numbers, so that
the time is the host's work per step (Python, the transforms' glue, the dispatcher and the operations'
overhead), the cost that bounds a launch-bound GPU step before the launches themselves. Process CPU time on
one thread, the libraries taking turns in every repeat; the median of the repeats' mean step times.
``--host-compiled`` adds the rows ``pyro_nf, compiled``: ``TrainingStep(compile=True)`` (the Glow steps
compiled by inductor, fused Adam, the gradient norm computed as the step reports it) and ``pyro_nf, compiled
whole``: ``TrainingStep(compile="whole")`` (the loss as one graph), each compiled before the timing; on a CPU
inductor emits C++ kernels, so the rows say how much host work compiling removes, not what the GPU's kernels
cost.

``--docs PAGE`` writes the table between the page's ``image-ops`` markers; ``--top N`` also prints each
library's N most frequent operations per phase. ``--smoke-test`` counts a tiny Glow.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import nflows_glow, normflows_glow, pyro_nf_glow  # noqa: E402

PHASES = ("forward", "backward", "optimizer")
KINDS = ("arithmetic", "views and metadata", "copies and allocation", "host synchronisation")
_VIEWS = {
    "view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze", "slice",
    "select", "split", "split_with_sizes", "unbind", "chunk", "narrow", "diagonal", "detach", "alias", "as_strided",
    "unflatten", "flatten", "movedim", "view_as", "expand_as", "lift_fresh",
}  # fmt: skip
_COPIES = {
    "clone", "copy_", "_to_copy", "contiguous", "cat", "stack", "zeros", "zeros_like", "new_zeros", "ones",
    "ones_like", "new_ones", "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "full",
    "full_like", "new_full", "fill_", "zero_", "scalar_tensor", "_foreach_zero_",
}  # fmt: skip
_SYNCS = {"_local_scalar_dense", "_is_all_true", "_assert_async", "is_nonzero", "equal", "item"}
BUILDERS: dict[str, Callable[..., tuple[nn.Module, Callable[[Tensor], Tensor], Any]]] = {
    "pyro_nf": pyro_nf_glow,
    "pyro_nf, fused Adam": pyro_nf_glow,
    "normflows": normflows_glow,
    "nflows": nflows_glow,
}
"""The rows: ``"pyro_nf, fused Adam"`` is ``TrainingStep(fused_optimizer=True)``'s optimizer (one fused update)."""


def kind(name: str) -> str:
    """The kind of the aten operation ``name`` (its overload packet's name, e.g. ``"view"``)."""
    if name in _SYNCS:
        return "host synchronisation"
    if name in _VIEWS:
        return "views and metadata"
    if name in _COPIES:
        return "copies and allocation"
    return "arithmetic"


class OperationCounter(TorchDispatchMode):
    """Counts the aten operations called while it is active (``with counter: ...``), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step(
    make: Callable[..., tuple[nn.Module, Callable[[Tensor], Tensor], Any]],
    shape: tuple[int, int, int],
    levels: int,
    depth: int,
    hidden: int,
    batch_size: int,
    fused: bool = False,
) -> dict[str, Counter[str]]:
    """The operations of each phase of a library's third training step (``fused``: Adam's fused update)."""
    model, log_prob, x = _seeded(make, shape, levels, depth, hidden, batch_size)
    optimizer = _adam(model, fused)
    counters: dict[str, Counter[str]] = {}
    for _ in range(3):
        phases = {phase: OperationCounter() for phase in PHASES}
        optimizer.zero_grad()
        with phases["forward"]:
            loss = -log_prob(x).mean()
        with phases["backward"]:
            loss.backward()
        with phases["optimizer"]:
            optimizer.step()
        counters = {phase: counter.counts for phase, counter in phases.items()}
    return counters


def _seeded(
    make: Callable[..., tuple[nn.Module, Callable[[Tensor], Tensor], Any]],
    shape: tuple[int, int, int],
    levels: int,
    depth: int,
    hidden: int,
    batch_size: int,
) -> tuple[nn.Module, Callable[[Tensor], Tensor], Tensor]:
    """A library's Glow from seed 0 in training mode, its ``log_prob`` and a batch of dequantized images in [0, 1)."""
    torch.manual_seed(0)
    model, log_prob, _ = make(depth, hidden, shape, levels)
    x = torch.rand(batch_size, *shape, generator=torch.Generator().manual_seed(1))
    return model.train(), log_prob, x


def _adam(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """Adam as a GPU runs it by default (for-each), or its fused form."""
    return torch.optim.Adam(model.parameters(), lr=1e-4, foreach=not fused, fused=fused or None)


def host_times(
    libraries: list[str],
    shape: tuple[int, int, int],
    levels: int,
    depth: int,
    hidden: int,
    steps: int,
    repeats: int,
    compiled: bool = False,
) -> dict[str, float]:
    """Milliseconds of process CPU time per training step on a batch of one, per library (``hidden`` small, so
    that the arithmetic is negligible): the median over ``repeats`` of the mean of ``steps`` steps, the
    libraries taking turns in every repeat."""
    runs: dict[str, Callable[[], None]] = {}
    for library in libraries:
        model, log_prob, x = _seeded(BUILDERS[library], shape, levels, depth, hidden, 1)
        optimizer = _adam(model, "fused" in library)

        def step(log_prob: Any = log_prob, optimizer: Any = optimizer, x: Tensor = x) -> None:
            optimizer.zero_grad()
            (-log_prob(x).mean()).backward()
            optimizer.step()

        for _ in range(3):  # ActNorm's initialisation, Adam's state, allocator warm-up
            step()
        runs[library] = step
    if compiled:
        from pyro_nf.training.step import TrainingStep

        for scope, row in (("blocks", "pyro_nf, compiled"), ("whole", "pyro_nf, compiled whole")):
            model, log_prob, x = _seeded(pyro_nf_glow, shape, levels, depth, hidden, 1)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # TrainingStep makes it fused
            training_step = TrainingStep(model, optimizer, _mean_loss(log_prob), compile=scope)  # type: ignore[arg-type]
            for _ in range(4):  # ActNorm's initialisation, then the variants after it compiled
                training_step(x)

            def compiled_step(training_step: TrainingStep = training_step, x: Tensor = x) -> None:
                training_step(x)

            runs[row] = compiled_step
    samples: dict[str, list[float]] = {library: [] for library in runs}
    for _ in range(repeats):
        for library, step in runs.items():
            start = time.process_time()
            for _ in range(steps):
                step()
            samples[library].append(1e3 * (time.process_time() - start) / steps)
    return {library: statistics.median(values) for library, values in samples.items()}


def _mean_loss(log_prob: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``x -> -log_prob(x).mean()`` bound to this ``log_prob`` (a lambda in the loop would see the last one)."""

    def loss(x: Tensor) -> Tensor:
        return -log_prob(x).mean()

    return loss


def host_table(times: dict[str, float], command: str, title: str) -> str:
    """The Markdown table of :func:`host_times`, with each library's time over normflows'."""
    reference = times.get("normflows")
    lines = [
        title,
        "",
        f"```text\n{command}\n```",
        "",
        "| library | ms per step | / normflows |",
        "| --- | ---: | ---: |",
    ]
    for library, ms in times.items():
        ratio = f"{ms / reference:.2f}" if reference else "-"
        lines.append(f"| {library} | {ms:.1f} | {ratio} |")
    return "\n".join(lines)


def table(rows: dict[str, dict[str, Counter[str]]], command: str, title: str) -> str:
    """The Markdown table: per library and phase, all operations and each kind."""
    lines = [
        title,
        "",
        f"```text\n{command}\n```",
        "",
        "| library | phase | operations | " + " | ".join(KINDS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in KINDS) + " |",
    ]
    for library, phases in rows.items():
        for phase in (*PHASES, "step"):
            counts = sum(phases.values(), Counter()) if phase == "step" else phases[phase]
            by_kind = Counter()
            for name, n in counts.items():
                by_kind[kind(name)] += n
            cells = [str(sum(counts.values()))] + [str(by_kind[k]) for k in KINDS]
            label = f"**{phase}**" if phase == "step" else phase
            lines.append(f"| {library} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(page: Path, text: str) -> None:
    """Replace what lies between ``<!-- image-ops:start -->`` and ``<!-- image-ops:end -->`` in ``page``."""
    start, end = "<!-- image-ops:start -->", "<!-- image-ops:end -->"
    old = page.read_text()
    if start not in old or end not in old:
        raise ValueError(f"{page}: expected the markers {start} and {end}")
    head, rest = old.split(start, 1)
    page.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2, help="does not change the counts")
    parser.add_argument("--libraries", nargs="+", default=list(BUILDERS), choices=list(BUILDERS), metavar="ROW")
    parser.add_argument("--top", type=int, default=0, help="also print each phase's N most frequent operations")
    parser.add_argument("--docs", default=None, help="write the table into this page (docs/families/images.md)")
    parser.add_argument("--smoke-test", action="store_true", help="a tiny Glow (8x8, depth 2, hidden 8)")
    host = parser.add_argument_group("the host's work per step (batch 1, few channels)")
    host.add_argument("--host-time", action="store_true", help="also time each library's step on a batch of one")
    host.add_argument("--host-hidden", type=int, default=8, help="hidden channels of the timed models")
    host.add_argument("--host-steps", type=int, default=20, help="steps per repeat")
    host.add_argument("--host-repeats", type=int, default=5)
    host.add_argument("--host-compiled", action="store_true", help="also time TrainingStep(compile=True)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = (1, 8, 8) if args.smoke_test else (1, 28, 28)
    depth, hidden = (2, 8) if args.smoke_test else (args.depth, args.hidden)
    rows = {}
    for library in args.libraries:
        try:
            rows[library] = count_step(
                BUILDERS[library], shape, args.levels, depth, hidden, args.batch_size, "fused" in library
            )
        except ImportError as error:
            print(f"{library}: skipped ({error})", file=sys.stderr)
            continue
        for phase, counts in rows[library].items():
            if args.top:
                top = ", ".join(f"{name} {n}" for name, n in counts.most_common(args.top))
                print(f"{library} {phase}: {top}")
    command = "python benchmarks/image_ops.py" + (" --smoke-test" if args.smoke_test else "")
    title = (
        f"aten operations of one training step (the third) of Glow on {shape}: {args.levels} levels x depth "
        f"{depth}, hidden {hidden}, affine couplings; torch {torch.__version__}"
    )
    text = table(rows, command, title)
    if args.host_time:
        steps, repeats = (2, 2) if args.smoke_test else (args.host_steps, args.host_repeats)
        times = host_times(list(rows), shape, args.levels, depth, args.host_hidden, steps, repeats, args.host_compiled)
        host_command = command + f" --host-time --host-hidden {args.host_hidden}"
        if args.host_compiled:
            host_command += " --host-compiled"
        if not args.smoke_test:
            host_command += f" --host-steps {steps} --host-repeats {repeats}"
        host_title = (
            f"The host's work per training step: the same Glow with {args.host_hidden} hidden channels, batch 1, "
            f"process CPU time on one thread, median of {repeats} repeats of {steps} steps, the libraries in turn"
        )
        text += "\n\n" + host_table(times, host_command, host_title)
    print(text)
    if args.docs:
        write_docs(Path(args.docs), text)
    return text


if __name__ == "__main__":
    main()
