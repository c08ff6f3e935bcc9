"""Collectives the orchestrator needs beyond Fabric's tensor ones, written for any world size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor


def all_gather_objects(fabric: Fabric, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (pickled; for metrics and small per-client state)."""
    if fabric.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum_(fabric: Fabric, tensors: Mapping[str, Tensor]) -> None:
    """Sum same-shaped float64 tensors across processes, in place, with a single collective."""
    if fabric.world_size == 1 or not tensors:
        return
    flat = fabric.all_reduce(torch.cat([t.reshape(-1) for t in tensors.values()]), reduce_op="sum")
    assert isinstance(flat, Tensor)  # a tensor in, a tensor out
    offset = 0
    for tensor in tensors.values():
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
