"""The ``pyro-nf`` command line end to end: every flow and data kind, resume, safe checkpoints, bad input, 2 processes.

Runs are tiny (a few steps of a few-unit network) and mostly in-process through
``main(argv)``; the interrupted save and the 2-process run use subprocesses.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_nf.checkpoint import CheckpointError, load_checkpoint
from pyro_nf.cli import EXIT_DIVERGED, EXIT_USAGE, main

ROOT = Path(__file__).resolve().parent.parent
HAS = {
    "glow": importlib.util.find_spec("pyro_nf.transforms.glow") is not None,
    "realnvp-multiscale": importlib.util.find_spec("pyro_nf.transforms.multiscale") is not None,
    "ffjord": importlib.util.find_spec("pyro_nf.transforms.continuous") is not None,
    "images": importlib.util.find_spec("pyro_nf.data.images") is not None,
}
TOY = "--n-train 256 --n-val 64 --n-test 64 --batch-size 64 --num-samples 64 --no-progress".split()
VECTOR = "--hidden 8 --num-transforms 2".split()
IMAGE = "--levels 1 --depth 1 --hidden-channels 8 --batch-size 16 --num-samples 16 --no-progress".split()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The runs are tiny: one thread is faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(argv: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def history(out: Path) -> list[dict[str, str]]:
    with (out / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 real 8x8 digits (17 grey levels) as an ``(N, 8, 8)`` integer array."""
    from sklearn.datasets import load_digits

    path = tmp_path_factory.mktemp("images") / "digits.npy"
    np.save(path, load_digits().images[:240].astype(np.int64))
    return path


def test_list_names_flows_and_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["list"], capsys)
    assert code == 0
    for name in ("maf", "iaf", "realnvp", "glow", "ffjord", "realnvp-multiscale", "moons", "rings", "digits", "mnist"):
        assert f"  {name} " in out
    for name in ("nsf", "nsf-coupling"):
        assert f"  {name} " in out and "neural spline flow" in out


@pytest.mark.parametrize("flow", ["maf", "iaf", "realnvp", "ffjord", "nsf", "nsf-coupling"])
def test_train_vector_flow_on_toy(flow: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not HAS.get(flow, True):
        code, _, err = run(["train", "--flow", flow, "--data", "moons", "--out", tmp_path, *TOY], capsys)
        assert code == EXIT_USAGE and "not available in this version" in err
        return
    arch = ["--hidden", "8"] if flow == "ffjord" else VECTOR
    code, out, err = run(
        ["train", "--flow", flow, "--data", "moons", "--steps", 3, "--out", tmp_path, *TOY, *arch], capsys
    )
    assert code == 0, err
    for name in ("checkpoint.pt", "config.json", "metrics.json", "train.log", "samples.png", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "figures" / "step_000003.png").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    solves = {"val_nfe", "test_nfe"} if flow == "ffjord" else set()  # a CNF reports its evaluation solves' NFE
    assert set(metrics) == {"step", "val_nll", "test_nll", *solves} and np.isfinite(metrics["test_nll"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["flow"] == flow and config["steps"] == 3 and config["resolved"]["n_train"] == 256
    assert config["resolved"]["event_shape"] == [2]
    assert f"outputs in {tmp_path}" in out
    assert "test nll" in (tmp_path / "train.log").read_text()


def test_user_files_train_evaluate_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, -3.0]
    (tmp_path / "points.csv").write_text("a,b,c\n" + "\n".join(",".join(f"{v:.6f}" for v in row) for row in points))
    np.save(tmp_path / "points.npy", points)
    np.savez(tmp_path / "splits.npz", train=points[:200], test=points[200:])
    results = {}
    for name in ("points.csv", "points.npy", "splits.npz"):
        folder = tmp_path / f"run-{name}"
        argv = ["train", "--data", tmp_path / name, "--steps", 4, "--batch-size", 50, *VECTOR]
        code, _, err = run([*argv, "--out", folder, "--num-samples", 64, "--no-progress"], capsys)
        assert code == 0, err
        results[name] = json.loads((folder / "metrics.json").read_text())
        assert json.loads((folder / "config.json").read_text())["resolved"]["event_shape"] == [3]
    # The CSV and the .npy hold the same numbers (to 6 decimals), split alike: the same model and scores.
    assert results["points.csv"]["test_nll"] == pytest.approx(results["points.npy"]["test_nll"], abs=1e-3)
    # The NLL is in data units: the standardization's log-det (log 1 + log 10 + log 0.1 = 0, plus the spread) counts.
    assert 3.0 < results["points.npy"]["test_nll"] < 12.0

    run_dir = tmp_path / "run-points.npy"
    code, out, err = run(["evaluate", run_dir, "--json"], capsys)
    assert code == 0, err
    scored = json.loads(out)
    assert scored["metric"] == "nll" and scored["value"] == pytest.approx(results["points.npy"]["test_nll"], rel=1e-6)
    code, out, err = run(["evaluate", run_dir / "checkpoint.pt", "--data", tmp_path / "points.csv"], capsys)
    assert code == 0 and "NLL on" in out and "300 samples" in out, err
    code, out, err = run(["sample", run_dir, "--num", 50, "--output", tmp_path / "s" / "x.npy"], capsys)
    assert code == 0, err
    samples = np.load(tmp_path / "s" / "x.npy")
    assert samples.shape == (50, 3) and np.isfinite(samples).all()
    assert (tmp_path / "s" / "x.png").is_file()
    # Samples come back in data units (the second feature lives around 50).
    assert 20.0 < np.median(samples[:, 1]) < 80.0


@pytest.mark.parametrize("flow, coupling", [("glow", "affine"), ("realnvp-multiscale", "affine"), ("glow", "spline")])
def test_image_flow_on_image_file(
    flow: str, coupling: str, digits_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--flow", flow, "--data", digits_file, "--steps", 3, "--out", tmp_path, *IMAGE]
    argv += ["--coupling", coupling]
    code, out, err = run(argv, capsys)
    if not HAS[flow]:
        assert code == EXIT_USAGE and "not available in this version" in err
        return
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"step", "val_bpd", "test_bpd"}
    assert 0.0 < metrics["test_bpd"] < 10.0  # 17 levels: a uniform model would score log2(17) = 4.09
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["resolved"]["event_shape"] == [1, 8, 8] and config["resolved"]["preprocess"]["n_levels"] == 17
    assert config["coupling"] == coupling
    code, out, err = run(["sample", tmp_path, "--num", 9, "--temperature", 0.7], capsys)
    assert code == 0, err
    images = np.load(tmp_path / "sampled.npy")
    assert images.shape == (9, 1, 8, 8) and images.min() >= 0 and images.max() <= 16


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion-mnist"])
def test_builtin_image_datasets(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not HAS["images"]:
        code, _, err = run(["train", "--flow", "maf", "--data", name, "--out", tmp_path], capsys)
        assert code == EXIT_USAGE and "not available in this version" in err
        return
    if name != "digits":
        # The 28x28 sets are too big for a smoke run here; a folder without the IDX files is bad input.
        (tmp_path / "empty").mkdir()
        code, _, err = run(["train", "--data", name, "--data-dir", tmp_path / "empty", "--out", tmp_path], capsys)
        assert code == EXIT_USAGE and str(tmp_path / "empty") in err, err
        return
    argv = ["train", "--flow", "maf", "--data", name, "--steps", 2, "--out", tmp_path, *VECTOR, "--batch-size", 32]
    code, _, err = run([*argv, "--num-samples", 16, "--no-progress"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["resolved"]["event_shape"] == [1, 8, 8] and config["resolved"]["preprocess"]["n_levels"] == 17
    assert set(json.loads((tmp_path / "metrics.json").read_text())) == {"step", "val_bpd", "test_bpd"}


@pytest.mark.parametrize("flow", ["maf", "ffjord"])
def test_resume_reproduces_the_uninterrupted_run(flow: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """MAF checks model, Adam state and data order; FFJORD also its Hutchinson noise (the global generator)."""
    if not HAS.get(flow, True):
        pytest.skip(f"{flow} is not part of this version")
    arch = ["--hidden", "8"] if flow == "ffjord" else VECTOR
    common = ["train", "--flow", flow, "--data", "8gaussians", *TOY, *arch, "--log-every", 1, "--checkpoint-every", 3]
    common += ["--val-every", 100]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run([*common, "--steps", 8, "--out", whole], capsys)[0] == 0
    assert run([*common, "--steps", 5, "--out", part], capsys)[0] == 0
    assert load_checkpoint(part / "checkpoint.pt").step == 5
    code, out, err = run(["train", "--resume", "--out", part, "--steps", 8, "--no-progress"], capsys)
    assert code == 0, err
    assert f"resuming {flow}" in out and "at step 5 of 8" in out
    # Every logged loss (exact decimal repr) and every parameter and Adam moment is identical.
    assert [row["loss"] for row in history(part)] == [row["loss"] for row in history(whole)]
    assert len(history(whole)) == 8
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert a.model.keys() == b.model.keys()
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    for state_a, state_b in zip(a.optimizer["state"].values(), b.optimizer["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert torch.equal(a.rng["torch"], b.rng["torch"])


@pytest.mark.skipif(not HAS["glow"], reason="Glow is not part of this version")
def test_resume_is_exact_for_glow(digits_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Dequantization noise and ActNorm's data-dependent initialisation survive a resume."""
    common = ["train", "--flow", "glow", "--data", digits_file, *IMAGE, "--log-every", 1, "--val-every", 100]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run([*common, "--steps", 4, "--out", whole], capsys)[0] == 0
    assert run([*common, "--steps", 2, "--out", part], capsys)[0] == 0
    assert run(["train", "--resume", "--out", part, "--steps", 4, "--no-progress"], capsys)[0] == 0
    assert [row["loss"] for row in history(part)] == [row["loss"] for row in history(whole)]
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_resume_refuses_a_changed_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["train", "--data", "moons", "--steps", 2, "--out", tmp_path, *TOY, *VECTOR], capsys)[0] == 0
    code, _, err = run(["train", "--resume", "--out", tmp_path, "--steps", 4, "--seed", 3], capsys)
    assert code == EXIT_USAGE and "--seed 3 differs from the resumed run's 0" in err
    code, _, err = run(["train", "--resume", "--out", tmp_path / "nothing", "--steps", 4], capsys)
    assert code == EXIT_USAGE and "no such checkpoint file" in err
    # A folder holding a run is neither clobbered nor continued by accident.
    code, _, err = run(["train", "--data", "moons", "--steps", 2, "--out", tmp_path, *TOY, *VECTOR], capsys)
    assert code == EXIT_USAGE and "already holds a run" in err and "--overwrite" in err
    assert load_checkpoint(tmp_path / "checkpoint.pt").step == 2
    code, _, err = run(
        ["train", "--data", "moons", "--steps", 1, "--out", tmp_path, *TOY, *VECTOR, "--overwrite"], capsys
    )
    assert code == 0, err
    assert load_checkpoint(tmp_path / "checkpoint.pt").step == 1


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["train", "--data", "moons", "--steps", 2, "--out", tmp_path, *TOY, *VECTOR], capsys)[0] == 0
    before = load_checkpoint(tmp_path / "checkpoint.pt")
    env = {**subprocess_env(), "PYRO_NF_TEST_SLEEP_BEFORE_RENAME": "60"}
    argv = [sys.executable, "-m", "pyro_nf", "train", "--resume", "--out", str(tmp_path), "--steps", "4"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not list(tmp_path.glob(".checkpoint.pt.*.tmp")):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # the new checkpoint is fully written but not yet renamed
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after.step == before.step == 2
    assert all(torch.equal(after.model[k], before.model[k]) for k in before.model)
    assert len(list(tmp_path.glob(".checkpoint.pt.*.tmp"))) == 1  # the killed save's full-size hidden copy
    # And the run continues from it, removing the stale temporary first.
    code, out, err = run(["train", "--resume", "--out", tmp_path, "--steps", 3, "--no-progress"], capsys)
    assert code == 0 and "at step 2 of 3" in out and "removed 1 files (stale temporaries)" in out, err
    assert load_checkpoint(tmp_path / "checkpoint.pt").step == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupted_and_foreign_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["train", "--data", "moons", "--steps", 1, "--out", tmp_path / "ok", *TOY, *VECTOR], capsys)[0] == 0
    good = (tmp_path / "ok" / "checkpoint.pt").read_bytes()
    cases = {
        "truncated.pt": (good[: len(good) // 2], "corrupted or truncated"),
        "garbage.pt": (b"not a checkpoint at all" * 10, "corrupted or truncated"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    cases["foreign.pt"] = (b"", "not a pyro_nf checkpoint (expected format 'pyro_nf.checkpoint'")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    cases["pickled.pt"] = (b"", "not loaded for safety")
    for name, (_, message) in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        assert message in str(info.value) and name in str(info.value)
        code, _, err = run(["evaluate", tmp_path / name], capsys)
        assert code == EXIT_USAGE and message in err, (name, err)
        code, _, err = run(["sample", tmp_path / name], capsys)
        assert code == EXIT_USAGE and message in err, (name, err)


def _write(path: Path, content: object) -> Path:
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(str(content))
    return path


BAD_FILES = {
    "text.csv": ("x,y\n1,2\n3,abc\n", "text.csv, row 3, column 2 ('y'): expected a number, got 'abc'"),
    "nan.csv": ("1,2\n3,4\nnan,5\n", "nan.csv, row 3, column 1: expected a finite number, got NaN"),
    "inf.csv": ("a,b\n1,2\n3,-inf\n", "inf.csv, row 3, column 2 ('b'): expected a finite number, got -inf"),
    "ragged.csv": ("1,2,3\n4,5,6\n7,8\n", "ragged.csv, row 3: expected 3 columns (as in row 1), got 2"),
    "empty.csv": ("", "empty.csv: the file is empty"),
    "header.csv": ("a,b\n", "header.csv: the file holds a header row (a, b) but no data rows"),
    "flat.npy": (np.arange(10.0), "flat.npy: expected a 2D array (samples, features), got a 1D array of shape (10,)"),
    "nan.npy": (np.array([[1.0, 2.0], [np.nan, 1.0], [0.0, 0.0]]), "nan.npy, row 2, column 1: expected a finite"),
    "words.npy": (np.array([["a", "b"], ["c", "d"]]), "words.npy: expected numbers, got an array of dtype <U1"),
    "empty.npy": (b"", "empty.npy: the file is empty"),
    "cube.npy": (np.zeros((4, 3, 2)), "cube.npy: expected a 2D array (samples, features) for a vector flow"),
    "missing.csv": (None, "missing.csv: no such file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_file(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, message = BAD_FILES[name]
    path = tmp_path / name if content is None else _write(tmp_path / name, content)
    code, out, err = run(["train", "--data", path, "--out", tmp_path / "run", "--steps", 1], capsys)
    assert code == EXIT_USAGE
    assert message in err, err
    assert err.startswith("pyro-nf: error: ")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


BAD_IMAGES = {
    "vectors.npy": (np.zeros((10, 64)), "expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C), got a 2D"),
    "fivedim.npy": (np.zeros((2, 1, 1, 8, 8)), "got a 5D array of shape (2, 1, 1, 8, 8)"),
    "channels.npy": (np.zeros((10, 5, 8, 7)), "with C in 1, 3, 4 channels, got shape (10, 5, 8, 7)"),
    "fraction.npy": (np.full((10, 8, 8), 0.5), "sample 1, pixel (0, 0, 0): expected integer pixel values >= 0"),
    "odd.npy": (np.ones((10, 1, 6, 6), dtype=np.uint8), "height and width must be multiples of 4"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_array(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, message = BAD_IMAGES[name]
    path = _write(tmp_path / name, content)
    argv = ["train", "--flow", "glow", "--data", path, "--levels", 2, "--batch-size", 2, "--no-progress"]
    code, _, err = run([*argv, "--out", tmp_path / "r"], capsys)
    assert code == EXIT_USAGE
    if name == "odd.npy" and not HAS["glow"]:
        message = "not available in this version"
    assert message in err, err


BAD_OPTIONS = {
    "unknown flow": (["--flow", "nope"], "unknown flow 'nope'; expected one of maf, iaf, realnvp, nsf, nsf-coupling"),
    "bad coupling": (["--flow", "glow", "--coupling", "cubic"], "argument --coupling: invalid choice: 'cubic'"),
    "unknown data": (["--data", "nope"], "unknown dataset 'nope'; expected one of moons, circles, 8gaussians"),
    "zero steps": (["--steps", "0"], "--steps: expected a positive integer, got 0"),
    "bad hidden": (["--hidden", "a,b"], "expected comma-separated integers such as 64,64, got 'a,b'"),
    "negative lr": (["--lr", "-1"], "--lr: expected a positive number, got -1.0"),
    "steps and epochs": (["--steps", "3", "--epochs", "1"], "not allowed with argument"),
    "image option": (["--flow", "maf", "--depth", "3"], "--depth applies to image flows, not to maf"),
    "image flow on toy": (["--flow", "glow", "--data", "moons"], "--flow glow models images, but 'moons' is a 2D toy"),
    "batch too large": (["--batch-size", "100000", "--n-train", "50"], "is larger than the training set (50 samples)"),
    "no device": (["--device", "cuda:7"], "CUDA is not available"),
    "data dir on toy": (["--data-dir", "."], "--data-dir applies to mnist and fashion-mnist, not to 'moons'"),
    "bad device": (["--device", "toaster"], "--device: expected auto, cpu, cuda, cuda:N or mps, got 'toaster'"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_option(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = BAD_OPTIONS[case]
    if case == "no device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(["train", *argv, "--out", tmp_path, "--no-progress"], capsys)
    assert code == EXIT_USAGE
    assert message in err, err


def test_npz_needs_a_named_array(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "two.npz", first=np.zeros((5, 2)), second=np.ones((5, 2)))
    code, _, err = run(["train", "--data", tmp_path / "two.npz", "--out", tmp_path / "r"], capsys)
    assert code == EXIT_USAGE
    assert "two.npz: cannot tell which array holds the data among first, second; name it 'data'" in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 5th optimizer step poisons a weight, as a diverging step would; the 6th loss is NaN."""
    calls = {"n": 0}
    original = torch.optim.Adam.step

    def step(self: torch.optim.Adam, closure: object = None) -> object:
        result = original(self, closure)
        calls["n"] += 1
        if calls["n"] == 5:
            with torch.no_grad():
                next(p for group in self.param_groups for p in group["params"]).fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    argv = ["train", "--data", "moons", "--steps", 10, "--checkpoint-every", 2, "--out", tmp_path, *TOY, *VECTOR]
    code, _, err = run(argv, capsys)
    assert code == EXIT_DIVERGED
    assert "the loss became nan at step 6" in err
    assert "the last good checkpoint (step 4) is kept" in err
    assert "Try a lower --lr" in err and "--warmup-steps" in err
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept.step == 4 and all(torch.isfinite(v).all() for v in kept.model.values() if v.is_floating_point())
    assert "the loss became nan" in (tmp_path / "train.log").read_text()


def test_two_processes_match_one(digits_file: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2`` (gloo on CPU) follows the one-process run within float tolerance.

    With Glow this also checks that ActNorm's data-dependent initialisation is the same in both processes
    and that the dequantization noise of each global batch is shared out, not redrawn per process.
    """
    if HAS["glow"]:
        args = ["--flow", "glow", "--data", str(digits_file), *IMAGE]
    else:
        np.save(tmp_path / "points.npy", np.random.default_rng(0).normal(size=(400, 3)))
        args = ["--flow", "maf", "--data", str(tmp_path / "points.npy"), *VECTOR, "--batch-size", "32"]
    args = ["train", *args, "--steps", "6", "--log-every", "1", "--val-every", "100", "--no-progress"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "pyro_nf"]
    two = subprocess.run(
        [*launcher, *args, "--out", str(tmp_path / "two")], env=subprocess_env(), capture_output=True, timeout=300
    )
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert "x 2 processes" in (tmp_path / "two" / "train.log").read_text()
    one_losses = [float(row["loss"]) for row in history(tmp_path / "one")]
    two_losses = [float(row["loss"]) for row in history(tmp_path / "two")]
    assert len(one_losses) == len(two_losses) == 6
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5, atol=1e-5)
    a, b = load_checkpoint(tmp_path / "one" / "checkpoint.pt"), load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    for key in a.model:
        torch.testing.assert_close(b.model[key], a.model[key], rtol=1e-4, atol=1e-5, msg=key)
    # Only rank 0 writes: one log, no stray temporary files.
    assert not list((tmp_path / "two").glob(".*.tmp"))
