"""The segmentation client: an smp U-Net (or the reference U-Net) with (cross-entropy + Dice) / 2."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.segmentation import DiceScore, MeanIoU

from harmofl.clients.base import FederatedClient
from harmofl.contrastive import Tap
from harmofl.losses import ce_dice_loss
from harmofl.models import create_segmenter
from harmofl.segmentation_metrics import HausdorffDistance95


class SegmentationClient(FederatedClient):
    """Semantic segmentation; metrics ``dice`` (foreground classes, over all pixels of a split: selects the best
    round), ``iou`` (mean over images) and ``hd95`` (95th-percentile Hausdorff distance in pixels, mean over images;
    lower is better): :func:`foreground_segmentation_metrics`.

    Args:
        backbone: ``harmofl_unet`` (the reference U-Net) or any segmentation_models_pytorch encoder name
            (an smp ``Unet`` with that encoder).
        optimizer: the base optimizer; the reference uses Adam (lr 1e-4, weight decay 1e-4).
        **kwargs: the other arguments of :class:`~harmofl.clients.base.FederatedClient`.
    """

    primary_metric = "dice"
    unbounded_metrics = frozenset({"hd95"})
    create_network = staticmethod(create_segmenter)

    def __init__(
        self, backbone: str = "harmofl_unet", optimizer: OptimizerCallable = torch.optim.Adam, **kwargs: Any
    ) -> None:
        super().__init__(backbone=backbone, optimizer=optimizer, **kwargs)

    def build_metrics(self) -> MetricCollection:
        return foreground_segmentation_metrics(self.num_classes)

    def representation_layer(self) -> tuple[str, Tap]:
        # The deepest encoder features, averaged over space: the reference U-Net's bottleneck, smp's encoder.
        return ("bottleneck" if hasattr(self.model, "bottleneck") else "encoder"), "output"

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return ce_dice_loss(logits, targets)

    def update_metrics(self, metrics: MetricCollection, logits: Tensor, targets: Tensor) -> None:
        metrics.update(logits.argmax(dim=1), targets)


def foreground_segmentation_metrics(num_classes: int) -> MetricCollection:
    """The foreground classes' metrics of a split, never synchronized across processes (each evaluates its own
    clients):

    - ``dice``: Dice over every pixel of the split (global, not per image: images without foreground would
      otherwise be undefined);
    - ``iou``: intersection over union per image and foreground class, averaged over the images holding the class
      in their prediction or target (torchmetrics' ``MeanIoU``);
    - ``hd95``: :class:`~harmofl.segmentation_metrics.HausdorffDistance95`, per 2-D image (an MRI slice) in pixels.
    """
    with warnings.catch_warnings():
        # torchmetrics warns about a future change of the default `average`, which is set explicitly here.
        warnings.filterwarnings("ignore", message="DiceScore metric currently defaults")
        dice = DiceScore(
            num_classes=num_classes,
            include_background=False,
            average="micro",
            aggregation_level="global",
            input_format="index",
            sync_on_compute=False,
        )
    iou = MeanIoU(num_classes=num_classes, include_background=False, input_format="index", sync_on_compute=False)
    hd95 = HausdorffDistance95(num_classes=num_classes, sync_on_compute=False)
    return MetricCollection({"dice": dice, "iou": iou, "hd95": hd95})
