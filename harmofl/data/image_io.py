"""Image files in and out of tensors: reading images and masks, integrity checks, resizing, listing.

Every file is opened through :func:`_strictly_opened`: an image above PIL's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``) and a file whose data ends early are errors naming the file, never a warning, an
exhausted machine or a silently grey-filled image.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch import Tensor

from harmofl.data.checks import DataError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_TOO_LARGE = (Image.DecompressionBombError, Image.DecompressionBombWarning)
# What PIL raises for a missing, truncated, corrupt or oversized file (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, *_TOO_LARGE)


@contextmanager
def _strictly_opened(path: Path) -> Iterator[Image.Image]:
    """``path`` opened by PIL with its safety checks made errors.

    PIL only warns about an image above ``Image.MAX_IMAGE_PIXELS`` (it raises above twice that): here both raise.
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is held False while the file is in use, whatever another library set, so
    that decoding a truncated file raises instead of filling the missing rows with grey.
    """
    truncated_allowed = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_allowed


def _problem(what: str, error: BaseException) -> str:
    """Why an image could not be read, and, for one too large to decode safely, what to do."""
    if isinstance(error, _TOO_LARGE):
        return (
            f"{what} too large to decode safely ({error}; the limit is PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS}): cut it into smaller image files (this loader's inputs are patches), or, if "
            "the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS deliberately before the run"
        )
    return f"unreadable {what} ({type(error).__name__}: {error})"


def read_image(path: Path, channels: int = 3) -> Tensor:
    """An image file as float32 ``[C, H, W]`` in ``[0, 1]`` (8- and 16-bit; grey or RGB as ``channels`` asks).

    Raises :class:`DataError` naming the file if it is unreadable, truncated or above PIL's decompression-bomb limit.
    """
    return image_tensor(decode_image(path, channels))


def decode_image(path: Path, channels: int = 3) -> np.ndarray:
    """An image file's pixels as PIL decodes them: ``[H, W, 3]`` (RGB) or ``[H, W]`` (grey), uint8 or uint16.

    Raises :class:`DataError` naming the file if it is unreadable, truncated or above PIL's decompression-bomb limit.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}.")
    try:
        with _strictly_opened(path) as opened:
            image: Image.Image = opened
            if channels == 3:
                image = opened.convert("RGB")
            elif opened.mode not in ("L", "I;16"):  # keep 16-bit grey as it is
                image = opened.convert("L")
            return np.asarray(image)
    except _DECODE_ERRORS as error:
        raise DataError(f"{path}: {_problem('image', error)}.") from error


def image_tensor(array: np.ndarray) -> Tensor:
    """Decoded pixels (:func:`decode_image`) as float32 ``[C, H, W]`` in ``[0, 1]``."""
    scale = 65535.0 if array.dtype == np.uint16 else 255.0 if array.dtype == np.uint8 else 1.0
    tensor = torch.from_numpy(array.astype(np.float32) / scale)
    return tensor.permute(2, 0, 1).contiguous() if tensor.ndim == 3 else tensor.unsqueeze(0)


def read_mask(path: Path) -> Tensor:
    """A mask file as long ``[H, W]`` of {0, 1}: any non-zero value (binary or instance labels) is foreground.

    Raises :class:`DataError` naming the file, as :func:`read_image` does.
    """
    try:
        with _strictly_opened(path) as image:
            array = np.asarray(image)
    except _DECODE_ERRORS as error:
        raise DataError(f"{path}: {_problem('mask', error)}.") from error
    if array.ndim == 3:  # an RGB(A) label image: foreground wherever any colour channel is set
        array = array[..., :3].max(axis=-1)
    return torch.from_numpy((array > 0).astype(np.int64))


def image_is_intact(path: Path, verify: bool = True) -> str | None:
    """None if ``path`` exists and, when ``verify``, decodes in full; else why not.

    PIL's ``verify()`` checks a PNG's chunk checksums but passes truncated JPEG and TIFF files, so the check also
    decodes every pixel (truncated data raises) and refuses images above PIL's decompression-bomb limit.
    """
    if not path.is_file():
        return "file is missing"
    if not verify:
        return None
    try:
        with _strictly_opened(path) as image:
            image.verify()
        with _strictly_opened(path) as image:  # verify() leaves the image unusable: open it again to decode
            image.load()
    except _TOO_LARGE as error:
        return _problem("image", error)
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
