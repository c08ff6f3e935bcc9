"""Client LightningModules: one site's model, loss, metrics and weight-perturbation step."""

from harmofl.clients.base import FederatedClient
from harmofl.clients.classification import ClassificationClient
from harmofl.clients.segmentation import SegmentationClient

__all__ = ["ClassificationClient", "FederatedClient", "SegmentationClient"]
