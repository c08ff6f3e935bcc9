"""The client LightningModule: one site's model and its local step, the weight-perturbation loop."""

from __future__ import annotations

import copy
from abc import abstractmethod
from pathlib import Path
from typing import Any, Literal, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from harmofl.contrastive import Tap, forward_with_representation, model_contrastive_loss
from harmofl.models import use_batch_statistics
from harmofl.perturbation import WeightPerturbation

EVAL_STAGES = ("val", "test")
_RUNNING_STAT_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


class FederatedClient(LightningModule):
    """Base class of the clients: manual optimization with :class:`~harmofl.perturbation.WeightPerturbation`.

    Subclasses implement :meth:`create_network`, :meth:`compute_loss`, :meth:`build_metrics`,
    :meth:`update_metrics` and :meth:`representation_layer`. One instance serves every client of a process:
    the orchestrator swaps each client's weights, optimizer state and :meth:`persistent_client_state` in and out.

    Args:
        backbone: the network's name, resolved by :meth:`create_network`; always random initialization.
        num_classes: number of classes (segmentation: including the background, index 0).
        in_chans: image channels.
        backbone_kwargs: extra arguments of the network, e.g. ``{norm: group}`` for the reference nets.
        optimizer: the base optimizer, e.g. ``torch.optim.SGD`` or a ``class_path``/``init_args`` in YAML.
        alpha: the perturbation radius α; 0 turns the perturbation off (plain base-optimizer steps).
        proximal_mu: FedProx's μ: adds ``μ/2·‖w − w_start‖²`` to the local objective, ``w_start`` the weights
            local training started from (the global model); 0 turns it off. The logged loss excludes it.
        contrastive_mu: MOON's μ: adds ``μ·ℓ_con`` (:mod:`harmofl.contrastive`) to the local objective, comparing
            this model's representation with the global model's and with the client's previous local model's;
            0 turns it off. The representation is read at :meth:`representation_layer`.
        contrastive_temperature: MOON's temperature τ (0.5 in the MOON paper).
        max_grad_norm: clip the gradient used for the update to this global L2 norm.
        weights_path: a local file of initial weights (a state dict, or a dict with a ``state_dict`` key).
        batch_norm_stats: ``running`` keeps BatchNorm's running statistics for evaluation; ``batch``
            normalizes with each batch's own statistics in evaluation too, as the reference networks do.
        channels_last: store the network's weights and feed its images in channels-last memory format (faster
            convolutions on recent GPUs with bf16; same results).
        compile_model: compile the network's forward with ``torch.compile`` (in place: parameter names and
            checkpoints are unchanged); ``compile_kwargs`` go to it, e.g. ``{mode: max-autotune}``.
    """

    #: The metric whose mean over clients selects the best global model.
    primary_metric: str
    #: Metrics that are not fractions in [0, 1] (distances), only >= 0: a server checks a site's reported values by it.
    unbounded_metrics: frozenset[str] = frozenset()

    def __init__(
        self,
        backbone: str,
        num_classes: int = 2,
        in_chans: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        alpha: float = 0.05,
        proximal_mu: float = 0.0,
        contrastive_mu: float = 0.0,
        contrastive_temperature: float = 0.5,
        max_grad_norm: float | None = None,
        weights_path: str | None = None,
        batch_norm_stats: Literal["running", "batch"] = "running",
        channels_last: bool = False,
        compile_model: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if proximal_mu < 0:
            raise ValueError(f"model.proximal_mu (FedProx's mu) must be >= 0, got {proximal_mu}.")
        if contrastive_mu < 0 or contrastive_temperature <= 0:
            raise ValueError(
                f"model.contrastive_mu (MOON's mu) must be >= 0 and model.contrastive_temperature > 0, got "
                f"{contrastive_mu} and {contrastive_temperature}."
            )
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
        self.contrastive_mu = contrastive_mu
        self.contrastive_temperature = contrastive_temperature
        #: SCAFFOLD's ``c − c_i`` per parameter name, set by :class:`callbacks.Scaffold` for one client's training.
        self.gradient_correction: dict[str, Tensor] | None = None
        self._start_weights: list[Tensor] | None = None
        # MOON: frozen copies of the network (not submodules: never trained, saved or aggregated), and the
        # weights the current client ended its previous round with.
        self._reference_networks: dict[str, nn.Module] = {}
        self._previous_weights: dict[str, Tensor] | None = None
        self.max_grad_norm = max_grad_norm
        self.num_classes = num_classes
        self.model = self.create_network(
            backbone, num_classes=num_classes, in_chans=in_chans, **(backbone_kwargs or {})
        )
        # Each process evaluates its own clients: metrics must never be synchronized across processes.
        self.metrics = nn.ModuleDict({stage: self.build_metrics() for stage in EVAL_STAGES})
        if batch_norm_stats == "batch":
            use_batch_statistics(self.model)
        if weights_path is not None:
            load_local_weights(self.model, weights_path)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        if compile_model:
            self.model.compile(**(compile_kwargs or {}))

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

    @abstractmethod
    def representation_layer(self) -> tuple[str, Tap]:
        """Where MOON reads the representation: a submodule of ``self.model`` and its ``input`` or ``output``."""

    def forward(self, images: Tensor) -> Tensor:
        return self.model(self.network_input(images))

    def network_input(self, images: Tensor) -> Tensor:
        """``images`` in the network's memory format (channels-last or contiguous)."""
        return images.contiguous(memory_format=self.memory_format)

    def configure_optimizers(self) -> WeightPerturbation:
        return WeightPerturbation(self.parameters(), self.optimizer_factory, self.alpha, self.max_grad_norm)

    def on_train_client_start(self) -> None:
        """Fired by the orchestrator as a client's local training starts, from the global weights."""
        if self.proximal_mu > 0:
            self._start_weights = [p.detach().clone() for p in self.parameters()]
        if self.contrastive_mu > 0:
            # Before any local training the previous local model is the global one (as in MOON's code).
            self._load_reference("global", self.model.state_dict())
            self._load_reference("previous", self._previous_weights or self.model.state_dict())

    def on_train_client_end(self) -> None:
        """Fired by the orchestrator as a client's local training ends."""
        if self.contrastive_mu > 0:
            self._previous_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def persistent_client_state(self) -> dict[str, Any]:
        """What this module keeps for the current client between rounds (MOON: its last local weights)."""
        return {"previous_weights": self._previous_weights} if self.contrastive_mu > 0 else {}

    def load_persistent_client_state(self, state: dict[str, Any]) -> None:
        """Set the current client's :meth:`persistent_client_state` (empty: the client never trained)."""
        self._previous_weights = state.get("previous_weights")

    def _load_reference(self, name: str, weights: dict[str, Tensor]) -> None:
        if name not in self._reference_networks:
            network = copy.deepcopy(self.model).eval()
            network.requires_grad_(False)
            self._reference_networks[name] = network
        self._reference_networks[name].load_state_dict(weights)

    def reference_representations(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """MOON's ``(z_glob, z_prev)`` of a batch; None when the contrastive term is off."""
        if self.contrastive_mu == 0:
            return None
        if not self._reference_networks:
            raise RuntimeError("contrastive_mu > 0 needs the global model: train this client with FederatedTrainer.")
        with torch.no_grad():
            return tuple(  # type: ignore[return-value]
                forward_with_representation(
                    self._reference_networks[name], self.network_input(images), *self.representation_layer()
                )[1]
                for name in ("global", "previous")
            )

    def local_objective(
        self, images: Tensor, targets: Tensor, references: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(objective to minimize, task loss): the task loss plus the client-side terms that are switched on.

        ``references`` are MOON's ``(z_glob, z_prev)`` for this batch (:meth:`reference_representations`).
        """
        if references is None:
            logits = self(images)
        else:
            logits, representation = forward_with_representation(
                self.model, self.network_input(images), *self.representation_layer()
            )
        loss = self.compute_loss(logits, targets)
        objective = loss
        if self.proximal_mu > 0:
            if self._start_weights is None:
                raise RuntimeError(
                    "proximal_mu > 0 needs the starting weights: train this client with FederatedTrainer."
                )
            squared_distance = sum(((p - s) ** 2).sum() for p, s in zip(self.parameters(), self._start_weights))
            objective = objective + 0.5 * self.proximal_mu * squared_distance
        if references is not None:
            contrastive = model_contrastive_loss(representation, *references, self.contrastive_temperature)
            objective = objective + self.contrastive_mu * contrastive
        if self.gradient_correction is not None:
            # ⟨c − c_i, w⟩ adds exactly SCAFFOLD's correction c − c_i to the gradient of every corrected parameter.
            parameters = dict(self.named_parameters())
            objective = objective + sum((parameters[name] * d).sum() for name, d in self.gradient_correction.items())
        return objective, loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One local step: backward at w, perturb, backward at w + δ, restore, base step.

        Returns the task loss of the unperturbed pass (the one that is logged).
        """
        images, targets = batch
        optimizer: Any = self.optimizers()  # one optimizer: the WeightPerturbation of configure_optimizers
        references = self.reference_representations(images)
        objective, loss = self.local_objective(images, targets, references)
        if not torch.isfinite(objective):
            raise FloatingPointError(
                f"Non-finite training loss ({objective.item()}) at batch {batch_idx}: lower the learning rate, check "
                "the data for NaN/Inf values, or use precision 32-true."
            )
        self.manual_backward(objective)
        if optimizer.perturbs:
            optimizer.perturb()
            self.manual_backward(self.local_objective(images, targets, references)[0])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        self.update_metrics(self.stage_metrics("val"), self(images), targets)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        self.update_metrics(self.stage_metrics("test"), self(images), targets)

    def stage_metrics(self, stage: str) -> MetricCollection:
        """The metrics of ``stage`` (``val``, ``test``)."""
        return cast(MetricCollection, self.metrics[stage])

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
