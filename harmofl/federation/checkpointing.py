"""The whole federated state in a checkpoint, and back: global weights, every client's entry, callbacks, server
optimizer, the run record. Files are written atomically and loaded safely by :mod:`harmofl.checkpoint`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from harmofl import validation
from harmofl.checkpoint import load_checkpoint
from harmofl.federation.collectives import all_gather_objects
from harmofl.federation.topology import POOLED_CLIENT

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer


def resolve_checkpoint(ckpt_path: str, checkpoint_dir: Path) -> Path:
    """``best`` / ``last`` name the run's own checkpoints; anything else is a path."""
    if ckpt_path in ("best", "last"):
        return checkpoint_dir / f"{ckpt_path}.ckpt"
    return Path(ckpt_path)


def build_checkpoint(trainer: FederatedTrainer, round_number: int) -> dict[str, Any]:
    """The whole federated state after round ``round_number``; the client entries gathered from every process
    (collective: every process calls it)."""
    clients: dict[str, Any] = {}
    own = {client: trainer.store.entry(client) for client in trainer.executor.record_holders()}
    for part in all_gather_objects(trainer.fabric, own):
        clients.update(part)
    record = trainer.record.state_dict()
    return {
        "round": round_number,
        "rounds": trainer.rounds,
        "best_round": record["best_round"],
        "best_score": record["best_score"],
        "client_names": trainer.federation.client_names,
        "global_state": trainer.global_state,
        "clients": trainer.federation.ordered(clients),
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks if isinstance(cb, Callback)},
        "server_optimizer": trainer.server_optimizer.state_dict(),
        "aggregator": trainer.aggregator.state_dict(),
        "history": record["history"],
        "failures": record["failures"],
        "executor": trainer.executor.state_dict(),
    }


def restore_checkpoint(trainer: FederatedTrainer, path: Path, with_optimizers: bool) -> int:
    """Load a federated checkpoint into ``trainer``; returns the number of completed rounds. ``with_optimizers``
    (continuing a fit) also restores optimizer states and requires the federation it was trained with."""
    checkpoint = load_checkpoint(path)
    try:
        validation.check_update(checkpoint["global_state"], trainer.global_state)
    except validation.InvalidUpdate as error:
        raise ValueError(
            f"Checkpoint {str(path)!r} does not fit this model: {error}. Use the model configuration the "
            "checkpoint was trained with."
        ) from error
    names = trainer.federation.client_names
    if with_optimizers:
        trained = [client for client in checkpoint["clients"] if client != POOLED_CLIENT]
        if trained != names:
            raise ValueError(
                f"Checkpoint {str(path)!r} was trained with clients {trained}, the data has {names}: "
                "continue it with the same data configuration (`cli.py test` evaluates other sites)."
            )
    trainer.global_state = checkpoint["global_state"]
    for client in trainer.executor.record_holders():
        entry = checkpoint["clients"].get(client)
        if entry is None:
            rank_zero_info(f"Client {client!r} is not in {path}: it uses the global model and shared target.")
            continue
        trainer.store.load_entry(client, entry, with_optimizers)
    trainer.load_callback_states(checkpoint["callbacks"])
    trainer.server_optimizer.load_state_dict(checkpoint["server_optimizer"])
    if with_optimizers:  # continuing the fit: DP-FedAvg's accountant and noise secret, a deployment's federation id
        trainer.aggregator.load_state_dict(checkpoint.get("aggregator", {}))
        trainer.executor.load_state_dict(checkpoint.get("executor", {}))
    trainer.record.load_state_dict(checkpoint)
    return int(checkpoint["round"])
