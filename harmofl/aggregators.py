"""Aggregators: how the server reduces a round's updates to one center, which the server optimizer then turns
into the next global model (``trainer.aggregator``, chosen by ``class_path`` like the server optimizers).

The maths are the pure functions of :mod:`harmofl.aggregation`; an aggregator adds how updates are collected:
:class:`Mean` keeps one running weighted sum per process (one all-reduce per round, memory independent of the
number of clients), the robust centers keep every update and gather them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.fabric import Fabric
from torch import Tensor

from harmofl import aggregation
from harmofl.aggregation import StateDict
from harmofl.federation.collectives import all_gather_objects, all_reduce_sum_
from harmofl.federation.store import to_host


class Aggregator:
    """Base class. Each round: :meth:`reset`, :meth:`add` every update this process received, then :meth:`center`
    (collective: every process calls it)."""

    #: Whether the center is a weighted mean (FedNova's normalization needs one).
    weighted: bool = False

    def reset(self, shared: StateDict, device: torch.device) -> None:
        """Start a round whose updates have the keys of the global ``shared`` weights."""
        raise NotImplementedError

    def add(self, client: str, update: StateDict, weight: float) -> None:
        """Take ``client``'s update with its aggregation weight (only :attr:`weighted` aggregators use it)."""
        raise NotImplementedError

    def center(self, fabric: Fabric, shared: StateDict, order: Sequence[str], total_weight: float) -> dict[str, Tensor]:
        """The center of every process's updates, with ``shared``'s dtypes; ``order`` is the clients' order and
        ``total_weight`` the sum of the weights added on every process."""
        raise NotImplementedError


class Mean(Aggregator):
    """The weighted mean (FedAvg): each process sums its clients in float64, one all-reduce adds the sums."""

    weighted = True

    def reset(self, shared: StateDict, device: torch.device) -> None:
        self._sum = aggregation.weighted_sum([], [], shared, device=device)

    def add(self, client: str, update: StateDict, weight: float) -> None:
        aggregation.add_weighted_(self._sum, update, weight)

    def center(self, fabric: Fabric, shared: StateDict, order: Sequence[str], total_weight: float) -> dict[str, Tensor]:
        all_reduce_sum_(fabric, self._sum)
        return aggregation.mean_from_sum(self._sum, total_weight, shared)


class _RobustCenter(Aggregator):
    """Keeps a host copy of every update (the center needs them all), gathered from every process."""

    def reset(self, shared: StateDict, device: torch.device) -> None:
        self._keys = list(shared)
        self._updates: dict[str, dict[str, Tensor]] = {}

    def add(self, client: str, update: StateDict, weight: float) -> None:
        self._updates[client] = {key: to_host(update[key]) for key in self._keys}

    def center(self, fabric: Fabric, shared: StateDict, order: Sequence[str], total_weight: float) -> dict[str, Tensor]:
        gathered = {client: u for part in all_gather_objects(fabric, self._updates) for client, u in part.items()}
        return self.robust_center([gathered[client] for client in order if client in gathered], shared)

    def robust_center(self, updates: Sequence[StateDict], shared: StateDict) -> dict[str, Tensor]:
        raise NotImplementedError


class Median(_RobustCenter):
    """The coordinate-wise median of the updates (unweighted), for untrusted sites."""

    def robust_center(self, updates: Sequence[StateDict], shared: StateDict) -> dict[str, Tensor]:
        return aggregation.coordinate_median(updates, shared)


class TrimmedMean(_RobustCenter):
    """The coordinate-wise mean after dropping the ``trim_ratio`` largest and smallest values (unweighted).

    Args:
        trim_ratio: the fraction dropped on each side, in ``[0, 0.5)``.
    """

    def __init__(self, trim_ratio: float = 0.1) -> None:
        if not 0.0 <= trim_ratio < 0.5:
            raise ValueError(f"trainer.aggregator.trim_ratio must be in [0, 0.5), got {trim_ratio}.")
        self.trim_ratio = trim_ratio

    def robust_center(self, updates: Sequence[StateDict], shared: StateDict) -> dict[str, Tensor]:
        return aggregation.trimmed_mean(updates, self.trim_ratio, shared)
