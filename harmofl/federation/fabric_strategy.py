"""The Fabric strategy for client parallelism: one process per device, each training its own clients."""

from __future__ import annotations

from lightning.fabric.strategies import DDPStrategy
from torch import nn


class ClientParallelStrategy(DDPStrategy):
    """DDP's launcher and process group, without DDP's gradient synchronization.

    In federated simulation a client is never split across processes: every process trains different
    clients, so gradients must not be all-reduced (that would leak clients into each other). Processes
    communicate only through explicit collectives when the server aggregates. gloo on CPU, NCCL on GPU.
    """

    def setup_module(self, module: nn.Module) -> nn.Module:  # type: ignore[override]  # no DDP wrapper
        # `Fabric.setup` has already moved the module to this process's device; no DistributedDataParallel wrap.
        return module
