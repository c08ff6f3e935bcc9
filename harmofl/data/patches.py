"""Fixed-size patches of segmentation pairs: tiling, resizing by a magnification factor, and the in-memory dataset.

Each image and its mask are cut into ``size`` squares laid every ``size`` pixels from the top-left corner; where a
side is not a multiple of ``size`` the last row or column is moved back to end at the border (overlapping its
neighbour), so every pixel is covered and every tile is whole. A side shorter than ``size`` is first padded at its
end (bottom / right) by reflection, image and mask alike.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class PatchDataset(Dataset):
    """In-memory patches ``uint8 [N, 3, P, P]`` and masks ``uint8 [N, P, P]``, served as float in [0, 1] and long."""

    def __init__(self, images: Tensor, masks: Tensor) -> None:
        self.images = images
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].float().div_(255.0), self.masks[index].long()


def tile_offsets(length: int, size: int) -> list[int]:
    """Start of every tile along a side of ``length >= size``: every ``size`` pixels, the last flush with the end."""
    starts = list(range(0, length - size + 1, size))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def tile(array: Tensor, size: int) -> Tensor:
    """``array [C, H, W]`` as ``[N, C, size, size]`` tiles, row-major; short sides reflection-padded at the end."""
    pad_h, pad_w = max(0, size - array.shape[1]), max(0, size - array.shape[2])
    if pad_h or pad_w:
        # numpy reflects repeatedly where the pad exceeds the side; torch's reflect pad refuses to.
        array = torch.from_numpy(np.pad(array.numpy(), ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect"))
    corners = itertools.product(tile_offsets(array.shape[1], size), tile_offsets(array.shape[2], size))
    return torch.stack([array[:, y : y + size, x : x + size] for y, x in corners])


def rescale(image: Tensor, mask: Tensor, factor: float) -> tuple[Tensor, Tensor]:
    """``image [C, H, W]`` (bilinear) and ``mask [H, W]`` (nearest) resized by ``factor``, to whole pixels."""
    size = [max(1, round(side * factor)) for side in mask.shape]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    # nearest-exact samples pixel centres, as bilinear with align_corners=False does: image and mask stay aligned.
    mask = F.interpolate(mask[None, None].to(torch.uint8), size=size, mode="nearest-exact")[0, 0]
    return image, mask
