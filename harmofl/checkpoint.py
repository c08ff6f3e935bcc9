"""Federated checkpoints: written atomically, loaded without executing pickled code."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from harmofl.run_folder import atomic_file, remove_stale_temporaries

FORMAT_KEY = "harmofl_checkpoint"
FORMAT_VERSION = 1


def atomic_torch_save(data: Any, path: Path) -> None:
    """``torch.save`` through :func:`harmofl.run_folder.atomic_file`: a crash at any moment leaves either the
    previous file or the new one, never a truncated one."""
    with atomic_file(path) as handle:
        torch.save(data, handle)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a federated checkpoint atomically: a crash never leaves a truncated file. Its only writer (the holder
    of the run folder's lock) also removes the temporary files of writers killed before."""
    atomic_torch_save({FORMAT_KEY: FORMAT_VERSION, **state}, path)
    remove_stale_temporaries(path)


def copy_checkpoint(source: Path, destination: Path) -> None:
    """Atomically copy a checkpoint file (``last.ckpt`` to ``best.ckpt``); its only writer, like
    :func:`save_checkpoint`, also removes what killed writers left."""
    with atomic_file(destination) as handle, source.open("rb") as original:
        shutil.copyfileobj(original, handle)
    remove_stale_temporaries(destination)


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
