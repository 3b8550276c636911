"""The examples run end to end in their smoke-test mode and write what they promise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from matplotlib.image import imread

ROOT = Path(__file__).resolve().parent.parent


def run_example(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<script>`` in a fresh interpreter with this checkout importable; fail with its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_two_moons_smoke(tmp_path: Path) -> None:
    proc = run_example("two_moons.py", "--smoke-test", "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.json", "two_moons.png"]
    assert imread(tmp_path / "two_moons.png").shape == (400, 1200, 4)
    assert imread(tmp_path / "curves.png").shape == (400, 600, 4)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["smoke_test"] is True and metrics["dataset"] == "moons"
    assert math.isfinite(metrics["test_nll"]) and math.isfinite(metrics["train_nll"])
    history = metrics["history"]
    assert history["step"][-1] == metrics["steps"]
    assert len(history["train"]) == len(history["test"]) == len(history["step"]) > 1
    assert all(math.isfinite(v) for v in history["train"] + history["test"])
    # The printed summary matches the file, and says where the outputs are.
    assert f"final test NLL {metrics['test_nll']:.4f}" in proc.stdout
    assert str(tmp_path / "two_moons.png") in proc.stdout
