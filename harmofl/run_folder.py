"""How a run writes its folder: every file atomically, and one writer per folder.

Every output of a run (checkpoints, ``metrics.csv``, ``summary.json``, plots, the val/test summaries, compare's
markers and tables) goes through :func:`atomic_file`: the new content is written to a temporary file of a unique
name beside the target, flushed to disk and renamed over the target. A reader, or a crash at any moment, sees the
old file or the new one, never a torn one; a failed write removes its own temporary file and no other writer's.

:class:`RunFolderLock` makes a run folder single-writer: an exclusive ``flock`` on ``<folder>/.lock``, held for the
whole run. A second writer is refused with the holder's pid, host and command; the kernel releases the lock when
its holder exits, however it ends (a crash or ``kill -9`` never leaves a folder blocked).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

LOCK_FILE = ".lock"
# The permissions a plain `open(path, "w")` would give: mkstemp makes its files private (0600). Read once, at import
# (os.umask can only be read by setting it), before any thread could create a file in between.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temporary_prefix(path: Path) -> str:
    """The name prefix of the temporary files that writes of ``path`` use (hidden, beside ``path``)."""
    return f".{path.name}.tmp."


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content into; when the block ends without an error it is flushed to
    disk and renamed over ``path`` (the rename made durable too). On an error ``path`` is left as it was and the
    temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path))
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path``'s content with ``data`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8) atomically (:func:`atomic_file`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files that killed writers of ``path`` left behind. Only for a file with a single
    writer (a checkpoint, written by the holder of its run folder's :class:`RunFolderLock`): it would break the
    write in progress of any other writer of ``path``."""
    for stale in path.parent.glob(f"{temporary_prefix(path)}*"):
        stale.unlink(missing_ok=True)


class RunFolderInUse(RuntimeError):
    """Another live process holds the run folder's lock."""


#: The lock descriptors this process holds: a forked child closes its copies (:func:`_close_locks_in_child`).
_HELD_DESCRIPTORS: set[int] = set()


def _close_locks_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file description, which keeps the lock held until
    # every copy is closed: a killed run's orphaned workers would hold its folder for seconds. Closing the child's
    # copies (never unlocking: that would release the parent's lock) frees the folder the moment the run dies.
    for descriptor in _HELD_DESCRIPTORS:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD_DESCRIPTORS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


class RunFolderLock:
    """The exclusive right to write a run folder, held from :meth:`acquire` (or ``with``) to :meth:`release`.

    Non-blocking: a folder another process holds raises :class:`RunFolderInUse` at once, naming the holder. The
    lock file stays in the folder after a release (deleting it would let two writers lock two different files).

    Args:
        folder: the run folder (created if missing).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> None:
        if self._descriptor is not None:
            raise RuntimeError(f"The lock of {str(self.folder)!r} is already held by this RunFolderLock.")
        self.folder.mkdir(parents=True, exist_ok=True)
        # Opened without truncating: the holder's record in the file must survive a refused writer's attempt.
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise RunFolderInUse(
                f"Run folder {str(self.folder)!r} is being written by another run ({holder}). Two runs in one folder "
                "would overwrite each other's checkpoints and results: wait for that run to end or stop it, or give "
                "this run another folder (`--trainer.default_root_dir`, compare's `--output_dir`). A run that "
                "crashed or was killed releases its folder by itself."
            ) from None
        except BaseException:
            os.close(descriptor)
            raise
        os.ftruncate(descriptor, 0)
        os.write(descriptor, (json.dumps(_holder_record()) + "\n").encode())
        self._descriptor = descriptor
        _HELD_DESCRIPTORS.add(descriptor)

    def release(self) -> None:
        """Give the folder back (closing the file releases the lock); nothing happens if it is not held."""
        if self._descriptor is not None:
            _HELD_DESCRIPTORS.discard(self._descriptor)
            os.close(self._descriptor)
            self._descriptor = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def _holder_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _read_holder(descriptor: int) -> str:
    """The lock holder in words, from the record it wrote (unknown while it is still writing it)."""
    try:
        record = json.loads(os.pread(descriptor, 65536, 0).decode())
        return f"pid {record['pid']} on {record['host']} since {record['since']}: {record['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet"
