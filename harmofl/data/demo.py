"""The built-in demo federation: procedural H&E histology, imaged differently at each site.

Needs no files. Tissue is drawn from one distribution for every site (:mod:`harmofl.data.synthesis`); only the
imaging (:mod:`harmofl.data.imaging`: stain colours, optics, sensor, tone curve) differs between sites.
Labels therefore depend on morphology alone while each site's images differ in colour, sharpness
and noise: the feature shift that HarmoFL's amplitude harmonisation targets.

- :class:`DemoHistology`: classification, label 1 when a tumour-like cluster of large,
  pleomorphic, hyperchromatic, crowded nuclei covers part of the patch, 0 for normal tissue.
- :class:`DemoNuclei`: segmentation of the nuclei (binary masks drawn before imaging).

Every (site, split) is drawn from its own generator seeded from ``(seed, site, split)``, so that
the size of one split never changes the samples of another.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from harmofl.data.base import SPLITS, FederatedDataModule, Split
from harmofl.data.cache import entry_path, read_entry, user_cache_dir, write_entry
from harmofl.data.checks import check_at_least
from harmofl.data.imaging import SiteImaging, default_sites, render
from harmofl.data.splits import named_generator
from harmofl.data.synthesis import Tissue, synthesize_tissue

# Part of every demo cache key: bump it whenever generation changes what a seed produces.
# (2: generation pinned to one thread; format 1 files depended on the generating process's thread count.)
DEMO_CACHE_FORMAT = 2
DEMO_CACHE_KEY_DIGITS = 20


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Generate on one thread: multi-threaded convolutions round differently (about 1e-6), and the demo data
    must be the same whatever the thread count, process layout or machine load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _ProceduralFederation(FederatedDataModule):
    """Shared machinery of the demo datamodules: arguments, sites, generation and lookup.

    Args:
        num_sites: number of sites (clients), named ``site_0``, ``site_1``, ...
        train_per_site: training images per site.
        val_per_site: validation images per site.
        test_per_site: test images per site.
        image_size: side of the square images, in pixels.
        seed: seeds the tissue, the sensor noise and any sites beyond the hand-picked ones.
        cache_dir: where generated splits are kept, so that later runs with the same settings load them instead
            of generating them again (generation takes seconds per site); None: ``$XDG_CACHE_HOME/harmofl/demo``
            (``~/.cache/harmofl/demo``). Loaded splits are identical to generated ones.
        cache: False generates every time and writes nothing.
    """

    def __init__(
        self,
        num_sites: int = 4,
        *,
        train_per_site: int = 192,
        val_per_site: int = 64,
        test_per_site: int = 64,
        image_size: int = 64,
        seed: int = 0,
        cache_dir: str | None = None,
        cache: bool = True,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        check_at_least("num_sites", num_sites, 1)
        check_at_least("train_per_site", train_per_site, 1)
        check_at_least("val_per_site", val_per_site, 0)
        check_at_least("test_per_site", test_per_site, 0)
        check_at_least("image_size", image_size, 16, " pixels")
        self.num_sites = num_sites
        self.split_sizes: dict[Split, int] = {"train": train_per_site, "val": val_per_site, "test": test_per_site}
        self.image_size = image_size
        self.seed = seed
        self.sites: list[SiteImaging] = default_sites(num_sites, seed)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir("demo")
        self.cache = cache
        self._set_up = False

    @property
    def client_names(self) -> list[str]:
        return [f"site_{index}" for index in range(self.num_sites)]

    def prepare_data(self) -> None:
        """Fill the cache, once per machine, before the processes read it (present files are not read)."""
        if self.cache:
            for index in range(self.num_sites):
                for split in SPLITS:
                    if not self._cache_path(index, split).is_file():
                        self._cached_split(index, split)

    def setup(self, stage: str | None = None) -> None:
        """Nothing to find: the sites and their sizes are the settings; a site's splits are generated (or read from
        the cache) when the site is first used."""
        self._set_up = True

    def num_samples(self, client: str, split: Split) -> int:
        """Known from the settings: counting generates nothing."""
        self._check_request(client, split)
        return self.split_sizes[split]

    def load_client_datasets(self, client: str) -> dict[Split, Dataset]:
        if not self._set_up:
            raise RuntimeError(f"{type(self).__name__}.dataset() needs setup() first.")
        index = self.client_names.index(client)
        read = self._cached_split if self.cache else self._generate
        return {split: TensorDataset(*read(index, split)) for split in SPLITS}

    def _generate(self, index: int, split: Split) -> tuple[Tensor, Tensor]:
        with _one_thread():
            return self._generate_split(index, split)

    def _generate_split(self, index: int, split: Split) -> tuple[Tensor, Tensor]:
        generator = named_generator("harmofl-demo", self.seed, index, split)
        count = self.split_sizes[split]
        # Balanced labels: half the patches (rounded down) hold a tumour-like cluster.
        labels = (torch.arange(count) % 2)[torch.randperm(count, generator=generator)]
        tissue = synthesize_tissue(labels.bool(), self.image_size, generator)
        images = render(tissue.hematoxylin, tissue.eosin, self.sites[index], generator)
        return images, self._targets(tissue, labels)

    def _cache_path(self, index: int, split: Split) -> Path:
        """The cache file of one site's split, named by a hash of everything that determines its content."""
        settings = {
            "format": DEMO_CACHE_FORMAT,
            "kind": type(self).__name__,
            "site": _site_key(self.sites[index]),
            "index": index,
            "split": split,
            "count": self.split_sizes[split],
            "image_size": self.image_size,
            "seed": self.seed,
        }
        return entry_path(self.cache_dir, type(self).__name__, settings, DEMO_CACHE_KEY_DIGITS)

    def _cached_split(self, index: int, split: Split) -> tuple[Tensor, Tensor]:
        """A split from the cache, else generated and written there (a cache that cannot be written is skipped)."""
        path = self._cache_path(index, split)
        if path.is_file():
            try:
                cached = read_entry(path)
                return cached["images"], cached["targets"]
            except Exception:  # a damaged cache file: generate again and overwrite it
                pass
        images, targets = self._generate(index, split)
        try:
            write_entry(path, {"images": images, "targets": targets})
        except OSError as error:
            rank_zero_warn(
                f"Cannot write the demo data cache {str(path)!r} ({error}); set data.cache_dir to a "
                "writable folder, or data.cache false."
            )
        return images, targets

    @abstractmethod
    def _targets(self, tissue: Tissue, labels: Tensor) -> Tensor:
        """The targets of a generated batch: its labels ``[B]`` or a per-pixel map ``[B, S, S]``."""


def _site_key(site: SiteImaging) -> dict[str, Any]:
    """A site's settings in the cache key. Fields added after format 2 enter it only when they differ from their
    default, so that the names of existing cache files (and their pinned keys) stay what they were."""
    return {
        field.name: getattr(site, field.name)
        for field in dataclasses.fields(site)
        if field.name not in _FIELDS_AFTER_FORMAT_2 or getattr(site, field.name) != field.default
    }


_FIELDS_AFTER_FORMAT_2 = ("magnification",)


class DemoHistology(_ProceduralFederation):
    """Procedural H&E patches, classification: 1 = tumour-like cluster present, 0 = normal tissue.

    Balanced labels per site and split; sites differ only in staining and scanner.
    """

    def _targets(self, tissue: Tissue, labels: Tensor) -> Tensor:
        return labels.long()


class DemoNuclei(_ProceduralFederation):
    """Procedural H&E patches, segmentation of the nuclei: masks ``[B, S, S]`` of {0, 1}.

    The masks are drawn at full resolution before imaging; half the patches hold tumour tissue.
    """

    def _targets(self, tissue: Tissue, labels: Tensor) -> Tensor:
        return tissue.nuclei.long()
