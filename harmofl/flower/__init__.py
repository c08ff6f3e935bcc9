"""Deployment across institutions on Flower (``pip install -e ".[flower]"``): the orchestrator with a
:class:`FlowerExecutor` as a ServerApp, each site's client as a ClientApp (:class:`FlowerSite`), the same code as in
simulation. See docs/deployment.md."""

from harmofl.flower.executor import FlowerExecutor
from harmofl.flower.site import FlowerSite

__all__ = ["FlowerExecutor", "FlowerSite"]
