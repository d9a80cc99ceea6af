"""Crash-safe checkpoint files.

``torch.save(obj, path)`` truncates ``path`` and then writes it: a job killed during the write
(SIGKILL, the OOM killer, a preempted node, a full disk) leaves a torn file where the last good
checkpoint was, and the run cannot resume from anything. :func:`save` writes a temporary file in
the same directory, flushes and fsyncs it, and renames it over ``path`` with :func:`os.replace`
(atomic on POSIX and Windows): at every instant ``path`` holds either the previous checkpoint or
the new one, complete. :func:`load` reads with ``weights_only=True`` (an optimizer's
``state_dict``, sampling RNG included, loads that way) and names the file when it is truncated
or corrupt.

Example: save model, optimizer and scheduler each few steps, resume from the file after a kill::

    >>> import os, tempfile, torch
    >>> from torch_proxvi import ProxScoreOptimizer, checkpoint_io
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=100)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    >>> path = os.path.join(tempfile.mkdtemp(), "last.pt")
    >>> checkpoint_io.save({"model": model.state_dict(), "opt": opt.state_dict(),
    ...                     "sched": sched.state_dict(), "step": 0}, path)
    >>> ckpt = checkpoint_io.load(path)
    >>> model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"])
    <All keys matched successfully>
    >>> sched.load_state_dict(ckpt["sched"])

A kill leaves at most a stray ``.last.pt.*.tmp`` file beside ``path`` (delete it at leisure);
``path`` itself is never torn. The fsyncs make the new file survive a power loss as well, on file
systems that honour them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from typing import Any

import torch

__all__ = ["save", "load", "CorruptCheckpointError"]


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that is truncated or damaged (e.g. written by ``torch.save`` when the job
    was killed during the write)."""


def _default_mode() -> int:
    # the mode torch.save's open() would give a new file; read once (os.umask has no getter)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _default_mode()


def save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically: ``path`` is replaced only by a complete, fsynced file.

    The temporary file is created in the directory of ``path`` (so the rename never crosses file
    systems) and removed if saving raises. The new file keeps the permission bits of the file it
    replaces (a new one gets the umask's). A symbolic link at ``path`` is followed: its target is
    replaced, as ``torch.save`` would overwrite it.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint_io.save writes to a file path, got {type(path).__name__}; "
                        f"for a buffer use torch.save directly")
    path = os.path.realpath(os.fspath(path))
    directory, name = os.path.split(path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | os.PathLike, map_location: Any = None, *, verify: bool = False) -> Any:
    """``torch.load(path, map_location=map_location, weights_only=True)``.

    Raises :class:`CorruptCheckpointError`, naming the file and its size, when the file is not a
    complete ``torch.save`` archive (truncated by a kill during a non-atomic write, or damaged);
    other errors (a missing file, an object that ``weights_only`` refuses) propagate unchanged.
    ``torch.load`` does not check the archive's CRCs, so a flipped bit inside a tensor loads as a
    wrong value: ``verify=True`` checks every member's CRC first (the file is read twice).
    """
    if verify:
        problem = _archive_problem(path)
        if problem is not None:
            raise _corrupt(path, problem)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:
        problem = _archive_problem(path)
        if problem is None:
            raise
        raise _corrupt(path, problem) from e


def _corrupt(path: str | os.PathLike, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"checkpoint {os.fspath(path)!r} ({os.path.getsize(path)} bytes) is truncated or corrupt: "
        f"{problem}. It was probably being written by torch.save when the job was killed; resume "
        f"from an earlier checkpoint, and write checkpoints with torch_proxvi.checkpoint_io.save "
        f"(atomic)")


def _archive_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not an intact zip archive (torch.save's format), or None if it is one."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()             # reads every member and checks its CRC
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        return f"not a complete zip archive ({e})"
    return None if bad is None else f"member {bad!r} fails its CRC check"
