"""The federated orchestrator: a readable Fabric loop over rounds, composed of small parts.

Each round the executor trains the participants from the global weights, the aggregator reduces their updates,
the server optimizer turns the center into the next global model; every client evaluates it, and the round is
recorded and checkpointed. ``docs/architecture.md`` maps the parts (:mod:`harmofl.federation`) and the hooks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from lightning.fabric.loggers import Logger
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from harmofl import aggregation, reporting
from harmofl.aggregators import Aggregator, Mean
from harmofl.checkpoint import copy_checkpoint
from harmofl.clients.base import FederatedClient
from harmofl.data.base import FederatedDataModule, Split
from harmofl.data.checks import DataError
from harmofl.federation.checkpointing import (
    build_checkpoint,
    resolve_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from harmofl.federation.collectives import all_gather_objects
from harmofl.federation.executor import Executor, InProcessExecutor, Results
from harmofl.federation.facade import TrainerFacade
from harmofl.federation.failures import ClientFailure, FailureAction, FailurePolicy
from harmofl.federation.run_record import RunRecord
from harmofl.federation.runner import LocalRunner
from harmofl.federation.settings import check_run_settings, check_strategy, make_fabric
from harmofl.federation.store import ClientStore, to_host
from harmofl.federation.topology import Federation
from harmofl.prediction import PredictionSettings, run_prediction
from harmofl.run_folder import RunFolderLock
from harmofl.server_optimizers import Contribution, FedAvg, ServerOptimizer
from harmofl.validation import NormPolicy, UpdateGuard

Params = ParamSpec("Params")
Returned = TypeVar("Returned")


def _holding_run_folder(
    method: Callable[Concatenate[FederatedTrainer, Params], Returned],
) -> Callable[Concatenate[FederatedTrainer, Params], Returned]:
    """``method`` with rank 0 holding the run folder's :class:`~harmofl.run_folder.RunFolderLock` throughout: a second
    run into the same folder is refused before anything is written, and the lock goes with the call however it ends
    (an error, or the process killed)."""

    @functools.wraps(method)
    def locked(trainer: FederatedTrainer, *args: Params.args, **kwargs: Params.kwargs) -> Returned:
        lock = RunFolderLock(trainer.root_dir) if trainer.is_global_zero else contextlib.nullcontext()
        with lock:
            return method(trainer, *args, **kwargs)

    return locked


class FederatedTrainer(TrainerFacade):
    """Federated training and evaluation, driven by Lightning Fabric.

    Args:
        rounds: communication rounds.
        local_epochs: epochs over its training data each client runs per round.
        local_steps: if set, each client runs exactly this many optimizer steps per round instead
            (cycling its loader), whatever its data size.
        client_weighting: aggregation weight of a client: ``uniform`` (the reference code) or ``samples``
            (its number of training samples, FedAvg as published).
        clients_per_round: partial participation: an int N trains N clients per round, a float in (0, 1]
            that fraction of them (rounded up); sampled per round from ``seed``. None: every client.
        held_out_clients: clients that never train nor send anything (leave-site-out): every round they
            evaluate the global model with the shared amplitude target, reported apart from the mean.
        server_optimizer: how the server turns the clients' center into the next global model
            (:mod:`harmofl.server_optimizers`: ``FedAvg`` by default, ``FedAvgM``, ``FedAdam``, ``FedYogi``,
            ``FedNova``).
        aggregator: how the server reduces the updates to a center (:mod:`harmofl.aggregators`): ``Mean``
            (weighted, by default), or for untrusted sites ``Median`` / ``TrimmedMean`` (coordinate-wise, unweighted).
        local_modules: module types whose weights each client keeps local and never sends (FedBN-style):
            ``norm`` for every normalization layer, or ``torch.nn`` class names such as ``BatchNorm2d``.
        pool_clients: centralized training, the upper reference: one client named ``pooled`` trains on the union
            of the training clients' data (a round is ``local_epochs`` over it); every client evaluates it.
        client_failure: what a client's failed local training (an exception, a NaN/Inf loss, an update the
            server refuses) does after its retries: ``raise`` stops the run; ``skip`` reports the client by name
            and round and aggregates the others (weights renormalized).
        client_retries: how many times a failed client's training is retried from the same start and seed
            (a transient fault then changes nothing).
        min_clients: the fewest clients whose updates a round needs; with fewer the run stops with an error,
            its last checkpoint intact and resumable.
        max_update_distance: a bound on ``‖θ_k − θ‖₂``, the distance of a client's update from the global model
            (:mod:`harmofl.validation`); None: unbounded. Every update is also checked for its keys, shapes,
            dtypes and finite values.
        update_distance_policy: ``clip`` scales an update beyond the bound back onto it; ``reject`` refuses it
            (a client failure).
        accelerator: ``cpu``, ``gpu``/``cuda`` or ``auto``.
        num_nodes: machines (nodes) the run spans, each started by its own launch (torchrun, SLURM's ``srun``).
        devices: processes per node, one per device. Clients are spread over all ``num_nodes × devices`` processes,
            which must not exceed the clients.
        precision: ``32-true`` or ``bf16-mixed``. ``16-mixed`` is refused: the hand-written two-pass step
            bypasses the gradient scaler.
        callbacks: Lightning callbacks, e.g. :class:`callbacks.AmplitudeHarmonization`.
        logger: extra loggers (e.g. ``WandbLogger``); ``metrics.csv`` is always written.
        default_root_dir: where checkpoints and results go (the CLI makes it ``runs/<config name>``).
        enable_progress_bar: show a rich progress bar (round, client, step); without it, one log line per round.
        seed: seeds data order and randomness per round and client (linked to ``seed_everything`` in the CLI).
        evaluate_every_n_rounds: every client evaluates the global model after every n-th round and after the last
            (1: every round). Other rounds have training rows only in ``metrics.csv``; the best round (``best.ckpt``)
            is the best evaluated one; ``last.ckpt`` is written every round.
    """

    def __init__(
        self,
        rounds: int = 10,
        local_epochs: int = 1,
        local_steps: int | None = None,
        client_weighting: aggregation.ClientWeighting = "uniform",
        clients_per_round: int | float | None = None,
        held_out_clients: list[str] | None = None,
        server_optimizer: ServerOptimizer | None = None,
        aggregator: Aggregator | None = None,
        local_modules: list[str] | None = None,
        pool_clients: bool = False,
        client_failure: FailureAction = "raise",
        client_retries: int = 0,
        min_clients: int = 1,
        max_update_distance: float | None = None,
        update_distance_policy: NormPolicy = "clip",
        accelerator: str = "auto",
        num_nodes: int = 1,
        devices: int = 1,
        precision: Literal["32-true", "bf16-mixed"] = "32-true",
        callbacks: list[Callback] | Callback | None = None,
        logger: Logger | list[Logger] | None = None,
        default_root_dir: str | None = None,
        enable_progress_bar: bool = True,
        seed: int = 0,
        evaluate_every_n_rounds: int = 1,
    ) -> None:
        aggregator, server_optimizer = aggregator or Mean(), server_optimizer or FedAvg()
        check_run_settings(rounds, local_epochs, local_steps, num_nodes, devices, precision)
        check_strategy(client_weighting, clients_per_round, pool_clients, local_modules, aggregator, server_optimizer)
        self.failure_policy = FailurePolicy(client_failure, client_retries, min_clients)
        self.guard = UpdateGuard(max_update_distance, update_distance_policy)
        self.rounds, self.local_epochs, self.local_steps = rounds, local_epochs, local_steps
        self.client_weighting, self.clients_per_round = client_weighting, clients_per_round
        self.held_out = list(held_out_clients or [])
        self.server_optimizer, self.aggregator = server_optimizer, aggregator
        self.local_module_types = aggregation.resolve_module_types(local_modules or [])
        self.pool_clients, self.seed = pool_clients, seed
        self.enable_progress_bar = enable_progress_bar
        if evaluate_every_n_rounds < 1:
            raise ValueError(
                f"trainer.evaluate_every_n_rounds must be >= 1 (1: every round), got {evaluate_every_n_rounds}."
            )
        self.evaluate_every_n_rounds = evaluate_every_n_rounds
        self.root_dir = Path(default_root_dir or "runs/harmofl")
        self.fabric = make_fabric(accelerator, num_nodes, devices, precision, callbacks, logger, enable_progress_bar)
        # With devices > 1 this starts this node's other processes, which re-run the same command up to this point
        # (under torchrun or srun every process is already started).
        self.fabric.launch()
        self.current_round = 0
        self.runner: LocalRunner | None = None

    # -- entry points ------------------------------------------------------------------------------------

    @_holding_run_folder
    def fit(  # type: ignore[override]
        self,
        model: FederatedClient,
        datamodule: FederatedDataModule | None = None,
        ckpt_path: str | None = None,
        executor: Executor | None = None,
    ) -> dict[str, Any]:
        """Run the federated training; returns the summary of the best round (also in ``summary.json``). The run
        folder is this fit's alone while it runs: another fit into it is refused (``RunFolderInUse``).

        Args:
            ckpt_path: a checkpoint of this run (``last.ckpt``, or ``last``) to continue from.
            executor: where clients run (default: :class:`~harmofl.federation.executor.InProcessExecutor`).
        """
        executor = executor or InProcessExecutor()
        if ckpt_path is not None:
            executor.check_resumable()
        self.setup(model, datamodule, "fit", executor)
        start_round = 0
        if ckpt_path is not None:
            path = resolve_checkpoint(ckpt_path, self.checkpoint_dir)
            start_round = restore_checkpoint(self, path, with_optimizers=True)
            best = self.checkpoint_dir / "best.ckpt"
            if self.is_global_zero and self.record.best_round == start_round and path.resolve() != best.resolve():
                # A kill between writing last.ckpt and copying it to best.ckpt leaves best.ckpt a round behind.
                copy_checkpoint(path, best)
            rank_zero_info(f"Resuming after round {start_round} of {self.rounds}.")
        self.current_round = start_round
        self._call("on_fit_start")
        for round_idx in range(start_round, self.rounds):
            self.run_round(round_idx)
        self._call("on_fit_end")
        self._call("teardown", stage="fit")
        result = self.record.summary()
        if self.is_global_zero:
            self.record.write_final_report()
        self._finish()
        return result

    def validate(  # type: ignore[override]
        self, model: FederatedClient, datamodule: FederatedDataModule, ckpt_path: str = "best"
    ) -> dict[str, Any]:
        """Evaluate a checkpoint on every client's validation split; writes ``val_summary.json`` beside it."""
        return self._evaluate_checkpoint(model, datamodule, ckpt_path, "val")

    def test(  # type: ignore[override]
        self, model: FederatedClient, datamodule: FederatedDataModule, ckpt_path: str = "best"
    ) -> dict[str, Any]:
        """Evaluate a checkpoint on every client's test split; writes ``test_summary.json`` beside it.

        Args:
            ckpt_path: a checkpoint file, or ``best`` / ``last`` in ``<default_root_dir>/checkpoints``.
        """
        return self._evaluate_checkpoint(model, datamodule, ckpt_path, "test")

    def predict(  # type: ignore[override]
        self,
        model: FederatedClient,
        datamodule: FederatedDataModule,
        ckpt_path: str | None = "best",
        predict: PredictionSettings | None = None,
    ) -> dict[str, Any]:
        """Apply a checkpoint to unlabelled images or volumes: class probabilities (``predictions.csv``) or masks.

        Args:
            ckpt_path: a checkpoint file, or ``best`` / ``last`` in ``<default_root_dir>/checkpoints``; null (as a
                fit's saved ``config.yaml`` has it): ``best``.
            predict: the inputs (``--predict.input``), the output folder, the site and how images are batched and
                sized (:class:`~harmofl.prediction.PredictionSettings`).
        """
        if predict is None:
            raise ValueError("cli.py predict needs the inputs: --predict.input FILE_OR_FOLDER.")
        self.setup(model, datamodule, "predict", InProcessExecutor())
        path = resolve_checkpoint(ckpt_path or "best", self.checkpoint_dir)
        restore_checkpoint(self, path, with_optimizers=False)
        result = run_prediction(self, datamodule, path, predict)
        self._call("teardown", stage="predict")
        self._finish()
        return result

    # -- the round ---------------------------------------------------------------------------------------

    def run_round(self, round_idx: int) -> None:
        """One round: train the participants, aggregate, evaluate every client, record and checkpoint."""
        self.current_round = round_idx
        self._call("on_round_start", round_idx=round_idx)
        shared = self.shared_global_state()
        participants = self.federation.participants(round_idx)
        self.aggregator.start_round(round_idx, self.federation)
        self.aggregator.reset(shared, self.fabric.device)
        contributions: dict[str, Contribution] = {}
        failures: dict[str, str] = {}
        train_results: Results = {}
        for client, outcome in self.executor.train(round_idx, participants, shared):
            if isinstance(outcome, ClientFailure):
                failures[client] = outcome.error
                continue
            weight = self.federation.client_weight[client]
            contributions[client] = Contribution(weight, outcome.num_steps)
            factor = self.server_optimizer.aggregation_factor(outcome.num_steps)
            self.aggregator.add(client, outcome.state, weight * factor)
            train_results[client] = {"train": {"loss": outcome.loss}}
        contributions, failures = self._merged(contributions), self._merged(failures)
        self.record.record_failures(round_idx, self.federation.ordered(failures), self.executor.client_noun)
        self.failure_policy.check_enough(len(contributions), len(participants), round_idx, self.record.failures)
        trainees = self.federation.trainees
        ordered = [contributions[client] for client in trainees if client in contributions]
        total_weight = sum(c.weight * self.server_optimizer.aggregation_factor(c.num_steps) for c in ordered)
        center = self.aggregator.center(self.fabric, shared, trainees, total_weight)
        self.global_state.update(self.server_optimizer.step(shared, center, ordered))
        self._call("on_aggregate", round_idx=round_idx)
        results = self.evaluate_clients(("val", "test")) if self.evaluates_round(round_idx) else {}
        for client, splits in self._merged(train_results).items():
            results[client] = {**splits, **results.get(client, {})}
        self._end_round(round_idx, self.federation.ordered(results))

    def evaluates_round(self, round_idx: int) -> bool:
        """Whether every client evaluates the global model after round ``round_idx`` (0-based): every
        ``evaluate_every_n_rounds``-th round, and the last."""
        return (round_idx + 1) % self.evaluate_every_n_rounds == 0 or round_idx + 1 == self.rounds

    def evaluate_clients(self, splits: tuple[Split, ...]) -> Results:
        """Every client's metrics on ``splits`` with the global model (plus its local keys), from all processes."""
        return self._merged(self.executor.evaluate(splits))

    def _end_round(self, round_idx: int, results: Results) -> None:
        round_number = round_idx + 1
        best_before = self.record.best_round
        rows = self.record.add_round(round_number, results, self.aggregator.round_metrics())
        checkpoint = build_checkpoint(self, round_number)  # collective: each process writes its changed records
        if self.is_global_zero:
            self._call("on_save_checkpoint", checkpoint=checkpoint)
            write_checkpoint(checkpoint, self.checkpoint_dir, best=self.record.best_round != best_before)
            self.record.write_outputs()
            self.fabric.log_dict(reporting.logged_metrics(rows), step=round_number)
        if not self.enable_progress_bar:  # the progress bar prints this line itself
            rank_zero_info(self.record.round_line(round_number, self.executor.client_noun))
        self._call("on_round_end", round_idx=round_idx, results=results)

    def _merged(self, per_client: Mapping[str, Any]) -> dict[str, Any]:
        """Every process's ``per_client`` entries in one dict (one gather)."""
        return {client: value for part in all_gather_objects(self.fabric, per_client) for client, value in part.items()}

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(
        self, model: FederatedClient, datamodule: FederatedDataModule | None, stage: str, executor: Executor
    ) -> None:
        """The federation the executor connects to, this process's model and client store, then the executor."""
        if not isinstance(model, FederatedClient):
            raise TypeError(f"The model must be a harmofl FederatedClient, got {type(model).__name__}.")
        self.executor = executor
        train_samples = executor.connect(self, datamodule, stage)
        self.federation = Federation.build(
            train_samples,
            held_out=self.held_out,
            pool_clients=self.pool_clients,
            clients_per_round=self.clients_per_round,
            client_weighting=self.client_weighting,
            seed=self.seed,
            world_size=self.world_size,
            min_clients=self.failure_policy.min_clients,
        )
        self.record = RunRecord(self.root_dir, self.rounds, self.held_out, model.primary_metric)
        self.setup_model(model, stage)
        executor.start(self)

    def setup_data(self, datamodule: FederatedDataModule, stage: str, clients: Sequence[str] | None = None) -> None:
        """Prepare the data (once per machine), set it up on every process (every client's metadata and counts), then
        load ``clients``' samples (:meth:`load_clients`; None: every client's)."""
        if self.fabric.local_rank == 0:
            datamodule.prepare_data()
        self.fabric.barrier()
        datamodule.setup(stage)
        self.datamodule = datamodule
        self.load_clients(datamodule.client_names if clients is None else clients)

    def load_clients(self, clients: Sequence[str]) -> None:
        """Load (read, decode, check) ``clients``' samples on this process, each process passing the clients it
        uses; a bad sample on any process stops every process with its error, as a check in setup would."""
        try:
            self.datamodule.load(clients)
            error = None
        except DataError as raised:
            error = raised
        problems = [problem for problem in all_gather_objects(self.fabric, error and str(error)) if problem]
        if error is not None:
            raise error
        if problems:
            raise DataError(problems[0])

    def setup_model(self, model: FederatedClient, stage: str) -> None:
        """The one model of this process, its optimizer, the initial global state (rank 0's weights), the client
        store and the local runner (which needs :meth:`setup_data` first to train or evaluate)."""
        self.fabric.call("setup", trainer=self, pl_module=model, stage=stage)
        model.setup(stage)
        self.module = model
        self.local_keys = aggregation.local_state_keys(model, self.local_module_types)
        self.fabric_module, self.optimizer = self.fabric.setup(model, model.configure_optimizers())
        # Processes initialize their models from their own RNG: rank 0's weights are everyone's start.
        self.global_state = self.fabric.broadcast({k: to_host(v) for k, v in model.state_dict().items()})
        self.store = ClientStore(self.federated_callbacks, self.local_keys, to_host(self.optimizer.state_dict()))

    def local_runner(self, pooled_clients: list[str]) -> LocalRunner:
        """The runner of this process's clients on its model (after :meth:`setup_data` and :meth:`setup_model`);
        ``pooled_clients``: whose data the pooled client trains on."""
        self.runner = LocalRunner(self, self.datamodule, pooled_clients)
        return self.runner

    # -- what callbacks and executors read (besides the facade's properties) ------------------------------

    def shared_global_state(self) -> dict[str, Tensor]:
        """The global weights the clients share: every key but those each client keeps local."""
        return {key: value for key, value in self.global_state.items() if key not in self.local_keys}

    def aggregate_client_values(self, values: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor] | None:
        """The center, over every client of every process, of small per-client tensors (amplitude targets, SCAFFOLD's
        control changes), as ``trainer.aggregator`` centers updates (:meth:`~harmofl.aggregators.Aggregator.combine`:
        the weighted mean under ``Mean``, the unweighted median or trimmed mean under the robust ones). ``values``
        holds this process's clients; None when no client has one."""
        gathered = self.gather_client_values({client: to_host(dict(value)) for client, value in values.items()})
        clients = [client for client in self.federation.client_names if client in gathered]  # not the pooled client
        if not clients:
            return None
        weights = [self.federation.client_weight[client] for client in clients]
        return self.aggregator.combine([gathered[client] for client in clients], weights)

    def gather_client_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every client's entry of ``values`` (this process's clients), from every process, in the federation's
        client order: per-client statistics that the server hands back to all (FedRDN's, FedDG's banks)."""
        return self.federation.ordered(self._merged(values))

    def load_callback_states(self, states: Mapping[str, Any]) -> None:
        """Restore the callbacks' global state from ``states`` (callbacks absent from it are left as they are)."""
        for cb in self.callbacks:
            if isinstance(cb, Callback) and cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])

    # -- evaluation of a checkpoint, and the end ---------------------------------------------------------------

    def _evaluate_checkpoint(
        self, model: FederatedClient, datamodule: FederatedDataModule, ckpt_path: str, split: Split
    ) -> dict[str, Any]:
        self.setup(model, datamodule, "validate" if split == "val" else "test", InProcessExecutor())
        path = resolve_checkpoint(ckpt_path, self.checkpoint_dir)
        rounds = restore_checkpoint(self, path, with_optimizers=False)
        results = self.federation.ordered(self.evaluate_clients((split,)))
        result = reporting.summary(rounds, self.record.best_round, results, self.held_out)
        if self.is_global_zero:
            reporting.print_results_table(f"{split} metrics of {path}", results, self.held_out)
            # No run folder lock: evaluating the checkpoint of a fit in progress is allowed, and the summary it
            # writes (atomically) is no file of the fit's.
            reporting.write_json(result, path.parent / f"{split}_summary.json")
        self._call("teardown", stage=split)
        self._finish()
        return result

    def _call(self, hook: str, **kwargs: Any) -> None:
        self.fabric.call(hook, trainer=self, pl_module=self.module, **kwargs)

    def _finish(self) -> None:
        if isinstance(getattr(self, "datamodule", None), FederatedDataModule):  # absent on a Flower server
            # Stop the loader's persistent workers with the run: they would otherwise live as long as the datamodule.
            self.datamodule.teardown("fit")
        self.fabric.barrier()
        for logger in self.loggers:
            logger.finalize("success")
