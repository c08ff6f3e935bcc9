"""The face of a Lightning ``Trainer`` that ``LightningCLI`` and Trainer-style callbacks need, and nothing more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric import Fabric
from lightning.fabric.loggers import Logger
from lightning.pytorch import Trainer

from harmofl.clients.base import FederatedClient
from harmofl.federation.callback import FederatedCallback
from harmofl.federation.run_record import RunRecord
from harmofl.federation.runner import LocalRunner
from harmofl.federation.store import ClientRecord, ClientStore
from harmofl.federation.topology import Federation


class TrainerFacade(Trainer):
    """A :class:`~lightning.pytorch.Trainer` in type only: ``LightningCLI(trainer_class=...)`` requires a Trainer
    subclass, and callbacks such as LightningCLI's ``SaveConfigCallback`` read the properties below. None of
    Trainer's own loops or state is used, and ``Trainer.__init__`` is deliberately not called: subclasses set
    :attr:`fabric`, :attr:`root_dir` and :attr:`module`. Callbacks written for Trainer's fit loop alone
    (ModelCheckpoint, EarlyStopping) do not apply.
    """

    fabric: Fabric
    root_dir: Path
    module: FederatedClient
    federation: Federation
    store: ClientStore
    record: RunRecord
    runner: LocalRunner | None

    @property
    def default_root_dir(self) -> str:
        return str(self.root_dir)

    @property
    def log_dir(self) -> str:
        return str(self.root_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.root_dir / "checkpoints"

    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero

    @property
    def global_rank(self) -> int:
        return self.fabric.global_rank

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def strategy(self) -> Any:
        return self.fabric.strategy

    @property  # type: ignore[misc]  # read-only: Fabric's loggers
    def loggers(self) -> list[Logger]:  # type: ignore[override]
        return self.fabric.loggers

    @property
    def callbacks(self) -> list[Any]:
        return self.fabric._callbacks  # Fabric keeps them private; it offers no public accessor

    @property
    def lightning_module(self) -> FederatedClient:
        return self.module

    # -- the federated run, as callbacks read it ----------------------------------------------------------

    @property
    def current_client(self) -> str | None:
        """The client whose batches the model sees now (None outside a client's local work)."""
        return self.runner.current_client if self.runner is not None else None

    @property
    def federated_callbacks(self) -> list[FederatedCallback]:
        return [cb for cb in self.callbacks if isinstance(cb, FederatedCallback)]

    @property
    def client_records(self) -> dict[str, ClientRecord]:
        return self.store.records

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.record.history

    @property
    def best_round(self) -> int | None:
        return self.record.best_round

    @property
    def failures(self) -> list[dict[str, Any]]:
        return self.record.failures

    def participants(self, round_idx: int) -> list[str]:
        return self.federation.participants(round_idx)
