"""The multi-site prostate MRI federation (the SAML / MS-Net release): one client per site, 2.5D slices.

Layout under ``root``: one folder per site (the release has BIDMC, HK, I2CVB, ISBI, ISBI_1.5, UCL), each
holding ``CaseNN.nii.gz`` volumes and their masks ``CaseNN_segmentation.nii.gz`` (or ``_Segmentation``).
Each volume is preprocessed (:mod:`harmofl.data.mri`) once and cached on disk (see :class:`ProstateMRI`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from harmofl.data.base import SPLITS, Split
from harmofl.data.cache import entry_path, read_entry, user_cache_dir, write_entry
from harmofl.data.checks import DataError, check_at_least, check_choice, keep_good_samples
from harmofl.data.mri import (
    MAX_VOXELS,
    NIFTI_SUFFIXES,
    VOLUME_SUFFIX,
    Case,
    context_stack,
    expected_masks,
    find_cases,
    preprocess_case,
    read_nifti,
    read_nifti_shape,
)
from harmofl.data.sites import SiteFolderFederation
from harmofl.data.splits import (
    Fractions,
    check_fractions,
    named_generator,
    permutation,
    random_subset,
    rows_by_code,
    split_groups,
)

CACHE_FOLDER = ".harmofl_cache"
# Part of every cache key: bump it whenever the preprocessing code changes what it stores.
CACHE_FORMAT = 1
CACHE_KEY_DIGITS = 16

SliceSelection = Literal["prostate", "all"]
SplitMode = Literal["patient", "slice"]


def reference_slice_bounds(num_slices: int) -> tuple[int, int]:
    """The reference's cut of its permuted slices: 64 % train, 16 % val, 20 % test, computed as it does."""
    return int(0.8 * num_slices * 0.8), int(0.8 * num_slices)


def default_cache_dir(root: Path) -> Path:
    """``<root>/.harmofl_cache`` when writable, else a per-user cache folder."""
    beside = root / CACHE_FOLDER
    if os.access(beside if beside.is_dir() else root, os.W_OK):
        return beside
    return user_cache_dir("prostate")


def _stat(path: Path) -> list[str | int]:
    info = path.stat()
    return [path.name, info.st_size, info.st_mtime_ns]


class ProstateMRI(SiteFolderFederation):
    """Multi-site prostate MRI segmentation: one client per site folder, 2.5D slices with binary masks.

    Splits are made per site, seeded by ``(seed, site)``. ``split_mode="patient"`` permutes the cases and cuts
    them by ``fractions`` (rounded, at least one case per split; a site needs 3 cases), so that no patient is in
    two splits. ``split_mode="slice"`` is the reference's split, kept for reproducing its numbers only: it
    permutes the slices of all cases together and cuts them 64/16/20 %, so one patient's neighbouring slices
    land in train and test alike (leakage: test scores are optimistic). Within a split, samples are in case
    order, then slice order, for the patient split; in permuted order for the slice split.

    Each case is preprocessed once (:mod:`harmofl.data.mri`) and cached as ``<cache_dir>/<site>/<case>-<key>.pt``
    (float16 slices, finer than the reference's 8 bits; uint8 mask; per-slice prostate flags), ``key`` hashing
    the site, the case's file names, sizes and modification times, and the preprocessing settings
    (``clip_percentile``, ``intensity_scale``, ``image_size``): editing a file or one of these settings makes a
    new entry, and later runs read no NIfTI. Setup reads only the cases' slice flags (to split every site); a
    site's splits are held in memory, as float32 inputs and long masks (about 3 MB per 3x384x384 slice), by the
    processes that load it.

    Args:
        context_slices: neighbours on each side of a slice stacked as channels (channels = 2k+1; reference 1).
        slices: ``prostate`` keeps slices whose mask is non-empty before resizing (reference), ``all`` every slice.
        clip_percentile: intensities above this percentile of the volume are clipped (reference 99).
        intensity_scale: the rescaled range is ``[0, intensity_scale]``; 255 is the reference's range.
        image_size: side of the square slices after resizing, in pixels (reference 384).
        split_mode: ``patient`` (cases split) or ``slice`` (the reference's leaky slice-level split).
        fractions: train/val/test fractions of each site's cases, for ``split_mode="patient"``.
        seed: seeds the splits and the ``max_slices_per_split`` subsets.
        cache_dir: where preprocessed cases are cached; None = ``<root>/.harmofl_cache`` when writable, else
            ``$XDG_CACHE_HOME/harmofl/prostate`` (``~/.cache/harmofl/prostate``).
        max_slices_per_split: keep at most this many slices (a seeded random subset) per site and split.
        max_voxels: a volume or mask whose header declares more voxels is a bad sample, refused before it is
            decompressed (default 512³); one with NaN or infinite voxels is a bad sample too, never cached.
        batch_size: training batch size (the reference's 16).
    """

    root_description = "Prostate MRI root (data.root)"
    layout = "each with CaseNN.nii.gz volumes and their masks"

    def __init__(
        self,
        root: str,
        sites: list[str] | None = None,
        *,
        context_slices: int = 1,
        slices: SliceSelection = "prostate",
        clip_percentile: float = 99.0,
        intensity_scale: float = 1.0,
        image_size: int = 384,
        split_mode: SplitMode = "patient",
        fractions: Fractions = (0.6, 0.2, 0.2),
        seed: int = 0,
        cache_dir: str | None = None,
        max_slices_per_split: int | None = None,
        max_voxels: int = MAX_VOXELS,
        batch_size: int = 16,
        **options: Any,
    ) -> None:
        super().__init__(root, sites, batch_size=batch_size, **options)
        check_at_least("context_slices", context_slices, 0)
        check_choice("slices", slices, ("prostate", "all"))
        if not 0.0 < clip_percentile <= 100.0:
            raise ValueError(f"data.clip_percentile must be in (0, 100], got {clip_percentile}.")
        if intensity_scale <= 0:
            raise ValueError(f"data.intensity_scale must be > 0, got {intensity_scale}.")
        check_at_least("image_size", image_size, 1, " pixel")
        check_choice("split_mode", split_mode, ("patient", "slice"))
        check_at_least("max_slices_per_split", max_slices_per_split, 1, nullable=True)
        self.context_slices = context_slices
        self.slices = slices
        self.clip_percentile = clip_percentile
        self.intensity_scale = intensity_scale
        self.image_size = image_size
        self.split_mode = split_mode
        # Every split needs at least one case: no fraction may be 0.
        self.fractions = check_fractions(fractions, "fractions", allow_empty=False)
        self.seed = seed
        self.cache_dir = cache_dir
        self.max_slices_per_split = max_slices_per_split
        check_at_least("max_voxels", max_voxels, 1)
        self.max_voxels = max_voxels
        self._origins: dict[tuple[str, Split], list[tuple[str, int]]] = {}
        self._cases: dict[str, list[Case]] = {}  # every site's usable cases
        self._rows: dict[str, dict[Split, Tensor]] = {}  # every site's slices per split (indices over its cases')

    # -- cases and their cache ------------------------------------------------------------------------------

    @property
    def cache_root(self) -> Path:
        """The folder holding the preprocessed cases, one subfolder per site."""
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir(self.root)

    def _cache_path(self, site: str, case: Case) -> Path:
        assert case.mask is not None  # only cases that passed the mask check are cached
        settings = {
            "format": CACHE_FORMAT,
            "site": site,
            "volume": _stat(case.volume),
            "mask": _stat(case.mask),
            "clip_percentile": self.clip_percentile,
            "intensity_scale": self.intensity_scale,
            "image_size": self.image_size,
        }
        return entry_path(self.cache_root / site, case.name, settings, CACHE_KEY_DIGITS)

    def _cache_case(self, site: str, case: Case) -> str | None:
        """Preprocess a case into the cache unless it is there already; None if usable, else what is wrong."""
        if case.mask is None:
            return f"no mask: expected {expected_masks(case)} beside it"
        path = self._cache_path(site, case)
        if path.is_file():
            return None
        try:
            volume, mask = read_nifti(case.volume, self.max_voxels), read_nifti(case.mask, self.max_voxels)
        except DataError as error:
            return str(error)
        if mask.shape != volume.shape:
            return f"its mask {case.mask.name} has shape {mask.shape} but the volume has shape {volume.shape}"
        image, labels, prostate = preprocess_case(
            volume, mask, self.clip_percentile, self.intensity_scale, self.image_size
        )
        try:
            write_entry(path, {"image": image.half(), "mask": labels, "prostate": prostate})
        except OSError as error:
            raise DataError(
                f"Cannot write the preprocessing cache {str(path)!r} ({error}): set data.cache_dir "
                "to a writable folder."
            ) from error
        return None

    def _good_cases(self, site: str) -> list[Case]:
        """The usable cases of a site, all preprocessed into the cache; bad ones raise or are counted."""
        site_dir = self.root / site
        cases = find_cases(site_dir)
        if not cases:
            raise DataError(
                f"Site folder {str(site_dir)!r} holds no volumes: expected CaseNN{VOLUME_SUFFIX} files "
                f"with masks CaseNN_segmentation{VOLUME_SUFFIX}; point data.root at the folder holding "
                "one folder per site."
            )
        good, self.skipped[site] = keep_good_samples(
            site, cases, lambda case: self._cache_case(site, case), lambda case: str(case.volume), self.on_bad_sample
        )
        return good

    def _cached_case(self, site: str, case: Case, mmap: bool = False) -> dict[str, Tensor]:
        path = self._cache_path(site, case)
        try:
            return read_entry(path, mmap=mmap)
        except Exception as error:  # a cache file damaged after it was written
            raise DataError(f"Cannot read the cached case {str(path)!r} ({error}): delete it to rebuild it.") from error

    def _kept(self, cached: dict[str, Tensor]) -> Tensor:
        """The indices along the volume of a cached case's slices that are used."""
        kept = cached["prostate"] if self.slices == "prostate" else torch.ones_like(cached["prostate"])
        return kept.nonzero().flatten()

    def _load_case(self, site: str, case: Case) -> tuple[Tensor, Tensor]:
        """A cached case's kept slices: 2.5D inputs ``[N, C, S, S]`` (float32) and masks ``[N, S, S]`` (long)."""
        cached = self._cached_case(site, case)
        indices = self._kept(cached)
        inputs = context_stack(cached["image"].float(), self.context_slices)[indices]
        return inputs, cached["mask"][indices].long()

    # -- LightningDataModule hooks ---------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Check every case and fill the cache (once per machine, before the processes read it)."""
        for site in self.client_names:
            self._good_cases(site)

    def setup(self, stage: str | None = None) -> None:
        """Split every site's slices, reading only the cached cases' slice flags (preprocessing what is missing),
        once per instance; a site's slices are read when it is loaded."""
        if self._rows:
            return
        for site in self.client_names:
            self._plan_site(site)

    def _plan_site(self, site: str) -> None:
        cases = self._good_cases(site)
        if self.split_mode == "patient" and len(cases) < 3:
            raise DataError(
                f"Site {site!r} has {len(cases)} usable case(s) in {str(self.root / site)!r}: a patient "
                "split needs at least 3 (one per split); add cases or leave the site out (data.sites)."
            )
        kept = [self._kept(self._cached_case(site, case, mmap=True)) for case in cases]
        origins = [(case.name, index) for case, indices in zip(cases, kept) for index in indices.tolist()]
        case_of = torch.repeat_interleave(torch.arange(len(cases)), torch.tensor([len(i) for i in kept]))

        generator = named_generator("harmofl-prostate", self.seed, site)
        rows = self._split(case_of, len(cases), generator)
        self._rows[site] = {}
        for split in SPLITS:
            index = torch.from_numpy(rows[split])
            if len(index) == 0:
                raise DataError(
                    f"Site {site!r} ({str(self.root / site)!r}) has no slices in its {split} split ({len(cases)} "
                    f"cases, {len(case_of)} slices, split_mode={self.split_mode}, slices={self.slices}): add cases, "
                    "or use slices: all, or leave the site out (data.sites)."
                )
            if self.max_slices_per_split is not None:
                # The split's generator draws the subsets too, split after split: their order is part of the result.
                index = index[random_subset(len(index), self.max_slices_per_split, generator)]
            self._rows[site][split] = index
            self._origins[(site, split)] = [origins[i] for i in index.tolist()]
        self._cases[site] = cases

    def num_samples(self, client: str, split: Split) -> int:
        """Known after :meth:`setup`: counting reads no slice."""
        self._check_request(client, split)
        return len(self._planned(client)[split])

    def _planned(self, client: str) -> dict[Split, Tensor]:
        if not self._rows:
            raise RuntimeError(f"{type(self).__name__} needs setup() first: the sites are split there.")
        return self._rows[client]

    def load_client_datasets(self, client: str) -> dict[Split, Dataset]:
        rows = self._planned(client)
        loaded = [self._load_case(client, case) for case in self._cases[client]]
        images = torch.cat([inputs for inputs, _ in loaded])
        masks = torch.cat([labels for _, labels in loaded])
        return {split: TensorDataset(images[index], masks[index]) for split, index in rows.items()}

    def _split(self, case_of: Tensor, num_cases: int, generator: torch.Generator) -> dict[Split, np.ndarray]:
        """Indices of a site's slices per split, given the case of each slice ``case_of [N]``."""
        if self.split_mode == "slice":
            # The reference's split: all slices permuted together, each split in that permuted order.
            order = permutation(len(case_of), generator)
            return dict(zip(SPLITS, np.split(order, reference_slice_bounds(len(case_of)))))
        # Half-to-even rounding and at least one case per split: how this loader has always cut its cases.
        codes = split_groups(case_of.numpy(), num_cases, self.fractions, generator, "half_even", at_least_one=True)
        return rows_by_code(codes)

    # -- lookup ----------------------------------------------------------------------------------------------

    def origins(self, client: str, split: Split) -> list[tuple[str, int]]:
        """The ``(case, slice index)`` of each sample of a split, in dataset order (slice index along the volume)."""
        self._check_request(client, split)
        self._planned(client)
        return self._origins[(client, split)]

    # -- unlabelled volumes (``cli.py predict``) -------------------------------------------------------------

    @property
    def unlabelled_suffixes(self) -> tuple[str, ...]:
        return NIFTI_SUFFIXES

    def read_unlabelled(self, path: Path) -> Tensor:
        """An unlabelled volume preprocessed as the training volumes (clipping, rescaling, resizing, the cache's
        float16 rounding, context slices): every slice, ``[Z, 2k+1, S, S]``."""
        if not path.name.lower().endswith(NIFTI_SUFFIXES):
            raise DataError(f"{path}: ProstateMRI predicts on NIfTI volumes ({', '.join(NIFTI_SUFFIXES)}).")
        volume = read_nifti(path, self.max_voxels)
        no_mask = np.zeros(volume.shape, dtype=np.uint8)
        image, _, _ = preprocess_case(volume, no_mask, self.clip_percentile, self.intensity_scale, self.image_size)
        return context_stack(image.half().float(), self.context_slices)

    def unlabelled_mask(self, path: Path, masks: Tensor) -> Tensor:
        """Slice masks ``[Z, S, S]`` back in the volume's voxel grid ``[X, Y, Z]`` (nearest), undoing the slice
        layout and resizing of :func:`~harmofl.data.mri.preprocess_case`."""
        columns, rows, _ = read_nifti_shape(path)
        resized = F.interpolate(masks[:, None].float(), size=(rows, columns), mode="nearest-exact")[:, 0]
        return resized.to(masks.dtype).permute(2, 1, 0).contiguous()
