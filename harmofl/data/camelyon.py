"""Camelyon17-WILDS: 96×96 H&E lymph-node patches from five hospitals, tumour or not; one client per hospital."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from harmofl.data.base import Split
from harmofl.data.checks import DataError, check_choice, check_distinct, require_dir, require_file
from harmofl.data.csv_tables import read_csv, read_header
from harmofl.data.image_files import ClientFiles, ImageFileFederation, encode_paths
from harmofl.data.splits import Fractions, check_fractions, rows_by_code, site_rng, split_groups

SplitMode = Literal["reference", "patient"]

COLUMNS = ("patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split")
PATCH = "patches/patient_{0:03d}_node_{1}/patch_patient_{0:03d}_node_{1}_x_{2}_y_{3}.png"


def read_metadata(file: Path) -> dict[str, np.ndarray]:
    """The columns of a WILDS ``metadata.csv`` as int64 arrays (a leading unnamed index column is accepted).

    Raises :class:`DataError` naming missing or unknown columns, or the first row or cell that is not an
    integer.
    """
    header = read_header(file, COLUMNS, allow_index=True)
    try:
        # numpy's C parser reads the 455k rows of the real file in a fraction of a second. An empty table
        # gets the clearer error below instead of numpy's warning.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "loadtxt: input contained no data")
            table = np.loadtxt(file, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError as error:
        # Find the bad row or cell with the slower, line-aware reader to name it precisely.
        cells = read_csv(file, COLUMNS, allow_index=True)
        for name in COLUMNS:
            cells.integers(name)
        raise DataError(f"{file}: not a table of integers ({error}).") from error
    if table.size == 0:
        raise DataError(f"{file} lists no patches: it has no rows below its header.")
    return {name: table[:, header.index(name)] for name in COLUMNS}


def _check_binary(file: Path, metadata: dict[str, np.ndarray], name: str, meaning: str) -> None:
    bad = np.flatnonzero((metadata[name] != 0) & (metadata[name] != 1))
    if len(bad):
        raise DataError(
            f"{file}, data row {bad[0] + 1}: column {name!r} holds {metadata[name][bad[0]]} "
            f"({len(bad)} such row(s)); it must be 0 or 1 ({meaning})."
        )


class Camelyon17(ImageFileFederation):
    """Camelyon17-WILDS (``camelyon17_v1.0/``) as a federation: one client per hospital, ``hospital_{center}``.

    Label: the ``tumor`` column (1 if the patch's central 32×32 region holds tumour tissue). Patches are read
    from ``patches/patient_{patient:03d}_node_{node}/patch_patient_{patient:03d}_node_{node}_x_{x}_y_{y}.png``.

    What ``split`` means: WILDS's ``metadata.csv`` marks a random 10 % of all patches, drawn patch by patch
    over every hospital, with ``split == 1`` (WILDS's in-distribution validation set) and the rest with
    ``split == 0``. (The WILDS loader then re-labels hospitals 1 and 2 as its OOD validation and test
    hospitals; the file itself does not.) So ``split == 1`` patches come from the same slides and patients
    as ``split == 0`` ones.

    Splits, per hospital, deterministic:

    - ``split_mode="reference"`` (HarmoFL's reference protocol): the rows with ``split == 0``, in file order,
      are the train list; its last ``floor(n / 5)`` rows (20 %) are validation, the rest training. The rows
      with ``split == 1``, in file order, are the test set. A hospital without ``split == 1`` rows is an
      error; use ``split_mode="patient"`` there.
    - ``split_mode="patient"``: the hospital's patients (sorted) are shuffled by a generator seeded with
      ``(seed, center)`` and cut by ``patient_fractions`` (train, val, test; the cuts are the cumulative
      fractions times the number of patients, rounded), so that no patient is in two splits. Rows keep
      their file order within a split; the ``split`` column is ignored.

    Then each split keeps its first ``max_per_split`` rows (if set), bad files are handled by
    ``on_bad_sample``, and with ``truncate_to_smallest`` (the reference default; false is the reference's
    "imbalance" setting) every training set keeps its first N rows, N the smallest hospital's training set.

    Args:
        root: the ``camelyon17_v1.0`` folder (``metadata.csv`` and ``patches/``).
        centers: the hospitals (``center`` values 0-4) to use, in this order; default all in the metadata.
        split_mode: ``reference`` or ``patient``, as above.
        patient_fractions: train, val, test fractions of each hospital's patients (``patient`` mode).
        image_size: side of the images; patches of another size are resized (bilinear).
        verify_images: check every used patch's integrity before training; decoding all 455k patches
            takes long (minutes to tens of minutes, depending on the disk), so false checks only that
            the files exist.
        seed: seeds the patient split.
        batch_size: training batch size (the reference's 128).
    """

    def __init__(
        self,
        root: str,
        centers: list[int] | None = None,
        *,
        split_mode: SplitMode = "reference",
        patient_fractions: Fractions = (0.6, 0.2, 0.2),
        truncate_to_smallest: bool = True,
        max_per_split: int | None = None,
        image_size: int = 96,
        verify_images: bool = True,
        seed: int = 0,
        batch_size: int = 128,
        **loader: Any,
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=3,
            max_per_split=max_per_split,
            truncate_to_smallest=truncate_to_smallest,
            verify_images=verify_images,
            seed=seed,
            batch_size=batch_size,
            **loader,
        )
        check_choice("split_mode", split_mode, ("reference", "patient"))
        check_distinct("centers", centers, "hospital")
        self.root = root
        self.centers = centers
        self.split_mode = split_mode
        self.patient_fractions = check_fractions(patient_fractions, "patient_fractions")

    def _client_files(self) -> dict[str, ClientFiles]:
        root = require_dir(self.root, "Camelyon17-WILDS folder (camelyon17_v1.0)")
        require_dir(root / "patches", "Camelyon17-WILDS patch folder")
        file = require_file(root / "metadata.csv", "Camelyon17-WILDS metadata")
        metadata = read_metadata(file)
        _check_binary(file, metadata, "tumor", "the label: 1 = tumour in the central 32x32 region, 0 = none")
        if self.split_mode == "reference":
            _check_binary(file, metadata, "split", "WILDS's 0 = train, 1 = held-out 10 %")
        present = np.unique(metadata["center"]).tolist()
        centers = self.centers if self.centers is not None else present
        absent = [c for c in centers if c not in present]
        if absent:
            raise DataError(f"{file} has no rows for hospital(s) {absent} (data.centers); it has {present}.")
        return {f"hospital_{c}": self._hospital_files(root, file, metadata, c) for c in centers}

    def _hospital_files(self, root: Path, file: Path, metadata: dict[str, np.ndarray], center: int) -> ClientFiles:
        here = metadata["center"] == center
        column = {name: values[here] for name, values in metadata.items()}
        splits: dict[Split, np.ndarray]
        if self.split_mode == "reference":
            if not (column["split"] == 1).any():
                raise DataError(
                    f"Hospital {center} (client 'hospital_{center}') has no rows with split == 1 in "
                    f"{file}, so no test set: set data.split_mode: patient."
                )
            train_list = np.flatnonzero(column["split"] == 0)
            cut = len(train_list) - len(train_list) // 5
            splits = {"train": train_list[:cut], "val": train_list[cut:], "test": np.flatnonzero(column["split"] == 1)}
        else:
            patients, patient_of = np.unique(column["patient"], return_inverse=True)
            codes = split_groups(patient_of, len(patients), self.patient_fractions, site_rng(self.seed, center))
            splits = rows_by_code(codes)
        location = zip(*(column[name].tolist() for name in ("patient", "node", "x_coord", "y_coord")))
        return ClientFiles(root, encode_paths([PATCH.format(*where) for where in location]), column["tumor"], splits)

    def _empty_split_hint(self, split: Split) -> str:
        if self.split_mode == "patient":
            return (
                f"Its patients are too few for data.patient_fractions={self.patient_fractions}: change them "
                "or drop the hospital from data.centers."
            )
        return (
            "The reference split needs split == 0 rows (train, and its last 20 % for val) and split == 1 rows "
            "(test) for every hospital; data.split_mode: patient splits by patient instead."
        )
