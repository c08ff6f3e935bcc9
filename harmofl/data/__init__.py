"""Federated data sources: the per-site data contract, the built-in procedural demo and loaders for data on disk."""

from __future__ import annotations

from harmofl.data.augmentation import Augmentation
from harmofl.data.base import SPLITS, FederatedDataModule
from harmofl.data.camelyon import Camelyon17
from harmofl.data.checks import DataError
from harmofl.data.demo import DemoHistology, DemoNuclei
from harmofl.data.prostate import ProstateMRI
from harmofl.data.scanner_shift import ScannerShiftHistology
from harmofl.data.segmentation_folders import SegmentationFolders
from harmofl.data.site_folders import SiteFolders

__all__ = [
    "SPLITS",
    "Augmentation",
    "Camelyon17",
    "DataError",
    "DemoHistology",
    "DemoNuclei",
    "FederatedDataModule",
    "ProstateMRI",
    "ScannerShiftHistology",
    "SegmentationFolders",
    "SiteFolders",
]
