"""Camelyon17-WILDS loader on a tiny folder in the real on-disk format: splits, truncation, checks, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmofl.data.camelyon import PATCH, Camelyon17
from harmofl.data.checks import DataError

from helpers import run_cli

HEADER = ["", "patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"]
# Patches per patient at each hospital (center): hospitals differ in size, so truncation shows.
PER_PATIENT = {0: 3, 1: 4, 3: 5}
PATIENTS = 5


def wilds_rows(per_patient: dict[int, int] = PER_PATIENT) -> list[list[int]]:
    """Metadata rows (without the index): per hospital, 5 patients; every 4th row of a hospital has split 1."""
    rows = []
    for center, count in per_patient.items():
        for k in range(PATIENTS * count):
            patient, node = 20 * center + k // count, (k // count) % 5
            rows.append(
                [patient, node, 100 * k, 200 * k + center, k % 2, 10 * center + k // count, center, int(k % 4 == 3)]
            )
    return rows


def write_wilds(root: Path, rows: list[list[int]], header: list[str] = HEADER) -> Path:
    """A camelyon17_v1.0 folder: metadata.csv (pandas-style index column) and a 96×96 RGB PNG per row."""
    generator = np.random.default_rng(0)
    (root / "patches").mkdir(parents=True)
    lines = [",".join(header)]
    for index, row in enumerate(rows):
        lines.append(",".join([str(index)] * (header[0] == "") + [f"{row[0]:03d}", *map(str, row[1:])]))
        path = root / PATCH.format(*row[:4])
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(generator.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def wilds(tmp_path_factory) -> Path:
    return write_wilds(tmp_path_factory.mktemp("data") / "camelyon17_v1.0", wilds_rows())


def files(module: Camelyon17, client: str, split: str) -> list[str]:
    return [name.decode() for name in module.dataset(client, split).files]  # type: ignore[attr-defined]


def expected_reference(center: int) -> dict[str, list[str]]:
    """The reference split computed by hand from the rows: split 0 in order, last 20 % val; split 1 test."""
    rows = [r for r in wilds_rows() if r[6] == center]
    train_list = [PATCH.format(*r[:4]) for r in rows if r[7] == 0]
    val = len(train_list) // 5
    return {
        "train": train_list[: len(train_list) - val],
        "val": train_list[len(train_list) - val :],
        "test": [PATCH.format(*r[:4]) for r in rows if r[7] == 1],
    }


def test_reference_split_per_hospital_exactly(wilds):
    module = Camelyon17(str(wilds), truncate_to_smallest=False)
    module.setup()
    assert module.client_names == ["hospital_0", "hospital_1", "hospital_3"]
    for center, count in PER_PATIENT.items():
        expected = expected_reference(center)
        for split in ("train", "val", "test"):
            assert files(module, f"hospital_{center}", split) == expected[split]
        total = PATIENTS * count
        assert len(expected["test"]) == total // 4
        assert len(expected["val"]) == (total - total // 4) // 5
    assert module.skipped == {"hospital_0": 0, "hospital_1": 0, "hospital_3": 0}


def test_training_sets_truncated_to_the_smallest_by_default(wilds):
    full = Camelyon17(str(wilds), truncate_to_smallest=False)
    truncated = Camelyon17(str(wilds))
    full.setup()
    truncated.setup()
    smallest = min(full.num_samples(c, "train") for c in full.client_names)
    assert [full.num_samples(c, "train") for c in full.client_names] == [10, 12, 16]  # imbalance: full sizes
    for client in truncated.client_names:
        assert files(truncated, client, "train") == files(full, client, "train")[:smallest]
        for split in ("val", "test"):
            assert files(truncated, client, split) == files(full, client, split)


def test_batches_images_and_labels(wilds):
    module = Camelyon17(str(wilds), batch_size=4, centers=[3, 0])
    module.setup()
    assert module.client_names == ["hospital_3", "hospital_0"]
    dataset = module.dataset("hospital_3", "test")
    labels = {PATCH.format(*r[:4]): r[4] for r in wilds_rows()}
    images, targets = next(iter(module.dataloader("hospital_3", "test")))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 96, 96)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.1
    assert targets.dtype == torch.long
    assert targets.tolist() == [labels[f] for f in files(module, "hospital_3", "test")[:4]]
    expected = torch.from_numpy(np.array(Image.open(dataset.path(0)))).permute(2, 0, 1) / 255.0
    torch.testing.assert_close(dataset[0][0], expected)

    small = Camelyon17(str(wilds), image_size=32, max_per_split=2)
    small.setup()
    image, _ = small.dataset("hospital_1", "train")[0]
    assert image.shape == (3, 32, 32) and image.min() >= 0.0 and image.max() <= 1.0
    assert {small.num_samples(c, s) for c in small.client_names for s in ("train", "val", "test")} == {2}


def test_patient_split_keeps_patients_apart_and_is_seeded(wilds):
    def assignment(seed: int) -> dict[str, dict[str, set[str]]]:
        module = Camelyon17(str(wilds), split_mode="patient", truncate_to_smallest=False, seed=seed)
        module.setup()
        return {
            c: {s: {f.split("/")[1] for f in files(module, c, s)} for s in ("train", "val", "test")}
            for c in module.client_names
        }

    first = assignment(0)
    for client, splits in first.items():
        # 5 patients, fractions 0.6/0.2/0.2: 3/1/1 patients, none in two splits, all used.
        assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 1], client
        assert len(splits["train"] | splits["val"] | splits["test"]) == PATIENTS
    assert assignment(0) == first
    assert assignment(1) != first


def test_missing_and_corrupt_patches_are_named_or_skipped(tmp_path):
    root = write_wilds(tmp_path / "c", wilds_rows())
    missing, corrupt = (root / PATCH.format(*row[:4]) for row in wilds_rows()[:2])  # hospital_0's first two
    good = missing.read_bytes()
    missing.unlink()
    corrupt.write_bytes(good[:100])
    for verify in (True, False):
        with pytest.raises(DataError, match=re.escape(f"{missing}: file is missing")):
            Camelyon17(str(root), verify_images=verify).setup()

    skipping = Camelyon17(str(root), on_bad_sample="skip", truncate_to_smallest=False)
    with pytest.warns(UserWarning, match="skipped 2 bad sample"):
        skipping.setup()
    assert skipping.skipped == {"hospital_0": 2, "hospital_1": 0, "hospital_3": 0}
    assert skipping.num_samples("hospital_0", "train") == 10 - 2

    missing.write_bytes(good)
    # Under on_bad_sample=error a client's images are decoded (checked) when a process loads it, not in setup.
    checked = Camelyon17(str(root))
    checked.setup()
    checked.load(["hospital_1", "hospital_3"])
    with pytest.raises(DataError, match=re.escape(f"{corrupt}: corrupt image")):
        checked.load(["hospital_0"])
    # Without the integrity check only existence is checked: the corrupt patch fails, named, when it is read.
    unverified = Camelyon17(str(root), verify_images=False)
    unverified.setup()
    with pytest.raises(DataError, match=re.escape(f"{corrupt}: unreadable image")):
        unverified.dataset("hospital_0", "train")[1]


def write_metadata(root: Path, header: list[str], rows: list[list]) -> None:
    (root / "metadata.csv").write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda h, rows: ([*h[:5], *h[6:]], [[*r[:5], *r[6:]] for r in rows]), r"missing column\(s\) 'tumor'"),
        (lambda h, rows: ([*h, "stain"], [[*r, 1] for r in rows]), r"unknown column\(s\) 'stain'"),
        (
            lambda h, rows: (h, [r if i != 4 else [*r[:5], 2, *r[6:]] for i, r in enumerate(rows)]),
            r"data row 5: column 'tumor' holds 2 \(1 such row",
        ),
        (
            lambda h, rows: (h, [r if i != 3 else [*r[:3], "12.5", *r[4:]] for i, r in enumerate(rows)]),
            "line 5: column 'x_coord' holds '12.5', not an integer",
        ),
        (
            lambda h, rows: (h, [r if i != 6 else r[:5] for i, r in enumerate(rows)]),
            r"line 8: 5 field\(s\) where the header has 9",
        ),
        (lambda h, rows: (h, []), "lists no patches: it has no rows below its header"),
        (
            lambda h, rows: (h, [[*r[:8], 0] if r[7] == 0 else r for r in rows]),
            "Hospital 0 .*no rows with split == 1.*split_mode: patient",
        ),
    ],
)
def test_metadata_problems_are_named(tmp_path, edit, named):
    root = write_wilds(tmp_path / "c", wilds_rows())
    rows = [[i, f"{r[0]:03d}", *r[1:]] for i, r in enumerate(wilds_rows())]
    header, rows = edit(HEADER, rows)
    write_metadata(root, header, rows)
    with pytest.raises(DataError, match=named) as error:
        Camelyon17(str(root)).setup()
    assert str(root / "metadata.csv") in str(error.value)


def test_metadata_without_index_column_and_unpadded_patients_is_read(tmp_path):
    root = write_wilds(tmp_path / "c", wilds_rows())
    write_metadata(root, HEADER[1:], wilds_rows())
    module = Camelyon17(str(root), truncate_to_smallest=False)
    module.setup()
    assert files(module, "hospital_1", "test") == expected_reference(1)["test"]


def test_missing_folders_hospitals_and_empty_splits_are_named(tmp_path):
    with pytest.raises(DataError, match="camelyon17_v1.0.*'/nowhere/camelyon17_v1.0' is not a folder"):
        Camelyon17("/nowhere/camelyon17_v1.0").setup()
    root = write_wilds(tmp_path / "c", wilds_rows({0: 1, 1: 2}))
    (root / "metadata.csv").rename(root / "meta.csv")
    with pytest.raises(DataError, match=re.escape(f"metadata '{root / 'metadata.csv'}' does not exist")):
        Camelyon17(str(root)).setup()
    (root / "meta.csv").rename(root / "metadata.csv")
    with pytest.raises(DataError, match=r"no rows for hospital\(s\) \[4\].*it has \[0, 1\]"):
        Camelyon17(str(root), centers=[0, 4]).setup()
    # One patch per patient at hospital 0: 4 training rows, so no validation row (20 % of 4 rounds down).
    with pytest.raises(DataError, match="'hospital_0' has no samples in its 'val' split"):
        Camelyon17(str(root)).setup()
    with pytest.raises(DataError, match="'hospital_0' has no samples in its 'val' split.*patient_fractions"):
        Camelyon17(str(root), split_mode="patient", patient_fractions=(0.9, 0.0, 0.1)).setup()
    with pytest.raises(ValueError, match="patient_fractions"):
        Camelyon17(str(root), patient_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(RuntimeError, match="setup"):
        Camelyon17(str(root)).client_names  # noqa: B018  # reading the property is what must fail


def test_one_round_through_the_cli(wilds, tmp_path):
    run_cli(
        "fit",
        "--config",
        "configs/camelyon.yaml",
        "--data.init_args.root",
        str(wilds),
        "--trainer.rounds",
        "1",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.image_size",
        "32",
        "--model.init_args.backbone",
        "test_resnet",
        "--model.init_args.batch_norm_stats",
        "batch",
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["clients"]) == {"hospital_0", "hospital_1", "hospital_3"}
