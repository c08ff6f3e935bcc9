"""Collectives the orchestrator needs beyond Fabric's tensor ones, written for any world size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor

from harmofl import aggregation


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


def weighted_client_mean(
    fabric: Fabric, values: Mapping[str, Mapping[str, Tensor]], client_names: list[str], weights: Mapping[str, float]
) -> dict[str, Tensor] | None:
    """The ``weights``-weighted mean of small per-client tensors over every process's clients (``values`` holds
    this process's). Clients without a value are left out and the weights renormalized; None when none has one."""
    gathered: dict[str, Mapping[str, Tensor]] = {}
    for part in all_gather_objects(fabric, {c: {k: v.cpu() for k, v in d.items()} for c, d in values.items()}):
        gathered.update(part)
    clients = [c for c in client_names if c in gathered]
    if not clients:
        return None
    return aggregation.weighted_average([gathered[c] for c in clients], [weights[c] for c in clients])
