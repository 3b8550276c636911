"""The benchmark's smoke run, and the known-density targets it scores flows against."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_nf.data.targets import GaussianMixtureTarget, gaussian_mixture_target

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("pyro_nf", "zuko", "nflows", "normflows", "pyro")


# -- the smoke run -------------------------------------------------------------------------------------------------
def _table_rows(text: str, first_cells: int) -> dict[tuple[str, ...], list[str]]:
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| ---") or line.startswith("| flow") or "| target" in line:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[tuple(cells[:first_cells])] = cells[first_cells:]
    return rows


def test_smoke_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "b.md"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke-test", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "--smoke-test" in text and "Machine:" in text and "torch 2" in text and "zuko" in text

    header = next(line for line in text.splitlines() if line.startswith("| flow"))
    assert [c.strip() for c in header.strip("|").split("|")][4:9] == list(LIBRARIES)
    speed = {key: cells for key, cells in _table_rows(text, 3).items() if key[0] in ("MAF", "IAF", "RealNVP")}
    expected = {
        (flow, str(dim), metric + (" *seq*" if seq else ""))
        for flow in ("MAF", "IAF", "RealNVP")
        for dim in (4, 8)
        for metric in ("log_prob", "sample", "train step")
        for seq in [(metric == "sample" and flow == "MAF") or (metric != "sample" and flow == "IAF")]
    }
    assert set(speed) == expected
    for key, cells in speed.items():
        rates = cells[1:6]  # n, five libraries, ratio
        assert all(re.fullmatch(r"[\d.,]+k?", r) for r in rates), (key, cells)
        assert re.fullmatch(r"\**\d+\.\d\d\**", cells[6]), (key, cells)

    quality = {key: cells for key, cells in _table_rows(text, 3).items() if key[0] in ("gmm8", "gmm21")}
    quality.update({key: cells for key, cells in _table_rows(text, 3).items() if key[0] in ("moons", "8gaussians")})
    expected_quality = {(target, flow, "KL gap") for target in ("gmm8", "gmm21") for flow in ("MAF", "RealNVP")} | {
        (target, flow, "test NLL") for target in ("moons", "8gaussians") for flow in ("MAF", "IAF", "RealNVP")
    }
    assert set(quality) == expected_quality
    for key, cells in quality.items():
        values = [float(c.split(" ")[0]) for c in cells[:5]]
        assert all(math.isfinite(v) for v in values), (key, cells)
        assert re.fullmatch(r"[+-]\d+\.\d+", cells[5]), (key, cells)


def test_sequential_threads_script_reports_three_ratios() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sequential_threads.py"), "--dim", "5", "--points", "64"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = [float(r) for r in re.findall(r"= (\d+\.\d+)x", result.stdout)]
    assert len(ratios) == 3 and all(math.isfinite(r) and r > 0 for r in ratios), result.stdout


# -- the Gaussian mixture targets -------------------------------------------------------------------------------
def _grid_mass(target: GaussianMixtureTarget, lo: float, hi: float, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    axis = torch.linspace(lo, hi, n, dtype=torch.float64)
    step = float(axis[1] - axis[0])
    grid = torch.cartesian_prod(axis, axis) if target.dim == 2 else axis[:, None]
    return grid, target.log_prob(grid).exp(), step


@pytest.mark.parametrize("dim", [1, 2])
def test_log_prob_integrates_to_one(dim: int) -> None:
    target = gaussian_mixture_target(dim, num_components=4, seed=3)
    _, density, step = _grid_mass(target, -9.0, 9.0, 601 if dim == 2 else 4001)
    assert float(density.sum()) * step**dim == pytest.approx(1.0, abs=2e-3)


def test_samples_follow_log_prob_in_2d() -> None:
    target = gaussian_mixture_target(2, num_components=5, seed=1)
    n = 40_000
    x = target.sample(n, torch.Generator().manual_seed(0), dtype=torch.float64)
    # Probability of each of 4 x 4 boxes: from the density on a fine grid, and from the samples.
    edges = torch.linspace(-4.0, 4.0, 5, dtype=torch.float64)
    grid, density, step = _grid_mass(target, -4.0 + 0.005, 4.0 - 0.005, 800)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    got = torch.zeros(4, 4, dtype=torch.float64)
    gi = torch.bucketize(grid, edges[1:-1])
    xi = torch.bucketize(x, edges[1:-1])
    inside = ((x > -4) & (x < 4)).all(-1)
    expected.index_put_((gi[:, 0], gi[:, 1]), density * step**2, accumulate=True)
    got.index_put_((xi[inside, 0], xi[inside, 1]), torch.ones(int(inside.sum()), dtype=torch.float64), accumulate=True)
    got /= n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert float(expected.sum()) > 0.5  # the boxes hold most of the mass, so the check has teeth
    assert torch.all((got - expected).abs() <= 5 * sigma + 2e-3), (got - expected) / sigma


def test_samples_match_mixture_moments_in_8d() -> None:
    target = gaussian_mixture_target(8, seed=0)
    n = 50_000
    x = target.sample(n, torch.Generator().manual_seed(4), dtype=torch.float64)
    w = target.weights[:, None]
    mean = (w * target.means).sum(0)
    covs = target.scale_trils @ target.scale_trils.transpose(-1, -2)
    second = (target.weights[:, None, None] * (covs + target.means[:, :, None] * target.means[:, None, :])).sum(0)
    cov = second - torch.outer(mean, mean)
    std = cov.diagonal().sqrt()
    assert torch.all((x.mean(0) - mean).abs() <= 5 * std / math.sqrt(n))
    # A sample covariance entry has standard deviation about sqrt(2 / n) * the largest variance (more for a
    # mixture's heavier tails): allow 8 of those.
    assert torch.allclose(torch.cov(x.T), cov, rtol=0.0, atol=8 * float(cov.diagonal().max()) * math.sqrt(2 / n))


def test_log_prob_matches_a_single_gaussian() -> None:
    loc = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    tril = torch.tensor([[[1.0, 0.0, 0.0], [0.3, 0.5, 0.0], [-0.2, 0.1, 2.0]]], dtype=torch.float64)
    target = GaussianMixtureTarget(torch.ones(1, dtype=torch.float64), loc, tril)
    x = torch.randn(10, 3)
    expected = torch.distributions.MultivariateNormal(loc[0], scale_tril=tril[0]).log_prob(x.double()).float()
    assert torch.allclose(target.log_prob(x), expected, atol=1e-5)
    assert target.log_prob(x).dtype == torch.float32


def test_kl_estimate_is_zero_for_the_target_and_positive_otherwise() -> None:
    target = gaussian_mixture_target(8, seed=0)
    x = target.sample(20_000, torch.Generator().manual_seed(5))
    assert target.kl_from(target.log_prob(x), x) == pytest.approx(0.0, abs=1e-6)
    wide = torch.distributions.Normal(0.0, 4.0).log_prob(x).sum(-1)
    assert target.kl_from(wide, x) > 0.5
    entropy = target.entropy(20_000, torch.Generator().manual_seed(6))
    assert -float(target.log_prob(x).mean()) == pytest.approx(entropy, abs=0.1)


def test_targets_are_fixed_by_their_seed() -> None:
    a, b, c = gaussian_mixture_target(21, seed=0), gaussian_mixture_target(21, seed=0), gaussian_mixture_target(21)
    assert torch.equal(a.means, b.means) and torch.equal(a.scale_trils, b.scale_trils) and torch.equal(a.means, c.means)
    assert not torch.equal(a.means, gaussian_mixture_target(21, seed=1).means)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(a.sample(100, g1), b.sample(100, g2))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="dim: expected a positive int, got 0"):
        gaussian_mixture_target(0)
    with pytest.raises(TypeError, match="num_components: expected an int"):
        gaussian_mixture_target(3, num_components=2.5)  # type: ignore[arg-type]
    target = gaussian_mixture_target(3)
    with pytest.raises(ValueError, match="last dimension is 3, got shape"):
        target.log_prob(torch.zeros(4, 2))
    with pytest.raises(TypeError, match="floating-point"):
        target.log_prob(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="positive number of points"):
        target.sample(0)
    with pytest.raises(ValueError, match="summing to 1"):
        GaussianMixtureTarget(torch.tensor([0.5, 0.2]), torch.zeros(2, 1), torch.ones(2, 1, 1))


# -- the neural spline flows -----------------------------------------------------------------------------------
def _run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_spline_smoke_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "splines.md"
    _run_script("splines.py", "--smoke-test", "--output", str(out))
    text = out.read_text()
    assert text.count("spline-speed-benchmark:start") == text.count("spline-quality-benchmark:end") == 1
    rows = _table_rows(text, 3)
    speed = {key: cells for key, cells in rows.items() if key[0].startswith("NSF")}
    expected = {
        (flow, str(dim), metric + (" *seq*" if seq else ""))
        for flow in ("NSF", "NSF-IAF", "NSF-coupling")
        for dim in (4, 8)
        for metric in ("log_prob", "sample", "train step")
        for seq in [(flow == "NSF" and metric == "sample") or (flow == "NSF-IAF" and metric != "sample")]
    }
    assert set(speed) == expected
    for key, cells in speed.items():  # n, three libraries, ratio
        assert all(re.fullmatch(r"[\d.,]+k?", r) for r in cells[1:4]), (key, cells)
        assert re.fullmatch(r"\*\*\d+\.\d\d\*\*", cells[4]), (key, cells)
    quality = {key: cells for key, cells in rows.items() if not key[0].startswith("NSF")}
    toys, mixtures = ("moons", "8gaussians", "checkerboard"), ("gmm8", "gmm21")
    assert set(quality) == {
        (target, flow, "test NLL") for target in toys for flow in ("NSF", "NSF-IAF", "NSF-coupling")
    } | {(target, flow, "KL gap") for target in mixtures for flow in ("NSF", "NSF-coupling")}
    for key, cells in quality.items():
        assert all(math.isfinite(float(c.split(" ")[0])) for c in cells[:3]), (key, cells)
        assert re.fullmatch(r"\*\*[+-]\d+\.\d+\*\*", cells[3]), (key, cells)


def test_sequential_spline_family_smoke(tmp_path: Path) -> None:
    out = tmp_path / "seq.md"
    result = _run_script("sequential.py", "--smoke-test", "--family", "spline", "--output", str(out))
    assert "| NSF sample | NSF log_prob | NSF-IAF log_prob |" in result.stdout
    rows = [line.split("|")[1].strip() for line in out.read_text().splitlines() if line.startswith("| ")][2:]
    assert rows == ["pyro_nf incremental", "pyro_nf reference", "zuko", "pyro"]
    assert "NSF sampling / fastest anchor's" in out.read_text()
