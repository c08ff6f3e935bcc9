"""A site's side of a Flower deployment: the simulation's own local runner and client store, for the one client
this node holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from harmofl import validation
from harmofl.clients.base import FederatedClient
from harmofl.data.base import FederatedDataModule, Split
from harmofl.federation.runner import ClientUpdate, Metrics
from harmofl.federation.store import ClientEntry, to_host
from harmofl.flower.site_policy import RefusedRequest, site_log
from harmofl.trainer import FederatedTrainer


class FlowerSite:
    """Local training and evaluation of one site exactly as simulation runs a client: the trainer's
    :class:`~harmofl.federation.runner.LocalRunner` (harmonization callback, weight-perturbation step, FedProx/MOON
    terms, update checks) and :class:`~harmofl.federation.store.ClientStore`. The server decides rounds and seeds.

    Between messages the site's state (its local weights, optimizer state, the module's client state such as MOON's
    previous model, and the callbacks' client state such as its amplitude target) is kept by the caller:
    :meth:`site_state` / :meth:`load_site_state`. A deployment keeps it on the site's own disk, one file per round it
    trained, under the federation id the server sends (:mod:`harmofl.flower.site_store`), so that a restarted
    SuperNode continues the federation; it never leaves the site.

    Args:
        trainer: the trainer the run's configuration builds (its Fabric, callbacks, local work and update checks).
        model, datamodule: the client module and the data, which must hold client ``site``.
    """

    def __init__(self, trainer: FederatedTrainer, model: FederatedClient, datamodule: FederatedDataModule, site: str):
        trainer.setup_data(datamodule, "fit")
        if site not in datamodule.client_names:  # the names may be the site's folder names: not in the reply
            site_log.error("This node serves site %r, but its data holds %s.", site, list(datamodule.client_names))
            raise RefusedRequest(
                f"This node serves site {site!r}, which the run's data at this node does not hold: set the node's "
                "`site` (its --node-config) to one the site's log lists, or its `data-path` to that site's data."
            )
        trainer.setup_model(model, "fit")
        self.trainer, self.site, self.datamodule = trainer, site, datamodule
        self.runner = trainer.local_runner(pooled_clients=[])
        self.initial_state = dict(trainer.global_state)
        self.shared_keys = list(trainer.shared_global_state())

    @property
    def train_samples(self) -> int:
        return self.datamodule.num_samples(self.site, "train")

    def train(self, shared: Mapping[str, Tensor], round_idx: int, seed: int) -> ClientUpdate:
        """One round of local training from the server's ``shared`` weights; returns the updated shared weights."""
        global_state = self._receive(shared)
        self.trainer.current_round = round_idx
        update = self.runner.train(self.site, global_state, shared, seed)
        return ClientUpdate(
            {key: to_host(update.state[key]) for key in self.shared_keys}, update.loss, update.num_steps
        )

    def evaluate(self, shared: Mapping[str, Tensor], splits: tuple[Split, ...]) -> dict[str, Metrics]:
        """The site's metrics of the server's model (with the site's local weights) on ``splits``."""
        return self.runner.evaluate(self.site, self._receive(shared), splits)

    def load_server_state(self, states: Mapping[str, Any]) -> None:
        """The federated callbacks' global state the server sent (the shared amplitude target)."""
        self.trainer.load_callback_states(states)

    def client_states(self, keys: list[str]) -> dict[str, Any]:
        """The callbacks' state of this site that the server asked for (by callback state key)."""
        return {key: state for key, state in self.trainer.store.callback_states(self.site).items() if key in keys}

    def site_state(self) -> dict[str, Any]:
        """What the site keeps between rounds: its record, and its callbacks' state."""
        record: ClientEntry = self.trainer.store.entry(self.site)
        return {"callbacks": record.pop("callbacks"), "record": record}

    def load_site_state(self, state: Mapping[str, Any]) -> None:
        entry = {**state["record"], "callbacks": state["callbacks"]}
        self.trainer.store.load_entry(self.site, entry, with_optimizer=True)

    def _receive(self, shared: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The global state: this site's initial weights with the server's ``shared`` ones, which must fit."""
        try:  # the server's weights must fit this site's model: the same checks as the server's of an update
            validation.check_update(shared, {key: self.initial_state[key] for key in self.shared_keys})
        except validation.InvalidUpdate as error:
            raise ValueError(
                f"The server's weights do not fit this site's model: {error}. The server and the sites must run the "
                "same configuration."
            ) from error
        global_state = {**self.initial_state, **shared}
        self.trainer.global_state = global_state
        return global_state
