"""The segmentation client: an smp U-Net (or the reference U-Net) with (cross-entropy + Dice) / 2."""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.segmentation import DiceScore

from harmofl.clients.base import FederatedClient
from harmofl.losses import ce_dice_loss
from harmofl.models import create_segmenter


class SegmentationClient(FederatedClient):
    """Semantic segmentation; metric ``dice`` (foreground classes, over all pixels of a split).

    Args:
        backbone: ``harmofl_unet`` (the reference U-Net) or any segmentation_models_pytorch encoder name
            (an smp ``Unet`` with that encoder); always built from random initialization.
        num_classes: number of classes including background (index 0).
        in_chans: image channels (3 for the reference's 2.5D MRI input).
        backbone_kwargs: extra arguments of the network, e.g. ``{base_features: 16}`` for ``harmofl_unet``.
        optimizer, alpha, max_grad_norm, weights_path, batch_norm_stats: see :class:`~harmofl.clients.base.FederatedClient`.
    """

    primary_metric = "dice"

    def __init__(
        self,
        backbone: str = "harmofl_unet",
        num_classes: int = 2,
        in_chans: int = 3,
        backbone_kwargs: Optional[dict[str, Any]] = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        alpha: float = 0.05,
        max_grad_norm: Optional[float] = None,
        weights_path: Optional[str] = None,
        batch_norm_stats: Literal["running", "batch"] = "running",
    ) -> None:
        super().__init__(optimizer, alpha, max_grad_norm, weights_path, batch_norm_stats)
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2 (background and foreground), got {num_classes}.")
        self.num_classes = num_classes
        self.model = create_segmenter(backbone, num_classes=num_classes, in_chans=in_chans, **(backbone_kwargs or {}))
        self._finish_init()

    def build_metrics(self) -> MetricCollection:
        # Global (not per-image) Dice: images without foreground would otherwise be undefined.
        with warnings.catch_warnings():
            # torchmetrics warns about a future change of the default `average`, which is set explicitly here.
            warnings.filterwarnings("ignore", message="DiceScore metric currently defaults")
            dice = DiceScore(
                num_classes=self.num_classes,
                include_background=False,
                average="micro",
                aggregation_level="global",
                input_format="index",
                sync_on_compute=False,
            )
        return MetricCollection({"dice": dice})

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return ce_dice_loss(logits, targets)

    def update_metrics(self, metrics: MetricCollection, logits: Tensor, targets: Tensor) -> None:
        metrics.update(logits.argmax(dim=1), targets)
