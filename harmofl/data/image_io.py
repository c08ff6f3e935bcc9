"""Image files in and out of tensors: reading images and masks, cheap integrity checks, resizing, listing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from harmofl.data.checks import DataError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def read_image(path: Path, channels: int = 3) -> Tensor:
    """An image file as float32 ``[C, H, W]`` in ``[0, 1]`` (8- and 16-bit; grey or RGB as ``channels`` asks)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}.")
    try:
        with Image.open(path) as opened:
            image: Image.Image = opened
            if channels == 3:
                image = opened.convert("RGB")
            elif opened.mode not in ("L", "I;16"):  # keep 16-bit grey as it is
                image = opened.convert("L")
            array = np.asarray(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"{path}: unreadable image ({error}).") from error
    scale = 65535.0 if array.dtype == np.uint16 else 255.0 if array.dtype == np.uint8 else 1.0
    tensor = torch.from_numpy(array.astype(np.float32) / scale)
    return tensor.permute(2, 0, 1).contiguous() if tensor.ndim == 3 else tensor.unsqueeze(0)


def read_mask(path: Path) -> Tensor:
    """A mask file as long ``[H, W]`` of {0, 1}: any non-zero value (binary or instance labels) is foreground."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"{path}: unreadable mask ({error}).") from error
    if array.ndim == 3:  # an RGB(A) label image: foreground wherever any colour channel is set
        array = array[..., :3].max(axis=-1)
    return torch.from_numpy((array > 0).astype(np.int64))


def image_is_intact(path: Path, verify: bool = True) -> str | None:
    """None if ``path`` exists and, when ``verify``, passes the format's integrity check (cheap, no full decode);
    else why not."""
    if not path.is_file():
        return "file is missing"
    if not verify:
        return None
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for truncated or corrupt files
        return f"corrupt image ({type(error).__name__}: {error})"
    return None


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (by suffix, any case), sorted; hidden files are ignored."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )


def resize(image: Tensor, size: int) -> Tensor:
    """``image [C, H, W]`` as ``[C, size, size]``, bilinear (antialiased when shrinking); as is if already that size."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
