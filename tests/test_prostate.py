"""The multi-site prostate MRI datamodule on a tiny synthetic release in the real on-disk format."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from harmofl.data import SPLITS
from harmofl.data.checks import DataError
from harmofl.data.mri import context_stack, preprocess_case
from harmofl.data.prostate import ProstateMRI

from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 10)  # voxels [X, Y, Z]; slices along Z
PROSTATE = range(3, 7)  # the slices holding the blob
OUTLIER = (5, 7, 4)  # a bright voxel far above the 99th percentile


def _volume(seed: int, dtype: type) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = rng.uniform(100, 1000, SHAPE)
    volume[OUTLIER] = 50_000
    return volume.astype(dtype)


def _mask(label: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[10:20, 12:22, PROSTATE.start : PROSTATE.stop] = label
    return mask


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


# Site A: float volumes, `_segmentation` masks, one mask labelled 2. Site B: int16 volumes, `_Segmentation`.
SITES = {"SiteA": (5, np.float32, "_segmentation"), "SiteB": (4, np.int16, "_Segmentation")}


def make_release(root: Path) -> Path:
    for site_index, (site, (cases, dtype, suffix)) in enumerate(SITES.items()):
        folder = root / site
        folder.mkdir(parents=True)
        for case in range(cases):
            _save(_volume(10 * site_index + case, dtype), folder / f"Case{case:02d}.nii.gz")
            _save(_mask(2 if (site, case) == ("SiteA", 1) else 1), folder / f"Case{case:02d}{suffix}.nii.gz")
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_release(tmp_path_factory.mktemp("prostate") / "data")


@pytest.fixture
def fresh(tmp_path) -> Path:
    """A release of its own, to damage or to cache into."""
    return make_release(tmp_path / "data")


def _data(root: Path, **kwargs) -> ProstateMRI:
    data = ProstateMRI(root=str(root), **{"image_size": 32, "batch_size": 4, **kwargs})
    data.setup()
    return data


@pytest.fixture(scope="module")
def prostate(release) -> ProstateMRI:
    return _data(release)


def _count(data: ProstateMRI, site: str) -> int:
    return sum(data.num_samples(site, split) for split in SPLITS)


# --- slices, channels, intensities --------------------------------------------------------------------------


def test_sites_are_the_subfolders_and_slices_are_selected(release, prostate) -> None:
    assert prostate.client_names == ["SiteA", "SiteB"]  # the hidden cache folder is no site
    everything = _data(release, slices="all")
    for site, (cases, _, _) in SITES.items():
        assert _count(prostate, site) == cases * len(PROSTATE)
        assert _count(everything, site) == cases * SHAPE[2]
    images, masks = prostate.dataset("SiteB", "train")[:]
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
    assert masks.dtype == torch.long and masks.shape[1:] == (32, 32)


def test_channels_are_the_neighbouring_preprocessed_slices_with_borders_repeated(release) -> None:
    data = _data(release, slices="all", context_slices=2)
    site = "SiteA"
    preprocessed = {
        name: preprocess_case(_volume(case, np.float32), _mask(1), 99.0, 1.0, 32)[0]
        for case, name in enumerate(f"Case{i:02d}" for i in range(SITES[site][0]))
    }
    for split in SPLITS:
        images, _ = data.dataset(site, split)[:]
        assert images.shape[1] == 5
        for image, (case, index) in zip(images, data.origins(site, split)):
            for channel in range(5):
                neighbour = min(max(index + channel - 2, 0), SHAPE[2] - 1)
                torch.testing.assert_close(image[channel], preprocessed[case][neighbour], atol=1e-3, rtol=0)
    slices = torch.arange(4.0).view(4, 1, 1)
    assert context_stack(slices, 1).flatten(1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]


def test_intensities_are_clipped_at_the_99th_percentile_and_rescaled() -> None:
    volume = _volume(0, np.float32)
    image = preprocess_case(volume, _mask(1), 99.0, 1.0, 32)[0]
    high, low = np.percentile(volume, 99.0), volume.min()
    assert image.min() == 0 and image.max().item() == pytest.approx(1, abs=1e-6)
    assert image[OUTLIER[2], OUTLIER[1], OUTLIER[0]] == image.max()  # [Z, Y, X]: the outlier is clipped
    voxel = (2, 3, 1)
    expected = (volume[voxel] - low) / (high - low)
    assert image[voxel[2], voxel[1], voxel[0]].item() == pytest.approx(expected, abs=1e-6)
    assert 0.4 < image.mean() < 0.6  # uniform intensities keep their spread: the outlier does not squash them
    scaled = preprocess_case(volume, _mask(1), 99.0, 255.0, 32)[0]
    torch.testing.assert_close(scaled, image * 255)


def test_dataset_values_masks_and_resize(release, prostate) -> None:
    for site in SITES:
        for split in SPLITS:
            images, masks = prostate.dataset(site, split)[:]
            assert images.min() >= 0 and images.max() <= 1
            assert set(masks.unique().tolist()) == {0, 1}  # SiteA's Case01 is labelled 2
    small = _data(release, image_size=16)
    images, masks = small.dataset("SiteA", "test")[:]
    assert images.shape[1:] == (3, 16, 16) and masks.shape[1:] == (16, 16)
    assert masks.sum(dim=(1, 2)).tolist() == [25] * len(masks)  # the 10x10 blob, halved by nearest sampling
    speck = np.zeros(SHAPE, dtype=np.uint8)
    speck[0, 0, 2] = 1  # one voxel, lost by downsampling: the slice still counts as prostate
    _, resized, prostate = preprocess_case(_volume(0, np.float32), speck, 99.0, 1.0, 8)
    assert resized.sum() == 0 and prostate.tolist() == [index == 2 for index in range(SHAPE[2])]


# --- splits ---------------------------------------------------------------------------------------------------


def _cases(data: ProstateMRI, site: str, split: str) -> set[str]:
    return {case for case, _ in data.origins(site, split)}


def test_patient_split_keeps_each_case_in_one_split_and_follows_the_seed(release, prostate) -> None:
    for site, (cases, _, _) in SITES.items():
        parts = [_cases(prostate, site, split) for split in SPLITS]
        assert all(parts) and sum(map(len, parts)) == cases
        assert set.union(*parts) == {f"Case{i:02d}" for i in range(cases)}
    again = _data(release)
    other = _data(release, seed=1)
    assert [again.origins("SiteA", s) for s in SPLITS] == [prostate.origins("SiteA", s) for s in SPLITS]
    assert [_cases(other, "SiteA", s) for s in SPLITS] != [_cases(prostate, "SiteA", s) for s in SPLITS]


def test_slice_split_is_the_reference_64_16_20(release) -> None:
    data = _data(release, split_mode="slice", slices="all")
    total = SITES["SiteA"][0] * SHAPE[2]  # 50 slices
    assert [data.num_samples("SiteA", split) for split in SPLITS] == [32, 8, 10]
    origins = [set(data.origins("SiteA", split)) for split in SPLITS]
    assert len(set.union(*origins)) == total  # every slice in exactly one split...
    assert _cases(data, "SiteA", "train") & _cases(data, "SiteA", "test")  # ...but patients leak across splits
    capped = _data(release, split_mode="slice", slices="all", max_slices_per_split=3)
    assert [capped.num_samples("SiteB", split) for split in SPLITS] == [3, 3, 3]


# --- cache ----------------------------------------------------------------------------------------------------


def _cache_files(root: Path) -> list[Path]:
    return sorted((root / ".harmofl_cache").rglob("*.pt"))


def test_cache_is_written_once_reused_without_nifti_and_invalidated(fresh, monkeypatch) -> None:
    first = _data(fresh)
    assert len(_cache_files(fresh)) == 9
    assert not list((fresh / ".harmofl_cache").rglob(".*"))  # no temporary file left behind

    def no_nifti(*args, **kwargs):
        raise AssertionError("NIfTI read although the cache holds the case")

    with monkeypatch.context() as patch:
        patch.setattr(nib, "load", no_nifti)
        second = _data(fresh)
        with pytest.raises(DataError, match="not a readable NIfTI"):  # a new setting needs the files again
            _data(fresh, clip_percentile=98.0)
    for split in SPLITS:
        torch.testing.assert_close(second.dataset("SiteB", split)[:], first.dataset("SiteB", split)[:])
    _data(fresh, image_size=16)
    assert len(_cache_files(fresh)) == 18
    os.utime(fresh / "SiteA" / "Case00.nii.gz", ns=(1, 1))  # an edited file
    _data(fresh, image_size=16)
    assert len(_cache_files(fresh)) == 19


def test_cache_falls_back_to_the_user_cache_when_the_root_is_read_only(fresh, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    _data(fresh)
    assert not _cache_files(fresh)
    assert len(list((tmp_path / "user-cache" / "harmofl" / "prostate").rglob("*.pt"))) == 9


# --- errors ---------------------------------------------------------------------------------------------------


def _remove_mask(root: Path) -> str:
    (root / "SiteB" / "Case02_Segmentation.nii.gz").unlink()
    return "Case02.nii.gz: no mask: expected Case02_segmentation.nii.gz or Case02_Segmentation.nii.gz"


def _corrupt_volume(root: Path) -> str:
    path = root / "SiteA" / "Case03.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    return "Case03.nii.gz is not a readable NIfTI file"


def _wrong_mask_shape(root: Path) -> str:
    _save(np.zeros((32, 30, 10), dtype=np.uint8), root / "SiteA" / "Case04_segmentation.nii.gz")
    return r"Case04_segmentation.nii.gz has shape \(32, 30, 10\) but the volume has shape \(32, 32, 10\)"


def _four_d_volume(root: Path) -> str:
    _save(np.zeros((32, 32, 10, 2), dtype=np.float32), root / "SiteB" / "Case01.nii.gz")
    return r"Case01.nii.gz is 4-D with shape \(32, 32, 10, 2\); expected a 3-D volume"


def _empty_site(root: Path) -> str:
    (root / "SiteC").mkdir()
    return "SiteC' holds no volumes"


def _missing_site(root: Path) -> str:
    shutil.rmtree(root / "SiteB")
    return r"Site folder\(s\) \['SiteB'\] not found"


def _split_without_slices(root: Path) -> str:
    for case in (0, 1, 2, 3):
        _save(np.zeros(SHAPE, dtype=np.uint8), root / "SiteA" / f"Case{case:02d}_segmentation.nii.gz")
    return "Site 'SiteA' .* has no slices in its (train|val|test) split"


def _missing_root(root: Path) -> str:
    shutil.rmtree(root)
    return "Prostate MRI root .* is not a folder"


@pytest.mark.parametrize(
    "damage",
    [
        _remove_mask,
        _corrupt_volume,
        _wrong_mask_shape,
        _four_d_volume,
        _empty_site,
        _missing_site,
        _split_without_slices,
        _missing_root,
    ],
)
def test_bad_data_fails_before_training_naming_the_file(fresh, damage) -> None:
    message = damage(fresh)
    with pytest.raises(DataError, match=message):
        _data(fresh, sites=["SiteA", "SiteB"] if damage is _missing_site else None)


@pytest.mark.parametrize("sites", [[], ["SiteA", "SiteB", "SiteA"]])
def test_an_empty_or_repeated_site_list_fails_at_construction_naming_it(tmp_path, sites) -> None:
    # Checked before any file is read (the root does not even exist), not later at the trainer's client check.
    expected = f"data.sites must name at least one site, each once, or be null (all), got {sites}."
    with pytest.raises(ValueError, match=re.escape(expected)):
        ProstateMRI(root=str(tmp_path / "absent"), sites=sites)


@pytest.mark.filterwarnings("ignore:Client .* skipped")
def test_skip_policy_leaves_bad_cases_out_and_counts_them(fresh) -> None:
    _remove_mask(fresh)
    _corrupt_volume(fresh)
    _wrong_mask_shape(fresh)
    with pytest.warns(UserWarning, match="skipped"):
        data = _data(fresh, on_bad_sample="skip")
    assert data.skipped == {"SiteA": 2, "SiteB": 1}
    assert _count(data, "SiteA") == 3 * len(PROSTATE) and _count(data, "SiteB") == 3 * len(PROSTATE)
    _four_d_volume(fresh)
    with pytest.raises(DataError, match="SiteB' has 2 usable case"):
        _data(fresh, on_bad_sample="skip")


# --- end to end -------------------------------------------------------------------------------------------------


def test_one_round_through_the_cli(release, tmp_path) -> None:
    run_cli(
        "fit",
        "--config",
        str(REPO / "configs" / "prostate.yaml"),
        "--data.init_args.root",
        str(release),
        "--data.init_args.image_size",
        "32",
        "--data.init_args.batch_size",
        "4",
        "--trainer.rounds",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--model.init_args.backbone_kwargs",
        "{base_features: 4}",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["clients"]) == set(SITES)
    assert 0 <= summary["mean"]["test"]["dice"] <= 1


def test_setup_counts_every_site_and_a_process_loads_only_the_sites_it_uses(release) -> None:
    data = _data(release)
    counts = {site: _count(data, site) for site in data.client_names}  # every site's counts, before any load
    assert data.loaded_clients == []
    data.load(["SiteB"])  # what the process holding SiteB only reads
    assert data.loaded_clients == ["SiteB"]
    assert sum(len(data.dataset("SiteB", split)) for split in SPLITS) == counts["SiteB"]  # type: ignore[arg-type]
    assert data.origins("SiteA", "test") and data.loaded_clients == ["SiteB"]  # origins are metadata too
