"""The classification client: a timm backbone (or the reference DenseNet-121 variant) with cross-entropy."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, MulticlassAccuracy, MulticlassAUROC

from harmofl.clients.base import FederatedClient
from harmofl.models import create_classifier


class ClassificationClient(FederatedClient):
    """Image classification; metrics ``accuracy`` and ``auroc``, the best model chosen by ``accuracy``.

    Args:
        backbone: a name registered in :mod:`harmofl.models` (``harmofl_densenet121``, the reference variant)
            or any ``timm`` model name; always built from random initialization.
        num_classes: number of classes (2 = binary metrics on the positive class's probability).
        in_chans: image channels.
        backbone_kwargs: extra arguments of the backbone, e.g. ``{norm: group}`` for ``harmofl_densenet121``.
        optimizer, alpha, max_grad_norm, weights_path, batch_norm_stats: see :class:`~harmofl.clients.base.FederatedClient`.
    """

    primary_metric = "accuracy"

    def __init__(
        self,
        backbone: str = "harmofl_densenet121",
        num_classes: int = 2,
        in_chans: int = 3,
        backbone_kwargs: Optional[dict[str, Any]] = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        alpha: float = 0.05,
        max_grad_norm: Optional[float] = None,
        weights_path: Optional[str] = None,
        batch_norm_stats: Literal["running", "batch"] = "running",
    ) -> None:
        super().__init__(optimizer, alpha, max_grad_norm, weights_path, batch_norm_stats)
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}.")
        self.num_classes = num_classes
        self.model = create_classifier(backbone, num_classes=num_classes, in_chans=in_chans, **(backbone_kwargs or {}))
        self._finish_init()

    def build_metrics(self) -> MetricCollection:
        if self.num_classes == 2:
            metrics = {"accuracy": BinaryAccuracy(sync_on_compute=False), "auroc": BinaryAUROC(sync_on_compute=False)}
        else:
            metrics = {
                "accuracy": MulticlassAccuracy(self.num_classes, average="micro", sync_on_compute=False),
                "auroc": MulticlassAUROC(self.num_classes, sync_on_compute=False),
            }
        return MetricCollection(metrics)

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets)

    def update_metrics(self, metrics: MetricCollection, logits: Tensor, targets: Tensor) -> None:
        probabilities = logits.float().softmax(dim=1)
        metrics.update(probabilities[:, 1] if self.num_classes == 2 else probabilities, targets)
