"""The federated callback: a Lightning callback with the hooks and the per-client state of federated rounds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from lightning.pytorch import Callback, LightningModule

from harmofl.data.base import Split

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer


class FederatedCallback(Callback):
    """Base class of callbacks that take part in federated rounds; every hook is a no-op by default.

    The orchestrator fires the federated hooks below (keyword arguments, with ``trainer`` the
    :class:`~harmofl.trainer.FederatedTrainer`) besides Lightning's batch hooks. Global state goes in the
    checkpoint through Lightning's ``state_dict`` / ``load_state_dict``; per-client state goes in each client's
    record through :meth:`client_state_dict` / :meth:`load_client_state_dict` (rolled back when a client's
    training is retried, restored with the checkpoint, kept at its site in a deployment).
    """

    #: Whether a Flower deployment can run this callback: its per-client state either stays at the site or
    #: reaches the server through :meth:`shares_client_states`.
    deployable: ClassVar[bool] = True
    #: Whether ``on_round_end``, ``on_save_checkpoint`` or ``on_round_start`` change this callback's global state, what
    #: :meth:`shares_client_states` answers or the global weights: a Flower deployment then sends a round's training
    #: apart from the previous round's evaluation, not in the same message (:mod:`harmofl.flower.executor`).
    changes_state_between_rounds: ClassVar[bool] = False

    def client_state_dict(self, client: str) -> dict[str, Any]:
        """This callback's state of ``client`` (host tensors)."""
        return {}

    def load_client_state_dict(self, client: str, state: dict[str, Any]) -> None:
        """Restore this callback's state of ``client`` from :meth:`client_state_dict`."""

    def shares_client_states(self) -> bool:
        """Whether this round's :meth:`on_aggregate` needs the clients' states at the server (a deployment then
        sends them with the training replies)."""
        return False

    def transform_batch(self, trainer: FederatedTrainer, pl_module: LightningModule, batch: Any, stage: Split) -> Any:
        """The batch the client's step sees instead of ``batch`` (on its device, before the ``on_*_batch_start``
        hooks): a data augmentation that needs the federation, and may change the batch's size. Identity by default;
        callbacks transform in their order in ``trainer.callbacks``."""
        return batch

    def on_round_start(self, trainer: FederatedTrainer, pl_module: LightningModule, round_idx: int) -> None:
        """A round starts (``round_idx`` is 0-based)."""

    def on_train_client_start(
        self, trainer: FederatedTrainer, pl_module: LightningModule, client: str, num_batches: int
    ) -> None:
        """``client``'s local training starts from the global weights; it will run ``num_batches`` steps."""

    def on_train_client_end(
        self, trainer: FederatedTrainer, pl_module: LightningModule, client: str, loss: float
    ) -> None:
        """``client``'s local training ended with mean training loss ``loss``."""

    def on_aggregate(self, trainer: FederatedTrainer, pl_module: LightningModule, round_idx: int) -> None:
        """The server aggregated round ``round_idx``; evaluation follows. Every process takes part."""

    def on_round_end(
        self, trainer: FederatedTrainer, pl_module: LightningModule, round_idx: int, results: dict[str, Any]
    ) -> None:
        """Round ``round_idx`` ended: ``results`` are its per-client metrics; checkpoint and outputs are written."""
