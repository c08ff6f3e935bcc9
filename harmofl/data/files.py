"""Reading a site's files: clear errors that name the file, and an explicit policy for bad samples.

Every loader checks what it can before training starts (folders, columns, listed files that are absent,
images that fail their integrity check, masks whose shape differs from their image) and raises
:class:`DataError` naming the file and what is wrong. A bad sample is never dropped silently: with
``on_bad_sample="skip"`` it is left out and the count per client is reported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Optional, TypeVar

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch import Tensor

BadSamplePolicy = Literal["error", "skip"]
Sample = TypeVar("Sample")

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class DataError(ValueError):
    """Bad data on disk; the message names the file or folder and what is wrong."""


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a folder, else a :class:`DataError` saying what was expected there."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{what} {str(folder)!r} is not a folder: set the data root to where the data set lies.")
    return folder


def require_file(path: str | Path, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{what} {str(file)!r} does not exist.")
    return file


def check_bad_sample_policy(policy: str) -> BadSamplePolicy:
    if policy not in ("error", "skip"):
        raise ValueError(f"data.on_bad_sample must be 'error' or 'skip', got {policy!r}.")
    return policy  # type: ignore[return-value]


def check_fractions(fractions: Sequence[float], name: str, allow_empty: bool = True) -> tuple[float, float, float]:
    """Three train/val/test fractions summing to 1; each ``> 0`` unless ``allow_empty``."""
    smallest = min(fractions, default=-1.0)
    if len(fractions) != 3 or smallest < 0 or (smallest == 0 and not allow_empty) or abs(sum(fractions) - 1) > 1e-6:
        kind = ">= 0" if allow_empty else "> 0"
        raise ValueError(f"data.{name} must be 3 fractions (train, val, test) {kind} summing to 1, got {fractions}.")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def find_site_folders(root: Path, sites: Optional[Sequence[str]], layout: str) -> list[str]:
    """The site (client) folders under ``root``: ``sites`` in their order (each must exist), else every
    non-hidden subfolder, sorted. ``layout`` says what a site folder holds, for the error messages."""
    available = sorted(path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if sites is None:
        if not available:
            raise DataError(f"{str(root)!r} holds no site folders: put one folder per site there, {layout}.")
        return available
    missing = [site for site in sites if site not in available]
    if missing:
        raise DataError(
            f"Site folder(s) {missing} not found under {str(root)!r}, which holds {available}: fix data.sites or "
            "data.root."
        )
    return list(sites)


def named_generator(*parts: object) -> torch.Generator:
    """A torch generator seeded from ``parts`` (e.g. a namespace, the run seed, a site, a split).

    Each (site, split) gets its own stream, so adding a site or resizing one split never changes another.
    """
    digest = hashlib.blake2b("/".join(str(part) for part in parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def read_image(path: Path, channels: int = 3) -> Tensor:
    """An image file as float32 ``[C, H, W]`` in ``[0, 1]`` (8- and 16-bit; grey or RGB as ``channels`` asks)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}.")
    try:
        with Image.open(path) as image:
            if channels == 3:
                image = image.convert("RGB")
            elif image.mode not in ("L", "I;16"):  # keep 16-bit grey as it is
                image = image.convert("L")
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


def image_is_intact(path: Path) -> Optional[str]:
    """None if ``path`` exists and passes the format's integrity check (cheap, no full decode); else why not."""
    if not path.is_file():
        return "file is missing"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for truncated or corrupt files
        return f"corrupt image ({type(error).__name__}: {error})"
    return None


def keep_good_samples(
    client: str,
    samples: Sequence[Sample],
    problem_of: Callable[[Sample], Optional[str]],
    name_of: Callable[[Sample], str],
    policy: BadSamplePolicy,
) -> tuple[list[Sample], int]:
    """Check every sample before training; raise on the first bad one, or drop the bad ones and count them."""
    check_bad_sample_policy(policy)
    good: list[Sample] = []
    skipped = 0
    for sample in samples:
        problem = problem_of(sample)
        if problem is None:
            good.append(sample)
        elif policy == "error":
            raise DataError(
                f"Client {client!r}: {name_of(sample)}: {problem}. Fix or remove the sample, or set "
                "data.on_bad_sample: skip to leave bad samples out (their count is reported)."
            )
        else:
            skipped += 1
    if skipped:
        rank_zero_warn(
            f"Client {client!r}: skipped {skipped} bad sample(s) of {len(samples)} (data.on_bad_sample=skip)."
        )
    return good, skipped
