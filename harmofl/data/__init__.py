"""Federated data sources: the per-site data contract and the built-in procedural demo."""

from __future__ import annotations

from harmofl.data.base import SPLITS, FederatedDataModule
from harmofl.data.demo import DemoHistology, DemoNuclei

__all__ = ["SPLITS", "DemoHistology", "DemoNuclei", "FederatedDataModule"]
