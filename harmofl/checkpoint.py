"""Federated checkpoints: written atomically, loaded without executing pickled code."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

FORMAT_KEY = "harmofl_checkpoint"
FORMAT_VERSION = 1


def atomic_torch_save(data: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``: a crash at
    any moment leaves either the previous file or the new one, never a truncated one."""
    with _atomic_file(path) as handle:
        torch.save(data, handle)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a federated checkpoint atomically: a crash never leaves a truncated file. Its only writer (the first
    process) also removes the temporary files of writers killed before."""
    with _atomic_file(path, remove_stale=True) as handle:
        torch.save({FORMAT_KEY: FORMAT_VERSION, **state}, handle)


def copy_checkpoint(source: Path, destination: Path) -> None:
    """Atomically copy a checkpoint file (``last.ckpt`` to ``best.ckpt``)."""
    with _atomic_file(destination, remove_stale=True) as handle, source.open("rb") as original:
        shutil.copyfileobj(original, handle)


@contextlib.contextmanager
def _atomic_file(path: Path, remove_stale: bool = False) -> Iterator[IO[bytes]]:
    """A temporary file to write ``path``'s new content into; on success it is flushed to disk and renamed over
    ``path`` (the rename made durable too). ``remove_stale`` then deletes the temporary files of killed writers:
    only for a path with a single writer, whose concurrent writes it would otherwise break."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp."
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=prefix, delete=False) as handle:
        temporary = Path(handle.name)
        try:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    try:
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    for stale in path.parent.glob(f"{prefix}*") if remove_stale else ():
        stale.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a federated checkpoint on the CPU with ``weights_only=True``; errors say what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist: pass the path of a .ckpt written by `fit`.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, or one holding arbitrary pickled objects
        raise ValueError(f"Checkpoint {str(path)!r} cannot be loaded safely: {error}") from error
    if not isinstance(state, dict) or state.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} is not a HarmoFL federated checkpoint (format {FORMAT_VERSION}): "
            "use checkpoints/last.ckpt or checkpoints/best.ckpt from a `fit` run."
        )
    return state
