"""FedDG's amplitude exchange as a federated callback (maths in :mod:`harmofl.frequency_interpolation`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from callbacks.site_bank import SiteBankCallback, images_and_targets
from harmofl.amplitude import amplitude_spectrum, check_band
from harmofl.data.base import Split
from harmofl.federation.store import to_host
from harmofl.frequency_interpolation import draw_amplitudes, interpolate_amplitude

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer


class AmplitudeExchange(SiteBankCallback):
    """FedDG-ELCFS's continuous frequency-space interpolation (Liu et al., CVPR 2021), without its episodic learning.

    Each client keeps the amplitude spectra of the first ``bank_size`` training images it sees in its first round.
    After a round's aggregation the server gathers the training sites' spectra into a bank ``{site: [N, C, H, W]}``
    that reaches every site (:class:`SiteBankCallback`). This shares ``bank_size`` full ``C×H×W`` amplitude spectra
    per site, one per image (not an average, unlike HarmoFL): without its phase an image's amplitude still carries its
    intensity and texture statistics.

    Training batches, once the bank holds another site: for each image, another site is drawn uniformly, one of its
    spectra uniformly and ``λ ~ U[0, 1]``; the image's amplitude inside the ``band`` window becomes
    ``(1 − λ)·A + λ·A_other``, its phase is kept, and the client trains on the originals and the interpolated images
    together (the batch doubles, targets repeated). Before that (round 1), batches are unchanged; evaluation
    batches are always unchanged. The boundary-oriented episodic meta-learning, FedDG's other half
    (segmentation-specific), is not implemented: the client's own training step is used as it is.

    Args:
        band: half-width ratio of the low-frequency window in ``[0, 0.5]`` (HarmoFL's convention; FedDG's ``L``
            for square images). 0.01, FDA's (Yang & Soatto 2020) window, from which FedDG's comes; FedDG's released
            code runs ``L=0`` (DC coefficient only) in training, 0.003 in its demo; 0.01 is DC-only below 100 pixels.
        bank_size: amplitude spectra each site shares (at least 1).
    """

    def __init__(self, band: float = 0.01, bank_size: int = 16) -> None:
        self.band = check_band(band)
        if bank_size < 1:
            raise ValueError(f"bank_size must be at least 1 (amplitude spectra each site shares), got {bank_size}.")
        super().__init__()
        self.bank_size = bank_size
        self._collected: list[Tensor] | None = None  # the training client's spectra so far, while it needs some

    def on_train_client_start(
        self, trainer: FederatedTrainer, pl_module: LightningModule, client: str, num_batches: int
    ) -> None:
        self._collected = None if client in self.client_summaries else []

    def on_train_client_end(
        self, trainer: FederatedTrainer, pl_module: LightningModule, client: str, loss: float
    ) -> None:
        if self._collected:
            self.client_summaries[client] = torch.cat(self._collected)[: self.bank_size]
        self._collected = None

    def transform_batch(self, trainer: FederatedTrainer, pl_module: LightningModule, batch: Any, stage: Split) -> Any:
        if stage != "train":
            return batch
        images, targets = images_and_targets(batch, type(self).__name__)
        self._collect(images)
        others = [amplitudes for site, amplitudes in self.bank.items() if site != trainer.current_client]
        if not others:
            return batch
        amplitudes = draw_amplitudes(others, len(images), images.device)
        lam = torch.rand(len(images), device=images.device)
        interpolated = interpolate_amplitude(images, amplitudes, lam, self.band)
        return type(batch)([torch.cat([images, interpolated]), torch.cat([targets, targets])])

    def _collect(self, images: Tensor) -> None:
        if self._collected is None:
            return
        missing = self.bank_size - sum(len(amplitudes) for amplitudes in self._collected)
        if missing > 0:
            self._collected.append(to_host(amplitude_spectrum(images[:missing].detach())))
