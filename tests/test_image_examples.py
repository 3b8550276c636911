"""The image-flow example runs end to end in smoke-test mode and writes what it promises."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from tests.test_examples import ROOT, run_example


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example runs on one thread (``run_example`` hands this environment to it)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("flow", ["glow", "realnvp"])
def test_image_flows_smoke(tmp_path: Path, flow: str) -> None:
    run_example("image_flows.py", "--smoke-test", "--flow", flow, "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.json", "samples.png"]
    assert imread(tmp_path / "samples.png").shape[-1] == 4
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["flow"] == flow and metrics["steps"] == 6 and len(metrics["curve"]) == 2
    assert math.isfinite(metrics["test_bits_per_dim"]) and 0 < metrics["test_bits_per_dim"] < 20
    if flow == "realnvp":
        return
    # resuming reads the checkpoint back and goes on from its step (to 8 steps)
    run_example("image_flows.py", "--smoke-test", "--steps", "8", "--flow", flow, "--out", str(tmp_path), "--resume")
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert resumed["steps"] == 8 and resumed["curve"][:2] == metrics["curve"]


def test_image_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "images.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "images.py"),
            "--smoke-test",
            "--threads",
            "1",
            "--output",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [
        line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert [r[0].strip() for r in rows[1:]] == ["pyro_nf", "normflows"]
    for row in rows[1:]:
        bpd, step_ms, sample_ms = (float(c) for c in row[2:5])
        assert 0 < bpd < 10 and step_ms > 0 and sample_ms > 0
