"""The executor seam: *where clients run*. The trainer decides rounds, participants, aggregation and outputs; an
executor trains a round's participants from the shared weights and evaluates clients.

:class:`InProcessExecutor` runs clients in this process (with ``trainer.devices=N``, in N Fabric processes, clients
spread round-robin); :class:`harmofl.flower.FlowerExecutor` sends them to their sites through a Flower grid.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from harmofl.data.base import FederatedDataModule, Split
from harmofl.federation.failures import ClientFailure, describe
from harmofl.federation.runner import ClientUpdate, Metrics
from harmofl.federation.topology import POOLED_CLIENT, Federation

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer

Outcome = ClientUpdate | ClientFailure
Results = dict[str, dict[str, Metrics]]


class Executor(Protocol):
    """Where clients run. Every method is called on every process of the run."""

    #: How messages name a client ("client", or "site" in a deployment).
    client_noun: str

    def connect(self, trainer: FederatedTrainer, datamodule: FederatedDataModule | None, stage: str) -> dict[str, int]:
        """Get ready to run clients: every client's number of training samples, in the clients' order."""
        ...

    def start(self, trainer: FederatedTrainer) -> None:
        """The trainer's federation, model and client store are set up: bind to them."""
        ...

    def check_resumable(self) -> None:
        """Raise when a run through this executor cannot continue from a checkpoint."""
        ...

    def record_holders(self) -> list[str]:
        """The clients whose records this process keeps (its part of a checkpoint)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps of the executor itself to continue the run (a deployment's federation id)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` from the checkpoint a fit continues from."""
        ...

    def train(
        self, round_idx: int, participants: list[str], shared: Mapping[str, Tensor]
    ) -> Iterator[tuple[str, Outcome]]:
        """Train this process's share of ``participants`` from the global ``shared`` weights: each client's checked
        update, or the failure for which it is skipped (the failure policy applied). An update's state may be live
        (valid until the next item is drawn)."""
        ...

    def evaluate(self, splits: tuple[Split, ...]) -> Results:
        """This process's share of every client's metrics of the global model on ``splits``."""
        ...


def clients_read_by(federation: Federation, rank: int, world_size: int) -> list[str]:
    """The clients whose data process ``rank`` of ``world_size`` reads: those it evaluates and trains, and every
    training client when it trains the pooled one. The others' data it never loads."""
    trainees = federation.trained_by(rank, world_size)
    pooled = federation.training_clients if POOLED_CLIENT in trainees else []
    readers = dict.fromkeys([*federation.evaluated_by(rank, world_size), *trainees, *pooled])
    return [client for client in readers if client != POOLED_CLIENT]


class InProcessExecutor:
    """Clients trained and evaluated one after the other on this process's model, through the trainer's
    :class:`~harmofl.federation.runner.LocalRunner`; process ``r`` of ``N`` holds clients ``r, r+N, ...``."""

    client_noun = "client"

    def connect(self, trainer: FederatedTrainer, datamodule: FederatedDataModule | None, stage: str) -> dict[str, int]:
        if not isinstance(datamodule, FederatedDataModule):
            raise TypeError(f"The data must be a harmofl FederatedDataModule, got {type(datamodule).__name__}.")
        trainer.setup_data(datamodule, stage, clients=[])  # each process loads its own clients' data in start()
        return {client: datamodule.num_samples(client, "train") for client in datamodule.client_names}

    def start(self, trainer: FederatedTrainer) -> None:
        self.trainer = trainer
        rank, world_size = trainer.global_rank, trainer.world_size
        self.my_clients = trainer.federation.evaluated_by(rank, world_size)
        self.my_trainees = trainer.federation.trained_by(rank, world_size)
        self.runner = trainer.local_runner(trainer.federation.training_clients)
        trainer.load_clients(clients_read_by(trainer.federation, rank, world_size))

    def check_resumable(self) -> None:
        """A simulated run always continues from its checkpoint."""

    def record_holders(self) -> list[str]:
        """The clients this process evaluates and those it trains (the pooled one)."""
        return list(dict.fromkeys(self.my_clients + self.my_trainees))

    def state_dict(self) -> dict[str, Any]:
        """Nothing: every client's state is in its checkpoint entry."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore (a deployment's checkpoint continued in simulation needs none either)."""

    def train(
        self, round_idx: int, participants: list[str], shared: Mapping[str, Tensor]
    ) -> Iterator[tuple[str, Outcome]]:
        for client in (c for c in self.my_trainees if c in participants):
            yield client, self._train_under_policy(client, round_idx, shared)

    def _train_under_policy(self, client: str, round_idx: int, shared: Mapping[str, Tensor]) -> Outcome:
        """A retry starts again from the same global weights, client state and seed; the callbacks' state of the
        client (its amplitude target, its control variate) is rolled back first."""
        trainer, policy = self.trainer, self.trainer.failure_policy
        saved = trainer.store.snapshot(client) if policy.tolerant else None
        seed = trainer.federation.client_seed(round_idx, client)
        attempt = 0
        while True:
            try:
                return self.runner.train(client, trainer.global_state, shared, seed)
            except Exception as error:  # any fault of one client's training; KeyboardInterrupt is not caught
                if saved is not None:
                    trainer.store.load_callback_states(client, copy.deepcopy(saved))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # an out-of-memory client must not starve the next one
                if not policy.retry(client, round_idx, attempt, error):
                    return ClientFailure(describe(error))
                attempt += 1

    def evaluate(self, splits: tuple[Split, ...]) -> Results:
        return {client: self.runner.evaluate(client, self.trainer.global_state, splits) for client in self.my_clients}
