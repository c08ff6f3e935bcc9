"""Site discovery: the site (client) folders under a data root, and the base of federations laid out that way."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from harmofl.data.base import FileFederation
from harmofl.data.checks import DataError, check_distinct, require_dir


def site_folders(root: str | Path, sites: Sequence[str] | None, description: str, layout: str) -> dict[str, Path]:
    """The site (client) folders under ``root``, by name: ``sites`` in their order (each must exist), else every
    non-hidden subfolder, sorted. ``description`` says what ``root`` is and ``layout`` what a site folder holds,
    for the error messages."""
    folder = require_dir(root, description)
    available = sorted(path.name for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    if sites is None and not available:
        raise DataError(f"{str(folder)!r} holds no site folders: put one folder per site there, {layout}.")
    names = available if sites is None else list(sites)
    missing = [name for name in names if name not in available]
    if missing:
        raise DataError(
            f"Site folder(s) {missing} not found under {str(folder)!r}, which holds {available}: fix data.sites or "
            "data.root."
        )
    return {name: folder / name for name in names}


class SiteFolderFederation(FileFederation):
    """Base class of the federations read from one folder per site under ``root``, a client per site folder.

    The clients are found on first use of :attr:`client_names` (:func:`site_folders`).

    Args:
        root: the folder holding one folder per site.
        sites: the site folders to use, in this order (the clients' order); null: every non-hidden subfolder of
            ``root``, sorted.
    """

    #: What ``root`` is, and what a site folder holds: for the error messages.
    root_description: ClassVar[str] = "data.root (one folder per site)"
    layout: ClassVar[str]

    def __init__(self, root: str, sites: list[str] | None = None, **options: Any) -> None:
        super().__init__(**options)
        check_distinct("sites", sites, "site")
        self.root = Path(root).expanduser()
        self.sites = sites
        self._clients: list[str] | None = None

    @property
    def client_names(self) -> list[str]:
        if self._clients is None:
            self._clients = list(site_folders(self.root, self.sites, self.root_description, self.layout))
        return list(self._clients)
