"""``harmofl.data.folders.SiteFolders``: the class path of :class:`SiteFolders` before it moved to
:mod:`harmofl.data.site_folders`, kept for the configurations written before the move (e.g. a run's saved
``config.yaml``). New configurations, ``configs/site_folders.yaml`` among them, name it ``harmofl.data.SiteFolders``."""

from __future__ import annotations

from harmofl.data.site_folders import SiteFolders

__all__ = ["SiteFolders"]
