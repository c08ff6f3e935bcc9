"""The class path of :class:`SiteFolders` in configurations written before it moved to
:mod:`harmofl.data.site_folders` (``harmofl.data.folders.SiteFolders``, as in ``configs/site_folders.yaml``);
``harmofl.data.SiteFolders`` names it too."""

from __future__ import annotations

from harmofl.data.site_folders import SiteFolders

__all__ = ["SiteFolders"]
