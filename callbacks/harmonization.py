"""The amplitude-harmonization callback: HarmoFL's local-drift fix applied to every batch a client sees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from harmofl.amplitude import (
    check_band,
    crop_window,
    expand_window,
    full_amplitude,
    harmonize,
    image_spectrum,
    update_running_amplitude,
)
from harmofl.federation.callback import FederatedCallback
from harmofl.federation.store import to_host
from harmofl.validation import ImageShape, InvalidUpdate, agreed_value, check_amplitude_window

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer

TargetSharing = Literal["never", "first_round", "every_round"]
Preset = Literal["reference", "paper"]

# `reference`: what the public reference code runs (DC coefficient only, target = the first training
# batch's mean amplitude). `paper`: what the paper describes (whole spectrum, running mean with 0.1).
PRESETS: dict[str, dict[str, float]] = {
    "reference": {"band": 0.0, "momentum": 0.0},
    "paper": {"band": 0.5, "momentum": 0.1},
}

# The client a plain (non-federated) Lightning Trainer trains.
LOCAL_CLIENT = "local"


class AmplitudeHarmonization(FederatedCallback):
    """Replaces the low-frequency amplitude of every image by a target amplitude, before the model sees it.

    Each client keeps a running mean of its own training images' amplitude inside the ``band`` window (all that
    harmonization reads: ``[C, 1, 1]`` for the DC coefficient only). The orchestrator calls :meth:`on_aggregate`
    after each round's aggregation: with ``share_target="first_round"`` (the method as published) the clients' targets
    are combined once, after round 1, into one shared target that every client then uses, frozen; ``"every_round"``
    combines them after every round; ``"never"`` keeps each client on its own target. Targets are combined as
    ``trainer.aggregator`` combines updates (weighted mean, or coordinate-wise median / trimmed mean), after
    :func:`~harmofl.validation.check_amplitude_window` and a majority vote on the images' shape. Only the band window
    crosses the network, and only when sharing is due; never an image. Training, validation, test and predict
    batches are all harmonized (in place), as the reference code's first network layer does.

    Args:
        band: half-width ratio of the low-frequency window in ``[0, 0.5]`` (0 = DC only, 0.5 = whole spectrum).
        momentum: weight of each new training batch in the running mean amplitude (0 = first batch only).
        share_target: when the clients' targets are combined into a shared one.
        preset: fills ``band`` and ``momentum`` when they are not given: ``reference`` or ``paper``.
        max_pixel_value: the largest ``|pixel|`` of the images harmonized: a target beyond ``H·W·max_pixel_value``,
            the largest amplitude such images have, is refused.
    """

    def __init__(
        self,
        band: float | None = None,
        momentum: float | None = None,
        share_target: TargetSharing = "first_round",
        preset: Preset = "reference",
        max_pixel_value: float = 1.0,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown harmonization preset {preset!r}; expected one of {sorted(PRESETS)}.")
        if share_target not in ("never", "first_round", "every_round"):
            raise ValueError(
                f"Unknown share_target {share_target!r}; expected 'never', 'first_round' or 'every_round'."
            )
        if not max_pixel_value > 0:
            raise ValueError(f"max_pixel_value must be > 0 (the largest |pixel| of the images), got {max_pixel_value}.")
        self.band = check_band(PRESETS[preset]["band"] if band is None else band)
        self.momentum = PRESETS[preset]["momentum"] if momentum is None else momentum
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}.")
        self.share_target = share_target
        self.max_pixel_value = max_pixel_value
        #: Each client's target: its band window, and the shape ``[C, H, W]`` of the images it comes from.
        self.client_targets: dict[str, Tensor] = {}
        self.client_image_shapes: dict[str, ImageShape] = {}
        self.shared_target: Tensor | None = None
        self.shared_image_shape: ImageShape | None = None
        self.frozen = False
        self._warned_untrained = False

    # -- which target a batch is harmonized to -----------------------------------------------------------

    def target_for(self, client: str) -> Tensor | None:
        """The ``[C, H, W]`` target amplitude of ``client``'s images: the shared target once it exists, else the
        client's own running target (None before training)."""
        if self.shared_target is not None and self.shared_image_shape is not None:
            return expand_window(self.shared_target, self.shared_image_shape, self.band)
        if client in self.client_targets:
            return expand_window(self.client_targets[client], self.client_image_shapes[client], self.band)
        return None

    def _harmonize_batch(self, trainer: Trainer, batch: Any, update: bool) -> None:
        images = _images_of(batch)
        client = _current_client(trainer)
        # With momentum 0 only the first batch counts: later batches need no spectrum.
        spectrum = magnitude = None
        if update and not self.frozen and (client not in self.client_targets or self.momentum > 0):
            # One forward FFT serves the target's update and, below, the harmonization.
            spectrum = image_spectrum(images.detach())
            magnitude = spectrum.abs()
            # The batch mean of the half amplitude, mirrored: bitwise the mean of the whole amplitude, 1/B the work.
            self._update_target(client, images.shape, full_amplitude(magnitude.mean(dim=0), images.shape[-1]))
        target = self.target_for(client)
        if target is None:
            if not self._warned_untrained:
                rank_zero_warn(
                    f"Client {client!r} has no amplitude target yet (no training batch seen and no checkpoint "
                    "restored): its evaluation images pass through unharmonized."
                )
                self._warned_untrained = True
            return
        with torch.no_grad():
            images.copy_(harmonize(images, target.to(images.device), self.band, spectrum, magnitude))

    def _update_target(self, client: str, batch_shape: torch.Size, batch_amplitude: Tensor) -> None:
        """Move ``client``'s running target towards a batch's mean amplitude ``[C, H, W]``."""
        # The window of the batch mean: bitwise the window of the whole running mean.
        batch_mean = crop_window(batch_amplitude.unsqueeze(0), self.band)
        image_shape = (batch_shape[1], batch_shape[2], batch_shape[3])
        if self.client_image_shapes.get(client, image_shape) != image_shape:
            raise ValueError(
                f"Client {client!r}'s images changed shape from {self.client_image_shapes[client]} to {image_shape}: "
                "its running amplitude needs one image size per client."
            )
        self.client_targets[client] = update_running_amplitude(
            self.client_targets.get(client), batch_mean, self.momentum
        )
        self.client_image_shapes[client] = image_shape

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._harmonize_batch(trainer, batch, update=True)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._harmonize_batch(trainer, batch, update=False)

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._harmonize_batch(trainer, batch, update=False)

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._harmonize_batch(trainer, batch, update=False)

    # -- federated hooks, fired by the orchestrator --------------------------------------------------------

    def shares_client_states(self) -> bool:
        """Whether this round's :meth:`on_aggregate` combines the clients' targets (they must reach the server):
        after round 1 only (``first_round``), after every round, or never. A site sends its target only then."""
        return self.share_target == "every_round" or (self.share_target == "first_round" and not self.frozen)

    def on_aggregate(self, trainer: FederatedTrainer, pl_module: LightningModule, round_idx: int) -> None:
        """After the server aggregated round ``round_idx`` (0-based): combine the clients' targets if due.

        Every target is checked (a bad one stops the run, naming its client); targets of images of another shape
        than the shared target's, or than a strict majority's, are left out with a warning naming their clients."""
        if not self.shares_client_states():
            return
        image_shape = self._agreed_image_shape(trainer)
        if image_shape is None:
            return
        combined = {
            c: {"amplitude": t} for c, t in self.client_targets.items() if self.client_image_shapes[c] == image_shape
        }
        shared = trainer.aggregate_client_values(combined)
        if shared is None:
            return
        self.shared_target, self.shared_image_shape = shared["amplitude"], image_shape
        if self.share_target == "first_round":
            self.frozen = True

    def _agreed_image_shape(self, trainer: FederatedTrainer) -> ImageShape | None:
        """The image shape of the targets to combine (None: no client has one); refuses a bad target."""
        claims: dict[str, tuple[ImageShape, str | None]] = trainer.gather_client_values(
            {client: (self.client_image_shapes[client], self._target_problem(client)) for client in self.client_targets}
        )
        problems = [f"client {client!r}: {problem}" for client, (_, problem) in claims.items() if problem]
        if problems:  # every process raises the same error: it gathered every client's verdict
            raise InvalidUpdate("; ".join(problems))
        if not claims:
            return None
        shapes = {client: shape for client, (shape, _) in claims.items()}
        agreed = self.shared_image_shape or agreed_value(
            shapes, "the shape of the images their amplitude targets are of"
        )
        left_out = [client for client, shape in shapes.items() if shape != agreed]
        if left_out:
            rank_zero_warn(
                f"Amplitude targets of clients {left_out} ({[shapes[c] for c in left_out]}) are left out of the shared "
                f"target: they are of images of another shape than {agreed}."
            )
        return agreed

    def _target_problem(self, client: str) -> str | None:
        try:
            check_amplitude_window(
                self.client_targets[client], self.client_image_shapes[client], self.band, self.max_pixel_value
            )
        except InvalidUpdate as error:
            return str(error)
        return None

    # -- state: global part in the checkpoint's callbacks, per-client part in each client's record ---------

    def state_dict(self) -> dict[str, Any]:
        return {
            "shared_target": to_host(self.shared_target),
            "image_shape": None if self.shared_image_shape is None else list(self.shared_image_shape),
            "frozen": self.frozen,
            "band": self.band,
            "momentum": self.momentum,
            "share_target": self.share_target,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if float(state_dict["band"]) != self.band:
            rank_zero_warn(
                f"The checkpoint's harmonization used band={state_dict['band']}, this run uses band={self.band}: "
                "evaluation images are harmonized differently from training."
            )
        if state_dict["shared_target"] is None:
            self.shared_target, self.shared_image_shape = None, None
        else:
            self.shared_target, self.shared_image_shape = self._checked_target(
                state_dict, "shared_target", "the server or checkpoint shares"
            )
        self.frozen = bool(state_dict["frozen"])

    def client_state_dict(self, client: str) -> dict[str, Any]:
        """``client``'s band window and its images' shape: what the site keeps and, when sharing is due, sends."""
        if client not in self.client_targets:
            return {"target": None}
        return {"target": to_host(self.client_targets[client]), "image_shape": list(self.client_image_shapes[client])}

    def load_client_state_dict(self, client: str, state: dict[str, Any]) -> None:
        """Restore ``client``'s target; raises :class:`~harmofl.validation.InvalidUpdate` naming the client for a
        target :func:`~harmofl.validation.check_amplitude_window` refuses, or of other images than the shared
        target's (a site's reply is then that site's failure)."""
        if isinstance(state, Mapping) and state.get("target") is None:
            self.client_targets.pop(client, None)
            self.client_image_shapes.pop(client, None)
            return
        window, image_shape = self._checked_target(state, "target", f"of client {client!r}", self.shared_image_shape)
        self.client_targets[client], self.client_image_shapes[client] = window, image_shape

    def _checked_target(
        self, state: Any, key: str, owner: str, image_shape: ImageShape | None = None
    ) -> tuple[Tensor, ImageShape]:
        """The band window of ``state[key]`` and its images' shape (``image_shape`` when given), checked. A state
        without ``image_shape`` holds a whole ``[C, H, W]`` spectrum (written before targets were windows)."""
        try:
            if not isinstance(state, Mapping):
                raise InvalidUpdate(f"its state is {type(state).__name__}, not a mapping")
            target, claimed = state.get(key), state.get("image_shape")
            if claimed is None and isinstance(target, Tensor) and target.ndim == 3:
                target, claimed = crop_window(target, self.band), list(target.shape)
            window, shape = check_amplitude_window(target, claimed, self.band, self.max_pixel_value)
            if image_shape not in (None, shape):
                raise InvalidUpdate(f"it is of images {shape}, the shared target of images {image_shape}")
        except InvalidUpdate as error:
            raise InvalidUpdate(f"the amplitude target {owner} is refused: {error}") from error
        return window, shape


def _images_of(batch: Any) -> Tensor:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(
            "AmplitudeHarmonization expects batches of (images, targets) with float images [B, C, H, W], "
            f"got {type(images).__name__}."
        )
    return images


def _current_client(trainer: Trainer) -> str:
    # A FederatedTrainer names the client it runs; a plain Lightning Trainer trains one model, ``local``.
    return getattr(trainer, "current_client", None) or LOCAL_CLIENT
