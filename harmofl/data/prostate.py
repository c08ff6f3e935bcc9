"""The multi-site prostate MRI federation (the SAML / MS-Net release): one client per site, 2.5D slices.

Layout under ``root``: one folder per site (the release has BIDMC, HK, I2CVB, ISBI, ISBI_1.5, UCL), each
holding ``CaseNN.nii.gz`` volumes and their masks ``CaseNN_segmentation.nii.gz`` (or ``_Segmentation``).

Preprocessing, per volume (cached on disk, see :class:`ProstateMRI`):

1. Read with nibabel; slices are taken along the third voxel axis and laid out as SimpleITK (the
   reference's reader) lays them out: rows follow the second voxel axis, columns the first. The NIfTI
   orientation is not applied, as in the reference.
2. Clip intensities above the volume's ``clip_percentile`` (99th) percentile and rescale
   ``(x - min) / (p99 - min)`` to ``[0, 1]``, times ``intensity_scale``. The reference rescales to 0-255
   and rounds down to 8 bits; ``intensity_scale: 255`` gives its range (without the rounding).
3. Resize every slice to ``image_size`` squared: bilinear for the image, nearest for the mask.
   Mask voxels > 0 are prostate (the release has labels > 1 that mean prostate too).

The input of slice ``i`` is the stack of slices ``i-k .. i+k`` (``k = context_slices``) as channels; at the
volume's ends the border slice is repeated. The reference uses ``k = 1`` but drops a volume's first and last
slices altogether instead of repeating them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from harmofl.checkpoint import atomic_torch_save
from harmofl.data.base import SPLITS, FederatedDataModule, Split
from harmofl.data.files import (
    BadSamplePolicy,
    DataError,
    check_bad_sample_policy,
    check_fractions,
    find_site_folders,
    keep_good_samples,
    named_generator,
    require_dir,
)

VOLUME_SUFFIX = ".nii.gz"
MASK_SUFFIXES = ("_segmentation", "_Segmentation")
CACHE_FOLDER = ".harmofl_cache"
# Part of every cache key: bump it whenever the preprocessing code changes what it stores.
CACHE_FORMAT = 1

SliceSelection = Literal["prostate", "all"]
SplitMode = Literal["patient", "slice"]


@dataclass(frozen=True)
class Case:
    """One patient of a site: its volume and (if found) its mask file."""

    name: str
    volume: Path
    mask: Optional[Path]


def find_cases(site_dir: Path) -> list[Case]:
    """The cases of a site folder, sorted by name; a case's ``mask`` is None when no mask file lies beside it."""
    cases = []
    for path in sorted(site_dir.glob(f"*{VOLUME_SUFFIX}")):
        name = path.name[: -len(VOLUME_SUFFIX)]
        if name.lower().endswith(MASK_SUFFIXES[0]):
            continue
        masks = [site_dir / f"{name}{suffix}{VOLUME_SUFFIX}" for suffix in MASK_SUFFIXES]
        cases.append(Case(name, path, next((mask for mask in masks if mask.is_file()), None)))
    return cases


def expected_masks(case: Case) -> str:
    """The mask file names accepted for a case, for error messages."""
    return " or ".join(f"{case.name}{suffix}{VOLUME_SUFFIX}" for suffix in MASK_SUFFIXES)


def read_nifti(path: Path) -> np.ndarray:
    """A 3-D NIfTI file as a float32 array ``[X, Y, Z]``; a :class:`DataError` naming the file otherwise."""
    try:
        array = nib.load(path).get_fdata(dtype=np.float32)
    except Exception as error:  # nibabel, gzip and zlib raise many types for corrupt or truncated files
        raise DataError(f"{path.name} is not a readable NIfTI file ({type(error).__name__}: {error})") from error
    if array.ndim != 3:
        raise DataError(f"{path.name} is {array.ndim}-D with shape {array.shape}; expected a 3-D volume")
    return array


def preprocess_case(
    volume: np.ndarray, mask: np.ndarray, clip_percentile: float, intensity_scale: float, image_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Volume and mask ``[X, Y, Z]`` to slices ``[Z, S, S]`` (float32 in ``[0, intensity_scale]``), masks
    ``[Z, S, S]`` (uint8 {0, 1}) and whether each slice holds prostate ``[Z]``, judged before resizing."""
    high = float(np.percentile(volume, clip_percentile))
    low = float(volume.min())
    # [X, Y, Z] -> [Z, Y, X]: the slice layout of SimpleITK's arrays, which the reference reads.
    image = torch.from_numpy(np.ascontiguousarray(volume.transpose(2, 1, 0)))
    # A constant volume has p99 == min: it maps to zeros rather than to NaN.
    image = (image.clamp(max=high) - low) / max(high - low, np.finfo(np.float32).tiny) * intensity_scale
    labels = torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 1, 0) > 0)).to(torch.uint8)
    size = (image_size, image_size)
    image = F.interpolate(image.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    # "nearest-exact" samples at pixel centres, aligned with the bilinear image ("nearest" shifts by half a pixel).
    resized = F.interpolate(labels.unsqueeze(1), size=size, mode="nearest-exact").squeeze(1)
    # Judged on the original mask: downsampling must not drop a slice whose prostate is a few voxels wide.
    return image, resized, labels.flatten(1).any(1)


def context_stack(slices: Tensor, context_slices: int) -> Tensor:
    """2.5D inputs ``[D, 2k+1, H, W]`` from slices ``[D, H, W]``: channel j of slice i is slice ``i - k + j``,
    the border slice repeated past either end."""
    depth = slices.shape[0]
    offsets = torch.arange(-context_slices, context_slices + 1)
    return slices[(torch.arange(depth).unsqueeze(1) + offsets).clamp(0, depth - 1)]


def patient_bounds(num_cases: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Where a permutation of ``num_cases`` cases is cut into train | val | test: at least one case each."""
    train_end = round(fractions[0] * num_cases)
    val_end = round((fractions[0] + fractions[1]) * num_cases)
    train_end = min(max(train_end, 1), num_cases - 2)
    return train_end, min(max(val_end, train_end + 1), num_cases - 1)


def reference_slice_bounds(num_slices: int) -> tuple[int, int]:
    """The reference's cut of its permuted slices: 64 % train, 16 % val, 20 % test, computed as it does."""
    return int(0.8 * num_slices * 0.8), int(0.8 * num_slices)


def default_cache_dir(root: Path) -> Path:
    """``<root>/.harmofl_cache`` when writable, else a per-user cache folder."""
    beside = root / CACHE_FOLDER
    if os.access(beside if beside.is_dir() else root, os.W_OK):
        return beside
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "harmofl" / "prostate"


def _stat(path: Path) -> list[str | int]:
    info = path.stat()
    return [path.name, info.st_size, info.st_mtime_ns]


class ProstateMRI(FederatedDataModule):
    """Multi-site prostate MRI segmentation: one client per site folder, 2.5D slices with binary masks.

    Splits are made per site, seeded by ``(seed, site)``. ``split_mode="patient"`` permutes the cases and cuts
    them by ``fractions`` (rounded, at least one case per split; a site needs 3 cases), so that no patient is in
    two splits. ``split_mode="slice"`` is the reference's split, kept for reproducing its numbers only: it
    permutes the slices of all cases together and cuts them 64/16/20 %, so one patient's neighbouring slices
    land in train and test alike (leakage: test scores are optimistic). Within a split, samples are in case
    order, then slice order, for the patient split; in permuted order for the slice split.

    Each case is preprocessed once (see the module docstring) and cached as ``<cache_dir>/<site>/<case>-<key>.pt``
    (float16 slices, finer than the reference's 8 bits; uint8 mask; per-slice prostate flags), ``key`` hashing
    the site, the case's file names, sizes and modification times, and the preprocessing settings
    (``clip_percentile``, ``intensity_scale``, ``image_size``): editing a file or one of these settings makes a
    new entry, and later runs read no NIfTI. The splits of every site are then held in memory as float32
    inputs and long masks (about 3 MB per 3x384x384 slice).

    Args:
        root: folder holding one folder per site.
        sites: the site folders to use, as clients; None = every non-hidden subfolder of ``root``, sorted.
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
        on_bad_sample: ``error`` stops at the first unusable case; ``skip`` leaves unusable cases out and
            counts them per site in :attr:`skipped`.
        max_slices_per_split: keep at most this many slices (a seeded random subset) per site and split.
        batch_size: training batch size (reference 16).
        eval_batch_size: validation and test batch size; ``batch_size`` when None.
        num_workers: loader worker processes.
        pin_memory: whether loaders pin memory.
    """

    def __init__(
        self,
        root: str,
        sites: Optional[list[str]] = None,
        context_slices: int = 1,
        slices: SliceSelection = "prostate",
        clip_percentile: float = 99.0,
        intensity_scale: float = 1.0,
        image_size: int = 384,
        split_mode: SplitMode = "patient",
        fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
        seed: int = 0,
        cache_dir: Optional[str] = None,
        on_bad_sample: BadSamplePolicy = "error",
        max_slices_per_split: Optional[int] = None,
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if context_slices < 0:
            raise ValueError(f"data.context_slices must be >= 0, got {context_slices}.")
        if slices not in ("prostate", "all"):
            raise ValueError(f"data.slices must be 'prostate' or 'all', got {slices!r}.")
        if not 0.0 < clip_percentile <= 100.0:
            raise ValueError(f"data.clip_percentile must be in (0, 100], got {clip_percentile}.")
        if intensity_scale <= 0:
            raise ValueError(f"data.intensity_scale must be > 0, got {intensity_scale}.")
        if image_size < 1:
            raise ValueError(f"data.image_size must be >= 1 pixel, got {image_size}.")
        if split_mode not in ("patient", "slice"):
            raise ValueError(f"data.split_mode must be 'patient' or 'slice', got {split_mode!r}.")
        if max_slices_per_split is not None and max_slices_per_split < 1:
            raise ValueError(f"data.max_slices_per_split must be >= 1 or null, got {max_slices_per_split}.")
        self.root = Path(root).expanduser()
        self.sites = sites
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
        self.on_bad_sample = check_bad_sample_policy(on_bad_sample)
        self.max_slices_per_split = max_slices_per_split
        self.skipped: dict[str, int] = {}
        self._client_names: Optional[list[str]] = None
        self._origins: dict[tuple[str, Split], list[tuple[str, int]]] = {}

    # -- sites and cases -------------------------------------------------------------------------------------

    @property
    def client_names(self) -> list[str]:
        if self._client_names is None:
            self._client_names = self._resolve_sites()
        return self._client_names

    def _resolve_sites(self) -> list[str]:
        root = require_dir(self.root, "Prostate MRI root (data.root)")
        return find_site_folders(root, self.sites, "each with CaseNN.nii.gz volumes and their masks")

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
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_root / site / f"{case.name}-{key}.pt"

    def _cache_case(self, site: str, case: Case) -> Optional[str]:
        """Preprocess a case into the cache unless it is there already; None if usable, else what is wrong."""
        if case.mask is None:
            return f"no mask: expected {expected_masks(case)} beside it"
        path = self._cache_path(site, case)
        if path.is_file():
            return None
        try:
            volume, mask = read_nifti(case.volume), read_nifti(case.mask)
        except DataError as error:
            return str(error)
        if mask.shape != volume.shape:
            return f"its mask {case.mask.name} has shape {mask.shape} but the volume has shape {volume.shape}"
        image, labels, prostate = preprocess_case(
            volume, mask, self.clip_percentile, self.intensity_scale, self.image_size
        )
        try:
            atomic_torch_save({"image": image.half(), "mask": labels, "prostate": prostate}, path)
        except OSError as error:
            raise DataError(f"Cannot write the preprocessing cache {str(path)!r} ({error}): set data.cache_dir "
                            "to a writable folder.") from error
        return None

    def _good_cases(self, site: str) -> list[Case]:
        """The usable cases of a site, all preprocessed into the cache; bad ones raise or are counted."""
        site_dir = self.root / site
        cases = find_cases(site_dir)
        if not cases:
            raise DataError(f"Site folder {str(site_dir)!r} holds no volumes: expected CaseNN{VOLUME_SUFFIX} files "
                            f"with masks CaseNN_segmentation{VOLUME_SUFFIX}; point data.root at the folder holding "
                            "one folder per site.")
        good, self.skipped[site] = keep_good_samples(
            site, cases, lambda case: self._cache_case(site, case), lambda case: str(case.volume), self.on_bad_sample
        )
        return good

    def _load_case(self, site: str, case: Case) -> tuple[Tensor, Tensor, Tensor]:
        """A cached case's kept slices: 2.5D inputs ``[N, C, S, S]`` (float32), masks ``[N, S, S]`` (long) and
        their indices along the volume ``[N]``."""
        path = self._cache_path(site, case)
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a cache file damaged after it was written
            raise DataError(f"Cannot read the cached case {str(path)!r} ({error}): delete it to rebuild it.") from error
        kept = cached["prostate"] if self.slices == "prostate" else torch.ones_like(cached["prostate"])
        indices = kept.nonzero().flatten()
        inputs = context_stack(cached["image"].float(), self.context_slices)[indices]
        return inputs, cached["mask"][indices].long(), indices

    # -- LightningDataModule hooks ---------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Check every case and fill the cache (once per machine, before the processes read it)."""
        for site in self.client_names:
            self._good_cases(site)

    def setup(self, stage: Optional[str] = None) -> None:
        """Load every site's splits from the cache (preprocessing what is missing), once per instance."""
        if self._datasets:
            return
        for site in self.client_names:
            self._setup_site(site)

    def _setup_site(self, site: str) -> None:
        cases = self._good_cases(site)
        if self.split_mode == "patient" and len(cases) < 3:
            raise DataError(f"Site {site!r} has {len(cases)} usable case(s) in {str(self.root / site)!r}: a patient "
                            "split needs at least 3 (one per split); add cases or leave the site out (data.sites).")
        loaded = [self._load_case(site, case) for case in cases]
        images = torch.cat([inputs for inputs, _, _ in loaded])
        masks = torch.cat([labels for _, labels, _ in loaded])
        origins = [(case.name, index) for case, (_, _, indices) in zip(cases, loaded) for index in indices.tolist()]
        case_of = torch.repeat_interleave(torch.arange(len(cases)), torch.tensor([len(i) for _, _, i in loaded]))

        generator = named_generator("harmofl-prostate", self.seed, site)
        for split, index in zip(SPLITS, self._split(case_of, len(cases), generator)):
            if len(index) == 0:
                raise DataError(
                    f"Site {site!r} ({str(self.root / site)!r}) has no slices in its {split} split ({len(cases)} "
                    f"cases, {len(masks)} slices, split_mode={self.split_mode}, slices={self.slices}): add cases, "
                    "or use slices: all, or leave the site out (data.sites)."
                )
            if self.max_slices_per_split is not None:
                subset = torch.randperm(len(index), generator=generator)[: self.max_slices_per_split]
                index = index[subset.sort().values]
            self._datasets[(site, split)] = TensorDataset(images[index], masks[index])
            self._origins[(site, split)] = [origins[i] for i in index.tolist()]

    def _split(self, case_of: Tensor, num_cases: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """Indices of a site's train, val and test slices, given the case of each slice ``case_of [N]``."""
        if self.split_mode == "slice":
            order = torch.randperm(len(case_of), generator=generator)
            return torch.tensor_split(order, reference_slice_bounds(len(case_of)))
        order = torch.randperm(num_cases, generator=generator)
        groups = torch.tensor_split(order, patient_bounds(num_cases, self.fractions))
        return tuple(torch.isin(case_of, group).nonzero().flatten() for group in groups)

    # -- lookup ----------------------------------------------------------------------------------------------

    def origins(self, client: str, split: Split) -> list[tuple[str, int]]:
        """The ``(case, slice index)`` of each sample of a split, in dataset order (slice index along the volume)."""
        self.dataset(client, split)  # validates the client, the split and that setup() ran
        return self._origins[(client, split)]
