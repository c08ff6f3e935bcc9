"""Deployment across institutions on Flower (``pip install -e ".[flower]"``): the orchestrator with a
:class:`FlowerExecutor` as a ServerApp, each site's client as a ClientApp (:class:`FlowerSite`), the same code as in
simulation. See docs/deployment.md."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harmofl.flower.executor import FlowerExecutor
    from harmofl.flower.site import FlowerSite

__all__ = ["FlowerExecutor", "FlowerSite"]


def __getattr__(name: str) -> Any:
    """``FlowerExecutor`` and ``FlowerSite`` on first use: a ClientApp process imports this package for its app
    before it knows whether the message needs PyTorch and Lightning."""
    if name == "FlowerExecutor":
        from harmofl.flower.executor import FlowerExecutor

        return FlowerExecutor
    if name == "FlowerSite":
        from harmofl.flower.site import FlowerSite

        return FlowerSite
    raise AttributeError(f"module 'harmofl.flower' has no attribute {name!r}")
