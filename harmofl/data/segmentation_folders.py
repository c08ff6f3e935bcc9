"""Folder-per-site segmentation data: the nuclei task (6 sources) and bring-your-own segmentation sites.

Layout under ``root``, one folder per site (client)::

    root/<site>/images/X.png        the image: any of IMAGE_SUFFIXES (.png .tif .tiff .jpg .jpeg .bmp),
                                    RGB or grey (read as RGB), 8- or 16-bit
    root/<site>/masks/X.png         its mask: X.<ext> or X_mask.<ext>, ext one of .png .tif .tiff .bmp;
                                    instance labels (any integer per nucleus) or binary; non-zero = foreground
    root/<site>/split.csv           optional: columns ``image,split``, split one of train / val / test

Pairing: a mask pairs with the image of the same stem (``X.tif`` ↔ ``X.png``), or of its stem less a
``_mask`` tag (``X_mask.png`` ↔ ``X.png``); an exact stem match wins. Two images sharing a stem, two masks
for one image, a mask matching no image and a JPEG mask (compression alters labels) are layout errors. An
image without a mask is a bad sample (``on_bad_sample``), like an unreadable file or a mask whose shape
differs from its image's. Hidden files and files with other suffixes are ignored.

Splits: ``split.csv`` names every image of the site once (file name or stem). Without it, the site's images
(sorted by stem) are permuted by a generator seeded from ``(seed, site)`` and cut at the cumulative ``fractions``
(rounded half up); a site's split depends on its own files only, and bad samples are dropped after the split
so that skipping one never moves another between splits. Every split of every site must hold an image.

Magnification: with ``magnifications`` (site → scan magnification) and ``target_magnification``, each image is
resized by ``target / site`` (bilinear, antialiased when shrinking) and its mask likewise (nearest), sizes
rounded to whole pixels. Without them nothing is resized.

Patches: each (resized) image and its mask are cut into ``patch_size`` squares laid every ``patch_size``
pixels from the top-left corner; where a side is not a multiple of ``patch_size`` the last row or column is
moved back to end at the border (overlapping its neighbour), so every pixel is covered and every tile is
whole. A side shorter than ``patch_size`` is first padded at its end (bottom / right) by reflection, image and
mask alike. Every client thus yields samples of one size, as the shared amplitude of HarmoFL needs.

Memory: everything is decoded, resized and tiled once in :meth:`SegmentationFolders.setup` and held in memory
as 8-bit (images: 3 bytes, masks: 1 byte per pixel; 0.25 MiB per 256² patch), the nuclei sources being a few
hundred images; batches are converted to float / long as they are served. 8 bits are lossless for 8-bit files
(H&E scans); 16-bit files are quantized. ``max_patches_per_split`` bounds the memory of larger sites.
"""

from __future__ import annotations

import csv
import itertools
import math
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset

from harmofl.data.base import SPLITS, FederatedDataModule, Split
from harmofl.data.files import (
    IMAGE_SUFFIXES,
    BadSamplePolicy,
    DataError,
    check_bad_sample_policy,
    check_fractions,
    find_site_folders,
    keep_good_samples,
    named_generator,
    read_image,
    read_mask,
    require_dir,
)

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")  # lossless formats only
MASK_TAG = "_mask"
SPLIT_FILE = "split.csv"


@dataclass(frozen=True)
class _Pair:
    """An image and its mask (None when no mask matched: a bad sample)."""

    image: Path
    mask: Optional[Path]


class PatchDataset(Dataset):
    """In-memory patches ``uint8 [N, 3, P, P]`` and masks ``uint8 [N, P, P]``, served as float in [0, 1] and long."""

    def __init__(self, images: Tensor, masks: Tensor) -> None:
        self.images = images
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].float().div_(255.0), self.masks[index].long()


def tile_offsets(length: int, size: int) -> list[int]:
    """Start of every tile along a side of ``length >= size``: every ``size`` pixels, the last flush with the end."""
    starts = list(range(0, length - size + 1, size))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def tile(array: Tensor, size: int) -> Tensor:
    """``array [C, H, W]`` as ``[N, C, size, size]`` tiles, row-major; short sides reflection-padded at the end."""
    pad_h, pad_w = max(0, size - array.shape[1]), max(0, size - array.shape[2])
    if pad_h or pad_w:
        # numpy reflects repeatedly where the pad exceeds the side; torch's reflect pad refuses to.
        array = torch.from_numpy(np.pad(array.numpy(), ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect"))
    corners = itertools.product(tile_offsets(array.shape[1], size), tile_offsets(array.shape[2], size))
    return torch.stack([array[:, y : y + size, x : x + size] for y, x in corners])


def rescale(image: Tensor, mask: Tensor, factor: float) -> tuple[Tensor, Tensor]:
    """``image [C, H, W]`` (bilinear) and ``mask [H, W]`` (nearest) resized by ``factor``, to whole pixels."""
    size = [max(1, round(side * factor)) for side in mask.shape]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    # nearest-exact samples pixel centres, as bilinear with align_corners=False does: image and mask stay aligned.
    mask = F.interpolate(mask[None, None].to(torch.uint8), size=size, mode="nearest-exact")[0, 0]
    return image, mask


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _read_split_csv(path: Path, images: dict[str, Path]) -> dict[str, Split]:
    """The split of every image (by stem) from a site's ``split.csv``, which must name each image once."""
    stem_of = {**{image.name: stem for stem, image in images.items()}, **{stem: stem for stem in images}}
    splits: dict[str, Split] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(handle)
        missing = {"image", "split"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: no column(s) {sorted(missing)}; the header must be 'image,split', "
                            f"got {reader.fieldnames}.")
        for row in reader:
            line = reader.line_num  # the file's line, blank lines included
            name, split = (row["image"] or "").strip(), (row["split"] or "").strip()
            if split not in SPLITS:
                raise DataError(f"{path}, line {line}: unknown split {split!r} for {name!r}; use one of {SPLITS}.")
            if name not in stem_of:
                raise DataError(f"{path}, line {line}: {name!r} is not an image of {path.parent / 'images'}.")
            if stem_of[name] in splits:
                raise DataError(f"{path}, line {line}: {name!r} is listed twice; give each image one split.")
            splits[stem_of[name]] = split
    unlisted = [images[stem].name for stem in images if stem not in splits]
    if unlisted:
        raise DataError(f"{path} gives no split for {len(unlisted)} image(s): {', '.join(unlisted[:5])}"
                        f"{', ...' if len(unlisted) > 5 else ''}; add a row for each.")
    return splits


class SegmentationFolders(FederatedDataModule):
    """Segmentation sites from folders (``root/<site>/images``, ``masks``): binary foreground masks, fixed-size patches.

    See the module's docstring for the layout, pairing, splits, magnification and patching rules.

    Args:
        root: the folder holding one folder per site.
        sites: the sites to use, in client order; None: every (non-hidden) subfolder of ``root``, sorted.
        patch_size: side of the square patches every site is cut into, in pixels.
        magnifications: each site's scan magnification (e.g. ``{kumar: 40, tnbc: 40}``): all sites or none.
        target_magnification: the magnification every site is resized to; needs ``magnifications``.
        fractions: train / val / test fractions of a site's images, for sites without ``split.csv``.
        max_patches_per_split: keep at most this many patches per site and split (a seeded random subset).
        on_bad_sample: ``error`` stops on the first bad pair; ``skip`` leaves bad pairs out, counted per site
            in :attr:`skipped`.
        seed: seeds the splits and the patch subsets.
        batch_size: training batch size.
        eval_batch_size: validation and test batch size; ``batch_size`` when None.
        num_workers: loader worker processes.
        pin_memory: whether loaders pin memory.
    """

    def __init__(
        self,
        root: str,
        sites: Optional[list[str]] = None,
        patch_size: int = 256,
        magnifications: Optional[dict[str, float]] = None,
        target_magnification: Optional[float] = None,
        fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        max_patches_per_split: Optional[int] = None,
        on_bad_sample: BadSamplePolicy = "error",
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if sites is not None and (not sites or len(set(sites)) != len(sites)):
            raise ValueError(f"data.sites must name at least one site, each once, or be null; got {sites}.")
        if patch_size < 1:
            raise ValueError(f"data.patch_size must be >= 1, got {patch_size}.")
        if (magnifications is None) != (target_magnification is None):
            raise ValueError("data.magnifications and data.target_magnification go together: give both (resize every "
                             "site to the target) or neither (no resizing).")
        if magnifications is not None and min([*magnifications.values(), target_magnification]) <= 0:
            raise ValueError(f"data.magnifications and data.target_magnification must be > 0, got "
                             f"{magnifications} and {target_magnification}.")
        if max_patches_per_split is not None and max_patches_per_split < 1:
            raise ValueError(f"data.max_patches_per_split must be >= 1 or null, got {max_patches_per_split}.")
        self.root = Path(root).expanduser()
        self.sites = sites
        self.patch_size = patch_size
        self.magnifications = magnifications
        self.target_magnification = target_magnification
        # Every split must be able to hold images: no fraction may be 0.
        self.fractions = check_fractions(fractions, "fractions", allow_empty=False)
        self.max_patches_per_split = max_patches_per_split
        self.on_bad_sample = check_bad_sample_policy(on_bad_sample)
        self.seed = seed
        #: Bad pairs left out per site (``on_bad_sample="skip"``), filled by :meth:`setup`.
        self.skipped: dict[str, int] = {}
        self._clients: Optional[list[str]] = None

    @property
    def client_names(self) -> list[str]:
        if self._clients is None:
            self._clients = self._find_sites()
        return list(self._clients)

    def setup(self, stage: Optional[str] = None) -> None:
        """Check every site's layout, then load, resize and tile each site's pairs; once per instance."""
        if self._datasets:
            return
        sites = self.client_names
        factors = self._scale_factors(sites)
        # Layout and split errors of every site come before the first (slow) decoding.
        plans = {site: self._plan(site) for site in sites}
        datasets: dict[tuple[str, Split], PatchDataset] = {}
        for site, (pairs, splits) in plans.items():
            for split, dataset in self._load_site(site, pairs, splits, factors[site]).items():
                datasets[(site, split)] = dataset
        # Set only once every site has loaded: a setup that failed half-way is not mistaken for a finished one.
        self._datasets = datasets

    def _find_sites(self) -> list[str]:
        root = require_dir(self.root, "data.root (one folder per site)")
        return find_site_folders(root, self.sites, "each with images/ and masks/")

    def _scale_factors(self, sites: list[str]) -> dict[str, float]:
        if self.magnifications is None:
            return {site: 1.0 for site in sites}
        missing = [site for site in sites if site not in self.magnifications]
        if missing:
            raise DataError(f"data.magnifications gives no magnification for site(s) {missing}: give every site's "
                            f"(the sites are {sites}) or none.")
        unknown = sorted(set(self.magnifications) - set(sites))
        if unknown:
            raise DataError(f"data.magnifications names {unknown}, which are not sites; the sites are {sites}.")
        return {site: self.target_magnification / self.magnifications[site] for site in sites}

    def _plan(self, site: str) -> tuple[list[_Pair], dict[str, Split]]:
        """A site's image/mask pairs (sorted by stem) and the split of each image (by stem)."""
        folder = self.root / site
        images_dir = require_dir(folder / "images", f"Site {site!r} needs images/ and masks/; its images folder")
        masks_dir = require_dir(folder / "masks", f"Site {site!r} needs images/ and masks/; its masks folder")
        images: dict[str, Path] = {}
        for path in _image_files(images_dir):
            if path.stem in images:
                raise DataError(f"{images[path.stem]} and {path} share the stem {path.stem!r}; masks pair with "
                                "images by stem: rename or remove one.")
            images[path.stem] = path
        if not images:
            raise DataError(f"Site {site!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}.")
        masks: dict[str, Path] = {}
        for path in _image_files(masks_dir):
            if path.suffix.lower() not in MASK_SUFFIXES:
                raise DataError(f"{path}: masks must be lossless ({', '.join(MASK_SUFFIXES)}); JPEG compression "
                                "alters labels. Save it as .png or .tif.")
            stem = path.stem if path.stem in images else path.stem.removesuffix(MASK_TAG)
            if stem not in images:
                raise DataError(f"{path} matches no image in {images_dir}: a mask of X.png is named X.<ext> or "
                                f"X{MASK_TAG}.<ext> ({', '.join(MASK_SUFFIXES)}).")
            if stem in masks:
                raise DataError(f"{masks[stem]} and {path} are both masks of {images[stem]}: keep one.")
            masks[stem] = path
        pairs = [_Pair(images[stem], masks.get(stem)) for stem in sorted(images)]
        split_file = folder / SPLIT_FILE
        splits = _read_split_csv(split_file, images) if split_file.is_file() else self._random_splits(site, pairs)
        return pairs, splits

    def _random_splits(self, site: str, pairs: list[_Pair]) -> dict[str, Split]:
        count = len(pairs)
        ends = [math.floor(count * total + 0.5) for total in itertools.accumulate(self.fractions)]  # half up
        order = torch.randperm(count, generator=named_generator("harmofl-folders", self.seed, site, "split")).tolist()
        # The image at rank r of the permutation goes to the split whose cumulative end first exceeds r.
        return {pairs[index].image.stem: SPLITS[bisect_right(ends, rank)] for rank, index in enumerate(order)}

    def _patches(self, pair: _Pair, factor: float) -> tuple[Tensor, Tensor]:
        """One pair read, checked, resized, quantized to 8 bits and tiled: ``[N, 3, P, P]``, ``[N, P, P]`` uint8."""
        image, mask = read_image(pair.image), read_mask(pair.mask)
        if mask.shape != image.shape[1:]:
            raise DataError(f"its mask {pair.mask} is {tuple(mask.shape)} (H, W) but the image is "
                            f"{tuple(image.shape[1:])}; a mask must cover its image pixel for pixel")
        if factor != 1.0:
            image, mask = rescale(image, mask, factor)
        image = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        # Image and mask are tiled as one array, so that every tile of the mask is cut where its image's is.
        tiles = tile(torch.cat([image, mask[None].to(torch.uint8)]), self.patch_size)
        return tiles[:, :3], tiles[:, 3]

    def _load_site(
        self, site: str, pairs: list[_Pair], splits: dict[str, Split], factor: float
    ) -> dict[Split, PatchDataset]:
        """A site's datasets per split; its count of skipped pairs goes to :attr:`skipped`."""
        patches: dict[str, tuple[Tensor, Tensor]] = {}

        def problem_of(pair: _Pair) -> Optional[str]:
            # Decoding is the only full integrity check (PIL's verify() passes truncated TIFF and JPEG files), so
            # checking a pair loads it, and the patches of the good ones are kept.
            if pair.mask is None:
                return (f"no mask in {pair.image.parent.parent / 'masks'} (expected {pair.image.stem}.<ext> or "
                        f"{pair.image.stem}{MASK_TAG}.<ext>, ext one of {', '.join(MASK_SUFFIXES)})")
            try:
                patches[pair.image.stem] = self._patches(pair, factor)
            except DataError as error:
                return str(error).rstrip(".")  # keep_good_samples ends the sentence
            return None

        good, self.skipped[site] = keep_good_samples(site, pairs, problem_of, lambda pair: pair.image.name,
                                                     self.on_bad_sample)
        datasets: dict[Split, PatchDataset] = {}
        for split in SPLITS:
            chosen = [patches[pair.image.stem] for pair in good if splits[pair.image.stem] == split]
            if not chosen:
                split_file = self.root / site / SPLIT_FILE
                fix = (f"list some as {split!r} in {split_file}" if split_file.is_file()
                       else f"add images, change data.fractions {self.fractions} or give the site a {SPLIT_FILE}")
                raise DataError(f"Site {site!r} has no images in its {split!r} split ({len(good)} usable of "
                                f"{len(pairs)}): {fix}.")
            images, masks = torch.cat([c[0] for c in chosen]), torch.cat([c[1] for c in chosen])
            if self.max_patches_per_split is not None and len(masks) > self.max_patches_per_split:
                keep = torch.randperm(len(masks), generator=named_generator("harmofl-folders", self.seed, site, split))
                keep = keep[: self.max_patches_per_split].sort().values
                images, masks = images[keep], masks[keep]
            datasets[split] = PatchDataset(images, masks)
        counts = ", ".join(f"{len(dataset)} {split}" for split, dataset in datasets.items())
        resized = f" resized ×{factor:g}" if factor != 1.0 else ""
        rank_zero_info(f"Site {site!r}: {counts} patches of {self.patch_size}² from {len(good)} images{resized}.")
        return datasets
