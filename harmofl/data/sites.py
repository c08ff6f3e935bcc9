"""Site discovery: the site (client) folders under a data root, and the base of federations laid out that way."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from harmofl.data.base import FileFederation
from harmofl.data.checks import DataError, check_distinct, require_dir


def find_site_folders(root: Path, sites: Sequence[str] | None, layout: str) -> list[str]:
    """The site (client) folders under ``root``: ``sites`` in their order (each must exist), else every
    non-hidden subfolder, sorted. ``layout`` says what a site folder holds, for the error messages."""
    available = sorted(path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if sites is None:
        if not available:
            raise DataError(f"{str(root)!r} holds no site folders: put one folder per site there, {layout}.")
        return available
    missing = [site for site in sites if site not in available]
    if missing:
        raise DataError(
            f"Site folder(s) {missing} not found under {str(root)!r}, which holds {available}: fix data.sites or "
            "data.root."
        )
    return list(sites)


class SiteFolderFederation(FileFederation):
    """Base class of the federations read from one folder per site under ``root``, a client per site folder.

    The clients are found on first use of :attr:`client_names` (:func:`find_site_folders`).

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
            self._clients = find_site_folders(require_dir(self.root, self.root_description), self.sites, self.layout)
        return list(self._clients)
