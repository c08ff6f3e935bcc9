"""The trainer's own settings: checks that refuse bad values before any work, and the Fabric they configure."""

from __future__ import annotations

import os

from lightning.fabric import Fabric
from lightning.fabric.loggers import Logger
from lightning.fabric.plugins.environments import ClusterEnvironment, LightningEnvironment
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from harmofl import aggregation
from harmofl.aggregators import Aggregator
from harmofl.federation.fabric_strategy import ClientParallelStrategy
from harmofl.federation.topology import check_participation
from harmofl.server_optimizers import ServerOptimizer

SUPPORTED_PRECISION = ("32-true", "bf16-mixed")


def check_run_settings(
    rounds: int, local_epochs: int, local_steps: int | None, num_nodes: int, devices: int, precision: str
) -> None:
    """Refuse bad rounds, local work, nodes, devices or precision before any work, naming the key and what is
    allowed."""
    counts = {"rounds": rounds, "local_epochs": local_epochs, "num_nodes": num_nodes, "devices": devices}
    for name, value in counts.items():
        _check_positive(f"trainer.{name}", value)
    if local_steps is not None:
        _check_positive("trainer.local_steps", local_steps)
    if precision not in SUPPORTED_PRECISION:
        raise ValueError(
            f"trainer.precision={precision!r} is not supported: use one of {SUPPORTED_PRECISION}. The weight-"
            "perturbation step runs two backward passes by hand, which Lightning's 16-bit gradient scaler "
            "does not see; bf16-mixed needs no scaler."
        )


def check_strategy(
    client_weighting: aggregation.ClientWeighting,
    clients_per_round: int | float | None,
    pool_clients: bool,
    local_modules: list[str] | None,
    aggregator: Aggregator,
    server_optimizer: ServerOptimizer,
) -> None:
    """Refuse settings of the federated strategy that cannot work, or not together (the components check their
    own values: the failure policy, the update guard, the aggregators and the server optimizers)."""
    aggregation.client_weights([1], client_weighting)  # validates the name
    check_participation(clients_per_round)
    if pool_clients and (local_modules or clients_per_round is not None):
        raise ValueError(
            "trainer.pool_clients trains one model on every client's data: it cannot keep modules local "
            f"(local_modules={local_modules}) or sample clients (clients_per_round={clients_per_round}); "
            "remove those settings."
        )
    if not isinstance(aggregator, Aggregator):
        raise ValueError(
            f"trainer.aggregator must be an harmofl.aggregators.Aggregator (Mean, Median, TrimmedMean), got "
            f"{aggregator!r}."
        )
    if not aggregator.weighted and server_optimizer.needs_weighted_mean:
        raise ValueError(
            f"trainer.aggregator={type(aggregator).__name__} cannot serve {type(server_optimizer).__name__}, whose "
            "normalization is a weighted mean: use aggregator: harmofl.aggregators.Mean, or another server optimizer."
        )


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")


def _default_wandb_to_offline(loggers: list[Logger]) -> None:
    """W&B must never block a run: without an API key (or an explicit WANDB_MODE) it logs offline."""
    if any(isinstance(lg, WandbLogger) for lg in loggers) and not (
        os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
    ):
        os.environ["WANDB_MODE"] = "offline"
        rank_zero_info("No WANDB_API_KEY: W&B logs offline (sync later with `wandb sync`).")


def make_fabric(
    accelerator: str,
    num_nodes: int,
    devices: int,
    precision: str,
    callbacks: list[Callback] | Callback | None,
    logger: Logger | list[Logger] | None,
    enable_progress_bar: bool,
) -> Fabric:
    """The run's Fabric: one process per device on each of ``num_nodes`` machines, without gradient synchronization
    (clients are never split), the callbacks (plus the progress bar) and loggers (W&B offline without a key).

    Several nodes need one launch per node, by torchrun, SLURM's ``srun`` or another cluster environment Lightning
    detects; a plain launch is refused (:func:`check_node_launcher`) rather than left waiting for nodes that never
    come."""
    callback_list = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
    if enable_progress_bar:
        from callbacks.progress import RoundProgressBar  # the callbacks package imports the trainer

        callback_list.append(RoundProgressBar())
    loggers = [logger] if isinstance(logger, Logger) else list(logger or [])
    _default_wandb_to_offline(loggers)
    fabric = Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=ClientParallelStrategy() if num_nodes * devices > 1 else "auto",
        precision=precision,  # type: ignore[arg-type]
        callbacks=callback_list,
        loggers=loggers,
    )
    check_node_launcher(num_nodes, getattr(fabric.strategy, "cluster_environment", None))
    return fabric


def check_node_launcher(num_nodes: int, environment: ClusterEnvironment | None) -> None:
    """Refuse several nodes started by a plain launch: Fabric's own launcher starts the processes of one machine
    only, and without a node rank every machine would take node 0's place and wait for the others forever."""
    if num_nodes > 1 and isinstance(environment, LightningEnvironment) and "NODE_RANK" not in os.environ:
        raise ValueError(
            f"trainer.num_nodes={num_nodes} needs one launch per node: start the same command on every node with "
            f"torchrun (`torchrun --nnodes {num_nodes} --node_rank <0..{num_nodes - 1}> --nproc_per_node <devices> "
            "--master_addr <node 0> --master_port <port> cli.py fit ...`), or with `srun` under SLURM "
            "(--ntasks-per-node = trainer.devices), or set NODE_RANK, MASTER_ADDR and MASTER_PORT on every node."
        )
