"""Checkpoints: the round trip, refusing damaged files (tensor bytes, plain values, the zip records), the previous
checkpoint as a fallback, version-1 files, and removing the temporaries of killed saves."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pyro_nf.checkpoint import (
    VERSION,
    Checkpoint,
    CheckpointCorruptedError,
    CheckpointError,
    load_checkpoint,
    load_latest_checkpoint,
    previous_checkpoint_path,
    save_checkpoint,
)
from pyro_nf.rng import capture_rng_state, restore_rng_state
from pyro_nf.training.run_folder import remove_stale_temporaries


def make_checkpoint(step: int = 5) -> Checkpoint:
    """A checkpoint shaped like the training loop's: a model with buffers, Adam's state, every generator."""
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 3)).square().mean().backward()
        optimizer.step()
    extra = {
        "preprocess": {"kind": "standardize", "shift": torch.randn(3), "scale": torch.rand(3) + 0.5},
        "curves": {"steps": [1.0, 2.0], "train": [1.5, 1.25], "val": [1.75, 1.5]},
        "event_shape": [3],
        "data_kind": "toy",
        "rank_rng": [torch.get_rng_state()],
    }
    config = {"flow": "maf", "lr": 1e-3, "hidden": [16], "seed": 0, "epochs": None, "progress": False}
    return Checkpoint(model.state_dict(), optimizer.state_dict(), step, capture_rng_state(), config, extra)


def records(path: Path) -> dict[str, tuple[int, int]]:
    """``name -> (offset of the data in the file, size)`` for each record of a torch.save zip (stored, not deflated)."""
    found = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            handle.seek(info.header_offset)
            header = handle.read(30)
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            found[info.filename] = (info.header_offset + 30 + name_length + extra_length, info.file_size)
    return found


def record_holding(path: Path, tensor: torch.Tensor) -> tuple[str, int, int]:
    """The data record whose bytes are exactly ``tensor``'s."""
    wanted = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    content = path.read_bytes()
    matches = [
        (name, offset, size)
        for name, (offset, size) in records(path).items()
        if "/data/" in name and content[offset : offset + size] == wanted
    ]
    assert len(matches) == 1, matches
    return matches[0]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x5A]))


def repack(source: Path, target: Path, edit: dict[str, Any]) -> None:
    """Rewrite a torch.save zip with Python's zipfile (fresh, valid CRC-32s), ``edit[name](bytes)`` changing records."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            new.writestr(info.filename, edit[info.filename](data) if info.filename in edit else data)


def payload_of(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def test_round_trip_is_exact_verified_and_weights_only(tmp_path: Path) -> None:
    original = make_checkpoint()
    save_checkpoint(tmp_path / "checkpoint.pt", original)
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded.step == original.step and loaded.config == original.config
    assert list(loaded.model) == list(original.model)
    assert all(torch.equal(loaded.model[k], original.model[k]) for k in original.model)
    assert loaded.model._metadata == original.model._metadata  # type: ignore[attr-defined]
    for key, state in original.optimizer["state"].items():
        assert all(torch.equal(loaded.optimizer["state"][key][name], state[name]) for name in state)
    assert loaded.optimizer["param_groups"] == original.optimizer["param_groups"]
    assert torch.equal(loaded.extra["preprocess"]["scale"], original.extra["preprocess"]["scale"])
    # The generators come back exactly.
    restore_rng_state(loaded.rng)
    after = torch.rand(3), np.random.rand()
    restore_rng_state(original.rng)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == np.random.rand()
    # The file is plain tensors and containers: torch's safe loader reads it without help.
    payload = payload_of(tmp_path / "checkpoint.pt")
    assert payload["version"] == VERSION == 2 and payload["checksum"]["algorithm"] == "sha256"
    digests = payload["checksum"]["digests"]
    assert {"model", "optimizer", "config", "step", "rng", "extra", "model['0.weight']"} <= set(digests)
    assert "optimizer['state'][0]['exp_avg']" in digests
    assert all(len(digest) == 64 for digest in digests.values())
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_digests_do_not_depend_on_device_layout_or_storage(tmp_path: Path) -> None:
    """A transposed tensor and a view into a larger storage verify; a map_location load verifies too."""
    base = torch.arange(24.0)
    model = {"t": torch.arange(12.0).reshape(3, 4).t(), "view": base[4:10], "empty": torch.zeros(0, 3)}
    model |= {"half": torch.ones(2, dtype=torch.bfloat16), "flag": torch.tensor(True), "z": torch.ones(2) * 1j}
    save_checkpoint(tmp_path / "c.pt", Checkpoint(model, {}, 0, {}, {}))
    for location in ("cpu", torch.device("cpu")):
        loaded = load_checkpoint(tmp_path / "c.pt", map_location=location)
        assert all(torch.equal(loaded.model[k], model[k]) for k in model)


def test_a_flipped_byte_in_a_tensor_is_refused_and_named(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    checkpoint = make_checkpoint()
    save_checkpoint(path, checkpoint)
    targets = {
        "model['0.weight']": checkpoint.model["0.weight"],
        "optimizer['state'][2]['exp_avg_sq']": checkpoint.optimizer["state"][2]["exp_avg_sq"],
        "extra['preprocess']['scale']": checkpoint.extra["preprocess"]["scale"],
    }
    clean = path.read_bytes()
    for name, tensor in targets.items():
        path.write_bytes(clean)
        record, offset, size = record_holding(path, tensor)
        flip_byte(path, offset + size // 2)
        # This is what used to happen: torch's zip reader accepts the file and hands back other numbers.
        damaged = payload_of(path)
        assert damaged["format"] == "pyro_nf.checkpoint"
        with pytest.raises(CheckpointCorruptedError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert message.startswith(f"{path}: the checkpoint is corrupted and is not used: {name} (a torch.")
        assert "does not match the checksum saved with it" in message
        assert f"the zip record {record} fails its CRC-32 check" in message
        assert "no previous checkpoint (checkpoint.prev.pt)" in message  # how to go on
        assert message.count("does not match") == 1  # only the damaged tensor is named


def test_a_repacked_zip_with_fresh_crcs_is_refused_by_the_digests(tmp_path: Path) -> None:
    """A file rewritten with valid CRC-32s passes every zip reader; the SHA-256 digests still catch the change."""
    save_checkpoint(tmp_path / "checkpoint.pt", checkpoint := make_checkpoint())
    record, _, _ = record_holding(tmp_path / "checkpoint.pt", checkpoint.model["2.bias"])

    def flip(data: bytes) -> bytes:
        changed = bytearray(data)
        changed[len(changed) // 2] ^= 0x01
        return bytes(changed)

    repack(tmp_path / "checkpoint.pt", tmp_path / "repacked.pt", {record: flip})
    with zipfile.ZipFile(tmp_path / "repacked.pt") as archive:
        assert archive.testzip() is None  # every CRC-32 is right
    assert not torch.equal(payload_of(tmp_path / "repacked.pt")["model"]["2.bias"], checkpoint.model["2.bias"])
    with pytest.raises(CheckpointCorruptedError) as info:
        load_checkpoint(tmp_path / "repacked.pt")
    message = str(info.value)
    assert "repacked.pt: the checkpoint is corrupted" in message and "CRC-32" not in message
    assert "model['2.bias'] (a torch.float32 tensor of shape (2,)) does not match the checksum saved with it" in message


def test_a_changed_plain_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_checkpoint(step=5))
    clean = path.read_bytes()
    # In place: one bit of the float 0.001 (the learning rate, pickled as 8 big-endian bytes) in the pickle record.
    offset, size = next(where for name, where in records(path).items() if name.endswith("data.pkl"))
    pickled = clean[offset : offset + size]
    assert pickled.count(struct.pack(">d", 1e-3)) >= 1
    flip_byte(path, offset + pickled.index(struct.pack(">d", 1e-3)) + 7)
    with pytest.raises(CheckpointCorruptedError) as info:
        load_checkpoint(path)
    assert "does not match the checksum saved with it" in str(info.value)
    assert "CRC-32" in str(info.value) and "data.pkl" in str(info.value)
    # Re-saved with valid CRCs and the old checksum: a changed step, config value, key, or container type.
    edits = {
        "step": lambda p: p.update(step=6),
        "config": lambda p: p["config"].update(lr=0.002),
        "extra": lambda p: p["extra"]["curves"]["train"].append(1.0),
        "rng": lambda p: p["rng"]["numpy"].update(position=int(p["rng"]["numpy"]["position"]) + 1),
        "optimizer": lambda p: p["optimizer"]["param_groups"][0].update(betas=[0.9, 0.999]),
        "model": lambda p: p["model"]._metadata["0"].update(version=7),
    }
    for entry, edit in edits.items():
        path.write_bytes(clean)
        payload = payload_of(path)
        edit(payload)
        torch.save(payload, tmp_path / "edited.pt")
        with pytest.raises(CheckpointCorruptedError) as info:
            load_checkpoint(tmp_path / "edited.pt")
        assert f": {entry} (its keys, layout and plain values) does not match the checksum saved with it" in str(
            info.value
        ), entry


def test_a_tensor_removed_added_or_checksum_stripped_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "checkpoint.pt", make_checkpoint())
    cases = {
        "removed": (lambda p: p["model"].pop("0.bias"), "model['0.bias'] is missing from the file"),
        "added": (lambda p: p["extra"].update(more=torch.ones(2)), "extra['more'] (a torch.float32 tensor of shape"),
        "stripped": (lambda p: p.pop("checksum"), "its checksum entry is missing or unreadable"),
    }
    for name, (edit, message) in cases.items():
        payload = payload_of(tmp_path / "checkpoint.pt")
        edit(payload)
        torch.save(payload, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointCorruptedError) as info:
            load_checkpoint(tmp_path / f"{name}.pt")
        assert message in str(info.value), (name, str(info.value))


def test_a_byte_no_tensor_looks_at_is_caught_by_the_crc(tmp_path: Path) -> None:
    """torch.save writes a view's whole storage; damage outside the view changes no value, yet the file is bad."""
    storage = torch.arange(64.0)
    save_checkpoint(tmp_path / "checkpoint.pt", Checkpoint({"w": storage[:8]}, {}, 1, {}, {}))
    name, (offset, size) = next((n, w) for n, w in records(tmp_path / "checkpoint.pt").items() if "/data/" in n)
    assert size == 64 * 4
    flip_byte(tmp_path / "checkpoint.pt", offset + size - 3)  # inside element 63, which the view does not hold
    assert torch.equal(payload_of(tmp_path / "checkpoint.pt")["model"]["w"], storage[:8])
    with pytest.raises(CheckpointCorruptedError, match=rf"the zip record {name} fails its CRC-32 check"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    for step in (1, 2, 3):
        save_checkpoint(path, make_checkpoint(step))
    assert previous_checkpoint_path(path) == tmp_path / "checkpoint.prev.pt"
    assert load_checkpoint(path).step == 3 and load_checkpoint(tmp_path / "checkpoint.prev.pt").step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    # Without hard links (FAT, some network shares) the old file is renamed instead.
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError(95, "Operation not supported")))
    save_checkpoint(path, make_checkpoint(4))
    assert load_checkpoint(path).step == 4 and load_checkpoint(tmp_path / "checkpoint.prev.pt").step == 3
    monkeypatch.undo()
    save_checkpoint(path, make_checkpoint(5), keep_previous=False)
    assert load_checkpoint(path).step == 5 and load_checkpoint(tmp_path / "checkpoint.prev.pt").step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_a_failed_save_leaves_both_checkpoints_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_checkpoint(1))
    save_checkpoint(path, make_checkpoint(2))
    real_replace = os.replace

    def failing_replace(source: Any, target: Any) -> None:
        if Path(target) == path:
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, make_checkpoint(3))
    monkeypatch.undo()
    # The newest checkpoint was never missing (a hard link kept it while the previous one was updated).
    assert load_checkpoint(path).step == 2 and load_checkpoint(tmp_path / "checkpoint.prev.pt").step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_save_refuses_what_the_safe_loader_would_refuse(tmp_path: Path) -> None:
    cases = {
        "extra['x']": ({"x": np.float64(1.0)}, "got a numpy.float64"),
        "extra['m']": ({"m": torch.nn.Linear(1, 1)}, "got a torch.nn.modules.linear.Linear"),
        "extra['s']": ({"s": torch.eye(2).to_sparse()}, "expected a dense tensor, got a torch.sparse_coo"),
    }
    for entry, (extra, message) in cases.items():
        with pytest.raises(TypeError) as info:
            save_checkpoint(tmp_path / "checkpoint.pt", Checkpoint({}, {}, 0, {}, {}, extra))
        assert f"checkpoint entry {entry}" in str(info.value) and message in str(info.value)
    assert not list(tmp_path.iterdir())


def test_load_latest_falls_back_to_the_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (4, 8):
        save_checkpoint(run / "checkpoint.pt", make_checkpoint(step))
    latest = load_latest_checkpoint(run)
    assert latest.checkpoint.step == 8 and latest.path == run / "checkpoint.pt" and latest.note is None
    # Damage the newest: it is refused, named, and the previous one is used (and said to be).
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    _, offset, size = record_holding(run / "checkpoint.pt", checkpoint.model["1.running_var"])
    flip_byte(run / "checkpoint.pt", offset + size // 2)
    with pytest.raises(CheckpointCorruptedError) as info:
        load_checkpoint(run / "checkpoint.pt")
    assert f"The previous checkpoint {run / 'checkpoint.prev.pt'} may still be good: use it instead" in str(info.value)
    for where in (run, run / "checkpoint.pt"):
        latest = load_latest_checkpoint(where)
        assert latest.checkpoint.step == 4 and latest.path == run / "checkpoint.prev.pt"
        assert latest.note is not None
        assert latest.note.startswith(f"{run / 'checkpoint.pt'}: the checkpoint is corrupted and is not used: ")
        assert "model['1.running_var']" in latest.note
        assert latest.note.endswith(f"; using the previous checkpoint {run / 'checkpoint.prev.pt'} (step 4) instead")
    assert (run / "checkpoint.pt").is_file()  # reading leaves the files alone
    # A resuming loop sets the refused file aside, so its next save does not move it over the good previous one.
    latest = load_latest_checkpoint(run, set_aside=True)
    assert latest.checkpoint.step == 4 and latest.note is not None
    assert latest.note.endswith(f"(the refused file is kept as {run / 'checkpoint.bad.pt'})")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.bad.pt", "checkpoint.prev.pt"]
    save_checkpoint(run / "checkpoint.pt", make_checkpoint(5))
    assert load_checkpoint(run / "checkpoint.pt").step == 5
    assert load_checkpoint(run / "checkpoint.prev.pt").step == 4


def test_load_latest_when_the_newest_is_missing_or_both_are_bad(tmp_path: Path) -> None:
    # A crash between the two renames of a save without hard links leaves only the previous checkpoint.
    save_checkpoint(tmp_path / "checkpoint.prev.pt", make_checkpoint(3))
    latest = load_latest_checkpoint(tmp_path)
    assert latest.checkpoint.step == 3 and latest.note is not None and "no such checkpoint file" in latest.note
    # Both unusable: both reasons, and no file is used.
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(CheckpointCorruptedError) as info:
        load_latest_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"no usable checkpoint: {tmp_path / 'checkpoint.pt'}: cannot read the checkpoint")
    assert f"the previous checkpoint is unusable too: {tmp_path / 'checkpoint.prev.pt'}: cannot read" in message
    # No previous checkpoint: the newest's own error.
    (tmp_path / "checkpoint.prev.pt").unlink()
    with pytest.raises(CheckpointCorruptedError, match="There is no previous checkpoint"):
        load_latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_latest_checkpoint(tmp_path / "nothing")


def version_1_file(path: Path, checkpoint: Checkpoint) -> None:
    """A file as the release before checksums wrote it (layout version 1: no checksum entry)."""
    payload = {"format": "pyro_nf.checkpoint", "version": 1, "model": checkpoint.model}
    payload |= {"optimizer": checkpoint.optimizer, "step": checkpoint.step, "rng": checkpoint.rng}
    payload |= {"config": checkpoint.config, "extra": checkpoint.extra}
    torch.save(payload, path)


def test_version_1_files_load_verified_by_their_crcs(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(7)
    version_1_file(tmp_path / "old.pt", checkpoint)
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert (
        loaded.step == 7
        and loaded.config == checkpoint.config
        and all(torch.equal(loaded.model[k], checkpoint.model[k]) for k in checkpoint.model)
    )
    # A damaged byte in a tensor is still caught, by the zip record's CRC-32.
    record, offset, size = record_holding(tmp_path / "old.pt", checkpoint.model["0.weight"])
    flip_byte(tmp_path / "old.pt", offset + size // 2)
    with pytest.raises(CheckpointCorruptedError, match=rf"the zip record {record} fails its CRC-32 check"):
        load_checkpoint(tmp_path / "old.pt")
    # Resuming one and saving again writes version 2.
    save_checkpoint(tmp_path / "new.pt", loaded)
    assert payload_of(tmp_path / "new.pt")["version"] == 2 and load_checkpoint(tmp_path / "new.pt").step == 7


def test_files_without_crcs_and_newer_layouts(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(2)
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        version_1_file(tmp_path / "nocrc-v1.pt", checkpoint)
        save_checkpoint(tmp_path / "nocrc-v2.pt", checkpoint)
    finally:
        torch.serialization.set_crc32_options(before)
    assert load_checkpoint(tmp_path / "nocrc-v1.pt").step == 2  # nothing to verify it by, but it loads
    assert load_checkpoint(tmp_path / "nocrc-v2.pt").step == 2
    _, offset, size = record_holding(tmp_path / "nocrc-v2.pt", checkpoint.model["2.weight"])
    flip_byte(tmp_path / "nocrc-v2.pt", offset + size // 2)
    with pytest.raises(CheckpointCorruptedError, match=r"model\['2.weight'\] \(a torch.float32 tensor of shape"):
        load_checkpoint(tmp_path / "nocrc-v2.pt")  # the digests still catch it
    payload = payload_of(tmp_path / "nocrc-v1.pt") | {"version": 3}
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="layout version 3; this pyro_nf reads versions 1, 2") as info:
        load_checkpoint(tmp_path / "future.pt")
    assert not isinstance(info.value, CheckpointCorruptedError)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_remove_stale_temporaries(tmp_path: Path) -> None:
    dead, alive = dead_pid(), os.getpid()
    names = [f".checkpoint.pt.{dead}.tmp", f".checkpoint.prev.pt.{dead}.tmp", f".checkpoint.pt.{alive}.tmp"]
    others = [f".config.json.{dead}.tmp", f".other.pt.{dead}.tmp", "checkpoint.pt.tmp", ".checkpoint.pt.x.tmp"]
    for name in names + others:
        (tmp_path / name).write_bytes(b"partial")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:] + others)
    # Holding the run's lock, a caller removes every one (its own process is not saving either).
    assert [p.name for p in remove_stale_temporaries(tmp_path, all_processes=True)] == names[2:]
    assert [p.name for p in remove_stale_temporaries(tmp_path, "other.pt")] == [f".other.pt.{dead}.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others[:1] + others[2:])


def test_a_killed_save_leaves_the_old_checkpoint_and_a_removable_temporary(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_checkpoint(1))
    script = (
        "import sys; from pyro_nf.checkpoint import Checkpoint, save_checkpoint; import torch; "
        "save_checkpoint(sys.argv[1], Checkpoint({'w': torch.zeros(1000)}, {}, 2, {}, {}))"
    )
    env = {**os.environ, "PYRO_NF_TEST_SLEEP_BEFORE_RENAME": "60", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    process = subprocess.Popen([sys.executable, "-c", script, str(path)], env=env)
    try:
        temporary = tmp_path / f".checkpoint.pt.{process.pid}.tmp"
        deadline = time.monotonic() + 90
        while not (temporary.is_file() and zipfile.is_zipfile(temporary)):  # written and fsynced, not renamed
            assert process.poll() is None and time.monotonic() < deadline, "the save never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert load_checkpoint(path).step == 1 and not (tmp_path / "checkpoint.prev.pt").exists()
    assert remove_stale_temporaries(tmp_path) == [temporary]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
