"""The inference examples run end to end in smoke mode, each in its own process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--smoke-test", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_banana_posterior_smoke(tmp_path: Path) -> None:
    out = tmp_path / "banana.png"
    stdout = run_example("banana_posterior.py", "--out", str(out))
    assert "log evidence by quadrature" in stdout
    for name in ("AutoNormal", "AutoFlow iaf", "AutoFlow maf", "AutoFlow realnvp", "AutoFlow nsf"):
        assert name in stdout
    assert out.stat().st_size > 10_000  # a real figure, not an empty file


@pytest.mark.parametrize("posterior, prior", [("iaf", "maf"), ("planar", "normal")])
def test_vae_flows_smoke(tmp_path: Path, posterior: str, prior: str) -> None:
    checkpoint = tmp_path / "vae.pt"
    stdout = run_example(
        "vae_flows.py", "--posterior", posterior, "--prior", prior, "--checkpoint", str(checkpoint), "--no-progress"
    )
    assert f"posterior={posterior} prior={prior}" in stdout
    assert "test log p(x) (IWAE, K=8)" in stdout
    assert checkpoint.exists() and not list(tmp_path.glob("*.tmp"))
    state = torch.load(checkpoint, weights_only=False)
    assert state["epoch"] == 1 and any(k.startswith("decoder.") for k in state["model"])


def test_autoflow_defaults_benchmark_smoke() -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "autoflow_defaults.py"
    spec = importlib.util.spec_from_file_location("autoflow_defaults", path)
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    results = benchmark.main(["--smoke-test"])
    assert set(results) == {("median", 0.05), ("wide", 0.05), ("tight", 0.05)}
    assert all(v is not None and math.isfinite(v) for values in results.values() for v in values)
