"""What FedRDN and FedDG have in common: each training site shares a small summary of its images once, and the
server hands every site the bank of all of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule
from torch import Tensor

from harmofl.federation.callback import FederatedCallback
from harmofl.federation.store import to_host

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer


class SiteBankCallback(FederatedCallback):
    """A federated callback whose clients each compute a summary (``client_summaries[client]``: statistics,
    amplitude spectra) that the server gathers, once, into ``bank`` ``{site: summary}``.

    After a round's aggregation the server adds the summaries of the training sites not in the bank yet (normally
    all of them after round 1; a site that had not trained yet, under partial participation or a skipped failure,
    after a later round). The bank is this callback's global state, so it reaches every site with the global model
    and is checkpointed; each client's own summary stays in its client record. Held-out sites never enter the bank.
    """

    def __init__(self) -> None:
        self.client_summaries: dict[str, Any] = {}
        self.bank: dict[str, Any] = {}
        self.complete = False

    def shares_client_states(self) -> bool:
        """Whether the bank still lacks training sites (their summaries must then reach the server)."""
        return not self.complete

    def on_aggregate(self, trainer: FederatedTrainer, pl_module: LightningModule, round_idx: int) -> None:
        """Add the summaries of the training sites that are not in the bank yet (every process takes part)."""
        if self.complete:
            return
        trainees = trainer.federation.trainees
        own = {client: summary for client, summary in self.client_summaries.items() if client in trainees}
        self.bank = trainer.federation.ordered({**self.bank, **trainer.gather_client_values(own)})
        self.complete = all(client in self.bank for client in trainees)

    def state_dict(self) -> dict[str, Any]:
        return {"bank": to_host(self.bank), "complete": self.complete}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bank = dict(state_dict["bank"])
        self.complete = bool(state_dict["complete"])

    def client_state_dict(self, client: str) -> dict[str, Any]:
        return {"summary": to_host(self.client_summaries.get(client))}

    def load_client_state_dict(self, client: str, state: dict[str, Any]) -> None:
        if state.get("summary") is None:
            self.client_summaries.pop(client, None)
        else:
            self.client_summaries[client] = state["summary"]


def images_and_targets(batch: Any, owner: str) -> tuple[Tensor, Tensor]:
    """The ``[images, targets]`` of a batch, checked: ``owner`` (the callback's name) is named if it is not one."""
    images = batch[0] if isinstance(batch, (list, tuple)) and len(batch) == 2 else None
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(
            f"{owner} expects batches [images, targets] with float images [B, C, H, W], got {type(batch).__name__}."
        )
    return images, batch[1]
