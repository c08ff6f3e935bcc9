"""Index files in CSV: a checked header, rows of its width, cells as text with their file line for error messages."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harmofl.data.checks import DataError, path_outside

# pandas writes its row index as a leading column with an empty name; read back and re-saved, "Unnamed: 0".
_INDEX_COLUMN_NAMES = ("", "Unnamed: 0")


def read_header(
    path: Path, required: Sequence[str], optional: Sequence[str] = (), allow_index: bool = False
) -> list[str]:
    """The column names of CSV file ``path``, checked: every required column, nothing unknown, no duplicates.

    With ``allow_index``, a leading unnamed column (pandas' row index) is accepted; its name is returned as is.
    """
    with path.open(newline="") as file:
        header = next(csv.reader(file), None)
    if not header:
        raise DataError(f"{path} is empty: its first line must name the columns {', '.join(required)}.")
    header = [name.strip() for name in header]
    named = header[1:] if allow_index and header[0] in _INDEX_COLUMN_NAMES else header
    expected = [*required, *optional]
    missing = [name for name in required if name not in named]
    unknown = [name for name in named if name not in expected]
    duplicated = sorted({name for name in named if named.count(name) > 1})
    if missing or unknown or duplicated:
        problems = [
            f"missing column(s) {', '.join(map(repr, missing))}" if missing else "",
            f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else "",
            f"repeated column(s) {', '.join(map(repr, duplicated))}" if duplicated else "",
        ]
        raise DataError(
            f"{path}: {'; '.join(p for p in problems if p)}. Expected the columns {', '.join(expected)} "
            f"(found {', '.join(map(repr, header))})."
        )
    return header


@dataclass(frozen=True)
class CsvTable:
    """A CSV file's cells as text, by column, with the file line of every row (for error messages)."""

    path: Path
    columns: dict[str, tuple[str, ...]]
    lines: list[int]

    def integers(self, name: str) -> np.ndarray:
        """Column ``name`` as int64; a :class:`DataError` names the first cell that is not an integer (or not one that
        fits in 64 bits)."""
        values = self.columns[name]
        try:
            return np.asarray(values, dtype=str).astype(np.int64)
        except (ValueError, OverflowError):
            line, value = next((line, v) for line, v in zip(self.lines, values) if not _is_int64(v))
            raise DataError(
                f"{self.path}, line {line}: column {name!r} holds {value!r}, not an integer (of 64 bits). Fix that row."
            ) from None

    def class_indices(self, name: str, num_classes: int | None) -> np.ndarray:
        """Column ``name`` as int64 class indices, each in ``[0, num_classes)`` (each ``>= 0`` where ``num_classes``
        is None); a :class:`DataError` names the first row outside, so that no such label reaches the loss."""
        labels = self.integers(name)
        outside = labels < 0
        if num_classes is not None:
            outside |= labels >= num_classes
        if outside.any():
            first = int(np.argmax(outside))
            label = int(labels[first])
            why = "negative" if label < 0 else f">= num_classes = {num_classes} (the model's)"
            raise DataError(
                f"{self.path}, line {self.lines[first]}: {name} {label} is {why}; labels are class indices 0, 1, ... "
                "below model.num_classes. Fix that row, or set model.num_classes to cover every class."
            )
        return labels

    def paths_inside(self, name: str, folder: Path) -> tuple[str, ...]:
        """Column ``name``: file paths relative to ``folder``; a :class:`DataError` names the first that is absolute or
        leads outside ``folder`` (through ``..`` or a symbolic link, see :func:`~harmofl.data.checks.path_outside`)."""
        paths = self.columns[name]
        for line, path in zip(self.lines, paths):
            problem = path_outside(folder, path)
            if problem is not None:
                raise DataError(
                    f"{self.path}, line {line}: {name} {path!r} {problem}. A listed file must lie inside "
                    f"{str(folder)!r}: give its path relative to that folder, and copy (not link) files from elsewhere."
                )
        return paths


def _is_int64(text: str) -> bool:
    try:
        value = int(text)
    except ValueError:
        return False
    return bool(np.iinfo(np.int64).min <= value <= np.iinfo(np.int64).max)


def read_csv(path: Path, required: Sequence[str], optional: Sequence[str] = (), allow_index: bool = False) -> CsvTable:
    """A CSV file with a checked header (:func:`read_header`) and rows of the header's width; blank lines skipped."""
    header = read_header(path, required, optional, allow_index)
    rows: list[list[str]] = []
    lines: list[int] = []
    with path.open(newline="") as file:
        reader = csv.reader(file)
        next(reader)
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(row)} field(s) where the header has {len(header)}. "
                    "Fix that row (quote values that contain commas)."
                )
            rows.append(row)
            lines.append(reader.line_num)
    cells = list(zip(*rows)) if rows else [()] * len(header)
    return CsvTable(path, {name: tuple(c.strip() for c in column) for name, column in zip(header, cells)}, lines)
