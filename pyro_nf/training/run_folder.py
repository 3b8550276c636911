"""A run folder's files beyond the checkpoint format: the temporaries a killed save leaves behind.

:func:`~pyro_nf.checkpoint.save_checkpoint` writes ``.<name>.<pid>.tmp`` next to the
checkpoint and renames it into place; only a killed process (SIGKILL, power loss) leaves
one. :func:`remove_stale_temporaries` clears them when a run starts or resumes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pyro_nf.checkpoint import previous_checkpoint_path

__all__ = ["remove_stale_temporaries"]

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
