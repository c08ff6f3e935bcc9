"""The data contract between a federation's sites and the orchestrator.

A :class:`FederatedDataModule` holds one dataset per client (site) and split. The orchestrator
never sees more than one client's loader at a time, and raw samples never leave the client
that owns them. Every batch is a pair ``(images, targets)``: ``images`` is a float tensor
``[B, C, H, W]``; ``targets`` is a long tensor ``[B]`` of class indices (classification) or
``[B, H, W]`` of per-pixel class indices (segmentation).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from harmofl.data.checks import BadSamplePolicy, check_at_least, check_bad_sample_policy

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class FederatedDataModule(LightningDataModule):
    """Base class of every federated data source: one dataset per client and split.

    Subclasses build their datasets in :meth:`setup` and implement :attr:`client_names` and
    :meth:`dataset`. Loaders are made on demand, per client and split; the training loader's
    order comes from the ``generator`` the orchestrator passes, so that data order is seeded
    per round and per client.

    The loader options below are every data source's; a subclass takes them as ``**loader`` and passes them on
    (the command line reads them, with their documentation, from here), declaring one itself only to change its
    default.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation and test batch size; ``batch_size`` when null.
        num_workers: loader worker processes.
        pin_memory: whether loaders pin memory.
    """

    def __init__(
        self, batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        super().__init__()
        check_at_least("batch_size", batch_size, 1)
        check_at_least("eval_batch_size", eval_batch_size, 1, nullable=True)
        check_at_least("num_workers", num_workers, 0)
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
        """The number of samples of one client's split; valid after :meth:`setup`."""
        return len(self.dataset(client, split))  # type: ignore[arg-type]

    def dataloader(self, client: str, split: Split, generator: torch.Generator | None = None) -> DataLoader:
        """A loader over one client's split: shuffled with ``generator`` for training, in order otherwise."""
        return self._loader(self.dataset(client, split), split == "train", generator)

    def pooled_dataloader(self, clients: Sequence[str], generator: torch.Generator | None = None) -> DataLoader:
        """A shuffled training loader over the union of ``clients``' training data (centralized training)."""
        if not clients:
            raise ValueError("Pooled training needs at least one client's training data.")
        return self._loader(ConcatDataset([self.dataset(client, "train") for client in clients]), True, generator)

    def _loader(self, dataset: Dataset, training: bool, generator: torch.Generator | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if training else self.eval_batch_size,
            shuffle=training,
            generator=generator if training else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )


class FileFederation(FederatedDataModule):
    """Base class of the data sources read from files: every sample is checked before training.

    Args:
        on_bad_sample: ``error`` stops at the first bad sample (a missing, unreadable or inconsistent file) with
            an error naming it; ``skip`` leaves bad samples out and counts them per client in ``skipped``.
    """

    def __init__(self, on_bad_sample: BadSamplePolicy = "error", **loader: Any) -> None:
        super().__init__(**loader)
        self.on_bad_sample = check_bad_sample_policy(on_bad_sample)
        #: Bad samples left out per client (``on_bad_sample="skip"``), filled by :meth:`setup`.
        self.skipped: dict[str, int] = {}
