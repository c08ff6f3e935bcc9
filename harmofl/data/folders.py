"""Federations of labelled image files, and the bring-your-own layout: one folder per site.

:class:`ImageFileFederation` holds what every file-based classification source shares: the checks made
before training (each listed file present and, optionally, intact; no empty split), the per-split cap, the
truncation of every client's training set to the smallest one, and lazy reading in :class:`ImageFiles`.
A subclass only says which files, labels and splits each client has (:meth:`ImageFileFederation._client_files`).

:class:`SiteFolders` is that source for data a user brings::

    root/
      site_a/
        labels.csv        # columns image,label[,split]
        images/0001.png   # any path relative to the site folder, any format read_image reads
      site_b/
        labels.csv
        ...
"""

from __future__ import annotations

import csv
import zlib
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from harmofl.data.base import SPLITS, FederatedDataModule, Split
from harmofl.data.files import (
    BadSamplePolicy,
    DataError,
    check_bad_sample_policy,
    check_fractions,
    find_site_folders,
    image_is_intact,
    keep_good_samples,
    read_image,
    require_dir,
    require_file,
)

Fractions = tuple[float, float, float]

# pandas writes its row index as a leading column with an empty name; read back and re-saved, "Unnamed: 0".
_INDEX_COLUMN_NAMES = ("", "Unnamed: 0")


def resize(image: Tensor, size: int) -> Tensor:
    """``image [C, H, W]`` as ``[C, size, size]``, bilinear (antialiased when shrinking); as is if already that size."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def encode_paths(paths: Sequence[str]) -> np.ndarray:
    """Paths as one UTF-8 bytes array.

    One array instead of a list of ``str``: forked loader workers share its pages, whereas touching the
    reference counts of hundreds of thousands of Python strings copies them into every worker.
    """
    return np.char.encode(np.asarray(paths, dtype=str), "utf-8")


class ImageFiles(Dataset):
    """Labelled image files read lazily: item ``i`` is ``(image [C, S, S] float in [0, 1], label long [])``.

    Args:
        root: folder the paths are relative to.
        files: UTF-8 paths (:func:`encode_paths`).
        labels: int64 class index per file.
        channels: 3 (RGB) or 1 (grey).
        image_size: side S every image is resized to (bilinear) when it differs.
    """

    def __init__(self, root: Path, files: np.ndarray, labels: np.ndarray, channels: int, image_size: int) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels.")
        self.root = root
        self.files = files
        self.labels = labels
        self.channels = channels
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index].decode("utf-8")

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        # read_image raises DataError naming the file if it became unreadable after the checks.
        image = read_image(self.path(index), self.channels)
        return resize(image, self.image_size), torch.tensor(self.labels[index], dtype=torch.long)


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
        """Column ``name`` as int64; a :class:`DataError` names the first cell that is not an integer."""
        values = self.columns[name]
        try:
            return np.asarray(values, dtype=str).astype(np.int64)
        except ValueError:
            line, value = next((line, v) for line, v in zip(self.lines, values) if not _is_integer(v))
            raise DataError(
                f"{self.path}, line {line}: column {name!r} holds {value!r}, not an integer. Fix that row."
            ) from None


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


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


def split_groups(groups: np.ndarray, fractions: Fractions, rng: np.random.Generator) -> np.ndarray:
    """The split code (0 train, 1 val, 2 test) of every row, whole groups at a time, so that no group is in two splits.

    The distinct groups (sorted) are shuffled with ``rng``; the first ``round(f_train * G)`` go to train, up to
    ``round((f_train + f_val) * G)`` to val, the rest to test (G groups; halves round up).
    """
    unique, group_of_row = np.unique(groups, return_inverse=True)
    cuts = np.floor(np.cumsum(fractions)[:2] * len(unique) + 0.5)
    code_of_rank = np.searchsorted(cuts, np.arange(len(unique)), side="right")
    code_of_group = np.empty(len(unique), dtype=np.int64)
    code_of_group[rng.permutation(len(unique))] = code_of_rank
    return code_of_group[group_of_row]


def rows_by_code(codes: np.ndarray) -> dict[Split, np.ndarray]:
    """Row indices of each split, in row order, from split codes 0/1/2."""
    return {split: np.flatnonzero(codes == code) for code, split in enumerate(SPLITS)}


@dataclass(frozen=True)
class ClientFiles:
    """One client's labelled files and, per split, the indices of its rows in order."""

    root: Path
    files: np.ndarray  # UTF-8 paths relative to root (encode_paths)
    labels: np.ndarray  # int64
    rows: dict[Split, np.ndarray]


class ImageFileFederation(FederatedDataModule):
    """Shared machinery of datamodules over labelled image files, one client per site.

    In :meth:`setup`, for every client and split in turn: the split is cut to its first ``max_per_split``
    rows; every listed file is checked (present, and intact when ``verify_images``): a bad one raises a
    :class:`DataError` naming it, or is left out and counted in ``skipped[client]`` under
    ``on_bad_sample="skip"``; an empty split raises a :class:`DataError` naming client and split. Then, with
    ``truncate_to_smallest``, every training set keeps its first N rows, N the smallest training set.
    Images are read when a batch asks for them.
    """

    def __init__(
        self,
        image_size: int,
        channels: int = 3,
        max_per_split: Optional[int] = None,
        truncate_to_smallest: bool = False,
        verify_images: bool = True,
        on_bad_sample: BadSamplePolicy = "error",
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if image_size < 1:
            raise ValueError(f"data.image_size must be >= 1 pixel, got {image_size}.")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels}.")
        if max_per_split is not None and max_per_split < 1:
            raise ValueError(f"data.max_per_split must be >= 1 or null (no cap), got {max_per_split}.")
        if seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {seed}.")
        self.image_size = image_size
        self.channels = channels
        self.max_per_split = max_per_split
        self.truncate_to_smallest = truncate_to_smallest
        self.verify_images = verify_images
        self.on_bad_sample = check_bad_sample_policy(on_bad_sample)
        self.seed = seed
        self.skipped: dict[str, int] = {}
        self._clients: list[str] = []

    @abstractmethod
    def _client_files(self) -> dict[str, ClientFiles]:
        """Every client's files, labels and split rows, read from the index files; raises DataError."""

    def _empty_split_hint(self, split: Split) -> str:
        """What to do when a client has no samples in ``split``."""
        return "Add samples to that split."

    @property
    def client_names(self) -> list[str]:
        if not self._datasets:
            raise RuntimeError(
                f"{type(self).__name__}.client_names needs setup() first: the clients are read from disk."
            )
        return list(self._clients)

    def setup(self, stage: Optional[str] = None) -> None:
        """Read the index files and check every listed file, once per instance."""
        if self._datasets:
            return
        clients = self._client_files()
        self._clients = list(clients)
        self.skipped = dict.fromkeys(clients, 0)
        rows = {client: {split: self._checked_rows(client, split, files) for split in SPLITS}
                for client, files in clients.items()}
        if self.truncate_to_smallest:
            smallest = min(len(splits["train"]) for splits in rows.values())
            for splits in rows.values():
                splits["train"] = splits["train"][:smallest]
        self._datasets = {
            (client, split): ImageFiles(files.root, files.files[rows[client][split]], files.labels[rows[client][split]],
                                        self.channels, self.image_size)
            for client, files in clients.items()
            for split in SPLITS
        }

    def _checked_rows(self, client: str, split: Split, files: ClientFiles) -> np.ndarray:
        """The rows of one client's split that are used: capped, then checked."""
        candidates = files.rows[split][: self.max_per_split].tolist()

        def path(row: int) -> Path:
            return files.root / files.files[row].decode("utf-8")

        def problem(row: int) -> Optional[str]:
            # Decoding every image to check it is slow on large sets; verify_images=False keeps the existence check.
            if self.verify_images:
                return image_is_intact(path(row))
            return None if path(row).is_file() else "file is missing"

        good, skipped = keep_good_samples(client, candidates, problem, lambda row: str(path(row)), self.on_bad_sample)
        self.skipped[client] += skipped
        if not good:
            left_out = f" ({skipped} bad sample(s) left out)" if skipped else ""
            raise DataError(f"Client {client!r} has no samples in its {split!r} split{left_out}. "
                            f"{self._empty_split_hint(split)}")
        return np.asarray(good, dtype=np.int64)


class SiteFolders(ImageFileFederation):
    """Bring-your-own sites for classification: one folder per site under ``root``, one client per site.

    Each site folder holds ``labels.csv`` with the columns ``image,label`` and optionally ``split``:
    ``image`` is a path relative to the site folder (any format :func:`~harmofl.data.files.read_image` reads),
    ``label`` an integer class index >= 0, ``split`` one of ``train``, ``val``, ``test``. Without a ``split``
    column, each site's rows are split by ``fractions``: shuffled with a generator seeded from ``seed`` and
    the site's name (so a site's split does not depend on which other sites are used), then cut (see
    :func:`split_groups`). Within a split, rows keep their order in ``labels.csv``.

    Args:
        root: the folder holding one folder per site.
        sites: the site folders to use, in this order; default every subfolder (not hidden), sorted.
        image_size: side every image is resized to (bilinear) when it differs.
        channels: 3 reads every image as RGB, 1 as grey.
        fractions: train, val, test fractions for sites without a ``split`` column.
        seed: seeds those splits.
        max_per_split: keep at most the first N rows of each split per site (quick runs); null: all.
        truncate_to_smallest: cut every site's training set to the smallest site's size (its first rows).
        verify_images: check that every listed image is intact before training (decodes headers and data
            chunks); false checks only that the files exist.
        on_bad_sample: ``error`` stops at the first missing or corrupt image; ``skip`` leaves it out and
            counts it in ``skipped[site]``.
        batch_size: training batch size.
        eval_batch_size: validation and test batch size; ``batch_size`` when null.
        num_workers: loader worker processes.
        pin_memory: whether loaders pin memory.
    """

    def __init__(
        self,
        root: str,
        sites: Optional[list[str]] = None,
        image_size: int = 64,
        channels: int = 3,
        fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        max_per_split: Optional[int] = None,
        truncate_to_smallest: bool = False,
        verify_images: bool = True,
        on_bad_sample: BadSamplePolicy = "error",
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size, channels, max_per_split, truncate_to_smallest, verify_images, on_bad_sample,
                         seed, batch_size, eval_batch_size, num_workers, pin_memory)
        if sites is not None and (not sites or len(set(sites)) != len(sites)):
            raise ValueError(f"data.sites must name at least one site, each once, or be null (all), got {sites}.")
        self.root = root
        self.sites = sites
        self.fractions = check_fractions(fractions, "fractions")

    def _client_files(self) -> dict[str, ClientFiles]:
        root = require_dir(self.root, "Site-folders root")
        sites = find_site_folders(root, self.sites, "each with labels.csv and its images")
        return {site: self._site_files(site, root / site) for site in sites}

    def _site_files(self, site: str, folder: Path) -> ClientFiles:
        table = read_csv(require_file(folder / "labels.csv", f"Labels file of site {site!r}"),
                         required=("image", "label"), optional=("split",))
        labels = table.integers("label")
        if (labels < 0).any():
            first = int(np.argmax(labels < 0))
            raise DataError(f"{table.path}, line {table.lines[first]}: label {labels[first]} is negative; labels "
                            "are class indices 0, 1, ...")
        if "split" in table.columns:
            names = table.columns["split"]
            codes = np.select([np.asarray(names) == split for split in SPLITS], list(range(len(SPLITS))), default=-1)
            if (codes < 0).any():
                first = int(np.argmax(codes < 0))
                raise DataError(f"{table.path}, line {table.lines[first]}: unknown split {names[first]!r}; "
                                f"expected one of {', '.join(SPLITS)} (or no split column to split by fractions).")
        else:
            rng = np.random.default_rng([self.seed, zlib.crc32(site.encode("utf-8"))])
            codes = split_groups(np.arange(len(labels)), self.fractions, rng)
        return ClientFiles(folder, encode_paths(table.columns["image"]), labels, rows_by_code(codes))

    def _empty_split_hint(self, split: Split) -> str:
        return (f"Give that site rows with split {split!r} in labels.csv, or, without a split column, more "
                f"images or other data.fractions (now {self.fractions}).")
