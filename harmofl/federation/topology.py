"""Who is in a federation and who does what each round: clients, held-out sites, the pooled client, the
participants of a round, seeds and aggregation weights, and which process holds which client. No Fabric, no
tensors: plain data that every process, and a resumed run, derives identically."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harmofl import aggregation
from harmofl.reporting import MEAN, SERVER

#: The one client of pooled (centralized) training, which trains on every training client's data.
POOLED_CLIENT = "pooled"


def check_participation(clients_per_round: int | float | None) -> None:
    """``trainer.clients_per_round`` is None, an int >= 1 or a float in (0, 1]."""
    if clients_per_round is not None and not (
        (isinstance(clients_per_round, int) and clients_per_round >= 1)
        or (isinstance(clients_per_round, float) and 0.0 < clients_per_round <= 1.0)
    ):
        raise ValueError(
            f"trainer.clients_per_round must be an int >= 1 (clients per round) or a float in (0, 1] (a "
            f"fraction of the clients), got {clients_per_round!r}."
        )


def derive_seed(seed: int, round_idx: int, client_index: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client), independent of the process layout."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_index) % (2**63 - 1)


@dataclass(frozen=True)
class Federation:
    """The clients of a run and the rules that pick who trains.

    Attributes:
        client_names: every client (site), in the data's order.
        client_weight: each trainee's aggregation weight (the pooled client's is 1).
        held_out: clients that never train (leave-site-out); they evaluate the global model.
        pool_clients: one client named ``pooled`` trains on the union of the training clients' data.
        clients_per_round: partial participation (see :func:`check_participation`); None: every trainee.
        seed: the run's seed, from which participants and client seeds are derived.
    """

    client_names: list[str]
    client_weight: dict[str, float]
    held_out: list[str]
    pool_clients: bool
    clients_per_round: int | float | None
    seed: int

    @classmethod
    def build(
        cls,
        train_samples: Mapping[str, int],
        *,
        held_out: Sequence[str],
        pool_clients: bool,
        clients_per_round: int | float | None,
        client_weighting: aggregation.ClientWeighting,
        seed: int,
        world_size: int,
        min_clients: int,
    ) -> Federation:
        """The federation of the clients in ``train_samples`` (name → training samples, in order), checked against
        the settings that depend on them."""
        names = list(train_samples)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"The data module must name at least one client, each once; got {names}.")
        reserved = sorted({MEAN, SERVER} & set(names))
        if reserved:  # metrics.csv's rows of the mean over clients and of the server's own values use these names
            raise ValueError(f"Client names {reserved} are reserved for metrics.csv's summary rows: rename the sites.")
        if world_size > len(names):
            raise ValueError(
                f"{world_size} processes (trainer.num_nodes × trainer.devices) exceed the {len(names)} clients: every "
                f"process needs a client, so use at most {len(names)} processes in all."
            )
        held_out = list(held_out)
        unknown = sorted(set(held_out) - set(names))
        if unknown or len(held_out) >= len(names):
            raise ValueError(
                f"trainer.held_out_clients={held_out} must name clients of the data ({names}) and "
                f"leave at least one to train{f'; unknown: {unknown}' if unknown else ''}."
            )
        if pool_clients and POOLED_CLIENT in names:
            raise ValueError(f"trainer.pool_clients names its client {POOLED_CLIENT!r}, which is already a site name.")
        counts = [train_samples[client] for client in names]
        weights = dict(zip(names, aggregation.client_weights(counts, client_weighting)))
        if pool_clients:
            weights[POOLED_CLIENT] = 1.0
        federation = cls(names, weights, held_out, pool_clients, clients_per_round, seed)
        if min_clients > len(federation.participants(0)):
            raise ValueError(
                f"trainer.min_clients={min_clients} exceeds the {len(federation.participants(0))} clients that "
                "train each round: lower it."
            )
        return federation

    @property
    def training_clients(self) -> list[str]:
        """The clients whose data trains: every client not held out."""
        return [client for client in self.client_names if client not in self.held_out]

    @property
    def trainees(self) -> list[str]:
        """Who trains and sends updates: the training clients, or the one pooled client (``pool_clients``)."""
        return [POOLED_CLIENT] if self.pool_clients else self.training_clients

    def participants(self, round_idx: int) -> list[str]:
        """The trainees of round ``round_idx``: all, or a sample drawn from (seed, round) alone, so that every
        process, and a resumed run, draws the same."""
        trainees = self.trainees
        if self.clients_per_round is None:
            return trainees
        count = len(trainees)
        if isinstance(self.clients_per_round, float):
            wanted = math.ceil(self.clients_per_round * count)
        else:
            wanted = min(self.clients_per_round, count)
        chosen = random.Random(f"participation/{self.seed}/{round_idx}").sample(range(count), wanted)
        return [trainees[index] for index in sorted(chosen)]

    def client_seed(self, round_idx: int, client: str) -> int:
        """The seed of a trainee's data order and randomness in a round: independent of the process layout."""
        return derive_seed(self.seed, round_idx, self.trainees.index(client))

    def evaluated_by(self, rank: int, world_size: int) -> list[str]:
        """The clients process ``rank`` evaluates (round-robin)."""
        return self.client_names[rank::world_size]

    def trained_by(self, rank: int, world_size: int) -> list[str]:
        """The trainees process ``rank`` trains: the clients it evaluates, or (rank 0) the pooled one."""
        return self.trainees[rank::world_size]

    def ordered(self, per_client: Mapping[str, Any]) -> dict[str, Any]:
        """``per_client`` in the clients' order, the pooled client last."""
        return {client: per_client[client] for client in [*self.client_names, POOLED_CLIENT] if client in per_client}
