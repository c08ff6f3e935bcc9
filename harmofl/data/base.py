"""The data contract between a federation's sites and the orchestrator.

A :class:`FederatedDataModule` holds one dataset per client (site) and split. The orchestrator
never sees more than one client's loader at a time, and raw samples never leave the client
that owns them. Every batch is a pair ``(images, targets)``: ``images`` is a float tensor
``[B, C, H, W]``; ``targets`` is a long tensor ``[B]`` of class indices (classification) or
``[B, H, W]`` of per-pixel class indices (segmentation).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal, Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class FederatedDataModule(LightningDataModule):
    """Base class of every federated data source: one dataset per client and split.

    Subclasses build their datasets in :meth:`setup` and implement :attr:`client_names` and
    :meth:`dataset`. Loaders are made on demand, per client and split; the training loader's
    order comes from the ``generator`` the orchestrator passes, so that data order is seeded
    per round and per client.
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1 or null, got {eval_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Filled by `setup`, one entry per (client, split); empty until then.
        self._datasets: dict[tuple[str, Split], Dataset] = {}

    @property
    @abstractmethod
    def client_names(self) -> list[str]:
        """The clients (sites) of the federation, in a fixed order."""

    def dataset(self, client: str, split: Split) -> Dataset:
        """The dataset of one client's split; valid after :meth:`setup`."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
        if not self._datasets:
            raise RuntimeError(f"{type(self).__name__}.dataset() needs setup() first.")
        if client not in self.client_names:
            raise KeyError(f"Unknown client {client!r}; the clients are {self.client_names}.")
        return self._datasets[(client, split)]

    def num_samples(self, client: str, split: Split) -> int:
        return len(self.dataset(client, split))  # type: ignore[arg-type]

    def dataloader(self, client: str, split: Split, generator: Optional[torch.Generator] = None) -> DataLoader:
        """A loader over one client's split: shuffled with ``generator`` for training, in order otherwise."""
        return self._loader(self.dataset(client, split), split == "train", generator)

    def pooled_dataloader(self, clients: Sequence[str], generator: Optional[torch.Generator] = None) -> DataLoader:
        """A shuffled training loader over the union of ``clients``' training data (centralized training)."""
        if not clients:
            raise ValueError("Pooled training needs at least one client's training data.")
        return self._loader(ConcatDataset([self.dataset(client, "train") for client in clients]), True, generator)

    def _loader(self, dataset: Dataset, training: bool, generator: Optional[torch.Generator]) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if training else self.eval_batch_size,
            shuffle=training,
            generator=generator if training else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
