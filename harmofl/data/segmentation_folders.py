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

Patches: each (resized) image and its mask are cut together into ``patch_size`` tiles that cover every pixel
(:func:`harmofl.data.patches.tile`), so every client yields samples of one size, as the shared amplitude of HarmoFL
needs.

Memory: everything is decoded, resized and tiled once in :meth:`SegmentationFolders.setup` and held in memory
as 8-bit (images: 3 bytes, masks: 1 byte per pixel; 0.25 MiB per 256² patch), the nuclei sources being a few
hundred images; batches are converted to float / long as they are served. 8 bits are lossless for 8-bit files
(H&E scans); 16-bit files are quantized. ``max_patches_per_split`` bounds the memory of larger sites.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset

from harmofl.data.base import SPLITS, Split
from harmofl.data.checks import DataError, check_at_least, keep_good_samples, require_dir
from harmofl.data.image_io import IMAGE_SUFFIXES, list_images, read_image, read_mask
from harmofl.data.patches import PatchDataset, rescale, tile
from harmofl.data.sites import SiteFolderFederation
from harmofl.data.splits import Fractions, check_fractions, named_generator, random_subset, split_groups

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")  # lossless formats only
MASK_TAG = "_mask"
SPLIT_FILE = "split.csv"


@dataclass(frozen=True)
class _Pair:
    """An image and its mask (None when no mask matched: a bad sample)."""

    image: Path
    mask: Path | None


def _read_split_csv(path: Path, images: dict[str, Path]) -> dict[str, Split]:
    """The split of every image (by stem) from a site's ``split.csv``, which must name each image once."""
    stem_of = {**{image.name: stem for stem, image in images.items()}, **{stem: stem for stem in images}}
    splits: dict[str, Split] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(handle)
        missing = {"image", "split"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{path}: no column(s) {sorted(missing)}; the header must be 'image,split', got {reader.fieldnames}."
            )
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
        raise DataError(
            f"{path} gives no split for {len(unlisted)} image(s): {', '.join(unlisted[:5])}"
            f"{', ...' if len(unlisted) > 5 else ''}; add a row for each."
        )
    return splits


class SegmentationFolders(SiteFolderFederation):
    """Segmentation sites from folders (``root/<site>/images``, ``masks``): binary foreground masks, fixed-size patches.

    See the module's docstring for the layout, pairing, splits, magnification and patching rules.

    Args:
        patch_size: side of the square patches every site is cut into, in pixels.
        magnifications: each site's scan magnification (e.g. ``{kumar: 40, tnbc: 40}``): all sites or none.
        target_magnification: the magnification every site is resized to; needs ``magnifications``.
        fractions: train / val / test fractions of a site's images, for sites without ``split.csv``.
        max_patches_per_split: keep at most this many patches per site and split (a seeded random subset).
        seed: seeds the splits and the patch subsets.
    """

    layout = "each with images/ and masks/"

    def __init__(
        self,
        root: str,
        sites: list[str] | None = None,
        *,
        patch_size: int = 256,
        magnifications: dict[str, float] | None = None,
        target_magnification: float | None = None,
        fractions: Fractions = (0.7, 0.15, 0.15),
        max_patches_per_split: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(root, sites, **options)
        check_at_least("patch_size", patch_size, 1)
        if (magnifications is None) != (target_magnification is None):
            raise ValueError(
                "data.magnifications and data.target_magnification go together: give both (resize every "
                "site to the target) or neither (no resizing)."
            )
        given = [*(magnifications or {}).values(), *([] if target_magnification is None else [target_magnification])]
        if any(value <= 0 for value in given):
            raise ValueError(
                f"data.magnifications and data.target_magnification must be > 0, got "
                f"{magnifications} and {target_magnification}."
            )
        check_at_least("max_patches_per_split", max_patches_per_split, 1, nullable=True)
        self.patch_size = patch_size
        self.magnifications = magnifications
        self.target_magnification = target_magnification
        # Every split must be able to hold images: no fraction may be 0.
        self.fractions = check_fractions(fractions, "fractions", allow_empty=False)
        self.max_patches_per_split = max_patches_per_split
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        """Check every site's layout, then load, resize and tile each site's pairs; once per instance."""
        if self._datasets:
            return
        sites = self.client_names
        factors = self._scale_factors(sites)
        # Layout and split errors of every site come before the first (slow) decoding.
        plans = {site: self._plan(site) for site in sites}
        datasets: dict[tuple[str, Split], Dataset] = {}
        for site, (pairs, splits) in plans.items():
            for split, dataset in self._load_site(site, pairs, splits, factors[site]).items():
                datasets[(site, split)] = dataset
        # Set only once every site has loaded: a setup that failed half-way is not mistaken for a finished one.
        self._datasets = datasets

    def _scale_factors(self, sites: list[str]) -> dict[str, float]:
        if self.magnifications is None or self.target_magnification is None:
            return dict.fromkeys(sites, 1.0)
        missing = [site for site in sites if site not in self.magnifications]
        if missing:
            raise DataError(
                f"data.magnifications gives no magnification for site(s) {missing}: give every site's "
                f"(the sites are {sites}) or none."
            )
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
        for path in list_images(images_dir):
            if path.stem in images:
                raise DataError(
                    f"{images[path.stem]} and {path} share the stem {path.stem!r}; masks pair with "
                    "images by stem: rename or remove one."
                )
            images[path.stem] = path
        if not images:
            raise DataError(f"Site {site!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}.")
        masks: dict[str, Path] = {}
        for path in list_images(masks_dir):
            if path.suffix.lower() not in MASK_SUFFIXES:
                raise DataError(
                    f"{path}: masks must be lossless ({', '.join(MASK_SUFFIXES)}); JPEG compression "
                    "alters labels. Save it as .png or .tif."
                )
            stem = path.stem if path.stem in images else path.stem.removesuffix(MASK_TAG)
            if stem not in images:
                raise DataError(
                    f"{path} matches no image in {images_dir}: a mask of X.png is named X.<ext> or "
                    f"X{MASK_TAG}.<ext> ({', '.join(MASK_SUFFIXES)})."
                )
            if stem in masks:
                raise DataError(f"{masks[stem]} and {path} are both masks of {images[stem]}: keep one.")
            masks[stem] = path
        pairs = [_Pair(images[stem], masks.get(stem)) for stem in sorted(images)]
        split_file = folder / SPLIT_FILE
        splits = _read_split_csv(split_file, images) if split_file.is_file() else self._random_splits(site, pairs)
        return pairs, splits

    def _random_splits(self, site: str, pairs: list[_Pair]) -> dict[str, Split]:
        """The split of each image (by stem): every image a group of its own, in a stream of the site's."""
        stream = named_generator("harmofl-folders", self.seed, site, "split")
        codes = split_groups(np.arange(len(pairs)), len(pairs), self.fractions, stream)
        return {pair.image.stem: SPLITS[code] for pair, code in zip(pairs, codes.tolist())}

    def _patches(self, pair: _Pair, factor: float) -> tuple[Tensor, Tensor]:
        """One pair read, checked, resized, quantized to 8 bits and tiled: ``[N, 3, P, P]``, ``[N, P, P]`` uint8."""
        assert pair.mask is not None  # a pair without a mask is a bad sample, never read
        image, mask = read_image(pair.image), read_mask(pair.mask)
        if mask.shape != image.shape[1:]:
            raise DataError(
                f"its mask {pair.mask} is {tuple(mask.shape)} (H, W) but the image is "
                f"{tuple(image.shape[1:])}; a mask must cover its image pixel for pixel"
            )
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

        def problem_of(pair: _Pair) -> str | None:
            # Decoding is the only full integrity check (PIL's verify() passes truncated TIFF and JPEG files), so
            # checking a pair loads it, and the patches of the good ones are kept.
            if pair.mask is None:
                return (
                    f"no mask in {pair.image.parent.parent / 'masks'} (expected {pair.image.stem}.<ext> or "
                    f"{pair.image.stem}{MASK_TAG}.<ext>, ext one of {', '.join(MASK_SUFFIXES)})"
                )
            try:
                patches[pair.image.stem] = self._patches(pair, factor)
            except DataError as error:
                return str(error).rstrip(".")  # keep_good_samples ends the sentence
            return None

        good, self.skipped[site] = keep_good_samples(
            site, pairs, problem_of, lambda pair: pair.image.name, self.on_bad_sample
        )
        datasets: dict[Split, PatchDataset] = {}
        for split in SPLITS:
            chosen = [patches[pair.image.stem] for pair in good if splits[pair.image.stem] == split]
            if not chosen:
                split_file = self.root / site / SPLIT_FILE
                fix = (
                    f"list some as {split!r} in {split_file}"
                    if split_file.is_file()
                    else f"add images, change data.fractions {self.fractions} or give the site a {SPLIT_FILE}"
                )
                raise DataError(
                    f"Site {site!r} has no images in its {split!r} split ({len(good)} usable of {len(pairs)}): {fix}."
                )
            images, masks = torch.cat([c[0] for c in chosen]), torch.cat([c[1] for c in chosen])
            if self.max_patches_per_split is not None and len(masks) > self.max_patches_per_split:
                stream = named_generator("harmofl-folders", self.seed, site, split)
                keep = random_subset(len(masks), self.max_patches_per_split, stream)
                images, masks = images[keep], masks[keep]
            datasets[split] = PatchDataset(images, masks)
        counts = ", ".join(f"{len(dataset)} {split}" for split, dataset in datasets.items())
        resized = f" resized ×{factor:g}" if factor != 1.0 else ""
        rank_zero_info(f"Site {site!r}: {counts} patches of {self.patch_size}² from {len(good)} images{resized}.")
        return datasets
