"""``pyro-nf train --objective flow-matching``: the vector and the image CNF, their outputs, resume, bad options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pyro_nf.checkpoint import load_checkpoint
from pyro_nf.cli import EXIT_USAGE
from tests.test_cli import IMAGE, TOY, _one_thread, digits_file, history, run  # noqa: F401 (fixtures)

FM = ["--objective", "flow-matching"]


def test_vector_cnf_by_flow_matching_learns_and_reports_its_solves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["train", "--flow", "ffjord", "--data", "8gaussians", "--n-train", 1024, "--n-val", 128, "--n-test", 128]
    common += ["--batch-size", 128, "--hidden", "32,32", "--lr", 0.005, "--num-samples", 64, "--no-progress"]
    untrained, trained = tmp_path / "untrained", tmp_path / "trained"
    assert run([*common, *FM, "--steps", 1, "--out", untrained], capsys)[0] == 0
    code, out, err = run([*common, *FM, "--steps", 300, "--val-every", 150, "--out", trained], capsys)
    assert code == 0, err
    assert "training ffjord by flow matching on 2D toy '8gaussians'" in out
    assert "step 150: train fm loss" in out and "(NFE " in out
    for name in ("checkpoint.pt", "samples.png", "curves.png", "figures/step_000150.png", "figures/step_000300.png"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert (config["objective"], config["fm_path"], config["fm_coupling"], config["fm_sigma_min"]) == (
        "flow-matching",
        "linear",
        "independent",
        0.0,
    )
    metrics = json.loads((trained / "metrics.json").read_text())
    assert set(metrics) == {"step", "val_nll", "test_nll", "val_nfe", "test_nfe"} and metrics["test_nfe"] > 0
    # The regression trained the field: the exact likelihood of the test points is far better than at the start.
    assert metrics["test_nll"] < json.loads((untrained / "metrics.json").read_text())["test_nll"] - 0.3
    # The history holds the flow-matching loss (a mean squared error: positive), not the NLL.
    losses = [float(row["loss"]) for row in history(trained)]
    assert len(losses) == 30 and min(losses) > 0
    code, out, err = run(["evaluate", trained, "--json"], capsys)
    scored = json.loads(out)
    assert code == 0 and scored["value"] == pytest.approx(metrics["test_nll"], rel=1e-6) and scored["nfe"] > 0, err
    code, out, _ = run(["evaluate", trained], capsys)
    assert "NFE" in out


def test_image_cnf_by_flow_matching(digits_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    argv = ["train", "--flow", "ffjord-multiscale", "--data", digits_file, *FM, "--steps", 3, "--out", tmp_path]
    code, _, err = run([*argv, *IMAGE], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"step", "val_bpd", "test_bpd", "val_nfe", "test_nfe"}
    assert 0.0 < metrics["test_bpd"] < 10.0 and metrics["test_nfe"] > 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["levels"], config["depth"], config["coupling"]) == (1, 1, None)
    code, _, err = run(["sample", tmp_path, "--num", 4], capsys)
    assert code == 0, err
    images = np.load(tmp_path / "sampled.npy")
    assert images.shape == (4, 1, 8, 8) and images.min() >= 0 and images.max() <= 16


def test_a_flow_matched_run_resumes_and_can_switch_to_the_likelihood(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["train", "--flow", "ffjord", "--data", "moons", *TOY, "--hidden", "8", "--log-every", 1]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run([*common, *FM, "--steps", 6, "--val-every", 100, "--out", whole], capsys)[0] == 0
    assert run([*common, *FM, "--steps", 3, "--val-every", 100, "--out", part], capsys)[0] == 0
    assert run(["train", "--resume", "--out", part, "--steps", 6, "--no-progress"], capsys)[0] == 0
    assert [row["loss"] for row in history(part)] == [row["loss"] for row in history(whole)]
    # Fine-tuning by maximum likelihood continues the same run.
    code, out, err = run(["train", "--resume", "--out", part, "--steps", 8, "--objective", "likelihood"], capsys)
    assert code == 0 and "--objective changes from 'flow-matching' to 'likelihood' at step 6" in out, err
    config = json.loads((part / "config.json").read_text())
    assert config["objective"] == "likelihood" and config["fm_path"] is None
    assert load_checkpoint(part / "checkpoint.pt").step == 8


BAD = {
    "not a cnf": (["--flow", "maf", *FM], "--objective flow-matching trains continuous flows (ffjord, ffjord-mul"),
    "cosine width": (["--flow", "ffjord", *FM, "--fm-path", "cosine", "--fm-sigma-min", "0.1"], "ends at the data"),
    "width range": (["--flow", "ffjord", *FM, "--fm-sigma-min", "1"], "--fm-sigma-min: expected a number in [0, 1)"),
    "path alone": (["--flow", "ffjord", "--fm-path", "cosine"], "--fm-path applies to --objective flow-matching"),
    "coupling": (["--flow", "ffjord-multiscale", "--data", "digits", "--coupling", "additive"], "not to ffjord-multi"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_flow_matching_options(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = BAD[case]
    code, _, err = run(["train", *argv, "--out", tmp_path / "r", "--no-progress"], capsys)
    assert code == EXIT_USAGE and message in err, err
