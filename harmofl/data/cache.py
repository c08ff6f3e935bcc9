"""A content-addressed cache of tensors on disk, for data that is slow to make (generated, preprocessed).

An entry is a file ``<folder>/<name>-<key>.pt`` holding a dict of tensors; ``key`` hashes every setting that
determines the content, so that another setting is another entry and a stale entry is never read. Entries are
written atomically (a crash leaves no half-written file) and read with ``weights_only=True`` (a cache file cannot
make its reader run code).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from harmofl.checkpoint import atomic_torch_save


def user_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/harmofl/<name>`` (``~/.cache/harmofl/<name>`` without it)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "harmofl" / name


def entry_path(folder: Path, name: str, settings: Mapping[str, object], digits: int) -> Path:
    """The entry of ``name`` made with ``settings`` (JSON values): keyed by the first ``digits`` hex digits of the
    sha256 of their sorted JSON."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:digits]
    return folder / f"{name}-{key}.pt"


def read_entry(path: Path, mmap: bool = False) -> dict[str, Tensor]:
    """An entry's tensors, on the CPU; ``mmap`` maps them instead of reading them (reading one small tensor of a large
    entry reads only its pages). Raises what ``torch.load`` raises for a missing or damaged file."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def write_entry(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write an entry atomically (its folder is created); raises OSError where the folder is not writable."""
    atomic_torch_save(tensors, path)
