"""One client's local work on this process's model: a round of local training, or evaluation of the global model.
Simulation and a Flower site both run clients through it, so a site trains exactly as a simulated client."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from harmofl.data.augmentation import augmentation_generator
from harmofl.data.base import FederatedDataModule, Split
from harmofl.federation.topology import POOLED_CLIENT

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer

EVAL_HOOKS = {"val": ("on_validation_batch_start", "validation_step"), "test": ("on_test_batch_start", "test_step")}
Metrics = dict[str, float]


@dataclass
class ClientUpdate:
    """One participant's round: its weights (at least the shared keys), mean training loss and local steps."""

    state: Mapping[str, Tensor]
    loss: float
    num_steps: int


def batches_per_epoch(num_samples: int, batch_size: int) -> int:
    """The length of a client's training loader (:meth:`~harmofl.data.base.FederatedDataModule.dataloader`, which
    keeps the last, partial batch) over ``num_samples`` samples: what a server without the data counts."""
    return -(-num_samples // batch_size)  # ceil in integers: exact for any count


def local_step_count(epoch_batches: int, local_epochs: int, local_steps: int | None) -> int:
    """A client's optimizer steps in one round: ``local_steps`` when set, else ``local_epochs`` passes over its
    ``epoch_batches`` training batches. A client trains exactly this many; a Flower server recomputes it for
    each site (from the site's training samples) and refuses any other count (FedNova weighs updates by it)."""
    return local_steps or local_epochs * epoch_batches


class LocalRunner:
    """Trains and evaluates one client at a time on the one model of ``trainer``'s process.

    It uses the trainer's Fabric (device, precision, callbacks: every hook is fired with ``trainer`` and the
    module), module and optimizer, client store, update guard and local work (``local_epochs`` / ``local_steps``).

    Args:
        trainer: the set-up trainer (:meth:`~harmofl.trainer.FederatedTrainer.setup_model`).
        datamodule: the clients' data.
        pooled_clients: the clients whose data the pooled client trains on.
    """

    def __init__(self, trainer: FederatedTrainer, datamodule: FederatedDataModule, pooled_clients: list[str]) -> None:
        self.trainer, self.datamodule, self.pooled_clients = trainer, datamodule, pooled_clients
        self.fabric, self.module, self.fabric_module = trainer.fabric, trainer.module, trainer.fabric_module
        self.optimizer, self.store, self.guard = trainer.optimizer, trainer.store, trainer.guard
        self.local_epochs, self.local_steps = trainer.local_epochs, trainer.local_steps
        self.current_client: str | None = None

    def train(
        self, client: str, global_state: Mapping[str, Tensor], shared: Mapping[str, Tensor], seed: int
    ) -> ClientUpdate:
        """Local training of ``client`` from ``global_state`` (``shared``: the keys it sends), seeded with ``seed``;
        stores the client's record and returns its update, checked (and bounded) in the module. The update is the
        live module's state: valid until the next client is loaded."""
        self.current_client = client
        self.store.load(client, self.module, self.optimizer, global_state, with_optimizer=True)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        if client == POOLED_CLIENT:
            loader = self.datamodule.pooled_dataloader(self.pooled_clients, generator=generator)
        else:
            loader = self.datamodule.dataloader(client, "train", generator=generator)
        num_batches = local_step_count(len(loader), self.local_epochs, self.local_steps)
        augmentation_draws = augmentation_generator(seed)
        self.module.train()
        self._call("on_train_client_start", client=client, num_batches=num_batches)
        loss_sum = torch.zeros((), device=self.fabric.device)
        for batch_idx, batch in enumerate(self._training_batches(client, loader, num_batches)):
            batch = self.transformed(self._augmented(self.fabric.to_device(batch), augmentation_draws), "train")
            self._call("on_train_batch_start", batch=batch, batch_idx=batch_idx)
            loss = self.fabric_module.training_step(batch, batch_idx)
            loss_sum += loss
            self._call("on_train_batch_end", outputs=loss, batch=batch, batch_idx=batch_idx)
        mean_loss = (loss_sum / max(num_batches, 1)).item()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"Client {client!r} had a non-finite training loss ({mean_loss}).")
        self._guard_update(shared)
        self._call("on_train_client_end", client=client, loss=mean_loss)
        self.store.save(client, self.module, self.optimizer)
        return ClientUpdate(self.module.state_dict(), mean_loss, num_batches)

    def evaluate(self, client: str, global_state: Mapping[str, Tensor], splits: Iterable[Split]) -> dict[str, Metrics]:
        """``client``'s metrics of the global model (with its local keys) on ``splits``."""
        self.current_client = client
        self.store.load(client, self.module, self.optimizer, global_state, with_optimizer=False)
        return {split: self._evaluate_split(client, split) for split in splits}

    def _call(self, hook: str, **kwargs: Any) -> None:
        self.fabric.call(hook, trainer=self.trainer, pl_module=self.module, **kwargs)

    def _augmented(self, batch: Any, generator: torch.Generator) -> Any:
        """A training batch ``(images, targets)`` with the data module's augmentation (in this process, on the
        device, drawn from the client's round generator); untouched when it is off."""
        augmentation = self.datamodule.augmentation
        if not augmentation.enabled:
            return batch
        images, targets = batch
        return augmentation(images, targets, generator)

    def transformed(self, batch: Any, stage: Split) -> Any:
        """``batch`` (on the device) as a client's ``stage`` step sees it: through every federated callback's
        :meth:`~harmofl.federation.callback.FederatedCallback.transform_batch`, in order."""
        for callback in self.trainer.federated_callbacks:
            batch = callback.transform_batch(self.trainer, self.module, batch, stage)
        return batch

    @staticmethod
    def _training_batches(client: str, loader: Any, num_batches: int) -> Iterator[Any]:
        """``num_batches`` batches: whole epochs, or a fixed number of steps cycling the loader."""
        if num_batches > 0 and len(loader) == 0:
            raise ValueError(f"Client {client!r} has no training batches: check its training data.")
        produced = 0
        while produced < num_batches:
            for batch in loader:
                yield batch
                produced += 1
                if produced == num_batches:
                    return

    def _guard_update(self, shared: Mapping[str, Tensor]) -> None:
        """The server's checks of the module's update; a clipped update replaces it."""
        state = self.module.state_dict()
        checked = self.guard.check({key: state[key] for key in shared}, shared)
        if self.guard.max_distance is not None:
            self.module.load_state_dict(checked, strict=False)

    @torch.no_grad()
    def _evaluate_split(self, client: str, split: Split) -> Metrics:
        hook, step = EVAL_HOOKS[split]
        metrics = self.module.stage_metrics(split)
        metrics.reset()
        self.module.eval()
        for batch_idx, batch in enumerate(self.datamodule.dataloader(client, split)):
            batch = self.transformed(self.fabric.to_device(batch), split)
            self._call(hook, batch=batch, batch_idx=batch_idx)
            getattr(self.fabric_module, step)(batch, batch_idx)
        values = {name: float(value) for name, value in metrics.compute().items()}
        metrics.reset()
        return values
