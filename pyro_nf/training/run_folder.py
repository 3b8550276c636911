"""The run folder: one run at a time (a lock), one run in it (``--overwrite`` clears the old one first), no stale files.

:class:`RunFolder` is what a training run holds while it runs: it checks ``--out``, takes the
folder's lock (a second run there is refused, naming the holder's pid), refuses a folder that
holds a run unless the run is resumed or overwritten, deletes an overwritten run's files before
anything new is written (so a folder never mixes two runs), and removes the temporaries killed
saves left behind. :class:`StopSignals` turns SIGTERM and SIGINT into a request to stop at the
next step, which the loop answers with a checkpoint. What a checkpoint records about its run (the
data's fingerprint) and the checks of a resume are in :mod:`pyro_nf.training.run_record`.

:func:`~pyro_nf.checkpoint.save_checkpoint` writes ``.<name>.<pid>.tmp`` next to the
checkpoint and renames it into place; only a killed process (SIGKILL, power loss) leaves
one. :func:`remove_stale_temporaries` clears them when a run starts or resumes.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from pyro_nf.checkpoint import previous_checkpoint_path
from pyro_nf.training.config import ConfigError, TrainingInterrupted

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (see RunFolder)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "RUN_FILES",
    "RunFolder",
    "RunFolderError",
    "RunOptions",
    "StopSignals",
    "clear_run",
    "remove_run_temporaries",
    "remove_stale_temporaries",
    "stopped_error",
    "stopped_message",
]

LOCK_NAME = ".pyro-nf.lock"
"""The lock file in a run folder (it holds the pid of the run holding it, and stays when the run ends)."""

RUN_FILES = (
    "checkpoint.pt",
    "checkpoint.prev.pt",
    "checkpoint.bad.pt",
    "config.json",
    "history.csv",
    "metrics.json",
    "train.log",
    "curves.png",
    "samples.png",
    "samples.npy",
)
"""The files a run writes in its folder (besides ``figures/step_NNNNNN.png``), checkpoints first."""

_MARKS = ("checkpoint.pt", "checkpoint.prev.pt", "config.json", "history.csv", "metrics.json")
"""Files whose presence means the folder holds a run."""


@dataclass(frozen=True)
class RunOptions:
    """How a training run treats its folder: ``overwrite`` an old run, continue on new data, the signal watch."""

    overwrite: bool = False
    allow_new_data: bool = False
    stop: StopSignals = field(default_factory=lambda: StopSignals())


def stopped_message(what: str, out: Path, last_saved: int | None, resume: bool) -> str:
    """The one line a run that stopped early prints: what stopped it, what is kept, how to continue."""
    if last_saved is None and resume:
        return f"{what}; the run's checkpoint is unchanged; continue with: pyro-nf train --resume --out {out}"
    if last_saved is None:
        return f"{what}, before the first checkpoint; start again with: pyro-nf train --overwrite --out {out} ..."
    kept = f"the checkpoint at step {last_saved} is kept in {out / 'checkpoint.pt'}"
    return f"{what}; {kept}; continue with: pyro-nf train --resume --out {out}"


_WRITE_ERRORS = {getattr(errno, name, None) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG")} - {None}


def stopped_error(error: TrainingInterrupted | OSError, out: Path, last_saved: int | None, resume: bool) -> Exception:
    """The error a run stopped by a signal or a failed write (a full disk, a folder gone) raises: one line."""
    if isinstance(error, TrainingInterrupted):
        return TrainingInterrupted(stopped_message(str(error), out, last_saved, resume), error.signum)
    where = f" {error.filename}" if error.filename else ""
    verb = "cannot write" if error.errno in _WRITE_ERRORS else "cannot use"
    what = f"{verb}{where} ({error.strerror or error}); training stopped"
    return RunFolderError(stopped_message(what, out, last_saved, resume))


class RunFolderError(ConfigError):
    """A run folder that cannot be used: not a folder, not writable, in use by another run, holding another run."""


def _first_file_above(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


class RunFolder:
    """The folder of a running training run, held from :meth:`open` to :meth:`close`.

    The lock is an advisory ``flock`` on :data:`LOCK_NAME` (Linux, macOS and other POSIX
    systems; the operating system releases it when the process ends, however it ends, so
    it never goes stale). On a network file system it holds only if the server supports
    locks; on Windows there is no lock (two runs in one folder are not detected there).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = RunFolder.open(Path(tmp, "run"))
        ...     try:
        ...         RunFolder.open(Path(tmp, "run"))
        ...     except RunFolderError as error:
        ...         print(str(error).replace(tmp, "<tmp>").split(" (")[0])
        ...     folder.close()
        <tmp>/run is in use by another pyro-nf run
    """

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self._handle = handle
        self.removed: list[Path] = []

    @classmethod
    def open(cls, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> RunFolder:
        """Check and create ``out``, take its lock, and make it ready for a new, resumed or overwritten run.

        Raises:
            RunFolderError: ``out`` is a file or below one, cannot be written, is in use by
                another run (its pid is named), or holds a run and neither ``resume`` nor
                ``overwrite`` is given.
        """
        path = Path(out)
        blocker = _first_file_above(path)
        if blocker == path:
            raise RunFolderError(f"--out {path}: this is a file, expected a folder for the run")
        if blocker is not None:
            raise RunFolderError(f"--out {path}: cannot create the folder, {blocker} is a file")
        try:
            path.mkdir(parents=True, exist_ok=True)
            handle = open(path / LOCK_NAME, "a+")  # noqa: SIM115 (held until close)
        except OSError as error:
            raise RunFolderError(f"--out {path}: cannot write in this folder ({error.strerror})") from None
        folder = cls(path, handle)
        try:
            folder._lock()
            marks = [path / name for name in _MARKS if (path / name).exists()]
            if marks and not resume and not overwrite:
                raise RunFolderError(
                    f"{path} already holds a run ({', '.join(p.name for p in marks)}); pass --resume to continue "
                    "it, --overwrite to delete it and start again, or choose another --out"
                )
            if overwrite:
                folder.removed += clear_run(path)
            folder.removed += remove_run_temporaries(path)
        except BaseException:
            folder.close()
            raise
        return folder

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "a process that has not written its pid yet"
            self._handle.close()
            self._handle = None
            raise RunFolderError(
                f"{self.path} is in use by another pyro-nf run ({holder}); wait for it to end, stop it "
                "(it saves a checkpoint on SIGTERM), or choose another --out"
            ) from None
        except OSError as error:  # a file system without locks
            raise RunFolderError(f"--out {self.path}: cannot lock the folder ({error.strerror})") from None
        self._handle.seek(0)
        self._handle.truncate()
        since = datetime.datetime.now().isoformat(timespec="seconds")
        self._handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n")
        self._handle.flush()

    def close(self) -> None:
        """Release the lock (the lock file stays, emptied)."""
        if self._handle is None:
            return
        try:
            if fcntl is not None:
                self._handle.seek(0)
                self._handle.truncate()
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            self._handle.close()
            self._handle = None


def clear_run(out: str | Path) -> list[Path]:
    """Delete the files of the run in ``out`` (:data:`RUN_FILES`, ``figures/step_*.png``): checkpoints first.

    Other files in the folder are left alone. Deleting the checkpoints first means that a
    process killed in the middle leaves nothing that ``--resume`` would continue. Returns the
    removed files.
    """
    out = Path(out)
    removed = []
    figures = out / "figures"
    for path in [out / name for name in RUN_FILES] + sorted(figures.glob("step_*.png")):
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(path)
    if figures.is_dir() and not any(figures.iterdir()):
        figures.rmdir()
    return removed


def remove_run_temporaries(out: str | Path) -> list[Path]:
    """Remove every temporary a killed write left in ``out`` (checkpoints, JSON files, figures); hold the lock.

    Atomic writes put ``.<name>.<suffix>.tmp`` beside the file they replace; this removes those
    of the run's files and figures whatever their process (the caller holds the folder's lock).
    """
    out = Path(out)
    removed = []
    names = tuple(f".{name}." for name in RUN_FILES)
    for folder, prefixes in ((out, names), (out / "figures", (".step_",))):
        if not folder.is_dir():
            continue
        for candidate in sorted(folder.glob(".*.tmp")):
            if candidate.name.startswith(prefixes) and candidate.is_file():
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


class StopSignals:
    """Within ``with``, SIGTERM and SIGINT ask the run to stop at the next step; a second one stops it at once.

    :attr:`signum` is the first signal received (None until then); the training loop checks it
    between steps, saves a checkpoint and raises :class:`~pyro_nf.training.config.TrainingInterrupted`.
    A second signal raises :class:`~pyro_nf.training.config.TrainingInterrupted` where the
    program is (an atomic save in progress removes its temporary; the last checkpoint stays).
    Handlers can only be installed in the main thread: elsewhere this does nothing. On Windows
    SIGINT (Ctrl+C) is handled; SIGTERM is not delivered there.
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        raise TrainingInterrupted(f"stopped at once by a second {signal.Signals(signum).name}", signum)

    @property
    def name(self) -> str:
        """The name of the signal received (``"SIGTERM"``), or an empty string."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")


def remove_stale_temporaries(
    folder: str | Path, name: str = "checkpoint.pt", *, all_processes: bool = False
) -> list[Path]:
    """Remove the temporary files that saves of ``folder/name`` left behind when their process was killed.

    :func:`save_checkpoint` names its temporaries ``.<name>.<pid>.tmp`` (and
    ``.<stem>.prev<suffix>.<pid>.tmp`` for the previous checkpoint's link)
    and removes them itself on an exception; only a killed process (SIGKILL,
    power loss) leaves one.

    By default only temporaries whose process is gone are removed: safe at
    any time, even while another process saves in the folder. A temporary
    whose pid has been reused by a live process is kept (harmless); on
    Windows, where liveness cannot be tested safely, none is removed. A
    process on another machine sharing the folder over a network file system
    cannot be seen: with ``all_processes=True`` every such temporary is
    removed, which is right only for a caller that holds the run's lock
    (so no other process is saving there), e.g. a training loop at its start
    or resume.

    Returns:
        The removed files.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = Path(tmp, ".checkpoint.pt.999999999.tmp").write_bytes(b"left by a killed process")
        ...     removed = remove_stale_temporaries(tmp)
        ...     [p.name for p in removed], sorted(Path(tmp).iterdir())
        (['.checkpoint.pt.999999999.tmp'], [])
    """
    folder = Path(folder)
    names = {name, previous_checkpoint_path(name).name}
    removed = []
    for candidate in sorted(folder.glob(".*.tmp")):
        match = _TEMPORARY.fullmatch(candidate.name)
        if match is None or match["name"] not in names or not candidate.is_file():
            continue
        if all_processes or not _process_alive(int(match["pid"])):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # no process writes with such a pid (and os.kill(0, ...) would signal a process group)
    if os.name == "nt":
        return True  # os.kill(pid, 0) terminates the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    return True
