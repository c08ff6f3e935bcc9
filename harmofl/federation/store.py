"""What each client keeps between rounds, on the host: its local keys, optimizer state, the module's per-client
state, and the federated callbacks' per-client state (amplitude target, control variate); and which of these
the client's record file on disk (:mod:`harmofl.checkpoint`) still holds."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from harmofl import aggregation
from harmofl.checkpoint import content_digest
from harmofl.clients.base import FederatedClient
from harmofl.federation.callback import FederatedCallback

#: A client's entry in a checkpoint (and a Flower site's state between messages).
ClientEntry = dict[str, Any]


def to_host(value: Any) -> Any:
    """A detached CPU copy of every tensor in a nested structure (state dicts, optimizer states)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(item) for item in value)
    return value


@dataclass
class ClientRecord:
    """What a client keeps between rounds, on the host: its local keys, its optimizer state, and the module's
    per-client state (:meth:`~harmofl.clients.base.FederatedClient.persistent_client_state`: MOON's last model)."""

    local_state: dict[str, Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    module_state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WrittenRecord:
    """A client's record file on disk: its reference in the checkpoint, and the
    :func:`~harmofl.checkpoint.content_digest` of the callbacks' state it holds."""

    reference: str
    callbacks_digest: str


class ClientStore:
    """Every client's :class:`ClientRecord` and its federated callbacks' state: load a client into the one model
    of this process, store it back, snapshot and roll back, and the checkpoint entries.

    A client's record file is stale once :meth:`save` or :meth:`load_entry` replaced its :class:`ClientRecord`, or
    once its callbacks' state differs from the file's (compared by digest: callbacks may change a client's state in
    any hook, e.g. a statistic computed at its first evaluation): :meth:`stale_entries`.

    Args:
        callbacks: the federated callbacks whose per-client state is the client's.
        local_keys: the state-dict keys each client keeps local (FedBN-style).
        initial_optimizer_state: the optimizer state of a client that has not trained yet.
    """

    def __init__(
        self, callbacks: Sequence[FederatedCallback], local_keys: set[str], initial_optimizer_state: dict[str, Any]
    ) -> None:
        self.callbacks = list(callbacks)
        self.local_keys = local_keys
        self.initial_optimizer_state = initial_optimizer_state
        self.records: dict[str, ClientRecord] = {}
        #: Each client's record file, once written (or restored from this run's checkpoint).
        self.written: dict[str, WrittenRecord] = {}
        self._replaced: set[str] = set()  # clients whose ClientRecord changed since their file was written

    def load(
        self,
        client: str,
        module: FederatedClient,
        optimizer: Optimizer,
        global_state: Mapping[str, Tensor],
        with_optimizer: bool,
    ) -> None:
        """Put the global weights, ``client``'s local keys and (for training) its optimizer state in place."""
        record = self.records.get(client, ClientRecord())
        module.load_state_dict(aggregation.merge_states(global_state, record.local_state))
        if with_optimizer:
            # A copy: on the CPU the optimizer would otherwise adopt (and mutate) the stored tensors.
            optimizer.load_state_dict(copy.deepcopy(record.optimizer_state or self.initial_optimizer_state))
            module.load_persistent_client_state(record.module_state)

    def save(self, client: str, module: FederatedClient, optimizer: Optimizer) -> None:
        """Keep ``client``'s local keys, optimizer state and module state after it trained."""
        state = module.state_dict()
        self.records[client] = ClientRecord(
            local_state={key: to_host(state[key]) for key in self.local_keys},
            optimizer_state=to_host(optimizer.state_dict()),
            module_state=to_host(module.persistent_client_state()),
        )
        self._replaced.add(client)

    def callback_states(self, client: str) -> dict[str, Any]:
        """Every federated callback's state of ``client``, by callback state key."""
        return {cb.state_key: cb.client_state_dict(client) for cb in self.callbacks}

    def load_callback_states(self, client: str, states: Mapping[str, Any]) -> None:
        """Restore the callbacks' state of ``client`` from ``states`` (callbacks absent from it are left as is)."""
        for cb in self.callbacks:
            if cb.state_key in states:
                cb.load_client_state_dict(client, states[cb.state_key])

    def snapshot(self, client: str) -> dict[str, Any]:
        """A copy of the callbacks' state of ``client``, to :meth:`load_callback_states` when a retry rolls back."""
        return copy.deepcopy(self.callback_states(client))

    def entry(self, client: str) -> ClientEntry:
        """``client``'s checkpoint entry; a client that has not trained yet has an empty record."""
        record = self.records.get(client, ClientRecord())
        return {
            "local_state": record.local_state,
            "optimizer_state": record.optimizer_state,
            "module_state": record.module_state,
            "callbacks": self.callback_states(client),
        }

    def load_entry(self, client: str, entry: Mapping[str, Any], with_optimizer: bool) -> None:
        """Restore ``client`` from its checkpoint :meth:`entry` (without its optimizer state to evaluate only)."""
        self.records[client] = ClientRecord(
            local_state=entry["local_state"],
            optimizer_state=entry["optimizer_state"] if with_optimizer else None,
            module_state=entry.get("module_state", {}),
        )
        self._replaced.add(client)
        self.load_callback_states(client, entry["callbacks"])

    def stale_entries(self, clients: Iterable[str]) -> Iterator[tuple[str, ClientEntry, str]]:
        """``(client, entry, digest of the entry's callbacks' state)`` of each of ``clients`` whose record file is
        missing or no longer holds its state: those to write (then :meth:`mark_written`)."""
        for client in clients:
            entry = self.entry(client)
            callbacks_digest = content_digest(entry["callbacks"])
            written = self.written.get(client)
            if written is None or client in self._replaced or written.callbacks_digest != callbacks_digest:
                yield client, entry, callbacks_digest

    def mark_written(self, client: str, reference: str, callbacks_digest: str) -> None:
        """``client``'s state as it is now is in record file ``reference``, whose callbacks' state has
        ``callbacks_digest``."""
        self.written[client] = WrittenRecord(reference, callbacks_digest)
        self._replaced.discard(client)
