"""A site's side of a Flower deployment: the orchestrator's own client code, for the one client this node holds."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from harmofl import validation
from harmofl.clients.base import FederatedClient
from harmofl.data.base import FederatedDataModule, Split
from harmofl.trainer import ClientRecord, ClientUpdate, FederatedTrainer, _to_host


class FlowerSite(FederatedTrainer):
    """Local training and evaluation of one site, as :class:`~harmofl.trainer.FederatedTrainer` runs them in
    simulation: the same client module, callbacks (amplitude harmonization), weight-perturbation step, seeds
    and update checks. Built from the run's YAML configuration; the server decides rounds and seeds.

    Between messages the site's state (its local weights, optimizer state, the module's per-client state and the
    callbacks' client state) is kept by the caller: :meth:`site_state` / :meth:`load_site_state`.
    """

    def attach(self, model: FederatedClient, datamodule: FederatedDataModule, site: str) -> None:
        """Set up the model and the data of client ``site``, which the data module must hold."""
        self._setup_data(datamodule, "fit")
        self.client_names = list(datamodule.client_names)
        if site not in self.client_names:
            raise ValueError(
                f"This node serves site {site!r}, but its data holds {self.client_names}: set the node's `site` (its "
                "--node-config) to one of them, or its `data-path` to the folder of that site's data."
            )
        self.site = site
        self.my_clients = self.my_trainees = [site]
        self._setup_model(model, "fit")
        self.initial_state = dict(self.global_state)
        self.shared_keys = list(self.shared_global_state())

    @property
    def train_samples(self) -> int:
        return self.datamodule.num_samples(self.site, "train")

    def train(self, shared: Mapping[str, Tensor], round_idx: int, seed: int) -> ClientUpdate:
        """One round of local training from the server's ``shared`` weights; returns the updated shared weights."""
        self._receive(shared)
        self.current_round = round_idx
        loss, num_steps = self._train_client(self.site, round_idx, shared, seed)
        self._store_client(self.site)
        state = self.module.state_dict()
        return ClientUpdate({key: _to_host(state[key]) for key in self.shared_keys}, loss, num_steps)

    def evaluate(self, shared: Mapping[str, Tensor], splits: tuple[Split, ...]) -> dict[str, dict[str, float]]:
        """The site's metrics of the server's model (with the site's local weights) on ``splits``."""
        self._receive(shared)
        return self._evaluate_client(self.site, splits)

    def load_server_state(self, states: Mapping[str, Any]) -> None:
        """The federated callbacks' global state the server sent (the shared amplitude target)."""
        self._load_callback_states(states)

    def client_states(self, keys: list[str]) -> dict[str, Any]:
        """The callbacks' state of this site that the server asked for (by callback state key)."""
        return {key: state for key, state in self._client_callback_states(self.site).items() if key in keys}

    def site_state(self) -> dict[str, Any]:
        """What the site keeps between rounds; it never leaves the site."""
        record = self.client_records.get(self.site, ClientRecord())
        return {
            "record": {"local_state": record.local_state, "optimizer_state": record.optimizer_state,
                       "module_state": record.module_state},
            "callbacks": self._client_callback_states(self.site),
        }

    def load_site_state(self, state: Mapping[str, Any]) -> None:
        self.client_records[self.site] = ClientRecord(**state["record"])
        self._load_client_callback_states(self.site, state["callbacks"])

    def _receive(self, shared: Mapping[str, Tensor]) -> None:
        try:  # the server's weights must fit this site's model: the same checks as the server's of an update
            validation.check_update(shared, {key: self.initial_state[key] for key in self.shared_keys})
        except validation.InvalidUpdate as error:
            raise ValueError(
                f"The server's weights do not fit this site's model: {error}. The server and the sites must run the "
                "same configuration."
            ) from error
        self.global_state = {**self.initial_state, **shared}
