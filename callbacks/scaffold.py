"""The SCAFFOLD callback: control variates that correct each client's drift (maths in :mod:`harmofl.scaffold`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from harmofl import scaffold
from harmofl.clients.base import FederatedClient
from harmofl.federation.callback import FederatedCallback
from harmofl.trainer import FederatedTrainer

Controls = dict[str, Tensor]


class Scaffold(FederatedCallback):
    """SCAFFOLD (Karimireddy et al. 2020) on top of the orchestrator's aggregation (FedAvg by default).

    While a client trains, its module's gradients are corrected by ``c − c_i`` (through
    :attr:`~harmofl.clients.base.FederatedClient.gradient_correction`); after its local steps the client's
    control ``c_i`` is updated (option II); after aggregation the server control ``c`` moves by the
    participants' center of changes (as ``trainer.aggregator`` centers updates: their weighted mean, or under a robust
    aggregator their coordinate-wise median or trimmed mean) times the participating fraction. Controls cover the
    parameters the clients share (not those kept local by ``trainer.local_modules``); they stay on the host between
    clients.
    The server control is in the checkpoint's callbacks, each ``c_i`` in its client's record.

    The option-II update divides the model change by the steps' total learning rate, so the base optimizer
    must be ``torch.optim.SGD`` (momentum allowed, see :mod:`harmofl.scaffold`); HarmoFL's weight perturbation
    combines with it (the corrected gradient is the one taken at the perturbed weights).
    """

    #: The per-round control changes are not in the Flower protocol yet.
    deployable: ClassVar[bool] = False

    def __init__(self) -> None:
        self.server_control: Controls | None = None
        self.client_controls: dict[str, Controls] = {}
        self._round_deltas: dict[str, Controls] = {}
        self._start_weights: Controls = {}
        self._num_steps = 0

    def on_train_client_start(
        self, trainer: FederatedTrainer, pl_module: LightningModule, client: str, num_batches: int
    ) -> None:
        _sgd_settings(pl_module)  # refuse another optimizer before any step
        parameters = _shared_parameters(trainer, pl_module)
        server, own = self._server_control(parameters), self._client_control(client, parameters)
        device = pl_module.device
        _client(pl_module).gradient_correction = {
            name: value.to(device) for name, value in scaffold.gradient_correction(server, own).items()
        }
        self._start_weights = {name: p.detach().to("cpu", copy=True) for name, p in parameters.items()}
        self._num_steps = num_batches

    def on_train_client_end(
        self, trainer: FederatedTrainer, pl_module: LightningModule, client: str, loss: float
    ) -> None:
        _client(pl_module).gradient_correction = None
        parameters = _shared_parameters(trainer, pl_module)
        own = self._client_control(client, parameters)
        lr, momentum = _sgd_settings(pl_module)
        updated = scaffold.updated_client_control(
            own,
            self._server_control(parameters),
            self._start_weights,
            {name: p.detach().to("cpu", copy=True) for name, p in parameters.items()},
            self._num_steps,
            lr,
            momentum,
        )
        self._round_deltas[client] = {name: updated[name] - own[name] for name in updated}
        self.client_controls[client] = updated

    def on_aggregate(self, trainer: FederatedTrainer, pl_module: LightningModule, round_idx: int) -> None:
        """Move the server control by the center of the participants' changes (every process takes part)."""
        center_delta = trainer.aggregate_client_values(self._round_deltas)
        self._round_deltas = {}
        if center_delta is None:
            return
        participation = len(trainer.federation.participants(round_idx)) / len(trainer.federation.trainees)
        server = self.server_control or {name: torch.zeros_like(d) for name, d in center_delta.items()}
        self.server_control = scaffold.updated_server_control(server, center_delta, participation)

    def _server_control(self, parameters: dict[str, Tensor]) -> Controls:
        return self.server_control if self.server_control is not None else _zeros(parameters)

    def _client_control(self, client: str, parameters: dict[str, Tensor]) -> Controls:
        return self.client_controls[client] if client in self.client_controls else _zeros(parameters)

    # -- state: the server control in the checkpoint's callbacks, each client's control in its record -------

    def state_dict(self) -> dict[str, Any]:
        return {"server_control": self.server_control}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.server_control = state_dict["server_control"]

    def client_state_dict(self, client: str) -> dict[str, Any]:
        return {"control": self.client_controls.get(client)}

    def load_client_state_dict(self, client: str, state: dict[str, Any]) -> None:
        if state.get("control") is None:
            self.client_controls.pop(client, None)
        else:
            self.client_controls[client] = state["control"]


def _shared_parameters(trainer: FederatedTrainer, pl_module: LightningModule) -> dict[str, Tensor]:
    """The trainable parameters every client sends (not those ``trainer.local_modules`` keeps local)."""
    if not isinstance(trainer, FederatedTrainer):
        raise TypeError("callbacks.Scaffold needs the federated orchestrator (harmofl.FederatedTrainer).")
    return {name: p for name, p in pl_module.named_parameters() if p.requires_grad and name not in trainer.local_keys}


def _client(pl_module: LightningModule) -> FederatedClient:
    if not isinstance(pl_module, FederatedClient):
        raise TypeError(f"callbacks.Scaffold needs a harmofl FederatedClient, got {type(pl_module).__name__}.")
    return pl_module


def _zeros(parameters: dict[str, Tensor]) -> Controls:
    return {name: torch.zeros(p.shape, dtype=p.dtype) for name, p in parameters.items()}


def _sgd_settings(pl_module: LightningModule) -> tuple[float, float]:
    """(learning rate, momentum) of the client's base optimizer, which must be plain or heavy-ball SGD."""
    optimizer: Any = pl_module.optimizers()  # one optimizer: the client's WeightPerturbation
    base = getattr(optimizer, "optimizer", optimizer)  # Fabric's wrapper
    base = getattr(base, "base_optimizer", base)  # the weight-perturbation wrapper
    group = base.param_groups[0]
    if not isinstance(base, torch.optim.SGD) or group.get("nesterov") or group.get("dampening"):
        raise ValueError(
            f"callbacks.Scaffold needs model.optimizer torch.optim.SGD without nesterov or dampening, got "
            f"{type(base).__name__}: its control-variate update divides the model change by the steps' total "
            "learning rate, which only SGD defines."
        )
    return float(group["lr"]), float(group.get("momentum", 0.0))
