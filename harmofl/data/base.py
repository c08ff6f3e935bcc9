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
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import Dataset

from harmofl.data.augmentation import NO_AUGMENTATION, Augmentation
from harmofl.data.checks import BadSamplePolicy, check_at_least, check_bad_sample_policy
from harmofl.data.image_io import IMAGE_SUFFIXES, read_image
from harmofl.data.loaders import LoaderOptions, LoaderPool, SplitLoader

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class FederatedDataModule(LightningDataModule):
    """Base class of every federated data source: one dataset per client and split.

    :meth:`setup` finds the clients and what is cheap to know of every one (its files, splits and sample counts);
    a client's samples are loaded (read, decoded, checked) when :meth:`dataset` first asks for one of its splits,
    so that each process loads only the clients it trains or evaluates (:meth:`load` loads some now). Subclasses
    implement :attr:`client_names`, :meth:`setup` and :meth:`load_client_datasets` (or fill every client's datasets in
    :meth:`setup`), and override :meth:`num_samples` where a count is known before loading.

    Loaders are made on demand, per client and split; the training loader's order comes from the ``generator``
    the orchestrator passes, so that data order is seeded per round and per client. Every loader of a process
    reads through one pool (:class:`~harmofl.data.loaders.LoaderPool`): with ``num_workers > 0`` its workers start
    once and serve every client, split and round, and the batches are exactly those of a loader made per round.

    The loader options below are every data source's; a subclass takes them as ``**loader`` and passes them on
    (the command line reads them, with their documentation, from here), declaring one itself only to change its
    default.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation and test batch size; ``batch_size`` when null.
        num_workers: loader worker processes, started once per process (not per client, split or round).
        pin_memory: whether loaders pin memory.
        decoded_cache: keep the decoded pixels of image files (``SiteFolders``, ``Camelyon17``) in an 8/16-bit
            memory map per client split, so that epochs and runs after the first never decode a PNG or JPEG again
            (:mod:`harmofl.data.decoded_cache`; entries keyed on the settings and every file's size and
            modification time, so an edited file is decoded again). Sources that hold decoded samples in memory
            (demo, prostate MRI, segmentation folders) have nothing to cache.
        decoded_cache_dir: where the decoded cache lives; null: ``$XDG_CACHE_HOME/harmofl/decoded``
            (``~/.cache/harmofl/decoded``). It takes about C×H×W bytes per image (27 kB per 96×96 RGB patch).
        augmentation: random transforms of the training batches (:class:`~harmofl.data.augmentation.Augmentation`:
            flips, 90° rotations, a small affine warp, colour jitter), drawn per sample and seeded per (round,
            client); masks move with their images; validation and test batches are never augmented. Off when null.
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        decoded_cache: bool = False,
        decoded_cache_dir: str | None = None,
        augmentation: Augmentation = NO_AUGMENTATION,
    ) -> None:
        super().__init__()
        check_at_least("batch_size", batch_size, 1)
        check_at_least("eval_batch_size", eval_batch_size, 1, nullable=True)
        check_at_least("num_workers", num_workers, 0)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.decoded_cache = decoded_cache
        self.decoded_cache_dir = decoded_cache_dir
        self.augmentation = augmentation
        # Filled per client on first use (or by `setup`), one entry per (client, split).
        self._datasets: dict[tuple[str, Split], Dataset] = {}
        self._pool: LoaderPool | None = None

    @property
    @abstractmethod
    def client_names(self) -> list[str]:
        """The clients (sites) of the federation, in a fixed order."""

    def load_client_datasets(self, client: str) -> dict[Split, Dataset]:
        """Load one client's samples (after :meth:`setup`): its dataset per split. Raises ``DataError`` naming a bad
        sample. Sources that fill every client's datasets in :meth:`setup` need not override it."""
        raise RuntimeError(f"{type(self).__name__}.dataset() needs setup() first.")

    @property
    def loaded_clients(self) -> list[str]:
        """The clients whose samples this process has loaded, in the clients' order."""
        loaded = {client for client, _ in self._datasets}
        return [client for client in self.client_names if client in loaded]

    def load(self, clients: Sequence[str]) -> None:
        """Load (and check) ``clients``' samples now, so that a bad sample stops the run before it trains."""
        for client in clients:
            self.dataset(client, "train")

    def dataset(self, client: str, split: Split) -> Dataset:
        """The dataset of one client's split, its client loaded on first use; valid after :meth:`setup`."""
        self._check_request(client, split)
        if (client, split) not in self._datasets:
            self._datasets.update({(client, name): data for name, data in self.load_client_datasets(client).items()})
        return self._datasets[(client, split)]

    def _check_request(self, client: str, split: Split) -> None:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
        if client not in self.client_names:
            raise KeyError(f"Unknown client {client!r}; the clients are {self.client_names}.")

    def num_samples(self, client: str, split: Split) -> int:
        """The number of samples of one client's split; valid after :meth:`setup` (loads the client unless the
        source knows its counts before loading)."""
        return len(self.dataset(client, split))  # type: ignore[arg-type]

    def dataloader(self, client: str, split: Split, generator: torch.Generator | None = None) -> SplitLoader:
        """A loader over one client's split: shuffled with ``generator`` for training, in order otherwise."""
        return self._loader([self.dataset(client, split)], split == "train", generator)

    def pooled_dataloader(self, clients: Sequence[str], generator: torch.Generator | None = None) -> SplitLoader:
        """A shuffled training loader over the union of ``clients``' training data (centralized training)."""
        if not clients:
            raise ValueError("Pooled training needs at least one client's training data.")
        return self._loader([self.dataset(client, "train") for client in clients], True, generator)

    def _loader(self, datasets: list[Dataset], training: bool, generator: torch.Generator | None) -> SplitLoader:
        if self._pool is None:
            self._pool = LoaderPool(
                LoaderOptions(self.num_workers, self.pin_memory), lambda: list(self._datasets.values())
            )
        batch_size = self.batch_size if training else self.eval_batch_size
        return SplitLoader(self._pool, datasets, batch_size, training, generator if training else None)

    def teardown(self, stage: str) -> None:
        """Stop the loader workers."""
        if self._pool is not None:
            self._pool.close()

    # -- unlabelled inputs (``cli.py predict``) ----------------------------------------------------------------

    @property
    def unlabelled_suffixes(self) -> tuple[str, ...]:
        """The file name endings (lower case) of the unlabelled inputs :meth:`read_unlabelled` reads."""
        return IMAGE_SUFFIXES

    def read_unlabelled(self, path: Path) -> Tensor:
        """An unlabelled input file as the model's inputs ``[N, C, H, W]``, preprocessed as this source preprocesses
        its training images. By default a 2-D RGB image (:func:`~harmofl.data.image_io.read_image`), ``N = 1``, at
        its own size: ``cli.py predict`` checks the size against the model's. Raises ``DataError`` naming the file."""
        return read_image(path, channels=3)[None]

    def unlabelled_mask(self, path: Path, masks: Tensor) -> Tensor:
        """The predicted class indices ``masks [N, H, W]`` of :meth:`read_unlabelled`'s inputs as one mask in the
        geometry of the file at ``path``: by default (a 2-D image) ``[H, W]``."""
        return masks[0]


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
