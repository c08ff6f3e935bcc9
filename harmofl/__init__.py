"""HarmoFL-Lightning: federated learning for multi-site medical images on PyTorch Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harmofl.clients import ClassificationClient, FederatedClient, SegmentationClient
    from harmofl.trainer import FederatedTrainer

__all__ = ["ClassificationClient", "FederatedClient", "FederatedTrainer", "SegmentationClient"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The public classes on first use: importing a light submodule (``harmofl.flower.app`` in a Flower ClientApp
    process, the pure maths) does not import PyTorch Lightning."""
    if name == "FederatedTrainer":
        from harmofl.trainer import FederatedTrainer

        return FederatedTrainer
    if name in ("ClassificationClient", "FederatedClient", "SegmentationClient"):
        from harmofl import clients

        return getattr(clients, name)
    raise AttributeError(f"module 'harmofl' has no attribute {name!r}")
