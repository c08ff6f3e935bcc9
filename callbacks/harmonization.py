"""The amplitude-harmonization callback: HarmoFL's local-drift fix applied to every batch a client sees."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from harmofl.amplitude import amplitude_spectrum, check_band, harmonize, update_running_amplitude
from harmofl.federation.callback import FederatedCallback
from harmofl.federation.store import to_host

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

    Each client keeps a running mean of its own training images' amplitude. The orchestrator calls
    :meth:`on_aggregate` after each round's aggregation: with ``share_target="first_round"`` (the method as
    published) the clients' targets are averaged once, after round 1, into one shared target that every client
    then uses, frozen; ``"every_round"`` re-averages after every round; ``"never"`` keeps each client on its own
    target. Only the amplitude map crosses the network, never an image. Training, validation, test and predict
    batches are all harmonized (in place), as the reference code's first network layer does.

    Args:
        band: half-width ratio of the low-frequency window in ``[0, 0.5]`` (0 = DC only, 0.5 = whole spectrum).
        momentum: weight of each new training batch in the running mean amplitude (0 = first batch only).
        share_target: when the clients' targets are averaged into a shared one.
        preset: fills ``band`` and ``momentum`` when they are not given: ``reference`` or ``paper``.
    """

    def __init__(
        self,
        band: float | None = None,
        momentum: float | None = None,
        share_target: TargetSharing = "first_round",
        preset: Preset = "reference",
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown harmonization preset {preset!r}; expected one of {sorted(PRESETS)}.")
        if share_target not in ("never", "first_round", "every_round"):
            raise ValueError(
                f"Unknown share_target {share_target!r}; expected 'never', 'first_round' or 'every_round'."
            )
        self.band = check_band(PRESETS[preset]["band"] if band is None else band)
        self.momentum = PRESETS[preset]["momentum"] if momentum is None else momentum
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}.")
        self.share_target = share_target
        self.client_targets: dict[str, Tensor] = {}
        self.shared_target: Tensor | None = None
        self.frozen = False
        self._warned_untrained = False

    # -- which target a batch is harmonized to -----------------------------------------------------------

    def target_for(self, client: str) -> Tensor | None:
        """The shared target once it exists, else the client's own running target (None before training)."""
        return self.shared_target if self.shared_target is not None else self.client_targets.get(client)

    def _harmonize_batch(self, trainer: Trainer, batch: Any, update: bool) -> None:
        images = _images_of(batch)
        client = _current_client(trainer)
        running = self.client_targets.get(client)
        # With momentum 0 only the first batch counts: later batches need no spectrum.
        if update and not self.frozen and (running is None or self.momentum > 0):
            self.client_targets[client] = update_running_amplitude(
                running, amplitude_spectrum(images.detach()), self.momentum
            )
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
            images.copy_(harmonize(images, target.to(images.device), self.band))

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
        """Whether this round's :meth:`on_aggregate` averages the clients' targets (they must reach the server)."""
        return self.share_target == "every_round" or (self.share_target == "first_round" and not self.frozen)

    def on_aggregate(self, trainer: FederatedTrainer, pl_module: LightningModule, round_idx: int) -> None:
        """After the server aggregated round ``round_idx`` (0-based): share the clients' targets if due."""
        if not self.shares_client_states():
            return
        shared = trainer.aggregate_client_values({c: {"amplitude": t} for c, t in self.client_targets.items()})
        if shared is None:
            return
        self.shared_target = shared["amplitude"]
        if self.share_target == "first_round":
            self.frozen = True

    # -- state: global part in the checkpoint's callbacks, per-client part in each client's record ---------

    def state_dict(self) -> dict[str, Any]:
        return {
            "shared_target": to_host(self.shared_target),
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
        self.shared_target = state_dict["shared_target"]
        self.frozen = bool(state_dict["frozen"])

    def client_state_dict(self, client: str) -> dict[str, Any]:
        return {"target": to_host(self.client_targets.get(client))}

    def load_client_state_dict(self, client: str, state: dict[str, Any]) -> None:
        if state.get("target") is None:
            self.client_targets.pop(client, None)
        else:
            self.client_targets[client] = state["target"]


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
