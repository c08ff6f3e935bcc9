"""Bring-your-own classification sites: one folder per site, each with its ``labels.csv``::

root/
  site_a/
    labels.csv        # columns image,label[,split]
    images/0001.png   # any path relative to the site folder, any format read_image reads
  site_b/
    labels.csv
    ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harmofl.data.base import SPLITS, Split
from harmofl.data.checks import DataError, check_at_least, check_distinct, require_file
from harmofl.data.csv_tables import read_csv
from harmofl.data.image_files import ClientFiles, ImageFileFederation, encode_paths
from harmofl.data.sites import site_folders
from harmofl.data.splits import Fractions, check_fractions, rows_by_code, site_rng, split_groups


class SiteFolders(ImageFileFederation):
    """Bring-your-own sites for classification: one folder per site under ``root``, one client per site.

    Each site folder holds ``labels.csv`` with the columns ``image,label`` and optionally ``split``:
    ``image`` is a path relative to the site folder (any format :func:`~harmofl.data.image_io.read_image` reads) that
    stays inside it (no absolute path, no ``..`` or symbolic link leading out), ``label`` an integer class index in
    ``[0, num_classes)``, ``split`` one of ``train``, ``val``, ``test``. Without a ``split``
    column, each site's rows are split by ``fractions``: shuffled with a generator seeded from ``seed`` and
    the site's name (so a site's split does not depend on which other sites are used), then cut (see
    :func:`~harmofl.data.splits.split_groups`). Within a split, rows keep their order in ``labels.csv``.

    Args:
        root: the folder holding one folder per site.
        sites: the site folders to use, in this order; default every subfolder (not hidden), sorted.
        image_size: side every image is resized to (bilinear) when it differs.
        fractions: train, val, test fractions for sites without a ``split`` column.
        num_classes: labels must be below it: a larger one is an error naming its row, before training. The command
            line sets it to ``model.num_classes`` (it cannot be set there); null checks only that labels are >= 0.
    """

    def __init__(
        self,
        root: str,
        sites: list[str] | None = None,
        *,
        image_size: int = 64,
        fractions: Fractions = (0.7, 0.15, 0.15),
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(image_size=image_size, **options)
        check_distinct("sites", sites, "site")
        self.root = root
        self.sites = sites
        self.fractions = check_fractions(fractions, "fractions")
        check_at_least("num_classes", num_classes, 1, nullable=True)
        self.num_classes = num_classes

    def _client_files(self) -> dict[str, ClientFiles]:
        folders = site_folders(self.root, self.sites, "Site-folders root", "each with labels.csv and its images")
        return {site: self._site_files(site, folder) for site, folder in folders.items()}

    def _site_files(self, site: str, folder: Path) -> ClientFiles:
        table = read_csv(
            require_file(folder / "labels.csv", f"Labels file of site {site!r}"),
            required=("image", "label"),
            optional=("split",),
        )
        labels = table.class_indices("label", self.num_classes)
        images = table.paths_inside("image", folder)
        if "split" in table.columns:
            names = table.columns["split"]
            codes = np.select([np.asarray(names) == split for split in SPLITS], list(range(len(SPLITS))), default=-1)
            if (codes < 0).any():
                first = int(np.argmax(codes < 0))
                raise DataError(
                    f"{table.path}, line {table.lines[first]}: unknown split {names[first]!r}; "
                    f"expected one of {', '.join(SPLITS)} (or no split column to split by fractions)."
                )
        else:
            codes = split_groups(np.arange(len(labels)), len(labels), self.fractions, site_rng(self.seed, site))
        return ClientFiles(folder, encode_paths(images), labels, rows_by_code(codes))

    def _empty_split_hint(self, split: Split) -> str:
        return (
            f"Give that site rows with split {split!r} in labels.csv, or, without a split column, more "
            f"images or other data.fractions (now {self.fractions})."
        )
