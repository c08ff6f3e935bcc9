"""What crosses the network between the Flower ServerApp and the sites, and how it is encoded.

Server → site, ``train`` and ``evaluate`` messages:
    ``arrays`` the global model's floating-point shared weights (every key but those the sites keep local), the
    message's one ArrayRecord, which Flower's mods (``LocalDpMod``) act on; ``buffers`` its integer buffers
    (BatchNorm's batch counters); ``server-state`` the federated callbacks' global state (HarmoFL: the shared
    amplitude target once it exists, and whether it is frozen); ``config`` the round, the federation id (which
    names the site's state folder, :mod:`harmofl.flower.site_store`), the site's seed, the splits to evaluate,
    which callback states the server needs back. A ``train`` message with ``splits`` is a combined one: the site
    first evaluates the weights it receives (the previous round's global model) on them, then trains from them
    (:func:`read_train_instruction`): one exchange per round instead of two.
Site → server, ``train`` replies:
    ``arrays`` and ``buffers`` with the same keys, updated; ``metrics`` the mean training loss and the number of
    local steps; ``client-state`` only when the server asked for it (HarmoFL: the site's amplitude target, in
    round 1), a ``[C, H, W]`` mean amplitude spectrum, never an image. To a combined message: also ``evaluation``,
    the metrics of the evaluation; and if the training failed after it, ``evaluation`` and ``train-error`` only
    (the exception's class and a correlation id), so that a failed training does not lose the evaluation.
Site → server, ``evaluate`` replies: ``metrics``, each split's metric values. ``query`` replies: ``site``, the
site's name, and ``train-samples``, its number of training samples (client weighting by data size).

Nothing else is sent: never images, labels, masks, file names, optimizer state or the sites' local weights.
Structured states are serialized with ``torch.save`` and read back with ``weights_only=True`` (tensors and plain
values only: a message cannot make the receiver run code).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from harmofl.flower.site_policy import RefusedRequest

ARRAYS = "arrays"
BUFFERS = "buffers"
CONFIG = "config"
SERVER_STATE = "server-state"
CLIENT_STATE = "client-state"
METRICS = "metrics"
SITE = "site"
TRAIN_SAMPLES = "train-samples"
FEDERATION_ID = "federation-id"
EVALUATION = "evaluation"
TRAIN_ERROR = "train-error"
#: The splits a server may ask a site to evaluate.
EVALUATION_SPLITS = ("val", "test")

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
    broadcast: Mapping[str, Any],
    round_idx: int,
    seed: int,
    requested_states: list[str],
    federation_id: str,
    splits: tuple[str, ...] = (),
) -> RecordDict:
    """The content of a ``train`` message: train from ``broadcast`` in round ``round_idx`` (0-based) with ``seed``,
    from the site's state of federation ``federation_id`` after the rounds before; with ``splits``, first evaluate
    ``broadcast``'s weights (round ``round_idx - 1``'s global model) on them."""
    config = ConfigRecord(
        {"round": round_idx, "seed": seed, "client-states": ",".join(requested_states), FEDERATION_ID: federation_id}
    )
    if splits:
        config["splits"] = ",".join(splits)
    return RecordDict({**broadcast, CONFIG: config})


@dataclass(frozen=True)
class TrainInstruction:
    """A ``train`` message's ``config``, decoded: the round (0-based), the site's seed, the callback states to send
    back, and the splits to evaluate first (empty: train only)."""

    round_idx: int
    seed: int
    requested_states: list[str]
    splits: tuple[str, ...]


def read_train_instruction(config: ConfigRecord) -> TrainInstruction:
    """The instruction of a ``train`` message's ``config``; a malformed one is refused, naming the entry (the federation
    id is checked where it names a folder, :func:`harmofl.flower.site_store.check_federation_id`)."""
    values = {key: config.get(key) for key in ("round", "seed")}
    bad = [f"{key}={value!r}" for key, value in values.items() if not _is_count(value)]
    if not isinstance(config.get("client-states"), str):
        bad.append(f"client-states={config.get('client-states')!r}")
    splits = tuple(listed(config, "splits")) if "splits" in config else ()
    if not isinstance(config.get("splits", ""), str) or any(s not in EVALUATION_SPLITS for s in splits):
        bad.append(f"splits={config.get('splits')!r}")
    if bad:
        raise RefusedRequest(
            f"The server's train instruction is malformed: {', '.join(bad)} (round and seed are ints >= 0, "
            f"client-states a comma-separated list, splits of {list(EVALUATION_SPLITS)}). The server and the sites "
            "must run the same version of harmofl."
        )
    return TrainInstruction(int(values["round"]), int(values["seed"]), listed(config, "client-states"), splits)  # type: ignore[arg-type]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def evaluate_instruction(
    broadcast: Mapping[str, Any], splits: tuple[str, ...], round_idx: int, federation_id: str
) -> RecordDict:
    """The content of an ``evaluate`` message: evaluate ``broadcast``'s weights, the model of round ``round_idx``
    (0-based), on ``splits`` with the site's state of federation ``federation_id`` after that round."""
    config = ConfigRecord({"splits": ",".join(splits), "round": round_idx, FEDERATION_ID: federation_id})
    return RecordDict({**broadcast, CONFIG: config})


def train_reply(
    update: Mapping[str, Tensor],
    loss: float,
    num_steps: int,
    client_states: Mapping[str, Any],
    evaluation: Mapping[str, Mapping[str, float]] | None = None,
) -> RecordDict:
    """A ``train`` reply; to a combined message, with the ``evaluation`` the site ran first."""
    records: dict[str, Any] = {**weight_records(update), METRICS: MetricRecord({"loss": loss, "num-steps": num_steps})}
    if client_states:
        records[CLIENT_STATE] = blob_record(dict(client_states))
    if evaluation is not None:
        records[EVALUATION] = metric_record(evaluation)
    return RecordDict(records)


def failed_training_reply(evaluation: Mapping[str, Mapping[str, float]], reason: str) -> RecordDict:
    """The reply to a combined message whose evaluation succeeded and whose training failed (``reason``: the
    exception's class and a correlation id, :func:`harmofl.flower.site_policy.error_reason`)."""
    return RecordDict({EVALUATION: metric_record(evaluation), TRAIN_ERROR: ConfigRecord({"reason": reason})})


def evaluate_reply(results: Mapping[str, Mapping[str, float]]) -> RecordDict:
    return RecordDict({METRICS: metric_record(results)})


def metric_record(results: Mapping[str, Mapping[str, float]]) -> MetricRecord:
    """``{split: {metric: value}}`` as one MetricRecord of ``split/metric`` entries."""
    flat = {f"{split}/{name}": float(value) for split, values in results.items() for name, value in values.items()}
    return MetricRecord(flat)  # type: ignore[arg-type]  # floats are metric values


def listed(config: ConfigRecord, key: str) -> list[str]:
    """The names a ``config`` entry lists (comma-separated: an empty list is a valid value)."""
    return [name for name in str(config[key]).split(",") if name]


def read_evaluation(content: RecordDict, record: str = METRICS) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` of an evaluate reply (``record``: ``evaluation`` in a combined train reply)."""
    results: dict[str, dict[str, float]] = {}
    for key, value in content.metric_records[record].items():
        split, separator, name = key.partition("/")
        if not separator or not isinstance(value, int | float):
            raise ValueError(f"the metric {key!r}: {value!r} is not a 'split/name': number entry")
        results.setdefault(split, {})[name] = float(value)
    return results


def fingerprint(value: Any) -> str:
    """A digest of ``value``'s content: nested mappings and sequences, tensors by dtype, shape and values (not by
    storage), other values by type and ``repr``. Equal digests: the same message content."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {value.dtype} {tuple(value.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())
