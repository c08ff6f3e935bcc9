"""HD95 against a brute-force reference, its conventions, and the segmentation client's metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harmofl.clients.segmentation import foreground_segmentation_metrics
from harmofl.segmentation_metrics import HausdorffDistance95, boundary, hausdorff_distance_95


def reference_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it or outside the image, by a plain loop."""
    height, width = mask.shape
    edge = np.zeros_like(mask)
    for y in range(height):
        for x in range(width):
            if mask[y, x]:
                neighbours = [(y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
                edge[y, x] = any(not (0 <= j < height and 0 <= i < width) or not mask[j, i] for j, i in neighbours)
    return edge


def reference_hd95(prediction: np.ndarray, target: np.ndarray) -> float:
    """Every pairwise boundary distance, then the larger directed 95th percentile (numpy's linear rule)."""
    a = torch.tensor(np.argwhere(reference_boundary(prediction)), dtype=torch.float64)
    b = torch.tensor(np.argwhere(reference_boundary(target)), dtype=torch.float64)
    distances = torch.cdist(a, b)
    return float(max(np.percentile(distances.min(1).values, 95), np.percentile(distances.min(0).values, 95)))


def blob(generator: np.random.Generator, size: int = 24) -> np.ndarray:
    """A random union of rectangles: non-convex, sometimes touching the image's edge."""
    mask = np.zeros((size, size), bool)
    for _ in range(3):
        y, x = generator.integers(0, size - 4, 2)
        h, w = generator.integers(2, 10, 2)
        mask[y : y + h, x : x + w] = True
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_hd95_equals_brute_force_pairwise_distances(seed):
    generator = np.random.default_rng(seed)
    prediction, target = blob(generator), blob(generator)
    np.testing.assert_array_equal(boundary(prediction), reference_boundary(prediction))
    assert hausdorff_distance_95(torch.tensor(prediction), torch.tensor(target)) == pytest.approx(
        reference_hd95(prediction, target), abs=1e-9
    )


def test_hd95_conventions_and_spacing():
    square = torch.zeros(10, 20, dtype=torch.bool)
    square[2:6, 3:9] = True
    assert hausdorff_distance_95(square, square) == 0.0
    empty = torch.zeros_like(square)
    assert hausdorff_distance_95(empty, empty) == 0.0
    assert (
        hausdorff_distance_95(square, empty)
        == hausdorff_distance_95(empty, square)
        == pytest.approx(math.hypot(10, 20))
    )
    shifted = torch.roll(square, shifts=3, dims=1)  # every boundary pixel 3 columns away or nearer
    in_pixels = hausdorff_distance_95(square, shifted)
    assert 0 < in_pixels <= 3
    assert hausdorff_distance_95(square, shifted, spacing=[1.0, 0.5]) == pytest.approx(in_pixels / 2)


def test_metric_averages_images_and_classes_it_counts():
    predictions = torch.zeros(3, 12, 12, dtype=torch.long)
    targets = torch.zeros_like(predictions)
    predictions[0, 2:6, 2:6] = 1
    targets[0, 3:7, 2:6] = 1  # image 0, class 1: a poor outline
    targets[1, 0:4, 0:4] = 2  # image 1, class 2: missed entirely -> the diagonal
    # image 2: no foreground anywhere -> not counted
    metric = HausdorffDistance95(num_classes=3)
    metric.update(predictions, targets)
    first = hausdorff_distance_95(predictions[0] == 1, targets[0] == 1)
    assert float(metric.compute()) == pytest.approx((first + math.hypot(12, 12)) / 2, rel=1e-6)
    assert int(metric.count) == 2
    metric.reset()
    assert int(metric.count) == 0 and float(metric.total) == 0.0
    with pytest.raises(ValueError, match="background and a foreground"):
        HausdorffDistance95(num_classes=1)


def test_segmentation_client_reports_dice_iou_hd95():
    metrics = foreground_segmentation_metrics(2)
    predictions = torch.zeros(2, 8, 8, dtype=torch.long)
    targets = torch.zeros_like(predictions)
    targets[0, :4] = 1
    predictions[0, :2] = 1  # image 0: IoU 16/32, Dice 2*16/(16+32); image 1 empty in both
    metrics.update(predictions, targets)
    values = {name: float(value) for name, value in metrics.compute().items()}
    assert values["dice"] == pytest.approx(32 / 48)
    assert values["iou"] == pytest.approx(0.5)  # the empty image is not counted
    assert values["hd95"] == pytest.approx(hausdorff_distance_95(predictions[0] == 1, targets[0] == 1))
