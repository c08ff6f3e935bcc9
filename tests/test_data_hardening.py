"""Site files crafted or damaged to attack or fool the loaders: each is refused with an error naming the file.

Decompression bombs, truncated JPEG/TIFF files that PIL's ``verify()`` passes, CSV labels outside the model's
classes, NIfTI headers declaring huge volumes and volumes with NaN voxels, ``labels.csv`` paths leading out of the
site folder; and, on the model side, timm's own checkpoint loading and a torch whose ``weights_only`` can be bypassed.
"""

from __future__ import annotations

import gzip
import re
import tomllib
from functools import partial
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
from packaging.requirements import Requirement
from PIL import Image, ImageFile
from test_prostate import make_release
from test_site_folders import write_image, write_site

from harmofl.cli import build
from harmofl.data import ProstateMRI, SiteFolders
from harmofl.data.checks import DataError
from harmofl.data.image_io import image_is_intact, read_image, read_mask
from harmofl.models import create_classifier, create_segmenter

from helpers import REPO, tiny_classifier


def _png(path: Path, side: int = 64) -> Path:
    write_image(path, np.random.default_rng(0))  # 30 x 40 RGB
    Image.open(path).resize((side, side)).save(path)
    return path


def _sites(root: Path, rows: list[tuple[str, str]]) -> SiteFolders:
    """One site, ``site_a``, whose labels.csv lists ``rows`` (image, label); every listed image is written."""
    splits = ["train", "val", "test"]
    write_site(root / "site_a", [(image, label, split) for (image, label), split in zip(rows, splits)])
    return SiteFolders(root=str(root), image_size=16)


# --- images: decompression bombs and truncated files ----------------------------------------------------------


@pytest.mark.parametrize("limit", [3000, 1000], ids=["warned", "raised"])  # PIL warns above the limit, raises at 2x
def test_an_image_above_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch, limit) -> None:
    image = _png(tmp_path / "huge.png")  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    expected = re.escape(str(image)) + ".*too large to decode safely.*4096 pixels.*MAX_IMAGE_PIXELS"
    with pytest.raises(DataError, match=expected):
        read_image(image)
    with pytest.raises(DataError, match=expected):
        read_mask(image)
    assert "too large to decode safely" in str(image_is_intact(image))


def test_a_loader_names_an_image_above_the_limit(tmp_path, monkeypatch) -> None:
    data = _sites(tmp_path, [("images/a.png", "0"), ("images/b.png", "1"), ("images/c.png", "0")])
    _png(tmp_path / "site_a" / "images" / "b.png", side=128)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # the others are 30 x 40
    data.setup()  # a site's images are decoded (checked) when a process loads it
    with pytest.raises(DataError, match=r"'site_a'.*b\.png: image too large to decode safely"):
        data.load(["site_a"])


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_truncated_jpeg_and_tiff_files_are_refused(tmp_path, monkeypatch, suffix) -> None:
    path = tmp_path / f"cut{suffix}"
    write_image(path, np.random.default_rng(0))
    path.write_bytes(path.read_bytes()[:-200])
    with Image.open(path) as opened:
        opened.verify()  # the fault: PIL's integrity check passes the file
    assert "truncated" in str(image_is_intact(path))
    # Another library may have told PIL to fill truncated files with grey: the loaders decode strictly regardless.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*truncated"):
        read_image(path)
    assert "truncated" in str(image_is_intact(path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the setting is the caller's again afterwards


def test_a_loader_refuses_a_truncated_jpeg_before_training(tmp_path) -> None:
    data = _sites(tmp_path, [("images/a.png", "0"), ("images/b.jpg", "1"), ("images/c.png", "0")])
    jpeg = tmp_path / "site_a" / "images" / "b.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    data.setup()
    with pytest.raises(DataError, match=re.escape(f"{jpeg}: corrupt image") + ".*truncated"):
        data.load(["site_a"])


# --- labels.csv: class indices and paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("2", "line 3: label 2 is >= num_classes = 2 (the model's)"),
        ("-1", "line 3: label -1 is negative"),
        ("1.5", "line 3: column 'label' holds '1.5', not an integer"),
        ("99999999999999999999", "line 3: column 'label' holds '99999999999999999999', not an integer"),
    ],
)
def test_labels_outside_the_models_classes_are_refused_when_read(tmp_path, label, message) -> None:
    root = tmp_path / "sites"
    write_site(root / "site_a", [("images/a.png", "0", "train"), ("images/b.png", label, "val")])
    with pytest.raises(DataError, match=re.escape(f"{root / 'site_a' / 'labels.csv'}, {message}")):
        SiteFolders(root=str(root), num_classes=2).setup()


def test_the_command_line_gives_the_data_the_models_class_count(tmp_path) -> None:
    root = tmp_path / "sites"
    write_site(root / "site_a", [(f"images/{i}.png", str(i), ["train", "val", "test"][i % 3]) for i in range(4)])
    flags = ["--config", str(REPO / "configs/site_folders.yaml"), "--data.init_args.root", str(root)]
    cli = build([*flags, "--model.init_args.num_classes", "3"])
    assert cli.datamodule.num_classes == 3
    with pytest.raises(DataError, match="line 5: label 3 is >= num_classes = 3"):
        cli.datamodule.setup()
    build([*flags, "--model.init_args.num_classes", "4"]).datamodule.setup()


@pytest.mark.parametrize(
    ("listed", "why"),
    [
        ("../site_b/images/x.png", "resolves to .*, outside the folder"),  # another site's file
        ("images/../../secret.png", "resolves to .*, outside the folder"),
        ("/etc/hostname", "is an absolute path"),
        ("images/link.png", "resolves to .*secret.png', outside the folder"),  # a symbolic link leading out
    ],
)
def test_labels_csv_paths_must_stay_inside_the_site_folder(tmp_path, listed, why) -> None:
    root = tmp_path / "sites"
    write_site(root / "site_b", [("images/x.png", "0", "train")])
    _png(tmp_path / "sites" / "secret.png")
    (root / "site_a" / "images").mkdir(parents=True)
    (root / "site_a" / "images" / "link.png").symlink_to(root / "secret.png")
    (root / "site_a" / "labels.csv").write_text(f"image,label\n{listed},0\n")
    expected = re.escape(f"{root / 'site_a' / 'labels.csv'}, line 2: image {listed!r} ") + why
    with pytest.raises(DataError, match=expected):
        SiteFolders(root=str(root), sites=["site_a"]).setup()


def test_a_data_root_reached_through_a_symbolic_link_is_accepted(tmp_path) -> None:
    rows: list[tuple[str, ...]] = [(f"images/{i}.png", str(i % 2), ["train", "val", "test"][i % 3]) for i in range(3)]
    write_site(tmp_path / "real" / "site_a", rows)
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    data = SiteFolders(root=str(tmp_path / "linked"), image_size=16, num_classes=2)
    data.setup()
    assert data.num_samples("site_a", "train") == 1


# --- NIfTI volumes ----------------------------------------------------------------------------------------------


def _nifti_header_only(path: Path, shape: tuple[int, int, int]) -> None:
    """A .nii.gz whose header declares ``shape`` (float32) but which holds a few bytes of data: a bomb."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + bytes(4 + 64)))


def test_a_nifti_declaring_a_huge_volume_is_refused_before_decoding(tmp_path) -> None:
    root = make_release(tmp_path / "data")
    _nifti_header_only(root / "SiteA" / "Case00.nii.gz", (2048, 2048, 2048))  # 32 GiB as float32
    _nifti_header_only(root / "SiteA" / "Case00_segmentation.nii.gz", (2048, 2048, 2048))
    cache = tmp_path / "cache"
    data = ProstateMRI(root=str(root), sites=["SiteA"], image_size=32, cache_dir=str(cache))
    with pytest.raises(DataError, match=r"Case00\.nii\.gz: its header declares shape \(2048, 2048, 2048\).*max_voxels"):
        data.setup()
    assert not cache.exists()  # nothing cached


def test_the_voxel_cap_is_a_setting(tmp_path) -> None:
    root = make_release(tmp_path / "data")  # 32 x 32 x 10 volumes
    data = ProstateMRI(root=str(root), sites=["SiteA"], image_size=32, cache_dir=str(tmp_path / "c"), max_voxels=10239)
    with pytest.raises(DataError, match=r"Case00\.nii\.gz: its header declares shape \(32, 32, 10\), 10240 voxels"):
        data.setup()
    ProstateMRI(root=str(root), sites=["SiteA"], image_size=32, cache_dir=str(tmp_path / "c"), max_voxels=10240).setup()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_volume_with_nan_or_infinite_voxels_is_never_cached(tmp_path, bad) -> None:
    root = make_release(tmp_path / "data")
    volume = cast(nib.Nifti1Image, nib.load(root / "SiteA" / "Case00.nii.gz")).get_fdata(dtype=np.float32)
    volume[3, 4, 5] = bad
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "SiteA" / "Case00.nii.gz")
    cache = tmp_path / "cache"
    prostate = partial(ProstateMRI, root=str(root), sites=["SiteA"], image_size=32, cache_dir=str(cache))
    with pytest.raises(DataError, match=r"Case00\.nii\.gz: Case00\.nii\.gz holds 1 NaN or infinite voxel"):
        prostate().setup()
    assert not cache.exists()
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        data = prostate(on_bad_sample="skip")
        data.setup()
    assert data.skipped == {"SiteA": 1}
    cached = sorted(path.name.split("-")[0] for path in cache.rglob("*.pt"))
    assert cached == ["Case01", "Case02", "Case03", "Case04"]


# --- models: weights loaded by timm, and torch's weights_only --------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checkpoint_path": "/nowhere/evil.pth"},
        {"pretrained_cfg_overlay": {"file": "/nowhere/evil.pth"}},
        {"pretrained_cfg": {"file": "/nowhere/evil.pth"}},
    ],
)
def test_timms_own_weight_loading_is_refused(kwargs) -> None:
    expected = f"{next(iter(kwargs))}=.*backbone_kwargs.*model.weights_path"
    with pytest.raises(ValueError, match=expected):
        create_classifier("test_resnet", num_classes=2, **kwargs)
    with pytest.raises(ValueError, match=expected):  # smp hands these on to timm for "tu-" encoders
        create_segmenter("tu-test_resnet", num_classes=2, **kwargs)
    with pytest.raises(ValueError, match=expected):
        tiny_classifier(backbone_kwargs=kwargs)


def test_torch_versions_whose_weights_only_can_be_bypassed_are_excluded() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = {requirement.name: requirement.specifier for requirement in map(Requirement, dependencies)}
    # CVE-2025-32434: torch.load(weights_only=True) could run code up to 2.5.1; fixed in 2.6.0 (torchvision 0.21).
    assert "2.5.1" not in requirements["torch"] and "2.6.0" in requirements["torch"]
    assert "0.20.1" not in requirements["torchvision"] and "0.21.0" in requirements["torchvision"]
