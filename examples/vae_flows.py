"""A VAE with flow posteriors and flow priors on binarized digits, evaluated by the IWAE bound.

The model: ``z ~ p(z)`` (a standard Normal, or a learnable MAF / RealNVP prior),
``x ~ Bernoulli(decoder(z))``. The guide: an MLP encoder gives a Gaussian
``N(mu(x), sigma(x))`` and a context ``h(x)``; a conditional flow conditioned on
``h(x)`` turns it into ``q(z | x)`` (Kingma et al. 2016). Both are trained
jointly by the ELBO with Pyro's SVI; the test set is scored by the ELBO and by
the importance-weighted estimate of ``log p(x)`` with ``K`` samples.

Data: dynamically binarized MNIST (a fresh ``u < x`` draw every epoch; the
test set binarized once with the generator seeded by ``TEST_BINARIZATION_SEED``)
when ``pyro_nf.data.images`` can load MNIST; otherwise scikit-learn's 8x8
digits (intensities / 16, binarized the same way; the script says which).
Dynamically binarized results are not comparable digit for digit with the
statically binarized MNIST of the papers.

FFJORD posteriors train with Hutchinson's trace estimate, backpropagating
through the solver (faster than the adjoint at this size: the solve's graph is
small), and are scored in evaluation mode with the exact trace (``D``
vector-Jacobian products per function evaluation), as an IWAE estimate needs
the exact ``log q``; ``--ode-tol`` and ``--ode-eval-tol`` set the solver
tolerances of the two modes.

``--max-minutes`` stops training at a wall-clock budget (the test scores still
run; the epochs done are printed and written to ``--results``), which writes
one Markdown table row, first with the ELBO alone, then with the IWAE estimate.

    python examples/vae_flows.py --posterior iaf --prior normal --epochs 50 --iwae-k 1000
    python examples/vae_flows.py --posterior ffjord --device cuda --latent-dim 32 --epochs 5
    python examples/vae_flows.py --smoke-test
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam
from torch import Tensor, nn

from pyro_nf.data.images import ImageDataError, load_digits, load_mnist
from pyro_nf.infer import AmortizedFlowPosterior, iwae_log_likelihood
from pyro_nf.infer.amortized import POSTERIORS
from pyro_nf.transforms import maf, realnvp

TEST_BINARIZATION_SEED = 20240601
PRIORS = ("normal", "maf", "realnvp")


# -- data --------------------------------------------------------------------------------------------------------


def load_data(smoke_test: bool) -> tuple[Tensor, Tensor, str]:
    """Grey levels in [0, 1], flattened: (train, test, description)."""
    data = None
    if not smoke_test:
        try:
            data = load_mnist()
        except ImageDataError as error:
            print(f"note: MNIST not available ({error}); using scikit-learn's 8x8 digits", file=sys.stderr)
    if data is None:
        data = load_digits()
    train, test = (x.reshape(len(x), -1).float() / (data.n_levels - 1) for x in (data.train, data.test))
    return train, test, f"{data.name} {'x'.join(map(str, data.shape[1:]))} (dynamically binarized)"


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One Bernoulli draw per pixel with the grey level as probability."""
    u = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
    return (u < x).to(x.dtype)


# -- model and guide ---------------------------------------------------------------------------------------------


class VAE(nn.Module):
    """MLP encoder and decoder, an amortized flow posterior and an optional flow prior."""

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: int,
        posterior: str,
        prior: str,
        num_flows: int | None,
        **flow_options: Any,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU())
        self.loc_scale = nn.Linear(hidden, 2 * latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, data_dim)
        )
        flow_hidden = [max(2 * hidden // 3, 4 * latent_dim)] * 2
        self.posterior = AmortizedFlowPosterior(
            posterior,  # type: ignore[arg-type]
            latent_dim,
            hidden,
            None if posterior in ("gaussian", "sylvester", "sylvester-shared") else flow_hidden,
            num_flows,
            **flow_options,
        )
        self.prior_flow: nn.Module | None = None
        if prior == "maf":  # the factories' default depths (5 MAF layers, 6 couplings) unless --num-flows
            self.prior_flow = (
                maf(latent_dim, flow_hidden) if num_flows is None else maf(latent_dim, flow_hidden, num_flows)
            )
        elif prior == "realnvp":
            couplings = 2 * ((num_flows + 1) // 2) if num_flows is not None else None
            self.prior_flow = (
                realnvp(latent_dim, flow_hidden) if couplings is None else realnvp(latent_dim, flow_hidden, couplings)
            )

    def model(self, x: Tensor, size: int | None = None) -> None:
        """``p(x, z)``; ``size`` is the data set size when ``x`` is a mini-batch (the ELBO is scaled to it)."""
        pyro.module("decoder", self.decoder)
        base = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
        prior: dist.TorchDistribution = base
        if self.prior_flow is not None:
            pyro.module("prior_flow", self.prior_flow)
            prior = dist.TransformedDistribution(base, [self.prior_flow])
        with pyro.plate("data", size or len(x), subsample=torch.arange(len(x), device=x.device)):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x: Tensor, size: int | None = None) -> None:
        """``q(z | x)``: the encoder's Gaussian through the flow conditioned on the encoder's features."""
        pyro.module("encoder", self.encoder)
        pyro.module("loc_scale", self.loc_scale)
        pyro.module("posterior", self.posterior)
        with pyro.plate("data", size or len(x), subsample=torch.arange(len(x), device=x.device)):
            h = self.encoder(x)
            loc, raw = self.loc_scale(h).chunk(2, -1)
            pyro.sample("z", self.posterior(loc, nn.functional.softplus(raw) + 1e-4, h))


# -- training and evaluation -------------------------------------------------------------------------------------


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def test_elbo(vae: VAE, x: Tensor, batch: int) -> float:
    """Mean per-image ELBO on ``x`` (10 particles per image)."""
    estimator = Trace_ELBO(num_particles=10, vectorize_particles=True, max_plate_nesting=1)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            total -= estimator.loss(vae.model, vae.guide, x[i : i + batch])
    return total / len(x)


def test_iwae(vae: VAE, x: Tensor, k: int, batch: int, chunk: int, deadline: float | None = None) -> tuple[float, int]:
    """Mean per-image IWAE estimate of ``log p(x)`` with ``k`` samples, and the number of images scored.

    With a ``deadline`` (a ``time.perf_counter()`` value) no new batch starts after it: the
    estimate is then over the first images only (at least one batch).
    """
    values: list[Tensor] = []
    for i in range(0, len(x), batch):
        if values and deadline is not None and time.perf_counter() > deadline:
            break
        values.append(
            iwae_log_likelihood(vae.model, vae.guide, x[i : i + batch], num_samples=k, chunk_size=chunk).per_datum
        )
    scores = torch.cat(values)
    return scores.mean().item(), len(scores)


def write_row(path: str | None, cells: list[str]) -> None:
    """Write one Markdown table row (replacing the file: the latest, most complete numbers)."""
    if path:
        with open(path, "w") as f:
            f.write("| " + " | ".join(cells) + " |\n")


def progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posterior", choices=POSTERIORS, default="iaf")
    parser.add_argument("--prior", choices=PRIORS, default="normal")
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=None, help="encoder/decoder width (300 MNIST, 128 digits)")
    parser.add_argument("--num-flows", type=int, default=None, help="flow layers (the flow's default when unset)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--iwae-k", type=int, default=1000, help="importance samples per test image (5000 in papers)")
    parser.add_argument("--iwae-chunk", type=int, default=250, help="importance samples per vectorised pass")
    parser.add_argument("--iwae-batch", type=int, default=None, help="test images per IWAE pass (50 for K > 100)")
    parser.add_argument("--test-points", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="where to save the model after each epoch")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall-clock time")
    parser.add_argument(
        "--max-eval-minutes", type=float, default=None, help="start no IWAE batch after this time (scores fewer images)"
    )
    parser.add_argument("--results", default=None, help="write the scores as one Markdown table row to this file")
    parser.add_argument("--ode-tol", type=float, default=1e-4, help="FFJORD: rtol = atol of training-mode solves")
    parser.add_argument("--ode-eval-tol", type=float, default=1e-5, help="FFJORD: rtol = atol of evaluation solves")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, one epoch: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.epochs, args.iwae_k, args.iwae_chunk, args.test_points = 1, 8, 4, 20
        args.hidden, args.latent_dim = 16, 2
        args.num_flows = args.num_flows or 2

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    device = torch.device(args.device)
    train_x, test_x, description = load_data(args.smoke_test)
    if args.smoke_test:
        train_x = train_x[:200]
    test_x = test_x[: args.test_points] if args.test_points else test_x
    test_bin = binarize(test_x, torch.Generator().manual_seed(TEST_BINARIZATION_SEED)).to(device)
    train_x = train_x.to(device)
    hidden = args.hidden or (300 if train_x.shape[1] > 100 else 128)
    print(f"data: {description}; train {len(train_x)}, test {len(test_bin)}, D = {train_x.shape[1]}; device {device}")

    flow_options: dict[str, Any] = {}
    if args.posterior == "ffjord":
        tol, eval_tol = args.ode_tol, args.ode_eval_tol
        flow_options = dict(adjoint=False, rtol=tol, atol=tol, eval_rtol=eval_tol, eval_atol=eval_tol)
        flow_options["eval_trace"] = "exact"
    vae = VAE(train_x.shape[1], args.latent_dim, hidden, args.posterior, args.prior, args.num_flows, **flow_options).to(
        device
    )
    optim = ClippedAdam({"lr": args.lr, "clip_norm": 100.0})
    svi = SVI(vae.model, vae.guide, optim, Trace_ELBO(max_plate_nesting=1))
    n = len(train_x)
    start = time.perf_counter()
    deadline = None if args.max_minutes is None else start + 60.0 * args.max_minutes
    epochs_done = 0.0
    cnfs = [m for m in vae.posterior.modules() if hasattr(type(m), "nfe")]  # FFJORD blocks: report their NFE
    for epoch in range(1, args.epochs + 1):
        x_epoch = binarize(train_x)  # dynamic binarization: a fresh draw every epoch
        order = torch.randperm(n, device=device)
        total, steps = 0.0, 0
        batches = range(0, n, args.batch_size)
        bar = progress(batches, len(batches), f"epoch {epoch}/{args.epochs}", not args.no_progress)
        for i in bar:
            if deadline is not None and time.perf_counter() > deadline:
                break
            total += svi.step(x_epoch[order[i : i + args.batch_size]], n)
            steps += 1
        epochs_done += steps / len(batches)
        train_elbo = -total / max(steps, 1) / n
        solver = f"  NFE {sum(m.nfe for m in cnfs)}" if cnfs else ""
        print(
            f"epoch {epoch:3d}  train ELBO {train_elbo:9.3f}{solver}  ({time.perf_counter() - start:.0f} s)", flush=True
        )
        if steps < len(batches):
            print(f"stopped at the --max-minutes budget after {epochs_done:.2f} epochs", flush=True)
            break
        if args.checkpoint:
            save_checkpoint(
                args.checkpoint,
                {"args": vars(args), "epoch": epoch, "model": vae.state_dict(), "optim": optim.get_state()},
            )

    vae.eval()
    epochs = f"{epochs_done:.2f}".rstrip("0").rstrip(".")
    row = [args.posterior, args.prior, str(args.latent_dim), epochs]
    elbo = test_elbo(vae, test_bin, 500)
    print(f"test ELBO {elbo:.3f} on {len(test_bin)} images ({time.perf_counter() - start:.0f} s)", flush=True)
    write_row(args.results, [*row, f"{elbo:.3f}", "not reached", "", f"{time.perf_counter() - start:.0f}", str(device)])
    iwae_batch = args.iwae_batch or (50 if args.iwae_k > 100 else 500)
    eval_start = time.perf_counter()
    eval_deadline = None if args.max_eval_minutes is None else eval_start + 60.0 * args.max_eval_minutes
    iwae, scored = test_iwae(vae, test_bin, args.iwae_k, iwae_batch, args.iwae_chunk, eval_deadline)
    seconds = time.perf_counter() - start
    images = f"on the first {scored} of {len(test_bin)} images" if scored < len(test_bin) else f"on {scored} images"
    print(
        f"posterior={args.posterior} prior={args.prior} latent={args.latent_dim} epochs={epochs}: "
        f"test ELBO {elbo:.3f}  test log p(x) (IWAE, K={args.iwae_k}) {iwae:.3f} nats {images} "
        f"(IWAE {time.perf_counter() - eval_start:.0f} s; {seconds:.0f} s in all)"
    )
    write_row(
        args.results,
        [*row, f"{elbo:.3f}", f"{iwae:.3f}", f"K={args.iwae_k}, {scored} images", f"{seconds:.0f}", str(device)],
    )
    return {"elbo": elbo, "iwae": iwae, "seconds": seconds, "epochs": epochs_done}


if __name__ == "__main__":
    main()
