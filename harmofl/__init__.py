"""HarmoFL-Lightning: federated learning for multi-site medical images on PyTorch Lightning."""

from harmofl.clients import ClassificationClient, FederatedClient, SegmentationClient
from harmofl.trainer import FederatedTrainer

__all__ = ["ClassificationClient", "FederatedClient", "FederatedTrainer", "SegmentationClient"]
__version__ = "0.1.0"
