"""Boundary distance of a segmentation: the 95th-percentile Hausdorff distance (HD95) as a torchmetrics metric.

torchmetrics' ``HausdorffDistance`` reports the maximum, which a single stray pixel decides; HD95 (the 95th
percentile of the symmetric boundary distances) is what segmentation papers report. Distances are exact Euclidean
distance transforms (scipy's, linear in the pixels: torchmetrics' own is quadratic in memory, gigabytes for one
256² image), in pixels or in ``spacing`` units.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric


def hausdorff_distance_95(prediction: Tensor, target: Tensor, spacing: list[float] | None = None) -> float:
    """HD95 between two binary masks ``[H, W]`` (or ``[D, H, W]``): the larger of the two directed 95th
    percentiles of the distances from each boundary pixel of one mask to the nearest boundary pixel of the other.

    Conventions where a boundary is missing: both masks empty → 0 (nothing to find, nothing found); exactly one
    empty → the image's diagonal, the largest distance it can hold (a missed or hallucinated structure must not
    score better than a poor outline of it).
    """
    prediction, target = prediction.bool(), target.bool()
    if not prediction.any() and not target.any():
        return 0.0
    if not prediction.any() or not target.any():
        scale = spacing or [1.0] * prediction.ndim
        return math.sqrt(sum((size * step) ** 2 for size, step in zip(prediction.shape, scale, strict=True)))
    prediction_boundary, target_boundary = boundary(prediction.numpy()), boundary(target.numpy())
    # The distance of every pixel to the nearest boundary pixel of the other mask, read at this mask's boundary.
    to_target = ndimage.distance_transform_edt(~target_boundary, sampling=spacing)[prediction_boundary]
    to_prediction = ndimage.distance_transform_edt(~prediction_boundary, sampling=spacing)[target_boundary]
    return float(max(np.percentile(to_target, 95), np.percentile(to_prediction, 95)))


def boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of a boolean ``mask`` with a neighbour (4-connected in 2-D, 6- in 3-D) outside it or beyond the
    image's edge."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


class HausdorffDistance95(Metric):
    """Mean HD95 over images and foreground classes (:func:`hausdorff_distance_95` per image and class).

    ``update(predictions, targets)`` takes class indices ``[N, H, W]`` (or ``[N, D, H, W]``); each image
    contributes one value per foreground class that its prediction or target holds (classes absent from both are
    not counted, as Dice leaves them undefined). ``compute`` returns 0 when nothing was counted.

    Args:
        num_classes: classes, background (index 0) included.
        spacing: the physical size of a pixel along each spatial axis; None: distances in pixels.
    """

    full_state_update = False
    higher_is_better = False
    total: Tensor
    count: Tensor

    def __init__(self, num_classes: int, spacing: list[float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"HausdorffDistance95 needs a background and a foreground class, got {num_classes}.")
        self.num_classes, self.spacing = num_classes, spacing
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Tensor, targets: Tensor) -> None:
        if predictions.shape != targets.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ.")
        for prediction, target in zip(predictions.cpu(), targets.cpu(), strict=True):
            for cls in range(1, self.num_classes):
                predicted, expected = prediction == cls, target == cls
                if predicted.any() or expected.any():
                    self.total += hausdorff_distance_95(predicted, expected, self.spacing)
                    self.count += 1

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()
