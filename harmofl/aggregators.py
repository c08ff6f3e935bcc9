"""Aggregators: how the server reduces a round's updates to one center, which the server optimizer then turns
into the next global model (``trainer.aggregator``, chosen by ``class_path`` like the server optimizers).

The maths are the pure functions of :mod:`harmofl.aggregation`; an aggregator adds how updates are collected:
:class:`Mean` keeps one running weighted sum per process (one all-reduce per round, memory independent of the
number of clients), the robust centers keep every update and gather them. The same aggregator centers the small
per-client values that callbacks share (:meth:`Aggregator.combine`: amplitude targets, SCAFFOLD's control changes), so
that a robust run is robust there too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric
from torch import Tensor

from harmofl import aggregation
from harmofl.aggregation import StateDict
from harmofl.federation.collectives import all_gather_objects, all_reduce_sum_
from harmofl.federation.store import to_host

if TYPE_CHECKING:
    from harmofl.federation.topology import Federation


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

    def combine(self, values: Sequence[StateDict], weights: Sequence[float]) -> dict[str, Tensor]:
        """The same kind of center as :meth:`center`, of small per-client values that are no model update (amplitude
        targets, SCAFFOLD's control changes), all on this process; ``weights`` as in :meth:`add`."""
        raise NotImplementedError

    def check_count(self, count: int) -> None:
        """Refuse to center ``count`` values when this aggregator's setting would not be what it claims (a median
        of two is their mean); nothing by default."""

    # Hooks of stateful aggregators (DP-FedAvg, :mod:`harmofl.private_aggregation`); no-ops by default.
    def start_round(self, round_idx: int, federation: Federation) -> None:
        """Called before :meth:`reset` with the round and the federation (who may take part, the run's seed)."""

    def round_metrics(self) -> dict[str, float]:
        """Server-side values of the round just aggregated, recorded in its history (``privacy/epsilon``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold for a resumed fit to aggregate as the uninterrupted one."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` when a fit continues from a checkpoint."""


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

    def combine(self, values: Sequence[StateDict], weights: Sequence[float]) -> dict[str, Tensor]:
        return aggregation.weighted_average(values, weights)


class _RobustCenter(Aggregator):
    """Keeps a host copy of every update (the center needs them all), gathered from every process; unweighted."""

    def start_round(self, round_idx: int, federation: Federation) -> None:
        self.check_count(len(federation.participants(round_idx)))  # before any client trains

    def reset(self, shared: StateDict, device: torch.device) -> None:
        self._keys = list(shared)
        self._updates: dict[str, dict[str, Tensor]] = {}

    def add(self, client: str, update: StateDict, weight: float) -> None:
        self._updates[client] = {key: to_host(update[key]) for key in self._keys}

    def center(self, fabric: Fabric, shared: StateDict, order: Sequence[str], total_weight: float) -> dict[str, Tensor]:
        gathered = {client: u for part in all_gather_objects(fabric, self._updates) for client, u in part.items()}
        updates = [gathered[client] for client in order if client in gathered]
        self.check_count(len(updates))
        return self.robust_center(updates, shared)

    def combine(self, values: Sequence[StateDict], weights: Sequence[float]) -> dict[str, Tensor]:
        self.check_count(len(values))
        return self.robust_center(values, values[0])

    def robust_center(self, updates: Sequence[StateDict], like: StateDict) -> dict[str, Tensor]:
        """The center of ``updates`` over the keys of ``like``, with its dtypes (their count checked)."""
        raise NotImplementedError


class Median(_RobustCenter):
    """The coordinate-wise median of the updates (unweighted), for untrusted sites; refuses 2 updates or fewer."""

    def check_count(self, count: int) -> None:
        if count <= 2:
            raise ValueError(
                f"trainer.aggregator=Median of {count} client value(s) is their mean, which one client steers: a "
                "median needs at least 3 clients per round (trainer.clients_per_round; trainer.min_clients=3 stops a "
                "round with fewer), or use harmofl.aggregators.Mean."
            )

    def robust_center(self, updates: Sequence[StateDict], like: StateDict) -> dict[str, Tensor]:
        return aggregation.coordinate_median(updates, like)


class TrimmedMean(_RobustCenter):
    """The coordinate-wise mean after dropping the ``trim_ratio`` largest and smallest values (unweighted).

    A round whose ``floor(trim_ratio·n)`` is 0 for its ``n`` updates (``trim_ratio=0.1`` below 10 clients) is
    refused rather than silently averaged.

    Args:
        trim_ratio: the fraction dropped on each side, in ``(0, 0.5)``.
    """

    def __init__(self, trim_ratio: float = 0.1) -> None:
        if not 0.0 < trim_ratio < 0.5:
            raise ValueError(
                f"trainer.aggregator.trim_ratio must be in (0, 0.5), got {trim_ratio} (0 trims nothing: that is "
                "harmofl.aggregators.Mean)."
            )
        self.trim_ratio = trim_ratio

    def check_count(self, count: int) -> None:
        if aggregation.trim_count(count, self.trim_ratio) > 0:
            return
        smallest = math.ceil(1000 / count) / 1000  # 1/count rounded up to 3 decimals: it trims one value
        remedy = (
            f"set trainer.aggregator.trim_ratio >= {smallest} (below 0.5), or run more clients per round"
            if count >= 3
            else "a trimmed mean needs at least 3 clients per round"
        )
        raise ValueError(
            f"trainer.aggregator=TrimmedMean(trim_ratio={self.trim_ratio}) of {count} client value(s) drops "
            f"floor({self.trim_ratio}·{count}) = 0 on each side: it is the plain mean, which one client steers; "
            f"{remedy} (trainer.min_clients stops a round with fewer)."
        )

    def robust_center(self, updates: Sequence[StateDict], like: StateDict) -> dict[str, Tensor]:
        return aggregation.trimmed_mean(updates, self.trim_ratio, like)
