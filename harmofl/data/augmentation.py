"""Training-time augmentation: random 90° rotations, flips, a small affine warp and colour jitter (pure torch).

Each sample of a training batch gets its own transform. The parameters are drawn on the CPU from a generator derived
from the client's round seed (:func:`augmentation_generator`), then moved to the batch's device, so that a run draws
the same transforms on any device, with any number of loader workers and in any process layout, and a resumed run
exactly those of an uninterrupted one. The orchestrator augments in the main process, on the device, before the
callbacks' ``transform_batch`` and batch hooks (harmonization sees augmented images, as in the reference code, whose
loader augments). Segmentation masks (targets ``[B, H, W]``) get the same geometric transform as their images, nearest
neighbour, and stay class indices; class labels (``[B]``) and validation / test batches are never touched.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

# Columns of a batch's draw (one uniform number per sample and column): every column is drawn whatever the settings,
# so that turning one transform on or off never changes another's parameters.
TURN, FLIP_H, FLIP_V, ANGLE, SCALE, SHIFT_X, SHIFT_Y, BRIGHTNESS, CONTRAST, SATURATION = range(10)
DRAW_COLUMNS = 10
LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's grayscale
Transform = Callable[[Tensor], Tensor]


def augmentation_generator(seed: int) -> torch.Generator:
    """The CPU generator of a client's augmentation in one round, derived from the seed of its data order as a
    separate named stream (the order's draws and the augmentation's never overlap). Derived, never carried: a
    resumed run draws what an uninterrupted one draws."""
    return torch.Generator().manual_seed(random.Random(f"augmentation/{seed}").getrandbits(63))


@dataclass(frozen=True)
class Augmentation:
    """Which random transforms a data module's training batches get; all off by default.

    Applied in this order, each with its own parameters per sample: a 90° rotation, flips, an affine warp, colour
    jitter. Pixels an affine warp brings in from outside the image are 0 (background, class 0, in masks).

    Args:
        flip: flip each sample horizontally with probability 1/2 and, independently, vertically with probability
            1/2 (the four outcomes equally likely, as the reference prostate loader's ``cv2.flip``: probability
            3/4, then vertical, horizontal or both).
        rotate90: rotate each sample by a multiple of 90°; square images only.
        rotate90_weights: relative probabilities of 0°, 90°, 180° and 270° (counter-clockwise, ``torch.rot90``).
            ``[1, 1, 1, 1]`` is uniform; the reference prostate loader draws ``np.rot90(image, randint(0, 4))``,
            so no turn twice as often: ``[2, 1, 1, 1]``.
        affine_degrees: largest rotation either way, in degrees (uniform in ``[-d, d]``; 0: none).
        affine_scale: zoom factor range ``(low, high)``, uniform (``(1, 1)``: none).
        affine_translate: largest shift either way, as a fraction of the width (horizontally) and height
            (vertically), each uniform in ``[-t, t]``. Images are resampled bilinearly, masks nearest.
        color_jitter: brightness, contrast and saturation factors each uniform in ``[1 - j, 1 + j]``, images only
            (``j < 1``); saturation only for 3-channel (RGB) images. Intensities are not clipped: their range is
            the data source's.
    """

    flip: bool = False
    rotate90: bool = False
    rotate90_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    affine_degrees: float = 0.0
    affine_scale: tuple[float, float] = (1.0, 1.0)
    affine_translate: float = 0.0
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        # A list from Python or YAML becomes the declared tuple (the instance stays hashable and comparable).
        object.__setattr__(self, "rotate90_weights", tuple(float(w) for w in self.rotate90_weights))
        object.__setattr__(self, "affine_scale", tuple(float(s) for s in self.affine_scale))
        weights, scale = self.rotate90_weights, self.affine_scale
        if len(weights) != 4 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"data.augmentation.rotate90_weights must be 4 non-negative weights (0°, 90°, 180°, 270°) with a "
                f"positive sum, got {list(weights)}."
            )
        if not 0 <= self.affine_degrees <= 180:
            raise ValueError(
                f"data.augmentation.affine_degrees must be in [0, 180] (the largest rotation either way), got "
                f"{self.affine_degrees}."
            )
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(
                f"data.augmentation.affine_scale must be [low, high] with 0 < low <= high, got {list(scale)}: "
                "write the smaller factor first."
            )
        for name in ("affine_translate", "color_jitter"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"data.augmentation.{name} must be in [0, 1), got {getattr(self, name)}.")

    @property
    def warps(self) -> bool:
        """Whether the affine warp is on (any of its ranges is not the identity)."""
        return self.affine_degrees > 0 or self.affine_scale != (1.0, 1.0) or self.affine_translate > 0

    @property
    def enabled(self) -> bool:
        """Whether any transform is on (off: batches pass untouched and nothing is drawn)."""
        return self.flip or self.rotate90 or self.warps or self.color_jitter > 0

    def draw(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """One batch's uniform numbers ``[batch_size, DRAW_COLUMNS]`` (CPU, float32), one row per sample."""
        return torch.rand(batch_size, DRAW_COLUMNS, generator=generator)

    def __call__(self, images: Tensor, targets: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(images [B, C, H, W], targets)`` augmented with parameters drawn from ``generator`` (CPU)."""
        return self.apply(images, targets, self.draw(images.shape[0], generator))

    def apply(self, images: Tensor, targets: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
        """``(images, targets)`` transformed by the parameters that :meth:`draw`'s ``uniforms`` (CPU) give.

        ``targets`` of shape ``[B, H, W]`` (a segmentation mask per image) get the images' geometric transforms;
        others (class labels) pass through."""
        height, width = images.shape[-2:]
        masks = targets if targets.shape == (images.shape[0], height, width) else None
        for transform in self._geometric(uniforms, height, width, images.device):
            images = transform(images)
            masks = None if masks is None else transform(masks)
        if self.color_jitter > 0:
            factors = 1 + (2 * uniforms[:, BRIGHTNESS : SATURATION + 1] - 1) * self.color_jitter
            images = jitter_colour(images, factors.to(images.device, images.dtype))
        return images, targets if masks is None else masks

    def _geometric(self, uniforms: Tensor, height: int, width: int, device: torch.device) -> list[Transform]:
        """The geometric transforms that are on, in order, their parameters computed on the CPU and moved."""
        transforms: list[Transform] = []
        if self.rotate90:
            if height != width:
                raise ValueError(
                    f"data.augmentation.rotate90 needs square images (a quarter turn changes the shape), got "
                    f"{height}x{width}: turn it off, or use affine_degrees."
                )
            cumulative = torch.tensor(self.rotate90_weights).cumsum(0)
            turns = torch.searchsorted(cumulative / cumulative[-1], uniforms[:, TURN].contiguous(), right=True)
            transforms.append(partial(rotate90, turns=turns.clamp(max=3).to(device)))
        if self.flip:
            for column, dim in ((FLIP_H, -1), (FLIP_V, -2)):
                transforms.append(partial(flip, chosen=(uniforms[:, column] < 0.5).to(device), dim=dim))
        if self.warps:
            transforms.append(partial(warp, theta=affine_matrices(self._affine_parameters(uniforms), height, width)))
        return transforms

    def _affine_parameters(self, uniforms: Tensor) -> Tensor:
        """Per sample: angle (radians), scale, horizontal and vertical shift (fractions of width and height)."""
        low, high = self.affine_scale
        angles = (2 * uniforms[:, ANGLE] - 1) * math.radians(self.affine_degrees)
        scales = low + uniforms[:, SCALE] * (high - low)
        shifts = (2 * uniforms[:, SHIFT_X : SHIFT_Y + 1] - 1) * self.affine_translate
        return torch.cat([angles[:, None], scales[:, None], shifts], dim=1)


#: Every transform off: the data modules' default.
NO_AUGMENTATION = Augmentation()


def rotate90(x: Tensor, turns: Tensor) -> Tensor:
    """Each sample of ``x [B, ..., H, W]`` (H = W) rotated by ``turns[b]`` quarter turns, as ``torch.rot90``."""
    rotated = x.clone()
    for k in (1, 2, 3):
        chosen = (turns == k).nonzero().flatten()
        rotated[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
    return rotated


def flip(x: Tensor, chosen: Tensor, dim: int) -> Tensor:
    """``x [B, ...]`` with the samples where ``chosen [B]`` (bool) is true flipped along ``dim``."""
    return torch.where(chosen.view(-1, *[1] * (x.dim() - 1)), x.flip(dim), x)


def affine_matrices(parameters: Tensor, height: int, width: int) -> Tensor:
    """``F.affine_grid``'s matrices ``[B, 2, 3]`` (output → input, normalized coordinates) of the pixel-space maps
    "rotate by angle and scale about the centre, then shift": ``parameters [B, 4]`` are angle (radians), scale and
    shifts as fractions of width and height. Rotations are true rotations on non-square images too."""
    angle, scale, shift = parameters[:, 0], parameters[:, 1], parameters[:, 2:]
    cos, sin = torch.cos(angle), torch.sin(angle)
    aspect = height / width  # normalized coordinates stretch x by W/2 and y by H/2: undo it around the rotation
    inverse = torch.stack(
        [torch.stack([cos, sin * aspect], -1), torch.stack([-sin / aspect, cos], -1)], dim=-2
    ) / scale.view(-1, 1, 1)
    offset = -(inverse @ (2 * shift)[..., None])  # a shift by a fraction f of the side is 2f in normalized units
    return torch.cat([inverse, offset], dim=-1)


def warp(x: Tensor, theta: Tensor) -> Tensor:
    """``x`` resampled through ``theta [B, 2, 3]`` (:func:`affine_matrices`, moved to ``x``'s device), zero outside:
    images ``[B, C, H, W]`` bilinearly; masks ``[B, H, W]`` of class indices nearest, keeping their dtype."""
    if x.dim() == 3:  # masks: through float32 (exact for class indices), nearest, back to their integer type
        values = x[:, None].float()
        return _resample(values, theta.to(x.device, values.dtype), "nearest")[:, 0].round().to(x.dtype)
    return _resample(x, theta.to(x.device, x.dtype), "bilinear")


def _resample(x: Tensor, theta: Tensor, mode: str) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def jitter_colour(images: Tensor, factors: Tensor) -> Tensor:
    """``images [B, C, H, W]`` with brightness, contrast and saturation scaled by ``factors [B, 3]`` in this order,
    as torchvision's ``adjust_*`` without clipping; saturation only for 3-channel images."""
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    images = images * brightness
    mean = grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    images = (images - mean) * contrast + mean
    if images.shape[1] == 3:
        gray = grayscale(images)
        images = (images - gray) * saturation + gray
    return images


def grayscale(images: Tensor) -> Tensor:
    """The luminance ``[B, 1, H, W]`` of RGB images; the channels' mean for any other number of channels."""
    if images.shape[1] != 3:
        return images.mean(dim=1, keepdim=True)
    weights = torch.tensor(LUMINANCE, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)
