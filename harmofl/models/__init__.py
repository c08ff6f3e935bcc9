"""Networks: HarmoFL's reference DenseNet-121 and U-Net, and factories by name (timm, smp)."""

from __future__ import annotations

from harmofl.models.norm import NORM_KINDS, norm_layer, use_batch_statistics
from harmofl.models.registry import (
    create_classifier,
    create_segmenter,
    list_registered,
    register_classifier,
    register_segmenter,
)

__all__ = [
    "NORM_KINDS",
    "create_classifier",
    "create_segmenter",
    "list_registered",
    "norm_layer",
    "register_classifier",
    "register_segmenter",
    "use_batch_statistics",
]
