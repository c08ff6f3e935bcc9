"""Folder-per-site segmentation data on tiny files in real formats: pairing, splits, patches, resizing, errors, CLI."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmofl.data.base import SPLITS
from harmofl.data.checks import DataError
from harmofl.data.patches import tile_offsets
from harmofl.data.segmentation_folders import SegmentationFolders

from helpers import REPO, run_cli

HEIGHT, WIDTH = 64, 48
PATCH = 32
TILES_PER_IMAGE = 4  # rows at 0 and 32, columns at 0 and 16 (the last flush with the border)
LABELS = (1, 2, 300, 40000)  # instance labels, some beyond 8 bits
SITE_CODES = {"alpha": {10, 11, 12, 13}, "beta": {20, 21, 22, 23}, "gamma": {30, 31, 32, 33}}


def draw_pair(rng: np.random.Generator, code: int, height: int = HEIGHT, width: int = WIDTH):
    """An RGB image whose red channel marks the nuclei (so every tile shows whether its mask is aligned) and whose
    green channel is ``code`` (so every tile tells which image it came from), with its instance labels."""
    labels = np.zeros((height, width), np.uint16)
    for label in LABELS:
        y, x = rng.integers(0, height - 6), rng.integers(0, width - 6)
        labels[y : y + 6, x : x + 6] = label
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[..., 0] = np.where(labels > 0, 255, 0)
    image[..., 1] = code
    return image, labels


def write_site(
    root: Path,
    name: str,
    codes: list[int],
    image_ext: str,
    mask_style: str,
    mask_tag: str = "",
    size: tuple[int, int] = (HEIGHT, WIDTH),
) -> None:
    """A site folder. ``mask_style``: ``binary`` (0/255 png), ``binary01`` (0/1 png) or ``instance`` (uint16 tif)."""
    rng = np.random.default_rng(sum(codes))
    (root / name / "images").mkdir(parents=True)
    (root / name / "masks").mkdir()
    for code in codes:
        image, labels = draw_pair(rng, code, *size)
        stem = f"{name[0]}{code}"
        Image.fromarray(image).save(root / name / "images" / f"{stem}{image_ext}")
        if mask_style == "instance":
            Image.fromarray(labels).save(root / name / "masks" / f"{stem}{mask_tag}.tif")
        else:
            binary = ((labels > 0) * (255 if mask_style == "binary" else 1)).astype(np.uint8)
            Image.fromarray(binary).save(root / name / "masks" / f"{stem}{mask_tag}.png")


@pytest.fixture
def federation(tmp_path: Path) -> Path:
    """alpha: PNG images, binary PNG masks, split.csv; beta: TIF images, instance TIF masks named X_mask;
    gamma: PNG images, 0/1 PNG masks named X_mask. Image codes: alpha 10-13, beta 20-23, gamma 30-33."""
    root = tmp_path / "sites"
    write_site(root, "alpha", sorted(SITE_CODES["alpha"]), ".png", "binary")
    (root / "alpha" / "split.csv").write_text("image,split\na10.png,train\na11,train\na12.png,val\na13,test\n")
    write_site(root, "beta", sorted(SITE_CODES["beta"]), ".tif", "instance", mask_tag="_mask")
    write_site(root, "gamma", sorted(SITE_CODES["gamma"]), ".png", "binary01", mask_tag="_mask")
    return root


def folders(root: Path, **kwargs) -> SegmentationFolders:
    settings = dict(patch_size=PATCH, fractions=(0.5, 0.25, 0.25), batch_size=4)
    data = SegmentationFolders(str(root), **{**settings, **kwargs})
    data.setup("fit")
    return data


def codes(data: SegmentationFolders, site: str, split: str) -> set[int]:
    """The images (by their green code) whose patches make up a split."""
    return {round(image[1, 0, 0].item() * 255) for image, _ in data.dataset(site, split)}


def assert_aligned(data: SegmentationFolders, site: str, split: str) -> None:
    for image, mask in data.dataset(site, split):
        torch.testing.assert_close(mask, (image[0] > 0.5).long(), rtol=0, atol=0)


def test_pairs_splits_shapes_and_ranges(federation):
    data = folders(federation)
    assert data.client_names == ["alpha", "beta", "gamma"]
    assert data.skipped == {"alpha": 0, "beta": 0, "gamma": 0}
    # split.csv names images by file name or stem; 4 images at (0.5, 0.25, 0.25) give 2 / 1 / 1.
    assert [codes(data, "alpha", split) for split in SPLITS] == [{10, 11}, {12}, {13}]
    for site in data.client_names:
        assert [data.num_samples(site, split) for split in SPLITS] == [
            2 * TILES_PER_IMAGE,
            TILES_PER_IMAGE,
            TILES_PER_IMAGE,
        ]
        assert set.union(*(codes(data, site, split) for split in SPLITS)) == SITE_CODES[site]
        for split in SPLITS:
            assert_aligned(data, site, split)  # each mask is its own image's, tile for tile
    images, masks = next(iter(data.dataloader("beta", "train", generator=torch.Generator().manual_seed(0))))
    assert images.shape == (4, 3, PATCH, PATCH) and images.dtype == torch.float32
    assert masks.shape == (4, PATCH, PATCH) and masks.dtype == torch.long
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() == 1.0
    assert set(masks.unique().tolist()) == {0, 1}  # instance labels (up to 40000) became foreground


def test_seeded_split_is_deterministic_and_per_site(federation):
    def split_of(data: SegmentationFolders) -> list[set[int]]:
        return [codes(data, "beta", split) for split in SPLITS]

    first = split_of(folders(federation, seed=0))
    assert split_of(folders(federation, seed=0)) == first
    assert split_of(folders(federation, seed=0, sites=["beta"])) == first  # other sites do not move it
    assert any(split_of(folders(federation, seed=seed)) != first for seed in range(1, 5))


def test_tiles_cover_the_image_with_the_last_row_and_column_on_the_border(tmp_path):
    assert tile_offsets(300, 128) == [0, 128, 172]
    assert tile_offsets(256, 128) == [0, 128] and tile_offsets(128, 128) == [0]
    root = tmp_path / "sites"
    write_site(root, "wide", [1, 2, 3, 4], ".png", "instance", size=(200, 300))
    data = folders(root, patch_size=128)
    image, labels = draw_pair(np.random.default_rng(1 + 2 + 3 + 4), 1, 200, 300)  # write_site drew code 1 first
    corners = [(y, x) for y in (0, 72) for x in (0, 128, 172)]
    assert data.num_samples("wide", "train") == 2 * len(corners)
    tiles = [
        sample
        for split in SPLITS
        for sample in data.dataset("wide", split)
        if round(sample[0][1, 0, 0].item() * 255) == 1
    ]
    assert len(tiles) == len(corners)
    for (tile_image, tile_mask), (y, x) in zip(tiles, corners):
        expected = torch.from_numpy(image[y : y + 128, x : x + 128]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(tile_image, expected, rtol=0, atol=0)
        torch.testing.assert_close(tile_mask, torch.from_numpy(labels[y : y + 128, x : x + 128] > 0).long())


def test_small_images_are_reflection_padded(tmp_path):
    root = tmp_path / "sites"
    write_site(root, "small", [1, 2, 3, 4], ".png", "binary", size=(20, 40))
    data = folders(root, patch_size=32)
    assert data.num_samples("small", "train") == 2 * 2  # one row (padded to 32), columns at 0 and 8
    assert_aligned(data, "small", "train")
    image, _ = data.dataset("small", "train")[0]
    torch.testing.assert_close(image[:, 20], image[:, 18])  # reflection: row 20 mirrors row 18
    torch.testing.assert_close(image[:, 31], image[:, 7])


def test_magnification_resizes_each_site_to_the_target(tmp_path):
    root = tmp_path / "sites"
    write_site(root, "low", [1, 2, 3, 4], ".png", "binary", size=(32, 32))
    write_site(root, "high", [5, 6, 7, 8], ".png", "binary", size=(32, 32))
    plain = folders(root, patch_size=32)
    assert plain.num_samples("low", "train") == plain.num_samples("high", "train") == 2
    data = folders(root, patch_size=32, magnifications={"low": 20, "high": 40}, target_magnification=40)
    assert data.num_samples("high", "train") == 2 and data.num_samples("low", "train") == 2 * 4  # 64×64 each
    for split in SPLITS:
        original = plain.dataset("low", split).masks  # one 32×32 tile per image, images in order
        # The 4 tiles of a resized image are its quarters, row-major: put them back together.
        quarters = data.dataset("low", split).masks.view(-1, 2, 2, 32, 32)  # image, tile row, tile column
        resized = quarters.permute(0, 1, 3, 2, 4).reshape(-1, 64, 64)
        # Nearest resizing by 2 repeats every mask pixel 2×2.
        torch.testing.assert_close(resized, original.repeat_interleave(2, 1).repeat_interleave(2, 2), rtol=0, atol=0)
    image, _ = data.dataset("low", "train")[0]
    assert image.shape == (3, 32, 32) and image.min() >= 0.0 and image.max() <= 1.0


def test_max_patches_per_split_keeps_a_seeded_subset(federation):
    full = folders(federation)
    capped = folders(federation, max_patches_per_split=3)
    assert [capped.num_samples("beta", split) for split in SPLITS] == [3, 3, 3]
    assert torch.equal(
        capped.dataset("beta", "train").images,
        folders(federation, max_patches_per_split=3).dataset("beta", "train").images,
    )
    kept = capped.dataset("beta", "train").images
    every = full.dataset("beta", "train").images
    assert all(any(torch.equal(patch, candidate) for candidate in every) for patch in kept)


def break_file(path: Path) -> None:
    path.write_bytes(b"not an image at all")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-400])  # header intact: PIL's verify() passes a truncated TIFF


def small_mask(path: Path) -> None:
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)


def write(path: Path, text: str) -> None:
    path.write_text(text)


# (change to the federation, constructor arguments, words the error must contain)
ERRORS: dict[str, tuple[Callable[[Path], object], dict, tuple[str, ...]]] = {
    "missing root": (shutil.rmtree, {}, ("sites", "not a folder")),
    "site without images": (
        lambda root: (root / "gamma" / "images").rename(root / "gamma" / "imgs"),
        {},
        ("gamma", "images"),
    ),
    "site without masks": (
        lambda root: (root / "beta" / "masks").rename(root / "beta" / "labels"),
        {},
        ("beta", "masks"),
    ),
    "image without mask": (
        lambda root: (root / "beta" / "masks" / "b21_mask.tif").unlink(),
        {},
        ("b21.tif", "no mask"),
    ),
    "mask without image": (
        lambda root: small_mask(root / "alpha" / "masks" / "a99.png"),
        {},
        ("a99.png", "matches no image"),
    ),
    "two masks for an image": (
        lambda root: small_mask(root / "gamma" / "masks" / "g31.png"),
        {},
        ("g31.png", "g31_mask.png"),
    ),
    "two images, one stem": (
        lambda root: small_mask(root / "alpha" / "images" / "a10.tif"),
        {},
        ("a10.png", "a10.tif", "share the stem"),
    ),
    "jpeg mask": (lambda root: small_mask(root / "beta" / "masks" / "b20.jpg"), {}, ("b20.jpg", "lossless")),
    "corrupt image": (lambda root: break_file(root / "alpha" / "images" / "a12.png"), {}, ("a12.png", "unreadable")),
    "truncated tif image": (lambda root: truncate(root / "beta" / "images" / "b22.tif"), {}, ("b22.tif",)),
    "corrupt mask": (
        lambda root: break_file(root / "beta" / "masks" / "b23_mask.tif"),
        {},
        ("b23_mask.tif", "unreadable mask"),
    ),
    "mask shape differs": (
        lambda root: small_mask(root / "alpha" / "masks" / "a11.png"),
        {},
        ("a11.png", "(10, 10)", f"({HEIGHT}, {WIDTH})"),
    ),
    "unknown split name": (
        lambda root: write(root / "alpha" / "split.csv", "image,split\na10,train\na11,training\n"),
        {},
        ("split.csv", "line 3", "'training'"),
    ),
    "split.csv misses an image": (
        lambda root: write(root / "alpha" / "split.csv", "image,split\na10,train\n"),
        {},
        ("split.csv", "a11.png"),
    ),
    "magnification of some sites only": (
        lambda root: None,
        {"magnifications": {"alpha": 40}, "target_magnification": 40},
        ("beta", "gamma"),
    ),
    "empty split": (lambda root: None, {"fractions": (0.7, 0.15, 0.15)}, ("beta", "'val'")),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_data_fails_in_setup_naming_the_file(federation, case):
    change, kwargs, words = ERRORS[case]
    change(federation)
    with pytest.raises(DataError) as error:
        folders(federation, **kwargs)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_skip_leaves_bad_pairs_out_and_counts_them_per_site(federation):
    write_site(federation, "many", list(range(50, 58)), ".tif", "instance", mask_tag="_mask")
    train = sorted(codes(folders(federation, sites=["many"]), "many", "train"))  # 4 of 8
    break_file(federation / "alpha" / "images" / "a10.png")  # a training image; a11 remains
    truncate(federation / "many" / "images" / f"m{train[0]}.tif")
    (federation / "many" / "masks" / f"m{train[1]}_mask.tif").unlink()
    small_mask(federation / "many" / "masks" / f"m{train[2]}_mask.tif")
    with pytest.warns(UserWarning, match="skipped"):
        data = folders(federation, sites=["alpha", "many", "beta"], on_bad_sample="skip")
    assert data.skipped == {"alpha": 1, "many": 3, "beta": 0}
    assert codes(data, "alpha", "train") == {11}
    assert codes(data, "many", "train") == {train[3]}  # the others' splits did not move
    assert data.num_samples("many", "val") == data.num_samples("many", "test") == 2 * TILES_PER_IMAGE


@pytest.fixture
def cli_sites(tmp_path: Path) -> Path:
    root = tmp_path / "nuclei"
    write_site(root, "site_a", list(range(1, 8)), ".png", "instance", size=(40, 40))
    write_site(root, "site_b", list(range(11, 18)), ".tif", "binary", mask_tag="_mask", size=(40, 40))
    return root


def test_one_round_through_the_cli_with_the_nuclei_config(cli_sites, tmp_path):
    run = tmp_path / "run"
    run_cli(
        "fit",
        "--config",
        str(REPO / "configs" / "nuclei.yaml"),
        "--data.init_args.root",
        str(cli_sites),
        "--data.init_args.patch_size",
        "32",
        "--data.init_args.batch_size",
        "4",
        "--trainer.rounds",
        "1",
        "--model.init_args.backbone_kwargs",
        "{base_features: 4}",
        "--trainer.default_root_dir",
        str(run),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "cpu",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["clients"]) == {"site_a", "site_b"}
    for splits in summary["clients"].values():
        assert 0.0 <= splits["test"]["dice"] <= 1.0
    assert "dice" in summary["mean"]["test"]
