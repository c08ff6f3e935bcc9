"""MRI volumes of the prostate release: cases on disk, NIfTI reading, and each volume's preprocessing into slices.

Preprocessing, per volume:

1. Read with nibabel; slices are taken along the third voxel axis and laid out as SimpleITK (the
   reference's reader) lays them out: rows follow the second voxel axis, columns the first. The NIfTI
   orientation is not applied, as in the reference.
2. Clip intensities above the volume's ``clip_percentile`` (99th) percentile and rescale
   ``(x - min) / (p99 - min)`` to ``[0, 1]``, times ``intensity_scale``. The reference rescales to 0-255
   and rounds down to 8 bits; ``intensity_scale: 255`` gives its range (without the rounding).
3. Resize every slice to ``image_size`` squared: bilinear for the image, nearest for the mask.
   Mask voxels > 0 are prostate (the release has labels > 1 that mean prostate too).

The input of slice ``i`` is the stack of slices ``i-k .. i+k`` (``k = context_slices``) as channels; at the
volume's ends the border slice is repeated. The reference uses ``k = 1`` but drops a volume's first and last
slices altogether instead of repeating them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.dataobj_images import DataobjImage
from torch import Tensor

from harmofl.data.checks import DataError

VOLUME_SUFFIX = ".nii.gz"
# What unlabelled volumes may be (`cli.py predict`); the release's cases are all .nii.gz.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MASK_SUFFIXES = ("_segmentation", "_Segmentation")
# The most voxels a volume may declare in its header: 512³ (512 MiB as float32, several times any prostate volume of
# the release). It bounds what one file can make the loader decompress and allocate.
MAX_VOXELS = 512**3


@dataclass(frozen=True)
class Case:
    """One patient of a site: its volume and (if found) its mask file."""

    name: str
    volume: Path
    mask: Path | None


def find_cases(site_dir: Path) -> list[Case]:
    """The cases of a site folder, sorted by name; a case's ``mask`` is None when no mask file lies beside it."""
    cases = []
    for path in sorted(site_dir.glob(f"*{VOLUME_SUFFIX}")):
        name = path.name[: -len(VOLUME_SUFFIX)]
        if name.lower().endswith(MASK_SUFFIXES[0]):
            continue
        masks = [site_dir / f"{name}{suffix}{VOLUME_SUFFIX}" for suffix in MASK_SUFFIXES]
        cases.append(Case(name, path, next((mask for mask in masks if mask.is_file()), None)))
    return cases


def expected_masks(case: Case) -> str:
    """The mask file names accepted for a case, for error messages."""
    return " or ".join(f"{case.name}{suffix}{VOLUME_SUFFIX}" for suffix in MASK_SUFFIXES)


def read_nifti(path: Path, max_voxels: int = MAX_VOXELS) -> np.ndarray:
    """A 3-D NIfTI file as a float32 array ``[X, Y, Z]``, every voxel finite; a :class:`DataError` naming the file
    otherwise.

    The shape is read from the header first (nibabel decodes nothing until asked), so that a file declaring more
    than ``max_voxels`` voxels, or not 3 dimensions, is refused before its data is decompressed.
    """
    try:
        image = cast(DataobjImage, nib.load(path))  # the header only
    except Exception as error:  # nibabel, gzip and zlib raise many types for corrupt or truncated files
        raise DataError(f"{path.name} is not a readable NIfTI file ({type(error).__name__}: {error})") from error
    shape = tuple(int(side) for side in image.shape)
    if len(shape) != 3:
        raise DataError(f"{path.name} is {len(shape)}-D with shape {shape}; expected a 3-D volume")
    if math.prod(shape) > max_voxels:
        raise DataError(
            f"{path.name}: its header declares shape {shape}, {math.prod(shape)} voxels, more than data.max_voxels = "
            f"{max_voxels}; crop or resample the volume, or raise data.max_voxels if the file is trusted and fits "
            "in memory (4 bytes per voxel)"
        )
    try:
        array = image.get_fdata(dtype=np.float32)
    except Exception as error:  # the data part may still be truncated or corrupt
        raise DataError(f"{path.name} is not a readable NIfTI file ({type(error).__name__}: {error})") from error
    non_finite = int(np.count_nonzero(~np.isfinite(array)))
    if non_finite:
        raise DataError(
            f"{path.name} holds {non_finite} NaN or infinite voxel(s) (after its header's scaling); they would "
            "spread through the intensity rescaling: fix or remove the file"
        )
    return array


def preprocess_case(
    volume: np.ndarray, mask: np.ndarray, clip_percentile: float, intensity_scale: float, image_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Volume and mask ``[X, Y, Z]`` to slices ``[Z, S, S]`` (float32 in ``[0, intensity_scale]``), masks
    ``[Z, S, S]`` (uint8 {0, 1}) and whether each slice holds prostate ``[Z]``, judged before resizing."""
    high = float(np.percentile(volume, clip_percentile))
    low = float(volume.min())
    # [X, Y, Z] -> [Z, Y, X]: the slice layout of SimpleITK's arrays, which the reference reads.
    image = torch.from_numpy(np.ascontiguousarray(volume.transpose(2, 1, 0)))
    # A constant volume has p99 == min: it maps to zeros rather than to NaN.
    image = (image.clamp(max=high) - low) / max(high - low, float(np.finfo(np.float32).tiny)) * intensity_scale
    labels = torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 1, 0) > 0)).to(torch.uint8)
    size = (image_size, image_size)
    image = F.interpolate(image.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    # "nearest-exact" samples at pixel centres, aligned with the bilinear image ("nearest" shifts by half a pixel).
    resized = F.interpolate(labels.unsqueeze(1), size=size, mode="nearest-exact").squeeze(1)
    # Judged on the original mask: downsampling must not drop a slice whose prostate is a few voxels wide.
    return image, resized, labels.flatten(1).any(1)


def context_stack(slices: Tensor, context_slices: int) -> Tensor:
    """2.5D inputs ``[D, 2k+1, H, W]`` from slices ``[D, H, W]``: channel j of slice i is slice ``i - k + j``,
    the border slice repeated past either end."""
    depth = slices.shape[0]
    offsets = torch.arange(-context_slices, context_slices + 1)
    return slices[(torch.arange(depth).unsqueeze(1) + offsets).clamp(0, depth - 1)]


def read_nifti_shape(path: Path) -> tuple[int, ...]:
    """A NIfTI file's voxel shape, from its header alone (the data is not decoded)."""
    return tuple(int(side) for side in cast(DataobjImage, nib.load(path)).shape)
