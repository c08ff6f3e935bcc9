"""The federated orchestrator: a readable Fabric loop over rounds, clients and batches.

Each round, every client starts from the global weights (except the keys it keeps local), trains its
local epochs or steps with its own optimizer state, and the server aggregates the clients' weights.
Then every client evaluates the global model on its validation and test splits; the global model with
the best mean validation metric is kept.

With ``devices=N`` there are N processes (one per device), clients spread over them round-robin. Each
process holds one model on its device and its clients' state on the host; aggregation is one all-reduce.

Hooks fired on callbacks (keyword arguments, so each callback takes what it needs):
``setup``, ``on_fit_start``, ``on_round_start(round_idx)``, ``on_train_client_start(client, num_batches)``,
``on_train_batch_start/end``, ``on_train_client_end(client, loss)``, ``on_aggregate(round_idx)`` (after the
server aggregated, before evaluation), ``on_validation_batch_start``, ``on_test_batch_start``,
``on_round_end(round_idx, results)``, ``on_fit_end``, ``teardown``. ``round_idx`` is 0-based; files and
tables count rounds from 1.
"""

from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Union

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import Logger
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from harmofl import aggregation, reporting, validation
from harmofl.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from harmofl.clients.base import FederatedClient
from harmofl.data.base import FederatedDataModule, Split
from harmofl.distributed import all_gather_objects, all_reduce_sum_
from harmofl.server import Contribution, FedAvg, FedNova, ServerOptimizer
from harmofl.strategy import ClientParallelStrategy

SUPPORTED_PRECISION = ("32-true", "bf16-mixed")
EVAL_HOOKS = {"val": ("on_validation_batch_start", "validation_step"), "test": ("on_test_batch_start", "test_step")}


#: The one client of pooled (centralized) training, which trains on every training client's data.
POOLED_CLIENT = "pooled"


@dataclass
class ClientUpdate:
    """One participant's round: its weights (at least the shared keys), mean training loss and local steps."""

    state: Mapping[str, Tensor]
    loss: float
    num_steps: int


@dataclass
class ClientRecord:
    """What a client keeps between rounds, on the host: its local keys, its optimizer state, and the module's
    per-client state (:meth:`~harmofl.clients.base.FederatedClient.persistent_client_state`: MOON's last model)."""

    local_state: dict[str, Tensor] = field(default_factory=dict)
    optimizer_state: Optional[dict[str, Any]] = None
    module_state: dict[str, Any] = field(default_factory=dict)


class FederatedTrainer(Trainer):
    """Federated training and evaluation, driven by Lightning Fabric.

    It subclasses :class:`~lightning.pytorch.Trainer` only so that ``LightningCLI(trainer_class=...)`` accepts
    it (the CLI requires a Trainer type); none of Trainer's own loops or state is used, and
    ``Trainer.__init__`` is deliberately not called. Callbacks written for Trainer's fit loop alone
    (ModelCheckpoint, EarlyStopping) do not apply: checkpoints and model selection are built in.

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
        server_optimizer: how the server turns the clients' weighted mean into the next global model
            (:mod:`harmofl.server`: ``FedAvg`` by default, ``FedAvgM``, ``FedAdam``, ``FedYogi``, ``FedNova``).
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
        aggregator: ``mean`` (weighted, then the server optimizer), or a robust center for untrusted sites:
            ``median`` or ``trimmed_mean`` (coordinate-wise, unweighted; the server optimizer still applies).
        trim_ratio: the fraction of largest and of smallest values ``trimmed_mean`` drops per coordinate.
        accelerator: ``cpu``, ``gpu``/``cuda`` or ``auto``.
        devices: processes, one per device; clients are spread over them. Must not exceed the clients.
        precision: ``32-true`` or ``bf16-mixed``. ``16-mixed`` is refused: the hand-written two-pass step
            bypasses the gradient scaler.
        callbacks: Lightning callbacks, e.g. :class:`callbacks.AmplitudeHarmonization`.
        logger: extra loggers (e.g. ``WandbLogger``); ``metrics.csv`` is always written.
        default_root_dir: where checkpoints and results go (the CLI makes it ``runs/<config name>``).
        enable_progress_bar: show a rich progress bar (round, client, step).
        seed: seeds data order and randomness per round and client (linked to ``seed_everything`` in the CLI).
    """

    def __init__(
        self,
        rounds: int = 10,
        local_epochs: int = 1,
        local_steps: Optional[int] = None,
        client_weighting: aggregation.ClientWeighting = "uniform",
        clients_per_round: Optional[Union[int, float]] = None,
        held_out_clients: Optional[list[str]] = None,
        server_optimizer: Optional[ServerOptimizer] = None,
        local_modules: Optional[list[str]] = None,
        pool_clients: bool = False,
        client_failure: Literal["raise", "skip"] = "raise",
        client_retries: int = 0,
        min_clients: int = 1,
        max_update_distance: Optional[float] = None,
        update_distance_policy: validation.NormPolicy = "clip",
        aggregator: Literal["mean", "median", "trimmed_mean"] = "mean",
        trim_ratio: float = 0.1,
        accelerator: str = "auto",
        devices: int = 1,
        precision: Literal["32-true", "bf16-mixed"] = "32-true",
        callbacks: Optional[Union[list[Callback], Callback]] = None,
        logger: Optional[Union[Logger, list[Logger]]] = None,
        default_root_dir: Optional[str] = None,
        enable_progress_bar: bool = True,
        seed: int = 0,
    ) -> None:
        _check_positive("trainer.rounds", rounds)
        _check_positive("trainer.local_epochs", local_epochs)
        _check_positive("trainer.devices", devices)
        if local_steps is not None:
            _check_positive("trainer.local_steps", local_steps)
        if precision not in SUPPORTED_PRECISION:
            raise ValueError(
                f"trainer.precision={precision!r} is not supported: use one of {SUPPORTED_PRECISION}. The weight-"
                "perturbation step runs two backward passes by hand, which Lightning's 16-bit gradient scaler "
                "does not see; bf16-mixed needs no scaler."
            )
        aggregation.client_weights([1], client_weighting)  # validates the name before any work
        if clients_per_round is not None and not (
            (isinstance(clients_per_round, int) and clients_per_round >= 1)
            or (isinstance(clients_per_round, float) and 0.0 < clients_per_round <= 1.0)
        ):
            raise ValueError(
                f"trainer.clients_per_round must be an int >= 1 (clients per round) or a float in (0, 1] (a "
                f"fraction of the clients), got {clients_per_round!r}."
            )
        if pool_clients and (local_modules or clients_per_round is not None):
            raise ValueError(
                "trainer.pool_clients trains one model on every client's data: it cannot keep modules local "
                f"(local_modules={local_modules}) or sample clients (clients_per_round={clients_per_round}); "
                "remove those settings."
            )
        _check_choice("trainer.client_failure", client_failure, ("raise", "skip"))
        _check_choice("trainer.update_distance_policy", update_distance_policy, ("clip", "reject"))
        _check_choice("trainer.aggregator", aggregator, ("mean", "median", "trimmed_mean"))
        _check_positive("trainer.min_clients", min_clients)
        if client_retries < 0:
            raise ValueError(f"trainer.client_retries must be >= 0, got {client_retries}.")
        if max_update_distance is not None and max_update_distance <= 0:
            raise ValueError(f"trainer.max_update_distance must be > 0 or null (no bound), got {max_update_distance}.")
        if not 0.0 <= trim_ratio < 0.5:
            raise ValueError(f"trainer.trim_ratio must be in [0, 0.5), got {trim_ratio}.")
        if aggregator != "mean" and isinstance(server_optimizer, FedNova):
            raise ValueError(
                f"trainer.aggregator={aggregator!r} cannot serve FedNova, whose normalization is a weighted mean: "
                "use aggregator: mean, or another server optimizer."
            )
        self.rounds = rounds
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.client_weighting = client_weighting
        self.clients_per_round = clients_per_round
        self.held_out = list(held_out_clients or [])
        self.server_optimizer = server_optimizer or FedAvg()
        self.local_module_types = aggregation.resolve_module_types(local_modules or [])
        self.pool_clients = pool_clients
        self.client_failure = client_failure
        self.client_retries = client_retries
        self.min_clients = min_clients
        self.max_update_distance = max_update_distance
        self.update_distance_policy = update_distance_policy
        self.aggregator = aggregator
        self.trim_ratio = trim_ratio
        self.seed = seed
        self._root_dir = Path(default_root_dir or "runs/harmofl")
        callback_list = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        if enable_progress_bar:
            from callbacks.progress import RoundProgressBar

            callback_list.append(RoundProgressBar())
        loggers = [logger] if isinstance(logger, Logger) else list(logger or [])
        _default_wandb_to_offline(loggers)
        self.fabric = Fabric(
            accelerator=accelerator,
            devices=devices,
            strategy=ClientParallelStrategy() if devices > 1 else "auto",
            precision=precision,
            callbacks=callback_list,
            loggers=loggers,
        )
        # With devices > 1 this starts the other processes, which re-run the same command up to this point.
        self.fabric.launch()
        self.current_client: Optional[str] = None
        self.current_round = 0
        self.history: list[dict[str, Any]] = []
        self.best_round: Optional[int] = None
        self.best_score = float("-inf")
        #: Client failures so far: ``{"round", "client", "error"}`` (rounds from 1), in the checkpoint and summary.
        self.failures: list[dict[str, Any]] = []

    # -- properties Trainer-style callbacks (e.g. LightningCLI's SaveConfigCallback) read ----------------

    @property
    def default_root_dir(self) -> str:
        return str(self._root_dir)

    @property
    def log_dir(self) -> str:
        return str(self._root_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self._root_dir / "checkpoints"

    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero

    @property
    def global_rank(self) -> int:
        return self.fabric.global_rank

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def strategy(self) -> Any:
        return self.fabric.strategy

    @property
    def loggers(self) -> list[Logger]:
        return self.fabric.loggers

    @property
    def callbacks(self) -> list[Any]:
        return self.fabric._callbacks

    @property
    def lightning_module(self) -> FederatedClient:
        return self.module

    # -- entry points ------------------------------------------------------------------------------------

    def fit(  # type: ignore[override]
        self, model: FederatedClient, datamodule: FederatedDataModule, ckpt_path: Optional[str] = None
    ) -> dict[str, Any]:
        """Run the federated training; returns the summary of the best round (also in ``summary.json``).

        Args:
            ckpt_path: a checkpoint of this run (``last.ckpt``, or ``last``) to continue from.
        """
        self._setup(model, datamodule, "fit")
        start_round = 0
        if ckpt_path is not None:
            start_round = self._restore(self._resolve_checkpoint(ckpt_path), with_optimizers=True)
            rank_zero_info(f"Resuming after round {start_round} of {self.rounds}.")
        self.current_round = start_round
        self.fabric.call("on_fit_start", trainer=self, pl_module=self.module)
        for round_idx in range(start_round, self.rounds):
            self._run_round(round_idx)
        self.fabric.call("on_fit_end", trainer=self, pl_module=self.module)
        self.fabric.call("teardown", trainer=self, pl_module=self.module, stage="fit")
        result = self._best_round_summary()
        best = {**result["clients"], **result.get("held_out", {})}
        if self.is_global_zero and best:
            # Once per fit, not per round: a plot costs more than a small model's round of bookkeeping, and
            # metrics.csv (and the loggers) already follow the run live.
            reporting.plot_convergence(self.history, self.module.primary_metric, self._root_dir / "convergence.png")
            reporting.print_results_table(f"Best round {self.best_round} of {self.rounds}", best, self.held_out)
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

    # -- the round ---------------------------------------------------------------------------------------

    def _run_round(self, round_idx: int) -> None:
        self.current_round = round_idx
        self.fabric.call("on_round_start", trainer=self, pl_module=self.module, round_idx=round_idx)
        shared = self.shared_global_state()
        update_sum = aggregation.weighted_sum([], [], shared, device=self.fabric.device)
        updates: dict[str, dict[str, Tensor]] = {}  # robust aggregators need every update, not their sum
        participants = self.participants(round_idx)
        train_results: dict[str, dict[str, dict[str, float]]] = {}
        contributions: dict[str, Contribution] = {}
        failures: dict[str, str] = {}
        for client, outcome in self._client_updates(round_idx, participants, shared):
            if isinstance(outcome, str):
                failures[client] = outcome
                continue
            contributions[client] = Contribution(self.client_weight[client], outcome.num_steps)
            if self.aggregator == "mean":
                factor = self.server_optimizer.aggregation_factor(outcome.num_steps)
                aggregation.add_weighted_(update_sum, outcome.state, self.client_weight[client] * factor)
            else:
                updates[client] = {key: _to_host(outcome.state[key]) for key in shared}
            train_results[client] = {"train": {"loss": outcome.loss}}
        gathered = all_gather_objects(self.fabric, (contributions, failures, updates))
        contributions = {client: c for part in gathered for client, c in part[0].items()}
        self._record_failures(round_idx, {client: e for part in gathered for client, e in part[1].items()})
        if len(contributions) < self.min_clients:
            raise RuntimeError(
                f"Only {len(contributions)} of {len(participants)} clients sent a valid update in round "
                f"{round_idx + 1}, fewer than trainer.min_clients={self.min_clients}: {self.failures[-5:]}. The "
                f"checkpoint of round {round_idx} is intact: fix the cause and continue with --ckpt_path last."
            )
        updates = {client: u for part in gathered for client, u in part[2].items()}
        self._aggregate(update_sum, contributions, updates)
        self.fabric.call("on_aggregate", trainer=self, pl_module=self.module, round_idx=round_idx)
        results = self._evaluate_clients(("val", "test"))
        for part in all_gather_objects(self.fabric, train_results):
            for client, splits in part.items():
                results[client] = {**splits, **results.get(client, {})}
        self._end_round(round_idx, self._ordered(results))

    def _client_updates(
        self, round_idx: int, participants: list[str], shared: Mapping[str, Tensor]
    ) -> Iterator[tuple[str, Union[ClientUpdate, str]]]:
        """This process's participants, trained one after the other: each client's update, or the error for which
        it is skipped. An update's state is the live module's: valid until the next client is loaded."""
        for client in (c for c in self.my_trainees if c in participants):
            outcome = self._train_client_under_policy(client, round_idx, shared)
            if isinstance(outcome, str):
                yield client, outcome
                continue
            self._store_client(client)
            yield client, ClientUpdate(self.module.state_dict(), *outcome)

    def _train_client_under_policy(
        self, client: str, round_idx: int, shared: Mapping[str, Tensor]
    ) -> Union[tuple[float, int], str]:
        """:meth:`_train_client` under the failure policy: (loss, steps), or the error when the client is skipped.

        A retry starts again from the same global weights, client state and seed; callbacks' state of the
        client (its amplitude target, its control variate) is rolled back first.
        """
        tolerant = self.client_retries > 0 or self.client_failure == "skip"
        saved = copy.deepcopy(self._client_callback_states(client)) if tolerant else None
        for attempt in range(self.client_retries + 1):
            try:
                return self._train_client(client, round_idx, shared, self.client_seed(round_idx, client))
            except Exception as error:  # any fault of one client's training; KeyboardInterrupt is not caught
                if saved is not None:
                    self._load_client_callback_states(client, copy.deepcopy(saved))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # an out-of-memory client must not starve the next one
                description = f"{type(error).__name__}: {error}"
                where = f"Client {client!r} failed in round {round_idx + 1} (attempt {attempt + 1})"
                if attempt < self.client_retries:
                    rank_zero_warn(f"{where}: {description}. Retrying.")
                elif self.client_failure == "raise":
                    error.add_note(f"{where}. Set trainer.client_failure: skip to continue without a failing client.")
                    raise
                else:
                    return description
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _record_failures(self, round_idx: int, failures: Mapping[str, str]) -> None:
        for client in self._ordered(failures):
            self.failures.append({"round": round_idx + 1, "client": client, "error": failures[client]})
            rank_zero_warn(
                f"Client {client!r} failed in round {round_idx + 1} and is left out of this round's aggregation: "
                f"{failures[client]}"
            )

    def client_seed(self, round_idx: int, client: str) -> int:
        """The seed of a trainee's data order and randomness in a round: independent of the process layout."""
        return _derive_seed(self.seed, round_idx, self.trainee_names.index(client))

    def _train_client(
        self, client: str, round_idx: int, shared: Mapping[str, Tensor], client_seed: int
    ) -> tuple[float, int]:
        """Local training of one client from the global weights (``shared``: the keys it sends), seeded with
        ``client_seed``; returns its mean unperturbed loss and steps, with its update checked (and bounded) in the
        module."""
        self.current_client = client
        self._load_client(client, with_optimizer=True)
        torch.manual_seed(client_seed)
        generator = torch.Generator().manual_seed(client_seed)
        if client == POOLED_CLIENT:
            loader = self.datamodule.pooled_dataloader(self.client_names_training, generator=generator)
        else:
            loader = self.datamodule.dataloader(client, "train", generator=generator)
        num_batches = self.local_steps or self.local_epochs * len(loader)
        self.module.train()
        self.fabric.call("on_train_client_start", trainer=self, pl_module=self.module, client=client,
                         num_batches=num_batches)
        loss_sum = torch.zeros((), device=self.fabric.device)
        for batch_idx, batch in enumerate(self._training_batches(loader, num_batches)):
            batch = self.fabric.to_device(batch)
            self.fabric.call("on_train_batch_start", trainer=self, pl_module=self.module, batch=batch,
                             batch_idx=batch_idx)
            loss = self.fabric_module.training_step(batch, batch_idx)
            loss_sum += loss
            self.fabric.call("on_train_batch_end", trainer=self, pl_module=self.module, outputs=loss, batch=batch,
                             batch_idx=batch_idx)
        mean_loss = (loss_sum / max(num_batches, 1)).item()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"Client {client!r} had a non-finite training loss ({mean_loss}).")
        self._check_update(shared)
        self.fabric.call("on_train_client_end", trainer=self, pl_module=self.module, client=client, loss=mean_loss)
        return mean_loss, num_batches

    def _training_batches(self, loader: Any, num_batches: int) -> Iterator[Any]:
        """``num_batches`` batches: whole epochs, or a fixed number of steps cycling the loader."""
        if num_batches > 0 and len(loader) == 0:
            raise ValueError(f"Client {self.current_client!r} has no training batches: check its training data.")
        produced = 0
        while produced < num_batches:
            for batch in loader:
                yield batch
                produced += 1
                if produced == num_batches:
                    return

    @property
    def client_names_training(self) -> list[str]:
        """The clients whose data trains: every client not held out."""
        return [client for client in self.client_names if client not in self.held_out]

    @property
    def trainee_names(self) -> list[str]:
        """Who trains and sends updates: the training clients, or the one pooled client (``pool_clients``)."""
        return [POOLED_CLIENT] if self.pool_clients else self.client_names_training

    def participants(self, round_idx: int) -> list[str]:
        """The trainees of round ``round_idx``: all, or a sample drawn from (seed, round) alone, so that every
        process, and a resumed run, draws the same."""
        training = self.trainee_names
        if self.clients_per_round is None:
            return training
        count = len(training)
        if isinstance(self.clients_per_round, float):
            wanted = math.ceil(self.clients_per_round * count)
        else:
            wanted = min(self.clients_per_round, count)
        chosen = random.Random(f"participation/{self.seed}/{round_idx}").sample(range(count), wanted)
        return [training[index] for index in sorted(chosen)]

    def _check_update(self, shared: Mapping[str, Tensor]) -> None:
        """The server's checks of the module's update; a clipped update replaces it."""
        state = self.module.state_dict()
        checked = self.checked_update({key: state[key] for key in shared}, shared)
        if self.max_update_distance is not None:
            self.module.load_state_dict(checked, strict=False)

    def checked_update(self, update: Mapping[str, Tensor], shared: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``update`` checked against the global ``shared`` weights (keys, shapes, dtypes, finite values) and
        bounded by ``max_update_distance`` (:mod:`harmofl.validation`); raises InvalidUpdate when refused."""
        validation.check_update(update, shared)
        if self.max_update_distance is None:
            return dict(update)
        return validation.bound_update(update, shared, self.max_update_distance, self.update_distance_policy)

    def _aggregate(
        self, update_sum: dict[str, Tensor], contributions: Mapping[str, Contribution],
        updates: Mapping[str, Mapping[str, Tensor]],
    ) -> None:
        """The clients' center (one all-reduce of the processes' weighted sums, or a robust statistic of every
        update); the server optimizer turns it into the model."""
        ordered = [contributions[client] for client in self.trainee_names if client in contributions]
        shared = {key: self.global_state[key] for key in update_sum}
        if self.aggregator == "mean":
            all_reduce_sum_(self.fabric, update_sum)
            total_weight = sum(c.weight * self.server_optimizer.aggregation_factor(c.num_steps) for c in ordered)
            center = aggregation.mean_from_sum(update_sum, total_weight, shared)
        else:
            states = [updates[client] for client in self.trainee_names if client in updates]
            center = (
                aggregation.coordinate_median(states, shared)
                if self.aggregator == "median"
                else aggregation.trimmed_mean(states, self.trim_ratio, shared)
            )
        self.global_state.update(self.server_optimizer.step(shared, center, ordered))

    def aggregate_client_values(self, values: Mapping[str, Mapping[str, Tensor]]) -> Optional[dict[str, Tensor]]:
        """Weighted mean, over every client of every process, of small per-client tensors (amplitude targets).

        ``values`` holds this process's clients; clients without a value are left out and the weights
        renormalized. Returns None when no client has a value.
        """
        gathered: dict[str, Mapping[str, Tensor]] = {}
        for part in all_gather_objects(self.fabric, {c: {k: v.cpu() for k, v in d.items()} for c, d in values.items()}):
            gathered.update(part)
        clients = [c for c in self.client_names if c in gathered]
        if not clients:
            return None
        return aggregation.weighted_average([gathered[c] for c in clients], [self.client_weight[c] for c in clients])

    def _evaluate_clients(self, splits: tuple[Split, ...]) -> dict[str, dict[str, dict[str, float]]]:
        """Every client's metrics on ``splits`` with the global model (plus its local keys), from all processes."""
        local = {client: self._evaluate_client(client, splits) for client in self.my_clients}
        results: dict[str, dict[str, dict[str, float]]] = {}
        for part in all_gather_objects(self.fabric, local):
            results.update(part)
        return results

    def _evaluate_client(self, client: str, splits: tuple[Split, ...]) -> dict[str, dict[str, float]]:
        self.current_client = client
        self._load_client(client, with_optimizer=False)
        return {split: self._evaluate_split(client, split) for split in splits}

    @torch.no_grad()
    def _evaluate_split(self, client: str, split: Split) -> dict[str, float]:
        hook, step = EVAL_HOOKS[split]
        metrics = self.module.metrics[split]
        metrics.reset()
        self.module.eval()
        for batch_idx, batch in enumerate(self.datamodule.dataloader(client, split)):
            batch = self.fabric.to_device(batch)
            self.fabric.call(hook, trainer=self, pl_module=self.module, batch=batch, batch_idx=batch_idx)
            getattr(self.fabric_module, step)(batch, batch_idx)
        values = {name: float(value) for name, value in metrics.compute().items()}
        metrics.reset()
        return values

    def _end_round(self, round_idx: int, results: dict[str, dict[str, dict[str, float]]]) -> None:
        round_number = round_idx + 1
        rows = reporting.history_rows(round_number, results, self.held_out)
        self.history.extend(rows)
        score = reporting.mean_over_clients(results, self.held_out)["val"][self.module.primary_metric]
        improved = score > self.best_score
        if improved:
            self.best_round, self.best_score = round_number, score
        checkpoint = self._checkpoint_state(round_number)  # collective: every process takes part
        if self.is_global_zero:
            save_checkpoint(checkpoint, self.checkpoint_dir / "last.ckpt")
            if improved:
                copy_checkpoint(self.checkpoint_dir / "last.ckpt", self.checkpoint_dir / "best.ckpt")
            self._write_outputs()
            self.fabric.log_dict(
                {f"{row['client']}/{row['split']}/{name}": value for row in rows for name, value in row.items()
                 if name not in ("round", "client", "split")},
                step=round_number,
            )
        self.fabric.call("on_round_end", trainer=self, pl_module=self.module, round_idx=round_idx, results=results)

    def _write_outputs(self) -> None:
        reporting.write_metrics_csv(self.history, self._root_dir / "metrics.csv")
        reporting.write_json(self._best_round_summary(), self._root_dir / "summary.json")

    def _best_round_summary(self) -> dict[str, Any]:
        """``summary.json``: the best round's metrics, and the client failures so far."""
        best = reporting.results_at_round(self.history, self.best_round, ("val", "test")) if self.best_round else {}
        result = reporting.summary(self.rounds, self.best_round, best, self.held_out)
        if self.failures:
            result["failures"] = self.failures
        return result

    # -- client state --------------------------------------------------------------------------------------

    def _load_client(self, client: str, with_optimizer: bool) -> None:
        """Put the global weights, this client's local keys and (for training) its optimizer state in place."""
        record = self.client_records.get(client, ClientRecord())
        self.module.load_state_dict(aggregation.merge_states(self.global_state, record.local_state))
        if with_optimizer:
            # A copy: on the CPU the optimizer would otherwise adopt (and mutate) the stored tensors.
            self.optimizer.load_state_dict(copy.deepcopy(record.optimizer_state or self.initial_optimizer_state))
            self.module.load_persistent_client_state(record.module_state)

    def _store_client(self, client: str) -> None:
        state = self.module.state_dict()
        self.client_records[client] = ClientRecord(
            local_state={key: _to_host(state[key]) for key in self.local_keys},
            optimizer_state=_to_host(self.optimizer.state_dict()),
            module_state=_to_host(self.module.persistent_client_state()),
        )

    # -- setup, checkpoints ----------------------------------------------------------------------------------

    def _setup(self, model: FederatedClient, datamodule: FederatedDataModule, stage: str) -> None:
        if not isinstance(model, FederatedClient):
            raise TypeError(f"The model must be a harmofl FederatedClient, got {type(model).__name__}.")
        self._setup_data(datamodule, stage)
        names = list(datamodule.client_names)
        self._setup_federation(names, {client: datamodule.num_samples(client, "train") for client in names})
        self._setup_model(model, stage)

    def _setup_data(self, datamodule: FederatedDataModule, stage: str) -> None:
        if not isinstance(datamodule, FederatedDataModule):
            raise TypeError(f"The data must be a harmofl FederatedDataModule, got {type(datamodule).__name__}.")
        if self.fabric.local_rank == 0:
            datamodule.prepare_data()
        self.fabric.barrier()
        datamodule.setup(stage)
        self.datamodule = datamodule

    def _setup_federation(self, client_names: list[str], train_samples: Mapping[str, int]) -> None:
        """The clients, who trains and evaluates where, and the clients' aggregation weights (from their numbers
        of training samples); validates the settings that depend on them."""
        self.client_names = list(client_names)
        if len(set(self.client_names)) != len(self.client_names) or not self.client_names:
            raise ValueError(f"The data module must name at least one client, each once; got {self.client_names}.")
        if self.world_size > len(self.client_names):
            raise ValueError(
                f"trainer.devices={self.world_size} exceeds the {len(self.client_names)} clients: "
                f"use at most {len(self.client_names)} devices."
            )
        unknown = sorted(set(self.held_out) - set(self.client_names))
        if unknown or len(self.held_out) >= len(self.client_names):
            raise ValueError(
                f"trainer.held_out_clients={self.held_out} must name clients of the data ({self.client_names}) and "
                f"leave at least one to train{f'; unknown: {unknown}' if unknown else ''}."
            )
        if self.pool_clients and POOLED_CLIENT in self.client_names:
            raise ValueError(f"trainer.pool_clients names its client {POOLED_CLIENT!r}, which is already a site name.")
        # Each process evaluates its clients and trains its trainees (the same clients, or rank 0 the pooled one).
        self.my_clients = self.client_names[self.global_rank :: self.world_size]
        self.my_trainees = self.trainee_names[self.global_rank :: self.world_size]
        if self.min_clients > len(self.participants(0)):
            raise ValueError(
                f"trainer.min_clients={self.min_clients} exceeds the {len(self.participants(0))} clients that train "
                "each round: lower it."
            )
        counts = [train_samples[client] for client in self.client_names]
        self.client_weight = dict(zip(self.client_names, aggregation.client_weights(counts, self.client_weighting)))
        if self.pool_clients:
            self.client_weight[POOLED_CLIENT] = 1.0

    def _setup_model(self, model: FederatedClient, stage: str) -> None:
        """The one model of this process, its optimizer, and the initial global state (rank 0's weights)."""
        self.fabric.call("setup", trainer=self, pl_module=model, stage=stage)
        model.setup(stage)
        self.module = model
        self.local_keys = aggregation.local_state_keys(model, self.local_module_types)
        self.fabric_module, self.optimizer = self.fabric.setup(model, model.configure_optimizers())
        self.initial_optimizer_state = _to_host(self.optimizer.state_dict())
        # Processes initialize their models from their own RNG: rank 0's weights are everyone's start.
        self.global_state = self.fabric.broadcast({k: _to_host(v) for k, v in model.state_dict().items()})
        self.client_records: dict[str, ClientRecord] = {}

    def _checkpoint_state(self, round_number: int) -> dict[str, Any]:
        """The whole federated state; client records and callback client states gathered from every process."""
        # A client that has not trained yet (partial participation) has an empty record.
        records = {client: self.client_records.get(client, ClientRecord()) for client in self._my_record_holders()}
        clients = {
            client: {
                "local_state": record.local_state,
                "optimizer_state": record.optimizer_state,
                "module_state": record.module_state,
                "callbacks": self._client_callback_states(client),
            }
            for client, record in records.items()
        }
        gathered: dict[str, Any] = {}
        for part in all_gather_objects(self.fabric, clients):
            gathered.update(part)
        return {
            "round": round_number,
            "rounds": self.rounds,
            "best_round": self.best_round,
            "best_score": self.best_score,
            "client_names": self.client_names,
            "global_state": self.global_state,
            "clients": {client: gathered[client] for client in self._ordered(gathered)},
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks if isinstance(cb, Callback)},
            "server_optimizer": self.server_optimizer.state_dict(),
            "history": self.history,
            "failures": self.failures,
        }

    def _my_record_holders(self) -> list[str]:
        """The clients whose records this process keeps: those it evaluates and those it trains (the pooled one)."""
        return list(dict.fromkeys(self.my_clients + self.my_trainees))

    def _client_state_callbacks(self) -> list[Any]:
        return [cb for cb in self.callbacks if hasattr(cb, "client_state_dict")]

    def _client_callback_states(self, client: str) -> dict[str, Any]:
        """Every callback's state of ``client`` (its amplitude target, its control variate), by callback state key."""
        return {cb.state_key: cb.client_state_dict(client) for cb in self._client_state_callbacks()}

    def _load_client_callback_states(self, client: str, states: Mapping[str, Any]) -> None:
        """Restore the callbacks' state of ``client`` from ``states`` (callbacks absent from it are left as is)."""
        for cb in self._client_state_callbacks():
            if cb.state_key in states:
                cb.load_client_state_dict(client, states[cb.state_key])

    def _load_callback_states(self, states: Mapping[str, Any]) -> None:
        """Restore the callbacks' global state from ``states`` (callbacks absent from it are left as they are)."""
        for cb in self.callbacks:
            if isinstance(cb, Callback) and cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])

    def shared_global_state(self) -> dict[str, Tensor]:
        """The global weights the clients share: every key but those each client keeps local."""
        return {key: value for key, value in self.global_state.items() if key not in self.local_keys}

    def _restore(self, path: Path, with_optimizers: bool) -> int:
        """Load a federated checkpoint into this trainer; returns the number of completed rounds."""
        checkpoint = load_checkpoint(path)
        try:
            validation.check_update(checkpoint["global_state"], self.global_state)
        except validation.InvalidUpdate as error:
            raise ValueError(
                f"Checkpoint {str(path)!r} does not fit this model: {error}. Use the model configuration the "
                "checkpoint was trained with."
            ) from error
        if with_optimizers:  # continuing a fit: the federation must be the one that was trained
            trained = [c for c in checkpoint["clients"] if c != POOLED_CLIENT]
            if trained != self.client_names:
                raise ValueError(
                    f"Checkpoint {str(path)!r} was trained with clients {trained}, the data has {self.client_names}: "
                    "continue it with the same data configuration (`cli.py test` evaluates other sites)."
                )
        self.global_state = checkpoint["global_state"]
        for client in self._my_record_holders():
            saved = checkpoint["clients"].get(client)
            if saved is None:
                rank_zero_info(f"Client {client!r} is not in {path}: it uses the global model and shared target.")
                continue
            self.client_records[client] = ClientRecord(
                local_state=saved["local_state"],
                optimizer_state=saved["optimizer_state"] if with_optimizers else None,
                module_state=saved.get("module_state", {}),
            )
            self._load_client_callback_states(client, saved["callbacks"])
        self._load_callback_states(checkpoint["callbacks"])
        self.server_optimizer.load_state_dict(checkpoint["server_optimizer"])
        self.history = list(checkpoint["history"])
        self.failures = list(checkpoint.get("failures", []))
        self.best_round, self.best_score = checkpoint["best_round"], checkpoint["best_score"]
        return int(checkpoint["round"])

    def _resolve_checkpoint(self, ckpt_path: str) -> Path:
        if ckpt_path in ("best", "last"):
            return self.checkpoint_dir / f"{ckpt_path}.ckpt"
        return Path(ckpt_path)

    def _evaluate_checkpoint(
        self, model: FederatedClient, datamodule: FederatedDataModule, ckpt_path: str, split: Split
    ) -> dict[str, Any]:
        self._setup(model, datamodule, "validate" if split == "val" else "test")
        path = self._resolve_checkpoint(ckpt_path)
        rounds = self._restore(path, with_optimizers=False)
        results = self._ordered(self._evaluate_clients((split,)))
        result = reporting.summary(rounds, self.best_round, results, self.held_out)
        if self.is_global_zero:
            reporting.print_results_table(f"{split} metrics of {path}", results, self.held_out)
            reporting.write_json(result, path.parent / f"{split}_summary.json")
        self.fabric.call("teardown", trainer=self, pl_module=self.module, stage=split)
        self._finish()
        return result

    def _ordered(self, results: Mapping[str, Any]) -> dict[str, Any]:
        """``results`` in the clients' order, the pooled client last."""
        return {client: results[client] for client in [*self.client_names, POOLED_CLIENT] if client in results}

    def _finish(self) -> None:
        self.fabric.barrier()
        for logger in self.loggers:
            logger.finalize("success")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def _derive_seed(seed: int, round_idx: int, client_index: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client), independent of the process layout."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_index) % (2**63 - 1)


def _to_host(value: Any) -> Any:
    """A detached CPU copy of every tensor in a nested structure (state dicts, optimizer states)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(item) for item in value)
    return value


def _default_wandb_to_offline(loggers: list[Logger]) -> None:
    """W&B must never block a run: without an API key (or an explicit WANDB_MODE) it logs offline."""
    if any(isinstance(lg, WandbLogger) for lg in loggers) and not (
        os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
    ):
        os.environ["WANDB_MODE"] = "offline"
        rank_zero_info("No WANDB_API_KEY: W&B logs offline (sync later with `wandb sync`).")
