"""The classification client: a timm backbone (or the reference DenseNet-121 variant) with cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, MulticlassAccuracy, MulticlassAUROC

from harmofl.clients.base import FederatedClient
from harmofl.contrastive import Tap
from harmofl.models import create_classifier


class ClassificationClient(FederatedClient):
    """Image classification; metrics ``accuracy`` and ``auroc``, the best model chosen by ``accuracy``.

    Args:
        backbone: ``harmofl_densenet121`` (the reference DenseNet-121 variant) or any ``timm`` model name.
        optimizer: the base optimizer; the reference uses SGD (lr 1e-3, momentum 0.9, weight decay 1e-4).
        **kwargs: the other arguments of :class:`~harmofl.clients.base.FederatedClient`; with 2 classes the
            metrics are binary, on the positive class's probability.
    """

    primary_metric = "accuracy"
    create_network = staticmethod(create_classifier)

    def __init__(
        self, backbone: str = "harmofl_densenet121", optimizer: OptimizerCallable = torch.optim.SGD, **kwargs: Any
    ) -> None:
        super().__init__(backbone=backbone, optimizer=optimizer, **kwargs)

    def build_metrics(self) -> MetricCollection:
        if self.num_classes == 2:
            metrics = {"accuracy": BinaryAccuracy(sync_on_compute=False), "auroc": BinaryAUROC(sync_on_compute=False)}
        else:
            metrics = {
                "accuracy": MulticlassAccuracy(self.num_classes, average="micro", sync_on_compute=False),
                "auroc": MulticlassAUROC(self.num_classes, sync_on_compute=False),
            }
        return MetricCollection(metrics)  # type: ignore[arg-type]  # dict[str, Metric] is a valid collection

    def representation_layer(self) -> tuple[str, Tap]:
        # The classifier head's input: the pooled features (timm's pre-logits), as MOON uses.
        head = self.model.get_classifier() if hasattr(self.model, "get_classifier") else self.model.classifier  # type: ignore[operator]
        name = next((name for name, module in self.model.named_modules() if module is head), None)
        if not name:
            raise ValueError(f"Cannot locate the classifier head of {type(self.model).__name__} for MOON.")
        return name, "input"

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets)

    def update_metrics(self, metrics: MetricCollection, logits: Tensor, targets: Tensor) -> None:
        probabilities = logits.float().softmax(dim=1)
        metrics.update(probabilities[:, 1] if self.num_classes == 2 else probabilities, targets)
