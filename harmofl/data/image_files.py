"""Federations of labelled image files (classification): what every file-list source shares.

:class:`ImageFileFederation` makes the checks done before training (each listed file present and, optionally,
intact; no empty split), the per-split cap, the truncation of every client's training set to the smallest one,
and lazy reading in :class:`ImageFiles`. A subclass only says which files, labels and splits each client has
(:meth:`ImageFileFederation._client_files`).
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from harmofl.data.base import SPLITS, FileFederation, Split
from harmofl.data.checks import DataError, check_at_least, check_choice, keep_good_samples
from harmofl.data.decoded_cache import decoded_dataset
from harmofl.data.image_io import image_is_intact, read_image, resize


def encode_paths(paths: Sequence[str]) -> np.ndarray:
    """Paths as one UTF-8 bytes array.

    One array instead of a list of ``str``: forked loader workers share its pages, whereas touching the
    reference counts of hundreds of thousands of Python strings copies them into every worker.
    """
    return np.char.encode(np.asarray(paths, dtype=str), "utf-8")


def decode_path(root: Path, files: np.ndarray, index: int) -> Path:
    """Entry ``index`` of ``files`` (:func:`encode_paths`) as a path under ``root``."""
    return root / files[index].decode("utf-8")


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
        """The file of item ``index``."""
        return decode_path(self.root, self.files, index)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        # read_image raises DataError naming the file if it became unreadable after the checks.
        image = read_image(self.path(index), self.channels)
        return resize(image, self.image_size), torch.tensor(self.labels[index], dtype=torch.long)


@dataclass(frozen=True)
class ClientFiles:
    """One client's labelled files and, per split, the indices of its rows in order."""

    root: Path
    files: np.ndarray  # UTF-8 paths relative to root (encode_paths)
    labels: np.ndarray  # int64
    rows: dict[Split, np.ndarray]

    def path(self, row: int) -> Path:
        """The file of ``row``."""
        return decode_path(self.root, self.files, row)


class ImageFileFederation(FileFederation):
    """Shared machinery of datamodules over labelled image files, one client per site.

    In :meth:`setup`, for every client and split in turn: the split is cut to its first ``max_per_split``
    rows; every listed file is checked (present, and intact when ``verify_images``): a bad one raises a
    :class:`DataError` naming it, or is left out and counted in ``skipped[client]`` under
    ``on_bad_sample="skip"``; an empty split raises a :class:`DataError` naming client and split. Then, with
    ``truncate_to_smallest``, every training set keeps its first N rows, N the smallest training set.
    Only under ``on_bad_sample="skip"`` does setup decode every client's images (the counts depend on them);
    otherwise the integrity check of a client's images is made when the client is loaded, by the processes that
    use it. Images are read when a batch asks for them (or from the decoded cache, ``decoded_cache``).

    Args:
        image_size: side every image is resized to (bilinear) when it differs.
        channels: 3 reads every image as RGB, 1 as grey.
        max_per_split: keep at most the first N rows of each split per client (quick runs); null: all.
        truncate_to_smallest: cut every client's training set to the smallest client's size (its first rows).
        verify_images: check that every listed image decodes in full before training (a truncated file, or one
            above PIL's decompression-bomb limit, is a bad sample; slow on large sets); false checks only that the
            files exist, and a bad file then stops training when a batch reads it.
        seed: seeds the splits made by fractions.
    """

    def __init__(
        self,
        image_size: int,
        channels: int = 3,
        max_per_split: int | None = None,
        truncate_to_smallest: bool = False,
        verify_images: bool = True,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        check_at_least("image_size", image_size, 1, " pixel")
        check_choice("channels", channels, (1, 3))
        check_at_least("max_per_split", max_per_split, 1, nullable=True)
        check_at_least("seed", seed, 0)
        self.image_size = image_size
        self.channels = channels
        self.max_per_split = max_per_split
        self.truncate_to_smallest = truncate_to_smallest
        self.verify_images = verify_images
        self.seed = seed
        self._files: dict[str, ClientFiles] = {}
        self._checked: dict[str, dict[Split, np.ndarray]] = {}  # every client's checked rows per split
        self._rows: dict[str, dict[Split, np.ndarray]] = {}  # the rows used (the training rows truncated)

    @abstractmethod
    def _client_files(self) -> dict[str, ClientFiles]:
        """Every client's files, labels and split rows, read from the index files; raises DataError."""

    def _empty_split_hint(self, split: Split) -> str:
        """What to do when a client has no samples in ``split``."""
        return "Add samples to that split."

    @property
    def client_names(self) -> list[str]:
        if not self._rows:
            raise RuntimeError(
                f"{type(self).__name__}.client_names needs setup() first: the clients are read from disk."
            )
        return list(self._rows)

    @property
    def _decodes_in_setup(self) -> bool:
        """Whether :meth:`setup` decodes every listed image: only when bad images are skipped, since every client's
        sample count (which every process needs) then depends on them. Otherwise a process decodes (checks) the
        images of the clients it loads, and a bad one stops it as it would have stopped setup."""
        return self.verify_images and self.on_bad_sample == "skip"

    def setup(self, stage: str | None = None) -> None:
        """Read the index files and check every client's listed files (that they exist; that they decode too under
        ``on_bad_sample="skip"``), once per instance; a client's images are decoded when it is loaded."""
        if self._rows:
            return
        clients = self._client_files()
        self.skipped = dict.fromkeys(clients, 0)
        verify = self._decodes_in_setup
        checked = {
            client: {
                split: self._checked_rows(client, split, files, files.rows[split][: self.max_per_split], verify)
                for split in SPLITS
            }
            for client, files in clients.items()
        }
        rows = {client: dict(splits) for client, splits in checked.items()}
        if self.truncate_to_smallest:
            smallest = min(len(splits["train"]) for splits in rows.values())
            for splits in rows.values():
                splits["train"] = splits["train"][:smallest]
        self._files, self._checked, self._rows = clients, checked, rows

    def num_samples(self, client: str, split: Split) -> int:
        """Known after :meth:`setup`: counting decodes nothing."""
        self._check_request(client, split)
        return len(self._rows[client][split])

    def load_client_datasets(self, client: str) -> dict[Split, Dataset]:
        files, checked, rows = self._files[client], self._checked[client], self._rows[client]
        verify = self.verify_images and not self._decodes_in_setup  # else setup has decoded them

        def check(split: Split) -> None:
            """The integrity check of every row setup checked in ``split``, as setup would have made it."""
            if verify:
                self._checked_rows(client, split, files, checked[split], verify=True)

        if not self.decoded_cache:
            for split in SPLITS:
                check(split)
            return {
                split: ImageFiles(files.root, files.files[rows[split]], files.labels[rows[split]], *self._shape)
                for split in SPLITS
            }
        # An entry covers the checked rows (the used ones are their first rows) and stands for files that passed the
        # check when it was written: a hit neither checks nor decodes them again.
        return {
            split: decoded_dataset(
                self.decoded_cache_dir,
                [files.path(row) for row in checked[split].tolist()],
                files.labels[rows[split]],
                *self._shape,
                check=functools.partial(check, split),
            )
            for split in SPLITS
        }

    @property
    def _shape(self) -> tuple[int, int]:
        """What every image is read as: channels, side."""
        return self.channels, self.image_size

    def _checked_rows(
        self, client: str, split: Split, files: ClientFiles, candidates: np.ndarray, verify: bool
    ) -> np.ndarray:
        """The ``candidates`` rows of one client's split that pass the checks (decoding them too when ``verify``)."""
        good, skipped = keep_good_samples(
            client,
            candidates.tolist(),
            lambda row: image_is_intact(files.path(row), verify),
            lambda row: str(files.path(row)),
            self.on_bad_sample,
        )
        self.skipped[client] += skipped
        if not good:
            left_out = f" ({skipped} bad sample(s) left out)" if skipped else ""
            raise DataError(
                f"Client {client!r} has no samples in its {split!r} split{left_out}. {self._empty_split_hint(split)}"
            )
        return np.asarray(good, dtype=np.int64)

    def read_unlabelled(self, path: Path) -> Tensor:
        """An unlabelled image as every training image is read: ``channels``, resized to ``image_size`` (bilinear)."""
        return resize(read_image(path, self.channels), self.image_size)[None]
