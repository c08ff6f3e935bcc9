"""Bitwise comparison of two runs' outputs: ``equivalence.py`` (two trees) and ``soak.py`` (with and without faults).

Output files compare by bytes; checkpoints value by value: tensors by dtype, shape and element bytes (so NaN equals
NaN of the same bits and 0.0 differs from -0.0, where ``torch.equal`` says the opposite), floats by their bits,
other values by type and ``==``, dicts by their keys in order.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _harness  # noqa: F401  first: the environment torch reads when imported
import torch

OUTPUT_FILES = ("metrics.csv", "summary.json")
CHECKPOINTS = ("checkpoints/last.ckpt", "checkpoints/best.ckpt")
IDENTICAL = "identical"


def first_difference(before: Any, after: Any, path: str = "") -> str | None:
    """The key path of the first bitwise difference between two loaded checkpoints, and what differs; None if equal."""
    where = path or "<root>"
    if type(before) is not type(after):
        return f"{where}: {type(before).__name__} vs {type(after).__name__}"
    if isinstance(before, torch.Tensor):
        if before.dtype != after.dtype or before.shape != after.shape:
            return f"{where}: {before.dtype}{list(before.shape)} vs {after.dtype}{list(after.shape)}"
        if before.layout != torch.strided or after.layout != torch.strided:
            return None if torch.equal(before, after) else f"{where}: values differ"
        if torch.equal(tensor_bytes(before), tensor_bytes(after)):
            return None
        if before.is_floating_point() and before.numel():
            largest = (before.double() - after.double()).abs().max().item()
            return f"{where}: values differ (largest difference {largest:.3g})"
        return f"{where}: values differ"
    if isinstance(before, dict):
        if list(before) != list(after):
            missing, extra = [k for k in before if k not in after], [k for k in after if k not in before]
            what = f"missing {missing[:5]}" if missing else ""
            what += (", " if missing and extra else "") + (f"new {extra[:5]}" if extra else "")
            return f"{where}: keys differ: {what or 'same keys, another order'}"
        for key in before:
            found = first_difference(before[key], after[key], f"{path}/{key}")
            if found:
                return found
        return None
    if isinstance(before, (list, tuple)):
        if len(before) != len(after):
            return f"{where}: length {len(before)} vs {len(after)}"
        for index, (one, two) in enumerate(zip(before, after)):
            found = first_difference(one, two, f"{path}[{index}]")
            if found:
                return found
        return None
    if isinstance(before, float):
        equal = struct.pack("<d", before) == struct.pack("<d", after) or (math.isnan(before) and math.isnan(after))
    else:
        equal = before == after
    return None if equal else f"{where}: {before!r:.80} vs {after!r:.80}"


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's element bytes (NaN equals NaN of the same bits, 0.0 differs from -0.0)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat


def compare_outputs(before: Path, after: Path, checkpoints: Sequence[str] = CHECKPOINTS) -> str:
    """:data:`IDENTICAL` or the first difference between two runs' output folders: :data:`OUTPUT_FILES`, then
    ``checkpoints`` (paths relative to the folders)."""
    for name in OUTPUT_FILES:
        one, two = before / name, after / name
        if not one.is_file() or not two.is_file():
            return f"{name}: missing {'before' if not one.is_file() else 'after'}"
        bytes_one, bytes_two = one.read_bytes(), two.read_bytes()
        if bytes_one != bytes_two:
            lines_one, lines_two = bytes_one.splitlines(), bytes_two.splitlines()
            for number, (line_one, line_two) in enumerate(zip(lines_one, lines_two), start=1):
                if line_one != line_two:
                    one_text, two_text = (line.decode(errors="replace")[:70] for line in (line_one, line_two))
                    return f"{name} line {number}: {one_text!r} vs {two_text!r}"
            return f"{name}: {len(lines_one)} vs {len(lines_two)} lines"
    for name in checkpoints:
        one, two = before / name, after / name
        if not one.is_file() or not two.is_file():
            return f"{name}: missing {'before' if not one.is_file() else 'after'}"
        found = first_difference(inline_checkpoint(one), inline_checkpoint(two))
        if found:
            return f"{name} {found}"
    return IDENTICAL


def inline_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint with every client's entry inline, whichever tree wrote it: torch.load, not harmofl's
    load_checkpoint, so that an older tree's format loads too. A manifest's record references (format 2) are
    replaced by the records' entries, and the format's version is left out, so that the same state compares equal
    across the two formats."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint.pop("harmofl_checkpoint", None)
    for client, entry in checkpoint.get("clients", {}).items():
        if isinstance(entry, str):  # a record file's path, relative to the manifest's folder
            checkpoint["clients"][client] = torch.load(path.parent / entry, map_location="cpu", weights_only=True)[
                "entry"
            ]
    return checkpoint
