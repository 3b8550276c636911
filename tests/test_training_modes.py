"""``pyro-nf train --compile / --cuda-graphs / --precision`` and the loop's deferred reading of the losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pyro_nf.cli import EXIT_USAGE, parse_args
from pyro_nf.training import loop, resolve_config
from pyro_nf.training.config import ConfigError
from pyro_nf.training.validation import step_modes
from tests.test_cli import (
    IMAGE,
    TOY,
    VECTOR,
    digits_file,
    history,
    run,
)
from tests.test_cli import test_nan_loss_stops_and_keeps_the_last_good_checkpoint as nan_stops_the_run

__all__ = ["digits_file"]  # the fixture, shared with test_cli (its NaN test runs again here, reading every 3 steps)


def test_the_flags_parse_and_default_to_none() -> None:
    argv = ["train", "--compile", "--no-cuda-graphs", "--precision", "bf16", "--no-channels-last"]
    options = parse_args(argv).options  # type: ignore[union-attr]
    keys = ("compile", "cuda_graphs", "precision", "channels_last")
    assert tuple(options[k] for k in keys) == (True, False, "bf16", False)
    options = parse_args(["train"]).options  # type: ignore[union-attr]
    assert tuple(options[k] for k in keys) == (None, None, None, None)


def test_step_modes_on_the_cpu() -> None:
    config = resolve_config({"flow": "glow", "data": "digits"})
    cpu = {"compile": False, "cuda_graphs": False, "precision": "fp32", "channels_last": False}
    assert step_modes(config, torch.device("cpu")) == cpu
    config = resolve_config({"flow": "glow", "data": "digits", "channels_last": True, "precision": "bf16"})
    assert step_modes(config, torch.device("cpu")) == {**cpu, "channels_last": True, "precision": "bf16"}
    config = resolve_config({"flow": "glow", "data": "digits", "cuda_graphs": True})
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA device, and this run is on cpu"):
        step_modes(config, torch.device("cpu"))
    with pytest.raises(ConfigError, match="--precision bf16 runs the coupling networks of an image flow"):
        resolve_config({"flow": "maf", "data": "moons", "precision": "bf16"})
    with pytest.raises(ConfigError, match="--cuda-graphs cannot capture ffjord"):
        resolve_config({"flow": "ffjord", "data": "moons", "cuda_graphs": True})


def test_cuda_graphs_on_a_cpu_is_a_usage_error(
    digits_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--flow", "glow", "--data", digits_file, *IMAGE, "--steps", 2, "--out", tmp_path, "--cuda-graphs"]
    code, _, err = run([*argv, "--device", "cpu"], capsys)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert code == EXIT_USAGE and "--cuda-graphs needs a CUDA device" in err


def test_compiled_and_bf16_runs_follow_the_eager_run(
    digits_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The compiled run's losses are the eager run's to float32 rounding; bf16 trains, its loss close and finite."""
    common = ["train", "--flow", "glow", "--data", digits_file, *IMAGE, "--steps", 3, "--log-every", 1]
    common += ["--val-every", 100, "--device", "cpu"]
    assert run([*common, "--out", tmp_path / "eager"], capsys)[0] == 0
    code, _, err = run([*common, "--out", tmp_path / "compiled", "--compile"], capsys)
    assert code == 0, err
    code, _, err = run([*common, "--out", tmp_path / "bf16", "--precision", "bf16"], capsys)
    assert code == 0, err
    eager = [float(r["loss"]) for r in history(tmp_path / "eager")]
    compiled = [float(r["loss"]) for r in history(tmp_path / "compiled")]
    bf16 = [float(r["loss"]) for r in history(tmp_path / "bf16")]
    assert eager[0] == pytest.approx(compiled[0], rel=1e-5)  # the same initialisation and first batch
    assert compiled == pytest.approx(eager, rel=1e-3)  # Adam's first updates amplify rounding a little
    assert bf16[0] == pytest.approx(eager[0], rel=2**-8)
    saved = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert (saved["compile"], saved["cuda_graphs"], saved["precision"]) == (True, None, None)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"


def test_a_bf16_run_is_evaluated_in_float32(
    digits_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bits/dim a bf16 run reports are its saved model's in float32, not under bf16 autocast."""
    from pyro_nf.training import trained
    from pyro_nf.training.step import autocast

    argv = ["train", "--flow", "glow", "--data", digits_file, *IMAGE, "--steps", 6, "--lr", 0.01, "--warmup-steps", 0]
    argv += ["--val-every", 6, "--device", "cpu", "--precision", "bf16", "--out", tmp_path / "bf16"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    reported = json.loads((tmp_path / "bf16" / "metrics.json").read_text())["test_bpd"]
    float32 = trained.evaluate(tmp_path / "bf16", split="test", device="cpu")["value"]
    with autocast("cpu", "bf16"):
        bf16 = trained.evaluate(tmp_path / "bf16", split="test", device="cpu")["value"]
    assert reported == pytest.approx(float32, rel=1e-12, abs=0)
    assert abs(bf16 - float32) > 1e-7  # the two evaluations differ, so the check can tell which one ran


def test_losses_read_every_few_steps_stop_at_the_right_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a GPU (one read every log_every steps): the history is whole and a NaN names its own step."""
    monkeypatch.setattr(loop, "read_interval", lambda device, config: 4)
    argv = ["train", "--data", "moons", "--steps", 7, "--log-every", 1, "--val-every", 100, *TOY, *VECTOR]
    assert run([*argv, "--out", tmp_path / "deferred"], capsys)[0] == 0
    monkeypatch.setattr(loop, "read_interval", lambda device, config: 1)
    assert run([*argv, "--out", tmp_path / "every"], capsys)[0] == 0
    assert history(tmp_path / "deferred") == history(tmp_path / "every")
    assert len(history(tmp_path / "every")) == 7

    monkeypatch.setattr(loop, "read_interval", lambda device, config: 3)
    nan_stops_the_run(tmp_path / "nan", capsys, monkeypatch)
