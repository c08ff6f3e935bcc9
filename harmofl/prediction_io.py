"""The files of ``cli.py predict``: which inputs a folder holds, the predictions written for them, the progress.

Every output goes through :mod:`harmofl.run_folder`'s atomic writer: a reader or a crash never sees a torn file.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from rich.progress import Progress
from torch import Tensor

from harmofl.data.checks import DataError
from harmofl.data.mri import NIFTI_SUFFIXES
from harmofl.run_folder import atomic_write_bytes, atomic_write_text

CSV_NAME = "predictions.csv"
LOG_EVERY_N_FILES = 100


def list_inputs(source: Path, endings: Sequence[str]) -> tuple[Path, list[Path]]:
    """The input files under ``source`` (a file, or a folder searched recursively; hidden files and folders ignored)
    whose names end with one of ``endings`` (any case), sorted, relative to the returned root folder."""
    endings = tuple(ending.lower() for ending in endings)
    if source.is_file():
        if not source.name.lower().endswith(endings):
            raise DataError(f"{source}: not an input this data source reads (files ending {', '.join(endings)}).")
        return source.parent, [Path(source.name)]
    if not source.is_dir():
        raise DataError(f"Prediction input {str(source)!r} does not exist: give an image file or a folder of them.")
    files = sorted(
        path.relative_to(source)
        for path in source.rglob("*")
        if path.is_file()
        and path.name.lower().endswith(endings)
        and not any(part.startswith(".") for part in path.relative_to(source).parts)
    )
    if not files:
        raise DataError(f"Folder {str(source)!r} holds no input files (ending {', '.join(endings)}).")
    return source, files


def mask_name(relative: Path) -> Path:
    """The mask file of input ``relative``: a NIfTI volume keeps its name, an image becomes ``<stem>.png``."""
    if relative.name.lower().endswith(NIFTI_SUFFIXES):
        return relative
    return relative.with_suffix(".png")


def check_distinct_outputs(inputs: Sequence[Path]) -> None:
    """Refuse inputs whose masks would overwrite each other (``a.jpg`` and ``a.tif`` in one folder)."""
    seen: dict[Path, Path] = {}
    for relative in inputs:
        name = mask_name(relative)
        if name in seen:
            raise DataError(
                f"Inputs {str(seen[name])!r} and {str(relative)!r} would both write the mask {str(name)!r}."
            )
        seen[name] = relative


def resize_images(images: Tensor, size: tuple[int, int]) -> Tensor:
    """``images [N, C, H, W]`` at ``size``: bilinear (antialiased when shrinking)."""
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Class-index ``masks [N, H, W]`` at ``size``, nearest (at pixel centres, aligned with :func:`resize_images`)."""
    if tuple(masks.shape[-2:]) == size:
        return masks
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(masks.dtype)


def probability_table(rows: Sequence[tuple[str, Tensor]], num_classes: int) -> str:
    """``image,class_0,...,class_{K-1},prediction``: each image's class probabilities and their argmax."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *(f"class_{k}" for k in range(num_classes)), "prediction"])
    for name, probabilities in rows:
        values = probabilities.tolist()
        writer.writerow([name, *(f"{value:.6g}" for value in values), int(torch.argmax(probabilities))])
    return buffer.getvalue()


def write_probability_table(folder: Path, rows: Sequence[tuple[str, Tensor]], num_classes: int) -> Path:
    """:func:`probability_table` as ``<folder>/predictions.csv``."""
    path = folder / CSV_NAME
    atomic_write_text(path, probability_table(rows, num_classes))
    return path


def write_png_mask(path: Path, mask: Tensor) -> None:
    """A class-index mask ``[H, W]`` as an 8-bit grey PNG (pixel value = class index)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.to(torch.uint8).cpu().numpy(), mode="L").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_nifti_mask(path: Path, mask: Tensor, like: Path) -> None:
    """A class-index mask volume ``[X, Y, Z]`` as NIfTI (uint8) with the affine and header geometry of ``like``."""
    source = cast(nib.Nifti1Image, nib.load(like))  # NIfTI-2 images are Nifti1Image subclasses
    if tuple(mask.shape) != tuple(source.shape):
        raise ValueError(f"The mask of {like} has shape {tuple(mask.shape)}, the volume {tuple(source.shape)}.")
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    image = type(source)(mask.to(torch.uint8).cpu().numpy(), source.affine, header)
    image.header.set_slope_inter(1.0, 0.0)  # class indices, never scaled by the input's intensity scaling
    data = image.to_bytes()
    atomic_write_bytes(path, gzip.compress(data, mtime=0) if path.name.lower().endswith(".gz") else data)


@contextlib.contextmanager
def progress_reporter(total: int, bar: bool) -> Iterator[Callable[[int], None]]:
    """A function to report files read: a rich progress bar, or one log line per 100 files."""
    if bar:
        with Progress(transient=False) as progress:
            task = progress.add_task("predict", total=total)
            yield lambda done: progress.advance(task, done)
        return
    count = 0

    def advance(done: int) -> None:
        nonlocal count
        count += done
        if count % LOG_EVERY_N_FILES == 0 or count == total:
            rank_zero_info(f"Read {count}/{total} input files.")

    yield advance
