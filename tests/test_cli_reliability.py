"""Nothing lost, nothing silently wrong: what a run keeps through signals, kills, a full disk, a corrupted
checkpoint, a second run in its folder, changed data and ``--overwrite``; one-line errors for unusable paths.

The signal, lock and kill tests run a real ``pyro-nf train`` process (``python -m pyro_nf``) and resume
in-process from what it left.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_nf.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pyro_nf.cli import EXIT_USAGE
from tests.test_cli import TOY, VECTOR, _one_thread, history, run, subprocess_env  # noqa: F401 (a fixture)

COMMON = ["train", "--data", "8gaussians", *TOY, *VECTOR, "--log-every", 1]


def start(argv: list[object], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A real ``pyro-nf`` process."""
    command = [sys.executable, "-m", "pyro_nf", *map(str, argv)]
    return subprocess.Popen(command, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(process: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=60)


def logged_steps(out: Path) -> list[int]:
    return [int(row["step"]) for row in history(out)] if (out / "history.csv").exists() else []


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signum = getattr(signal, name)
    part, whole = tmp_path / "part", tmp_path / "whole"
    options = [*COMMON, "--val-every", 100000, "--checkpoint-every", 100000]
    process = start([*options, "--steps", 100000, "--out", part])
    try:
        wait_for(process, lambda: len(logged_steps(part)) >= 5, "five steps")
        process.send_signal(signum)
        _, err_bytes = process.communicate(timeout=120)
    finally:
        stop(process)
    err = err_bytes.decode()
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    match = re.fullmatch(rf"pyro-nf: stopped by {name} at step (\d+); (.*)", lines[0])
    assert match, lines[0]
    step = int(match[1])
    assert match[2] == (
        f"the checkpoint at step {step} is kept in {part / 'checkpoint.pt'}; "
        f"continue with: pyro-nf train --resume --out {part}"
    )
    assert load_checkpoint(part / "checkpoint.pt").step == step >= 5
    assert logged_steps(part) == list(range(1, step + 1))
    assert not list(part.glob(".*.tmp"))
    # Resumed, the run continues exactly as if it had never stopped.
    code, out, err = run(["train", "--resume", "--out", part, "--steps", step + 3, "--no-progress"], capsys)
    assert code == 0 and f"at step {step} of {step + 3}" in out, err
    assert run([*options, "--steps", step + 3, "--out", whole], capsys)[0] == 0
    assert logged_steps(part) == list(range(1, step + 4))
    assert [row["loss"] for row in history(part)] == [row["loss"] for row in history(whole)]
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert all(torch.equal(a.model[key], b.model[key]) for key in a.model)


def test_a_second_signal_stops_at_once_keeping_the_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([*COMMON, "--steps", 2, "--out", tmp_path], capsys)[0] == 0
    env = {**subprocess_env(), "PYRO_NF_TEST_SLEEP_BEFORE_RENAME": "60"}  # every save waits before its rename
    process = start(["train", "--resume", "--out", tmp_path, "--steps", 100000, "--checkpoint-every", 100000], env)
    try:
        wait_for(process, lambda: len(logged_steps(tmp_path)) >= 5, "five steps")
        process.send_signal(signal.SIGTERM)  # the run saves a checkpoint at the current step ...
        wait_for(process, lambda: bool(list(tmp_path.glob(".checkpoint.pt.*.tmp"))), "the save")
        process.send_signal(signal.SIGTERM)  # ... and the second signal does not wait for it
        _, err = process.communicate(timeout=60)
    finally:
        stop(process)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.decode() == (
        "pyro-nf: stopped at once by a second SIGTERM; the checkpoint at step 2 is kept in "
        f"{tmp_path / 'checkpoint.pt'}; continue with: pyro-nf train --resume --out {tmp_path}\n"
    )
    assert load_checkpoint(tmp_path / "checkpoint.pt").step == 2 and not list(tmp_path.glob(".*.tmp"))


def test_a_second_run_in_the_same_folder_is_refused_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = start([*COMMON, "--steps", 100000, "--val-every", 100000, "--out", tmp_path])
    try:
        lock = tmp_path / ".pyro-nf.lock"
        wait_for(holder, lambda: lock.is_file() and f"pid {holder.pid} " in lock.read_text(), "the lock")
        for flag in ([], ["--overwrite"]):
            code, _, err = run([*COMMON, "--steps", 5, "--out", tmp_path, *flag], capsys)
            assert code == EXIT_USAGE
            assert f"{tmp_path} is in use by another pyro-nf run (pid {holder.pid} on " in err, err
        wait_for(holder, lambda: len(logged_steps(tmp_path)) >= 3, "three steps")
        holder.send_signal(signal.SIGTERM)
        holder.communicate(timeout=120)
    finally:
        stop(holder)
    # The holder's history is its own: one line per step, in order.
    steps = logged_steps(tmp_path)
    assert steps == list(range(1, len(steps) + 1))
    # Once it has ended the folder is free (and the lock file, emptied, stays).
    code, out, err = run(["train", "--resume", "--out", tmp_path, "--steps", steps[-1] + 1, "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / ".pyro-nf.lock").read_text() == ""


def test_overwrite_deletes_the_old_run_before_it_writes_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([*COMMON, "--steps", 4, "--checkpoint-every", 2, "--val-every", 2, "--out", tmp_path], capsys)[0] == 0
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.json", "samples.png", "figures/step_000002.png"):
        assert (tmp_path / name).is_file(), name
    (tmp_path / "notes.txt").write_text("not a run file")
    env = {**subprocess_env(), "PYRO_NF_TEST_SLEEP_BEFORE_RENAME": "60"}
    new = [*COMMON, "--steps", 3, "--checkpoint-every", 1, "--hidden", 16, "--out", tmp_path, "--overwrite"]
    process = start(new, env)
    try:  # killed while its first checkpoint is being written: after config.json
        wait_for(process, lambda: bool(list(tmp_path.glob(".checkpoint.pt.*.tmp"))), "the first save")
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        stop(process)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if not p.name.startswith("."))
    assert left == ["config.json", "figures", "history.csv", "notes.txt", "train.log"]
    assert json.loads((tmp_path / "config.json").read_text())["hidden"] == [16]
    log = (tmp_path / "train.log").read_text()  # the old run's log went with it
    assert log.count("pyro-nf: training") == 1 and "for 3 steps" in log
    # Nothing of the old run can be continued by accident.
    code, _, err = run(["train", "--resume", "--out", tmp_path], capsys)
    assert code == EXIT_USAGE and "stopped before its first checkpoint" in err and "--overwrite" in err, err
    code, _, err = run([*COMMON, "--steps", 3, "--out", tmp_path], capsys)
    assert code == EXIT_USAGE and "already holds a run (config.json, history.csv)" in err, err
    code, out, err = run(new, capsys)
    assert code == 0 and "removed" in out, err
    assert not list(tmp_path.glob(".*.tmp")) and (tmp_path / "notes.txt").is_file()
    assert load_checkpoint(tmp_path / "checkpoint.pt").step == 3


def flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's storage record of a ``torch.save`` zip."""
    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[record.header_offset + 26 : record.header_offset + 30])
    start_of_data = record.header_offset + 30 + name_length + extra_length
    raw[start_of_data + record.file_size // 2] ^= 0xFF
    path.write_bytes(raw)


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*COMMON, "--steps", 4, "--checkpoint-every", 2, "--val-every", 100, "--out", tmp_path]
    assert run(argv, capsys)[0] == 0
    flip_a_tensor_byte(tmp_path / "checkpoint.pt")
    # Reading a run never uses a damaged file, nor silently an older one: the error names the fallback.
    for command in (["evaluate", tmp_path], ["sample", tmp_path, "--num", 4]):
        code, _, err = run(command, capsys)
        assert code == EXIT_USAGE and "the checkpoint is corrupted and is not used" in err, err
        assert f"The previous checkpoint {tmp_path / 'checkpoint.prev.pt'} may still be good" in err
    code, out, err = run(["evaluate", tmp_path / "checkpoint.prev.pt"], capsys)
    assert code == 0 and "NLL on test split" in out, err
    # Resuming sets the damaged file aside, says so, and continues from the previous checkpoint.
    code, out, err = run(["train", "--resume", "--out", tmp_path, "--steps", 6, "--no-progress"], capsys)
    assert code == 0, err
    assert f"using the previous checkpoint {tmp_path / 'checkpoint.prev.pt'} (step 2) instead" in out
    assert f"the refused file is kept as {tmp_path / 'checkpoint.bad.pt'}" in out and "at step 2 of 6" in out
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(tmp_path / "checkpoint.pt").step == 6
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt").step == 4
    # --overwrite clears every checkpoint of the old run, the set-aside one too.
    assert run([*COMMON, "--steps", 1, "--out", tmp_path, "--overwrite"], capsys)[0] == 0
    assert not (tmp_path / "checkpoint.bad.pt").exists() and not (tmp_path / "checkpoint.prev.pt").exists()


def test_a_full_disk_stops_with_the_last_checkpoint_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original, saves = torch.save, {"n": 0}

    def save(obj: object, handle: object, *args: object, **kwargs: object) -> None:
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint finds the disk full half-way
            handle.write(b"partial")  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, "No space left on device")
        original(obj, handle, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "save", save)
    code, _, err = run([*COMMON, "--steps", 4, "--checkpoint-every", 2, "--out", tmp_path], capsys)
    monkeypatch.undo()
    assert code == EXIT_USAGE
    assert err == (
        "pyro-nf: error: cannot write (No space left on device); training stopped; the checkpoint at step 2 is "
        f"kept in {tmp_path / 'checkpoint.pt'}; continue with: pyro-nf train --resume --out {tmp_path}\n"
    )
    assert load_checkpoint(tmp_path / "checkpoint.pt").step == 2 and not list(tmp_path.glob(".*.tmp"))
    code, out, err = run(["train", "--resume", "--out", tmp_path, "--no-progress"], capsys)
    assert code == 0 and "at step 2 of 4" in out, err


def test_resume_on_changed_data_is_refused_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    data, out = tmp_path / "points.npy", tmp_path / "run"
    np.save(data, rng.normal(size=(300, 3)))
    argv = ["train", "--data", data, "--steps", 2, "--batch-size", 50, *VECTOR, "--num-samples", 16, "--no-progress"]
    assert run([*argv, "--out", out], capsys)[0] == 0
    np.save(data, rng.normal(size=(300, 3)) + 100.0)  # same width, other numbers
    code, _, err = run(["train", "--resume", "--out", out, "--steps", 3], capsys)
    assert code == EXIT_USAGE and "the data changed since the checkpoint" in err and "--allow-new-data" in err, err
    assert f"{data} ({data.stat().st_size} bytes): 300 samples of shape (3,)" in err
    code, out_text, err = run(["train", "--resume", "--out", out, "--steps", 3, "--allow-new-data"], capsys)
    assert code == 0 and "continuing on new data (--allow-new-data)" in out_text, err
    # The new data are the run's now; the same file moved elsewhere is the same data.
    moved = tmp_path / "moved.npy"
    shutil.move(data, moved)
    code, _, err = run(["train", "--resume", "--out", out, "--steps", 4, "--data", moved], capsys)
    assert code == 0, err
    np.save(moved, rng.normal(size=(300, 5)))  # another width: never, not even when asked
    code, _, err = run(["train", "--resume", "--out", out, "--steps", 5, "--allow-new-data"], capsys)
    assert code == EXIT_USAGE and "samples of shape (5,), but the run's model" in err and "(3,)" in err, err
    code, _, err = run(["train", "--data", moved, "--out", tmp_path / "new", "--allow-new-data"], capsys)
    assert code == EXIT_USAGE and "--allow-new-data applies to --resume" in err


def test_resume_may_change_the_learning_rate_but_not_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([*COMMON, "--steps", 2, "--out", tmp_path], capsys)[0] == 0
    code, out, err = run(["train", "--resume", "--out", tmp_path, "--steps", 4, "--lr", 0.0005], capsys)
    assert code == 0 and "--lr changes from 0.001 to 0.0005 at step 2" in out, err
    assert [float(row["lr"]) for row in history(tmp_path)] == [0.001, 0.001, 0.0005, 0.0005]
    code, _, err = run(["train", "--resume", "--out", tmp_path, "--steps", 5, "--hidden", "16"], capsys)
    assert code == EXIT_USAGE and "--hidden [16] differs from the resumed run's [8]" in err
    assert "start a new run, in this folder with --overwrite" in err and "--lr" in err


def test_a_constant_column_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [f"{x:.3f},5,{-x:.3f}" for x in np.random.default_rng(0).normal(size=50)]
    (tmp_path / "flat.csv").write_text("a,b,c\n" + "\n".join(rows) + "\n")
    code, _, err = run(["train", "--data", tmp_path / "flat.csv", "--out", tmp_path / "r", "--steps", 1], capsys)
    assert code == EXIT_USAGE
    assert f"{tmp_path / 'flat.csv'}, column 2 ('b'): every training sample has the value 5" in err
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


@pytest.mark.parametrize("case", ["a file", "below a file", "read-only", "empty"])
def test_an_unusable_out_is_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("x")
    out, message = {
        "a file": (tmp_path / "file", f"--out {tmp_path / 'file'}: this is a file, expected a folder"),
        "below a file": (tmp_path / "file" / "run", f"cannot create the folder, {tmp_path / 'file'} is a file"),
        "read-only": (tmp_path / "ro" / "run", f"--out {tmp_path / 'ro' / 'run'}: cannot write in this folder"),
        "empty": ("", "--out: expected the name of a folder, got ''"),
    }[case]
    if case == "read-only":

        def read_only(self: Path, *args: object, **kwargs: object) -> None:
            raise OSError(errno.EROFS, "Read-only file system", str(self))

        monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = run([*COMMON, "--steps", 1, "--out", out], capsys)
    assert code == EXIT_USAGE and err.count("\n") == 1 and message in err, err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs file permissions that bind (not root)")
def test_a_folder_without_write_permission_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "locked").mkdir(mode=0o500)
    code, _, err = run([*COMMON, "--steps", 1, "--out", tmp_path / "locked" / "run"], capsys)
    assert code == EXIT_USAGE and "cannot write in this folder (Permission denied)" in err, err


def test_an_unusable_sample_output_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run([*COMMON, "--steps", 1, "--out", tmp_path / "run"], capsys)[0] == 0
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.npy").mkdir()
    cases = {
        tmp_path / "folder.npy": "expected the name of a .npy file to write, got a folder",
        tmp_path / "file" / "x.npy": f"cannot write it ({tmp_path / 'file'} is a file)",
    }
    for output, message in cases.items():
        code, _, err = run(["sample", tmp_path / "run", "--num", 4, "--output", output], capsys)
        assert code == EXIT_USAGE and message in err and err.count("\n") == 1, err

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(np, "save", read_only)
    code, _, err = run(["sample", tmp_path / "run", "--num", 4, "--output", tmp_path / "s.npy"], capsys)
    assert code == EXIT_USAGE and "cannot write it (Read-only file system)" in err, err


def test_a_folder_whose_config_and_checkpoint_disagree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one, other = tmp_path / "one", tmp_path / "other"
    assert run([*COMMON, "--steps", 1, "--out", one], capsys)[0] == 0
    assert run([*COMMON, "--flow", "realnvp", "--steps", 1, "--out", other], capsys)[0] == 0
    shutil.copyfile(other / "config.json", one / "config.json")
    for command in (["evaluate", one], ["train", "--resume", "--out", one, "--steps", 2]):
        code, _, err = run(command, capsys)
        assert code == EXIT_USAGE, err
        assert f"{one / 'config.json'} and {one / 'checkpoint.pt'} describe different runs" in err
        assert "flow: 'realnvp' against 'maf'" in err
    code, _, err = run(["evaluate", one / "checkpoint.pt"], capsys)  # the checkpoint alone is one run
    assert code == 0, err


def test_checkpoints_that_the_command_line_cannot_rebuild(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([*COMMON, "--steps", 1, "--out", tmp_path / "ok"], capsys)[0] == 0
    good = load_checkpoint(tmp_path / "ok" / "checkpoint.pt")

    def variant(name: str, **changes: object) -> Path:
        fields = {"model": good.model, "optimizer": good.optimizer, "step": good.step, "rng": good.rng}
        fields.update(config=good.config, extra=good.extra)
        fields.update(changes)
        save_checkpoint(tmp_path / name, Checkpoint(**fields))  # type: ignore[arg-type]
        return tmp_path / name

    cases = {
        variant("flow.pt", config={**good.config, "flow": "nope"}): "unknown flow 'nope'; this pyro_nf knows maf",
        variant("extra.pt", extra={}): "the checkpoint lacks the training record that pyro-nf train writes",
        variant("widths.pt", config={**good.config, "hidden": [16]}): "the weights it holds do not fit the model",
    }
    for path, message in cases.items():
        for command in (["evaluate", path], ["sample", path, "--num", 2, "--output", tmp_path / "s.npy"]):
            code, _, err = run(command, capsys)
            assert code == EXIT_USAGE and f"{path}: " in err and message in err and "Traceback" not in err, err


BAD_VALUES = {
    "evaluate batch size": (["evaluate", "RUN", "--batch-size", "-1"], "--batch-size: expected a positive integer"),
    "sample seed": (["sample", "RUN", "--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
    "train seed": ([*COMMON, "--seed", "-1", "--out", "NEW"], "--seed: expected an integer >= 0, got -1"),
    "cpu index": ([*COMMON, "--device", "cpu:5", "--out", "NEW"], "--device: expected auto, cpu, cuda, cuda:N or mps"),
    "evaluate device": (["evaluate", "RUN", "--device", "cpu:5"], "--device: expected auto, cpu, cuda, cuda:N or mps"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([*COMMON, "--steps", 1, "--out", tmp_path / "run"], capsys)[0] == 0
    argv, message = BAD_VALUES[case]
    argv = [str(tmp_path / "run") if a == "RUN" else str(tmp_path / "new") if a == "NEW" else a for a in argv]
    code, _, err = run(argv, capsys)
    assert code == EXIT_USAGE and message in err, err
    assert not (tmp_path / "new").exists()
