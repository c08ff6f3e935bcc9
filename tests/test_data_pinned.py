"""Pins, bit for bit, what every loader puts in each client's splits, the generated demo data and the cache keys.

The expected digests were computed with the data code of commit 87bdd82, before ``harmofl/data`` was reorganized
into shared helpers (splits, cache, loader options). A changed digest means that samples moved between splits,
changed order, or changed content for some loader, seed or setting: existing runs would no longer be
reproducible. Never update a literal here to make a refactoring pass.

Integer identities (file names, labels, case and slice indices, 8-bit patches read from lossless files) are the
same on every machine. Floating-point content (generated demo images and masks, preprocessed MRI slices) goes
through vectorized kernels whose last bit depends on the torch version and the CPU kernels it dispatches to
(AVX2 and AVX512 agree; the scalar fallback does not), so it is compared on that platform only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from harmofl.data import SPLITS, Camelyon17, DemoHistology, DemoNuclei, ProstateMRI, SegmentationFolders, SiteFolders
from harmofl.data.base import FederatedDataModule

# Where the floating-point digests hold (torch version, CPU kernels); elsewhere those comparisons are skipped.
PINNED_TORCH, PINNED_KERNELS = "2.14", ("AVX2", "AVX512")


def skip_unless_pinned_platform(what: str) -> None:
    version, kernels = ".".join(torch.__version__.split(".")[:2]), torch.backends.cpu.get_cpu_capability()
    if version != PINNED_TORCH or kernels not in PINNED_KERNELS:
        pytest.skip(
            f"{what} are pinned for torch {PINNED_TORCH} with {PINNED_KERNELS} kernels, not {version} with {kernels}"
        )


def digest(value: object) -> str:
    """sha256 of nested lists/dicts of JSON values, numpy arrays and tensors (dtype, shape and bytes)."""
    hasher = hashlib.sha256()

    def feed(item: object) -> None:
        if isinstance(item, torch.Tensor):
            item = item.contiguous().numpy()
        if isinstance(item, np.ndarray):
            hasher.update(f"{item.dtype.str}{item.shape}".encode())
            hasher.update(np.ascontiguousarray(item).tobytes())
        elif isinstance(item, (list, tuple)):
            hasher.update(b"[")
            for element in item:
                feed(element)
            hasher.update(b"]")
        elif isinstance(item, dict):
            for key in sorted(item):
                hasher.update(json.dumps(key).encode())
                feed(item[key])
        else:
            hasher.update(json.dumps(item).encode())

    feed(value)
    return hasher.hexdigest()


def per_split(module: FederatedDataModule, identify) -> dict[str, list]:
    """``identify(dataset)`` of every client's every split, keyed by the clients' position and name."""
    return {
        f"{index}:{client}": [identify(module.dataset(client, split)) for split in SPLITS]
        for index, client in enumerate(module.client_names)
    }


def built(cls: type, *args, **kwargs) -> FederatedDataModule:
    """A data module, set up."""
    module = cls(*args, **kwargs)
    module.setup()
    return module


# --- Camelyon17 -------------------------------------------------------------------------------------------------

CAMELYON_PATCH = "patches/patient_{0:03d}_node_{1}/patch_patient_{0:03d}_node_{1}_x_{2}_y_{3}.png"


@pytest.fixture(scope="module")
def camelyon(tmp_path_factory) -> Path:
    """Hospitals 0, 1, 3 with 7, 6, 9 patients of 2-5 patches each; about every 4th patch has split 1."""
    root = tmp_path_factory.mktemp("pinned") / "camelyon17_v1.0"
    (root / "patches").mkdir(parents=True)
    rng = np.random.default_rng(11)
    lines = [",patient,node,x_coord,y_coord,tumor,slide,center,split"]
    for center, patients in ((0, 7), (1, 6), (3, 9)):
        for patient in range(patients):
            for k in range(int(rng.integers(2, 6))):
                row = [
                    10 * center + patient,
                    patient % 5,
                    96 * k,
                    7 * patient + center,
                    int(rng.integers(0, 2)),
                    center * 100 + patient,
                    center,
                    int(rng.random() < 0.25),
                ]
                lines.append(",".join([str(len(lines) - 1), f"{row[0]:03d}", *map(str, row[1:])]))
                path = root / CAMELYON_PATCH.format(*row[:4])
                path.parent.mkdir(exist_ok=True)
                Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(path)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def _files_and_labels(dataset) -> list:
    return [[name.decode() for name in dataset.files], dataset.labels.tolist()]


CAMELYON = {  # case: (settings, digest of every client's files and labels per split)
    "reference": ({}, "86711798982159fd2eba0bb35c7743d75c696cd4c6c19aa79b3e3cd9aa8f358e"),
    "reference-full-capped": (
        {"truncate_to_smallest": False, "max_per_split": 3},
        "c6952c241702fc4bc5867fe30a28a6885536a9c01762a4af064725b17bd4ae48",
    ),
    "patient-seed0": (
        {"split_mode": "patient", "truncate_to_smallest": False},
        "ea3533455d80ee24280dee8859ac61a4351148a7fd8390d93f7973629d6a475d",
    ),
    "patient-seed1": (
        {"split_mode": "patient", "truncate_to_smallest": False, "seed": 1},
        "50b90a21e48ce94f6d9125d6efd23c5385677670ef4f9d240e8cc8661aa42057",
    ),
    "patient-seed7-truncated": (
        {"split_mode": "patient", "seed": 7},
        "4760699ec43715491f785d007fde9b318a9b1515ab43d7e3ccad6765046e6aa1",
    ),
    "patient-fractions-centers": (
        {
            "split_mode": "patient",
            "patient_fractions": (0.5, 0.25, 0.25),
            "centers": [3, 0],
            "seed": 2,
            "truncate_to_smallest": False,
        },
        "8b35d0a518923e63133d7bae9db6f79aa37f1853272a41dde6d6e35b0e5c98e0",
    ),
}


@pytest.mark.parametrize("case", list(CAMELYON))
def test_camelyon_splits_are_pinned(camelyon, case):
    settings, expected = CAMELYON[case]
    module = built(Camelyon17, str(camelyon), image_size=8, **settings)
    assert digest(per_split(module, _files_and_labels)) == expected


# --- SiteFolders ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site_folders(tmp_path_factory) -> Path:
    """site_a: a split column; site_b (20 rows) and site_c (13 rows, nested folders): split by fractions."""
    root = tmp_path_factory.mktemp("pinned") / "sites"
    splits = ["train", "val", "train", "test", "train", "train", "val", "test", "train", "train"]
    tables = {
        "site_a": ("image,label,split", [(f"img/a{i}.png", str(i % 3), s) for i, s in enumerate(splits)]),
        "site_b": ("image,label", [(f"img/b{i}.png", str(i % 2)) for i in range(20)]),
        "site_c": ("image,label", [(f"deep/{i % 3}/c{i}.png", str(int(i % 5 == 0))) for i in range(13)]),
    }
    for site, (header, rows) in tables.items():
        for row in rows:
            (root / site / row[0]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 6, 3), len(row[0]), np.uint8)).save(root / site / row[0])
        (root / site / "labels.csv").write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    return root


SITE_FOLDERS = {  # case: (settings, digest of every client's files and labels per split)
    "seed0": ({}, "2109efe6459eb3d570a743dcb92ae9109aafac3ca3ec31f97ca8d86903d0042f"),
    "seed1": ({"seed": 1}, "b01cada93a8e246a95054dc7541699e2d311490d8d4a9e726179f883bfd7cb07"),
    "seed2-fractions": (
        {"seed": 2, "fractions": (0.5, 0.3, 0.2)},
        "111d808637a8b116c0959dc77f6de60534364bb38038abe93c0f5957fa205eb5",
    ),
    "subset-reordered": (
        {"sites": ["site_c", "site_b"], "seed": 3},
        "8a46ff16fbcec79940782eb24ef3f3eb83aa01fa63383e3ecba95798a757f890",
    ),
    "capped-truncated": (
        {"max_per_split": 2, "truncate_to_smallest": True, "seed": 4},
        "cabb826c95ca28fb6af2716a0bbba6b8e8a09e7766a8af60bf4f4ff4f5261476",
    ),
}


@pytest.mark.parametrize("case", list(SITE_FOLDERS))
def test_site_folder_splits_are_pinned(site_folders, case):
    settings, expected = SITE_FOLDERS[case]
    module = built(SiteFolders, str(site_folders), image_size=6, **settings)
    assert digest(per_split(module, _files_and_labels)) == expected


# --- SegmentationFolders ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory) -> Path:
    """alpha: 4 pairs and a split.csv; beta: 9 pairs, X_mask.tif instance masks; gamma: 7 pairs, one without mask."""
    root = tmp_path_factory.mktemp("pinned") / "nuclei"
    rng = np.random.default_rng(5)
    for site, count, suffix, tag in (("alpha", 4, ".png", ""), ("beta", 9, ".tif", "_mask"), ("gamma", 7, ".png", "")):
        (root / site / "images").mkdir(parents=True)
        (root / site / "masks").mkdir()
        for index in range(count):
            height, width = int(rng.integers(20, 50)), int(rng.integers(20, 50))
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
                root / site / "images" / f"{site[0]}{index}{suffix}"
            )
            if (site, index) != ("gamma", 3):
                labels = (rng.random((height, width)) < 0.3) * rng.integers(1, 400, (height, width))
                mask = labels.astype(np.uint16) if suffix == ".tif" else (labels > 0).astype(np.uint8) * 255
                Image.fromarray(mask).save(root / site / "masks" / f"{site[0]}{index}{tag}{suffix}")
    (root / "alpha" / "split.csv").write_text("image,split\na0.png,val\na1,train\na2.png,test\na3,train\n")
    return root


def _patches(dataset) -> list:
    return [dataset.images, dataset.masks]


def _masks(dataset) -> list:
    return [dataset.masks]


# 8-bit patches of lossless files are exact everywhere; resized images are not, so only their masks are pinned.
SEGMENTATION = {  # case: (settings, what is hashed, digest of it per client and split)
    "seed0": ({}, _patches, "d54c367f99317a4bb7b7a9cc4280e3f1e9b3eb0fcb2045794ab82a02f336b67d"),
    "seed1-fractions": (
        {"seed": 1, "fractions": (0.5, 0.25, 0.25)},
        _patches,
        "07cda8c6549ddb6bc587e8b97106d6e9b0bd5ad5701c2c3c367dd92693f81f9b",
    ),
    "capped": (
        {"max_patches_per_split": 3},
        _patches,
        "135527208c1efeed29fbea0e55e69a0727a3458e73f0fd917db6a3beb689e767",
    ),
    "subset-capped": (
        {"sites": ["gamma", "beta"], "max_patches_per_split": 2},
        _patches,
        "3afa445c09da180fdd3ffea5105da80ec8e933db1c5b3af11cb65bd37622bc2e",
    ),
    "magnified": (
        {"magnifications": {"alpha": 20, "beta": 40, "gamma": 30}, "target_magnification": 40},
        _masks,
        "b751151bbeddd5ab2b13e0a89941a2a1fab7277c9aa31c8e1ca3da2331d7e40f",
    ),
}


@pytest.mark.parametrize("case", list(SEGMENTATION))
def test_segmentation_folder_splits_are_pinned(segmentation, case):
    settings, identify, expected = SEGMENTATION[case]
    with pytest.warns(UserWarning, match="skipped"):
        module = built(SegmentationFolders, str(segmentation), patch_size=16, on_bad_sample="skip", **settings)
    assert digest(per_split(module, identify)) == expected


# --- ProstateMRI ------------------------------------------------------------------------------------------------

PROSTATE_SHAPE = (16, 16, 6)


def _write_nifti(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


@pytest.fixture(scope="module")
def prostate(tmp_path_factory) -> Path:
    """SiteA: 5 cases; SiteB: 4; SiteC: 7. Each case's prostate covers its own run of slices."""
    root = tmp_path_factory.mktemp("pinned") / "prostate"
    rng = np.random.default_rng(3)
    for site, cases in (("SiteA", 5), ("SiteB", 4), ("SiteC", 7)):
        (root / site).mkdir(parents=True)
        for case in range(cases):
            volume = rng.uniform(0, 500, PROSTATE_SHAPE).astype(np.float32)
            mask = np.zeros(PROSTATE_SHAPE, np.uint8)
            first = int(rng.integers(0, 3))
            mask[4:12, 5:11, first : first + int(rng.integers(2, 4))] = 1
            _write_nifti(volume, root / site / f"Case{case:02d}.nii.gz")
            _write_nifti(mask, root / site / f"Case{case:02d}_segmentation.nii.gz")
    return root


def _origins(module: ProstateMRI) -> dict[str, list]:
    return {client: [module.origins(client, split) for split in SPLITS] for client in module.client_names}


def _tensors(dataset) -> list:
    return list(dataset.tensors)


PROSTATE = {  # case: (settings, digest of the (case, slice) origins per split, digest of the tensors per split)
    "patient-seed0": (
        {},
        "d6ee0c236fd0fb9471c673f3c535c31fa1c527356fa5e45800280957f330b660",
        "6fbc3b23dbfe5c29a6ec34ab02b26b959a3a03e6b3a465512e890ab926793974",
    ),
    "patient-seed1-all-slices": (
        {"seed": 1, "slices": "all", "context_slices": 2},
        "7bb88fdfe0162f16fb9b29e1c9457ee8127d29ad30f6ea0ac6c6f43eb6f5d388",
        "722ea33821380e1de227a45a7153bbb464fb85712eefe0052d47bec5b1a39e7b",
    ),
    "patient-fractions-capped": (
        {"seed": 2, "fractions": (0.4, 0.3, 0.3), "max_slices_per_split": 2},
        "85f8891d649c5d7802ec358920ad105e0d80c24d206f44e22ae2936d6de96cc4",
        "db98bf013e0ed09da12b4f94309dcc12bfb3a418a8208de8eb98f12118101c69",
    ),
    "slice": (
        {"split_mode": "slice", "slices": "all"},
        "2bfe1bb4f75c5c453e4c671f6d03f5c97eebb41b6cc046e6b769d69454c82973",
        "fb81d649d78f8c9bca370a0812afa9663ea3a60980c10b979fb2ad6cd8a43de2",
    ),
    "slice-capped": (
        {"split_mode": "slice", "slices": "all", "max_slices_per_split": 3, "seed": 5},
        "5d1f419fea7ec7726360577140bcf32fc32c9f7a51383f7653d1e81f6129f33f",
        "389be3e8602be1e24cb8caa18ca8b7b8812654727299d9da22852acf0650ff97",
    ),
}


@pytest.mark.parametrize("case", list(PROSTATE))
def test_prostate_splits_are_pinned(prostate, tmp_path_factory, case):
    settings, expected_origins, expected_tensors = PROSTATE[case]
    cache = tmp_path_factory.mktemp("cache")
    module = built(ProstateMRI, str(prostate), image_size=8, cache_dir=str(cache), **settings)
    assert digest(_origins(module)) == expected_origins
    skip_unless_pinned_platform("preprocessed slices")
    assert digest(per_split(module, _tensors)) == expected_tensors


def test_prostate_cache_keys_and_entries_are_pinned(prostate, tmp_path):
    """The cache file of a case: ``<site>/<case>-<key>.pt``, key = the first 16 hex digits of the sha256 of the
    sorted JSON of (format 1, site, the files' name, size and mtime, the preprocessing settings)."""
    built(ProstateMRI, str(prostate), sites=["SiteB"], image_size=8, clip_percentile=98.5, cache_dir=str(tmp_path))
    names = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.pt"))
    expected = []
    for case in range(4):
        stat = [
            [file.name, file.stat().st_size, file.stat().st_mtime_ns]
            for file in (
                prostate / "SiteB" / f"Case{case:02d}.nii.gz",
                prostate / "SiteB" / f"Case{case:02d}_segmentation.nii.gz",
            )
        ]
        settings = {
            "format": 1,
            "site": "SiteB",
            "volume": stat[0],
            "mask": stat[1],
            "clip_percentile": 98.5,
            "intensity_scale": 1.0,
            "image_size": 8,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        expected.append(f"SiteB/Case{case:02d}-{key}.pt")
    assert names == expected
    entry = torch.load(tmp_path / expected[0], weights_only=True)
    assert sorted(entry) == ["image", "mask", "prostate"]
    assert (entry["image"].dtype, entry["mask"].dtype, entry["prostate"].dtype) == (
        torch.float16,
        torch.uint8,
        torch.uint8,
    )
    assert entry["image"].shape == (6, 8, 8) and entry["mask"].shape == (6, 8, 8)


# --- the demo ---------------------------------------------------------------------------------------------------

DEMO = {  # case: (class, settings, digest of the class labels or None, digest of images and targets)
    # 5 sites: the 4 hand-picked ones and one drawn from the seed.
    "histology": (
        DemoHistology,
        {"num_sites": 5, "seed": 0},
        "77ff2b18a0cc3394c7df3d30ba76cafc9d758f5c383e064502522abb01e34739",
        "80d18f75cb92ee675f15d97f3bb6cb9866f99c98fff7a80922942b7269d55daf",
    ),
    "nuclei": (
        DemoNuclei,
        {"num_sites": 2, "seed": 7},
        None,
        "dcab3ac67cf5c668672ddb40b42efa42d46c8b03b3f8ef2d5f84f001b3da706d",
    ),
}
DEMO_SIZES = {"train_per_site": 4, "val_per_site": 3, "test_per_site": 2, "image_size": 32}


def _targets(dataset) -> list:
    return [dataset.tensors[1]]


@pytest.mark.parametrize("case", list(DEMO))
def test_demo_data_is_pinned(case, tmp_path):
    cls, settings, expected_labels, expected_tensors = DEMO[case]
    module = built(cls, cache=False, **settings, **DEMO_SIZES)
    if expected_labels is not None:  # class labels come from an integer permutation: the same everywhere
        assert digest(per_split(module, _targets)) == expected_labels
    skip_unless_pinned_platform("generated images")
    assert digest(per_split(module, _tensors)) == expected_tensors
    cached = built(cls, cache=True, cache_dir=str(tmp_path), **settings, **DEMO_SIZES)
    assert digest(per_split(cached, _tensors)) == expected_tensors


# The sorted cache file names (``<class>-<key>.pt``, one per site and split), e.g. DemoNuclei-1b2ad9a3829ed35abfb3.pt.
DEMO_CACHE_NAMES = {
    "histology": "0e7f9170c2312281145026fcddd4a8ae12d8bb585d4d83564ede15516cebd9ee",
    "nuclei": "67aef36d55b1b74a8c3096a4fa6f107fba2596c6313bbb6cf702811fb5b4120d",
}


@pytest.mark.parametrize("case", list(DEMO))
def test_demo_cache_names_and_entries_are_pinned(case, tmp_path):
    cls, settings, _, _ = DEMO[case]
    cls(cache_dir=str(tmp_path), **settings, **DEMO_SIZES).prepare_data()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert len(names) == settings["num_sites"] * 3 and digest(names) == DEMO_CACHE_NAMES[case]
    entry = torch.load(tmp_path / names[0], weights_only=True)
    assert sorted(entry) == ["images", "targets"]
    assert entry["images"].dtype == torch.float32 and entry["targets"].dtype == torch.long
