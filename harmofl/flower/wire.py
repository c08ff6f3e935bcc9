"""What crosses the network between the Flower ServerApp and the sites, and how it is encoded.

Server → site, ``train`` and ``evaluate`` messages:
    ``arrays`` the global model's floating-point shared weights (every key but those the sites keep local), the
    message's one ArrayRecord, which Flower's mods (``LocalDpMod``) act on; ``buffers`` its integer buffers
    (BatchNorm's batch counters); ``server-state`` the federated callbacks' global state (HarmoFL: the shared
    amplitude target once it exists, and whether it is frozen); ``config`` the round, the federation id (which
    names the site's state folder, :mod:`harmofl.flower.site_store`), the site's seed, the splits to evaluate,
    which callback states the server needs back.
Site → server, ``train`` replies:
    ``arrays`` and ``buffers`` with the same keys, updated; ``metrics`` the mean training loss and the number of
    local steps; ``client-state`` only when the server asked for it (HarmoFL: the site's amplitude target, in
    round 1), a ``[C, H, W]`` mean amplitude spectrum, never an image.
Site → server, ``evaluate`` replies: ``metrics``, each split's metric values. ``query`` replies: ``site``, the
site's name, and ``train-samples``, its number of training samples (client weighting by data size).

Nothing else is sent: never images, labels, masks, file names, optimizer state or the sites' local weights.
Structured states are serialized with ``torch.save`` and read back with ``weights_only=True`` (tensors and plain
values only: a message cannot make the receiver run code).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

ARRAYS = "arrays"
BUFFERS = "buffers"
CONFIG = "config"
SERVER_STATE = "server-state"
CLIENT_STATE = "client-state"
METRICS = "metrics"
SITE = "site"
TRAIN_SAMPLES = "train-samples"
FEDERATION_ID = "federation-id"

_BLOB = "blob"  # the one entry of a ConfigRecord that carries a serialized structure


def to_bytes(value: Any) -> bytes:
    """``value`` (tensors, dicts, lists, numbers, strings, None) serialized with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Any:
    """The value :func:`to_bytes` serialized; refuses anything but tensors and plain values (``weights_only``)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def blob_record(value: Any) -> ConfigRecord:
    return ConfigRecord({_BLOB: to_bytes(value)})


def read_blob(content: RecordDict, name: str) -> Any:
    return from_bytes(content.config_records[name][_BLOB])  # type: ignore[arg-type]  # a blob is bytes


def weight_records(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """``arrays`` (floating-point entries) and ``buffers`` (integer entries) of a state dict."""
    floats = {key: value.detach().cpu() for key, value in state.items() if value.is_floating_point()}
    integers = {key: value.detach().cpu() for key, value in state.items() if not value.is_floating_point()}
    return {ARRAYS: ArrayRecord(torch_state_dict=floats), BUFFERS: blob_record(integers)}


def read_weights(content: RecordDict) -> dict[str, Tensor]:
    """The state dict :func:`weight_records` encoded (arrays come back as writable CPU tensors)."""
    state = {key: value.clone() for key, value in content.array_records[ARRAYS].to_torch_state_dict().items()}
    state.update(read_blob(content, BUFFERS))
    return state


def broadcast_records(shared: Mapping[str, Tensor], server_state: Mapping[str, Any]) -> dict[str, Any]:
    """What every site receives alike: the shared global weights and the callbacks' global state, encoded once."""
    return {**weight_records(shared), SERVER_STATE: blob_record(dict(server_state))}


def train_instruction(
    broadcast: Mapping[str, Any], round_idx: int, seed: int, requested_states: list[str], federation_id: str
) -> RecordDict:
    """The content of a ``train`` message: train from ``broadcast`` in round ``round_idx`` (0-based) with ``seed``,
    from the site's state of federation ``federation_id`` after the rounds before."""
    config = ConfigRecord(
        {"round": round_idx, "seed": seed, "client-states": ",".join(requested_states), FEDERATION_ID: federation_id}
    )
    return RecordDict({**broadcast, CONFIG: config})


def evaluate_instruction(
    broadcast: Mapping[str, Any], splits: tuple[str, ...], round_idx: int, federation_id: str
) -> RecordDict:
    """The content of an ``evaluate`` message: evaluate ``broadcast``'s weights, the model of round ``round_idx``
    (0-based), on ``splits`` with the site's state of federation ``federation_id`` after that round."""
    config = ConfigRecord({"splits": ",".join(splits), "round": round_idx, FEDERATION_ID: federation_id})
    return RecordDict({**broadcast, CONFIG: config})


def train_reply(
    update: Mapping[str, Tensor], loss: float, num_steps: int, client_states: Mapping[str, Any]
) -> RecordDict:
    records: dict[str, Any] = {**weight_records(update), METRICS: MetricRecord({"loss": loss, "num-steps": num_steps})}
    if client_states:
        records[CLIENT_STATE] = blob_record(dict(client_states))
    return RecordDict(records)


def evaluate_reply(results: Mapping[str, Mapping[str, float]]) -> RecordDict:
    flat = {f"{split}/{name}": float(value) for split, values in results.items() for name, value in values.items()}
    return RecordDict({METRICS: MetricRecord(flat)})  # type: ignore[arg-type]  # floats are metric values


def listed(config: ConfigRecord, key: str) -> list[str]:
    """The names a ``config`` entry lists (comma-separated: an empty list is a valid value)."""
    return [name for name in str(config[key]).split(",") if name]


def read_evaluation(content: RecordDict) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` of an evaluate reply."""
    results: dict[str, dict[str, float]] = {}
    for key, value in content.metric_records[METRICS].items():
        split, separator, name = key.partition("/")
        if not separator or not isinstance(value, int | float):
            raise ValueError(f"the metric {key!r}: {value!r} is not a 'split/name': number entry")
        results.setdefault(split, {})[name] = float(value)
    return results
