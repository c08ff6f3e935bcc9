"""The whole federated state in a checkpoint, and back: global weights, callbacks, server optimizer, the run
record, and every client's record file (:mod:`harmofl.checkpoint` describes the files). A round writes the
records of the clients whose state changed, each from the process that holds it; the manifest, on rank 0, only
references them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from harmofl import validation
from harmofl.checkpoint import (
    client_entry,
    content_digest,
    copy_checkpoint,
    load_manifest,
    record_references,
    remove_unreferenced_records,
    save_checkpoint,
    write_client_records,
)
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
    """The manifest of the federated state after round ``round_number``. Collective: every process first writes
    the record files of its clients whose state changed, then the references are gathered, so that every file the
    manifest names is on disk before the manifest is written."""
    store, folder = trainer.store, trainer.checkpoint_dir
    holders = trainer.executor.record_holders()
    stale = {client: (entry, callbacks_digest) for client, entry, callbacks_digest in store.stale_entries(holders)}
    written = write_client_records(folder, {client: entry for client, (entry, _) in stale.items()})
    for client, reference in written.items():
        store.mark_written(client, reference, stale[client][1])
    references: dict[str, str] = {}
    for part in all_gather_objects(trainer.fabric, {client: store.written[client].reference for client in holders}):
        references.update(part)
    if trainer.is_global_zero and trainer.world_size > 1:
        _check_visible(folder, references)
    record = trainer.record.state_dict()
    return {
        "round": round_number,
        "rounds": trainer.rounds,
        "best_round": record["best_round"],
        "best_score": record["best_score"],
        "client_names": trainer.federation.client_names,
        "global_state": trainer.global_state,
        "clients": trainer.federation.ordered(references),
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks if isinstance(cb, Callback)},
        "server_optimizer": trainer.server_optimizer.state_dict(),
        "aggregator": trainer.aggregator.state_dict(),
        "history": record["history"],
        "failures": record["failures"],
        "executor": trainer.executor.state_dict(),
    }


def _check_visible(folder: Path, references: dict[str, str]) -> None:
    """Every process's record files must be where rank 0 writes the manifest (a folder every node shares)."""
    missing = [reference for reference in references.values() if not (folder / reference).is_file()]
    if missing:
        raise RuntimeError(
            f"Client record files {missing[:3]} written by other processes are not in {str(folder)!r} as rank 0 sees "
            "it: on several nodes, trainer.default_root_dir must be on a filesystem every node shares."
        )


def write_checkpoint(checkpoint: dict[str, Any], checkpoint_dir: Path, best: bool) -> None:
    """Rank 0: write the round's manifest as ``last.ckpt`` (and ``best.ckpt`` when ``best``), then remove the
    record files neither references any more."""
    last = checkpoint_dir / "last.ckpt"
    save_checkpoint(checkpoint, last)
    if best:
        copy_checkpoint(last, checkpoint_dir / "best.ckpt")
    remove_unreferenced_records(checkpoint_dir)


def restore_checkpoint(trainer: FederatedTrainer, path: Path, with_optimizers: bool) -> int:
    """Load a federated checkpoint into ``trainer``, each process only its own clients' records; returns the number
    of completed rounds. ``with_optimizers`` (continuing a fit) also restores optimizer states and requires the
    federation it was trained with; the records of this run's own checkpoint are then not written again until
    their clients change."""
    checkpoint = load_manifest(path)
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
    own_files = with_optimizers and path.parent.resolve() == trainer.checkpoint_dir.resolve()
    references = record_references(checkpoint) if own_files else {}
    for client in trainer.executor.record_holders():
        entry = client_entry(checkpoint, path, client)
        if entry is None:
            rank_zero_info(f"Client {client!r} is not in {path}: it uses the global model and shared target.")
            continue
        trainer.store.load_entry(client, entry, with_optimizers)
        if client in references:  # the file holds what was loaded: the client's state as the file has it
            trainer.store.mark_written(client, references[client], content_digest(entry["callbacks"]))
    trainer.load_callback_states(checkpoint["callbacks"])
    trainer.server_optimizer.load_state_dict(checkpoint["server_optimizer"])
    if with_optimizers:  # continuing the fit: DP-FedAvg's accountant and noise secret, a deployment's federation id
        trainer.aggregator.load_state_dict(checkpoint.get("aggregator", {}))
        trainer.executor.load_state_dict(checkpoint.get("executor", {}))
    trainer.record.load_state_dict(checkpoint)
    return int(checkpoint["round"])
