"""The decoded cache: a client split's image files decoded once into a memory map, so that later epochs and runs read
pixels instead of decoding PNG or JPEG files again (``data.decoded_cache``).

An entry is two files: ``<folder>/images-<key>.bin``, every image's pixels as PIL decoded them (8- or 16-bit, each
image at an 8-byte-aligned offset), and ``images-<key>.pt``, its index (offsets, shapes, dtypes and a CRC-32 per
image), written last and atomically, so that an index exists only beside a complete data file. ``key`` hashes the
image channels and every file's path, size and modification time: an edited, replaced or touched file makes a new
entry, decoded again through the strict reader, so a cached entry never stands in for a changed file. An index
that cannot be read or does not match its data file is rebuilt; an image whose bytes no longer match their CRC
(the cache's own disk damaged) is an error naming the entry to delete.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from harmofl.data.cache import entry_path, read_entry, user_cache_dir, write_entry
from harmofl.data.checks import DataError
from harmofl.data.image_io import decode_image, image_tensor, resize
from harmofl.run_folder import atomic_file

# Part of every key: bump it whenever what an entry stores changes.
DECODED_CACHE_FORMAT = 1
DECODED_CACHE_KEY_DIGITS = 24
DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))  # what decode_image returns
ALIGN = 8


def cache_folder(folder: str | None) -> Path:
    """``data.decoded_cache_dir``, or ``$XDG_CACHE_HOME/harmofl/decoded`` (``~/.cache/harmofl/decoded``) when null."""
    return Path(folder).expanduser() if folder is not None else user_cache_dir("decoded")


def entry_for(folder: Path, paths: list[Path], channels: int) -> Path:
    """The index file of the entry of ``paths`` decoded with ``channels``: keyed on every file's identity."""
    identity = hashlib.sha256()
    for path in paths:
        info = path.stat()
        identity.update(f"{path.resolve()}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
    settings = {"format": DECODED_CACHE_FORMAT, "channels": channels, "files": identity.hexdigest()}
    return entry_path(folder, "images", settings, DECODED_CACHE_KEY_DIGITS)


def data_file(index: Path) -> Path:
    """The data file beside an entry's index."""
    return index.with_suffix(".bin")


def write_decoded(index: Path, paths: list[Path], channels: int) -> None:
    """Decode ``paths`` (strictly: a bad file raises :class:`DataError` naming it) into a new entry at ``index``."""
    offsets, shapes, dtypes, crcs = [0], [], [], []
    with atomic_file(data_file(index)) as handle:
        for path in paths:
            array = np.ascontiguousarray(decode_image(path, channels))
            raw = array.tobytes()
            padding = -len(raw) % ALIGN
            handle.write(raw + bytes(padding))
            offsets.append(offsets[-1] + len(raw) + padding)
            shapes.append([*array.shape, 0][:3])  # [H, W, C]; C = 0 for a grey image
            dtypes.append(DTYPES.index(array.dtype))
            crcs.append(zlib.crc32(raw))
    write_entry(
        index,
        {
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "shapes": torch.tensor(shapes, dtype=torch.int64).reshape(-1, 3),
            "dtypes": torch.tensor(dtypes, dtype=torch.uint8),
            "crcs": torch.tensor(crcs, dtype=torch.int64),
        },
    )


def read_index(index: Path, count: int) -> dict[str, Tensor] | None:
    """An entry's index when it is whole and matches its data file (``count`` images), else None."""
    try:
        entry = read_entry(index)
        offsets = entry["offsets"]
        whole = len(offsets) == count + 1 and all(len(entry[key]) == count for key in ("shapes", "dtypes", "crcs"))
        if whole and data_file(index).stat().st_size == int(offsets[-1]):
            return entry
    except Exception:  # a damaged or foreign index: the caller decodes again
        pass
    return None


class DecodedImageFiles(Dataset):
    """Labelled images served from a decoded-cache entry (its first ``len(labels)`` images): item ``i`` is ``(image
    [C, S, S] float in [0, 1], label long [])``, equal to :class:`~harmofl.data.image_files.ImageFiles`' item (the
    same pixels, the same conversion).

    Args:
        index: the entry's index file.
        entry: its index, read (:func:`read_index`).
        labels: int64 class index per image.
        image_size: side S every image is resized to (bilinear) when it differs.
    """

    def __init__(self, index: Path, entry: dict[str, Tensor], labels: np.ndarray, image_size: int) -> None:
        self.index, self.entry, self.labels, self.image_size = index, entry, labels, image_size
        self._pixels: np.memmap | None = None  # mapped on first use, in each process

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, item: int) -> np.ndarray:
        """Image ``item``'s decoded pixels, checked against their CRC."""
        if self._pixels is None:
            self._pixels = np.memmap(data_file(self.index), dtype=np.uint8, mode="r")
        start = int(self.entry["offsets"][item])
        height, width, channels = self.entry["shapes"][item].tolist()
        dtype = DTYPES[int(self.entry["dtypes"][item])]
        raw = self._pixels[start : start + height * width * max(channels, 1) * dtype.itemsize]
        if zlib.crc32(raw) != int(self.entry["crcs"][item]):  # type: ignore[arg-type]  # numpy's stubs: no buffer
            raise DataError(
                f"The decoded cache entry {str(self.index)!r} is damaged (image {item} fails its checksum): delete "
                f"{self.index.name} and {data_file(self.index).name} to decode the images again."
            )
        shape = (height, width, channels) if channels else (height, width)
        return raw.view(dtype).reshape(shape)

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor]:
        image = image_tensor(self.pixels(item))
        return resize(image, self.image_size), torch.tensor(self.labels[item], dtype=torch.long)


def decoded_dataset(
    folder: str | None,
    paths: list[Path],
    labels: np.ndarray,
    channels: int,
    image_size: int,
    check: Callable[[], None] = lambda: None,
) -> DecodedImageFiles:
    """The first ``len(labels)`` images of ``paths``, from their entry in ``folder`` (:func:`cache_folder`), made when
    absent or damaged: ``check()`` (the loader's integrity check, raising on a bad file) then strict decoding.
    Raises :class:`DataError` naming a bad file, or where the cache cannot be written."""
    index = entry_for(cache_folder(folder), paths, channels)
    entry = read_index(index, len(paths))
    if entry is None:
        check()
        try:
            write_decoded(index, paths, channels)
        except OSError as error:
            raise DataError(
                f"Cannot write the decoded cache {str(index)!r} ({error}): set data.decoded_cache_dir to a writable "
                "folder, or data.decoded_cache false."
            ) from error
        entry = read_index(index, len(paths))
        if entry is None:
            raise DataError(f"The decoded cache entry {str(index)!r} was written but cannot be read back.")
    return DecodedImageFiles(index, entry, labels, image_size)
