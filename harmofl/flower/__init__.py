"""Deployment across institutions on Flower (``pip install -e ".[flower]"``): the orchestrator as a ServerApp, each
site's client as a ClientApp, the same code as in simulation. See README, "Deploying across hospitals"."""

from harmofl.flower.server import FlowerServer
from harmofl.flower.site import FlowerSite

__all__ = ["FlowerServer", "FlowerSite"]
