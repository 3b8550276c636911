"""Benchmark Glow on the 8x8 digits: pyro_nf against normflows at the same architecture and budget.

Run ``python benchmarks/images.py`` (prints a Markdown table; ``--output FILE`` also writes it).
Both models: 2 levels, ``--depth`` Glow steps per level (ActNorm, LU 1x1 convolution, affine
coupling with the 3x3 -> 1x1 -> zero 3x3 network of ``--hidden`` channels), a learned prior for the
factored-out half (pyro_nf: Glow's conditional prior; normflows: its ``GlowBase``, a learned
diagonal Gaussian per position), data dequantized to ``[0, 1)`` with uniform noise (17 levels).
Same seed, same batches, Adam at the same learning rate, the same number of steps. Reported:
test bits/dim after training, milliseconds per training step (median over the steps after a warm-up),
and milliseconds to sample 64 images (median of 5). ``--smoke-test`` runs 3 steps of a tiny model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributions import AffineTransform

from pyro_nf import FlowModel
from pyro_nf.core import FlowStack
from pyro_nf.data.images import load_digits
from pyro_nf.metrics import bits_per_dim
from pyro_nf.transforms import dequantize, glow

SHAPE = (1, 8, 8)
LEVELS = 2


def pyro_nf_glow(depth: int, hidden: int) -> tuple[nn.Module, Callable[[Tensor], Tensor], Callable[[int], Tensor]]:
    model = FlowModel(FlowStack([glow(SHAPE, LEVELS, depth, hidden), AffineTransform(0.5, 1.0, event_dim=3)]), SHAPE)
    return model, model.log_prob, lambda n: model.sample((n,))


def normflows_glow(depth: int, hidden: int) -> tuple[nn.Module, Callable[[Tensor], Tensor], Callable[[int], Tensor]]:
    import normflows as nf

    c = SHAPE[0]
    q0, merges, flows = [], [], []
    for i in range(LEVELS):  # level 0 is the coarsest, as in normflows' Glow example
        flows.append(
            [
                nf.flows.GlowBlock(c * 2 ** (LEVELS + 1 - i), hidden, split_mode="channel", scale=True)
                for _ in range(depth)
            ]
            + [nf.flows.Squeeze()]
        )
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (LEVELS - i), SHAPE[1] // 2 ** (LEVELS - i), SHAPE[2] // 2 ** (LEVELS - i))
        else:
            latent = (c * 2 ** (LEVELS + 1), SHAPE[1] // 2**LEVELS, SHAPE[2] // 2**LEVELS)
        q0.append(nf.distributions.GlowBase(latent))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
    return model, lambda x: model.log_prob(x - 0.5, None), lambda n: model.sample(n)[0]


def run(name: str, make, args: argparse.Namespace, train: Tensor, test: Tensor) -> dict[str, float]:  # type: ignore[no-untyped-def]
    torch.manual_seed(args.seed)
    model, log_prob, sample = make(args.depth, args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = torch.Generator().manual_seed(args.seed)
    times = []
    model.train()
    for _ in range(args.steps):
        index = torch.randint(len(train), (args.batch_size,), generator=batches)
        y = dequantize(train[index], 17, generator=batches)
        start = time.perf_counter()
        loss = bits_per_dim(log_prob(y), SHAPE, 17).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        y = dequantize(test, 17, generator=torch.Generator().manual_seed(1234))
        bpd = bits_per_dim(log_prob(y), SHAPE, 17).mean().item()
        sample_times = []
        for _ in range(5):
            start = time.perf_counter()
            sample(64)
            sample_times.append(time.perf_counter() - start)
    warm = times[min(len(times) - 1, 10) :]
    return {
        "bpd": bpd,
        "step_ms": 1000 * statistics.median(warm),
        "sample_ms": 1000 * statistics.median(sample_times),
        "params": float(sum(p.numel() for p in model.parameters())),
    }


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
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.steps, args.depth, args.hidden = 3, 1, 8
    torch.set_num_threads(args.threads)
    data = load_digits()
    train, test = data.train, data.test
    rows = {"pyro_nf": run("pyro_nf", pyro_nf_glow, args, train, test)}
    try:
        rows["normflows"] = run("normflows", normflows_glow, args, train, test)
    except ImportError:
        pass
    lines = [
        f"Glow on 8x8 digits: {LEVELS} levels x depth {args.depth}, hidden {args.hidden}, batch {args.batch_size}, "
        f"{args.steps} Adam steps (lr {args.lr}), {args.threads} threads, torch {torch.__version__}",
        "",
        "| library | parameters | test bits/dim | ms / training step | ms to sample 64 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {int(r['params'])} | {r['bpd']:.3f} | {r['step_ms']:.1f} | {r['sample_ms']:.1f} |")
    if "normflows" in rows:
        ratio = rows["normflows"]["step_ms"] / rows["pyro_nf"]["step_ms"]
        lines += ["", f"Speed ratio (normflows ms / pyro_nf ms per training step): {ratio:.2f}"]
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
