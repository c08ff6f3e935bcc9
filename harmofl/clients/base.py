"""The client LightningModule: one site's model and its local step, the weight-perturbation loop."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from harmofl.models import use_batch_statistics
from harmofl.perturbation import WeightPerturbation

EVAL_STAGES = ("val", "test")
_RUNNING_STAT_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


class FederatedClient(LightningModule):
    """Base class of the clients: manual optimization with :class:`~harmofl.perturbation.WeightPerturbation`.

    Subclasses implement :meth:`create_network`, :meth:`compute_loss`, :meth:`build_metrics` and
    :meth:`update_metrics`. One instance serves every client of a process: the orchestrator swaps each
    client's weights and optimizer state in and out.

    Args:
        backbone: the network's name, resolved by :meth:`create_network`; always random initialization.
        num_classes: number of classes (segmentation: including the background, index 0).
        in_chans: image channels.
        backbone_kwargs: extra arguments of the network, e.g. ``{norm: group}`` for the reference nets.
        optimizer: the base optimizer, e.g. ``torch.optim.SGD`` or a ``class_path``/``init_args`` in YAML.
        alpha: the perturbation radius α; 0 turns the perturbation off (plain base-optimizer steps).
        proximal_mu: FedProx's μ: adds ``μ/2·‖w − w_start‖²`` to the local objective, ``w_start`` the weights
            local training started from (the global model); 0 turns it off. The logged loss excludes it.
        max_grad_norm: clip the gradient used for the update to this global L2 norm.
        weights_path: a local file of initial weights (a state dict, or a dict with a ``state_dict`` key).
        batch_norm_stats: ``running`` keeps BatchNorm's running statistics for evaluation; ``batch``
            normalizes with each batch's own statistics in evaluation too, as the reference networks do.
    """

    #: The metric whose mean over clients selects the best global model.
    primary_metric: str

    def __init__(
        self,
        backbone: str,
        num_classes: int = 2,
        in_chans: int = 3,
        backbone_kwargs: Optional[dict[str, Any]] = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        alpha: float = 0.05,
        proximal_mu: float = 0.0,
        max_grad_norm: Optional[float] = None,
        weights_path: Optional[str] = None,
        batch_norm_stats: Literal["running", "batch"] = "running",
    ) -> None:
        super().__init__()
        if proximal_mu < 0:
            raise ValueError(f"model.proximal_mu (FedProx's mu) must be >= 0, got {proximal_mu}.")
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2 (with background for segmentation), got {num_classes}.")
        if batch_norm_stats not in ("running", "batch"):
            raise ValueError(f"model.batch_norm_stats must be 'running' or 'batch', got {batch_norm_stats!r}.")
        if alpha < 0:
            raise ValueError(f"model.alpha (the perturbation radius) must be >= 0, got {alpha}.")
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.alpha = alpha
        self.proximal_mu = proximal_mu
        self._start_weights: Optional[list[Tensor]] = None
        self.max_grad_norm = max_grad_norm
        self.num_classes = num_classes
        self.model = self.create_network(backbone, num_classes=num_classes, in_chans=in_chans,
                                         **(backbone_kwargs or {}))
        # Each process evaluates its own clients: metrics must never be synchronized across processes.
        self.metrics = nn.ModuleDict({stage: self.build_metrics() for stage in EVAL_STAGES})
        if batch_norm_stats == "batch":
            use_batch_statistics(self.model)
        if weights_path is not None:
            load_local_weights(self.model, weights_path)

    @staticmethod
    @abstractmethod
    def create_network(name: str, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
        """Build the network by name (a factory of :mod:`harmofl.models`)."""

    @abstractmethod
    def build_metrics(self) -> MetricCollection:
        """The evaluation metrics (torchmetrics, created with ``sync_on_compute=False``)."""

    @abstractmethod
    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The training loss of the reference protocol."""

    @abstractmethod
    def update_metrics(self, metrics: MetricCollection, logits: Tensor, targets: Tensor) -> None:
        """Feed one batch's outputs to ``metrics``."""

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def configure_optimizers(self) -> WeightPerturbation:
        return WeightPerturbation(self.parameters(), self.optimizer_factory, self.alpha, self.max_grad_norm)

    def on_train_client_start(self) -> None:
        """Fired by the orchestrator as a client's local training starts, from the global weights."""
        if self.proximal_mu > 0:
            self._start_weights = [p.detach().clone() for p in self.parameters()]

    def local_objective(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(objective to minimize, task loss): the task loss plus the client-side terms that are switched on."""
        loss = self.compute_loss(self(images), targets)
        if self.proximal_mu == 0:
            return loss, loss
        if self._start_weights is None:
            raise RuntimeError("proximal_mu > 0 needs the starting weights: train this client with FederatedTrainer.")
        squared_distance = sum(((p - s) ** 2).sum() for p, s in zip(self.parameters(), self._start_weights))
        return loss + 0.5 * self.proximal_mu * squared_distance, loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One local step: backward at w, perturb, backward at w + δ, restore, base step.

        Returns the task loss of the unperturbed pass (the one that is logged).
        """
        images, targets = batch
        optimizer = self.optimizers()
        objective, loss = self.local_objective(images, targets)
        if not torch.isfinite(objective):
            raise FloatingPointError(
                f"Non-finite training loss ({objective.item()}) at batch {batch_idx}: lower the learning rate, check "
                "the data for NaN/Inf values, or use precision 32-true."
            )
        self.manual_backward(objective)
        if optimizer.perturbs:
            optimizer.perturb()
            self.manual_backward(self.local_objective(images, targets)[0])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        self.update_metrics(self.metrics["val"], self(images), targets)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        self.update_metrics(self.metrics["test"], self(images), targets)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=1)


def load_local_weights(model: nn.Module, path: str) -> None:
    """Load initial weights from a local file, safely (no pickled code) and strictly (no silent partial load)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.weights_path {path!r} is not a file: give the path of a local state-dict file.")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # Running statistics saved by a model that kept them are meaningless to one that normalizes with batch
    # statistics; every other key must match.
    expected = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in expected or not k.endswith(_RUNNING_STAT_SUFFIXES)}
    advice = "Use weights saved from the same backbone, number of classes and input channels."
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ValueError(f"The weights in {path!r} do not fit the model: {error}. {advice}") from error
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"The weights in {path!r} do not fit the model: missing keys {result.missing_keys[:10]}, unexpected keys "
            f"{result.unexpected_keys[:10]}. {advice}"
        )
