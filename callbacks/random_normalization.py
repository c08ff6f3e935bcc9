"""FedRDN's random domain normalization as a federated callback (maths in :mod:`harmofl.random_normalization`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from callbacks.site_bank import SiteBankCallback, images_and_targets
from harmofl.data.base import Split
from harmofl.data.loaders import SplitLoader
from harmofl.federation.topology import POOLED_CLIENT
from harmofl.random_normalization import channel_statistics, normalize, random_site_normalization

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer

#: A site's per-channel statistics: ``{"mean": [C], "std": [C]}``.
Statistics = dict[str, Tensor]


class RandomDomainNormalization(SiteBankCallback):
    """FedRDN (Yan et al., CVPR 2025): each training image normalized with a randomly drawn site's statistics.

    Each client computes the per-channel mean and std of its own training images (one pass over its training
    loader, labels unused) the first time it trains or evaluates; a held-out client thus evaluates with statistics of
    its own unlabeled training images. After a round's aggregation the server gathers the training sites'
    statistics (2·C numbers per site, once) into a bank that reaches every site (:class:`SiteBankCallback`).

    Training batches: every image is normalized with the statistics of a site drawn uniformly over the bank and the
    client itself, ``(x − μ_j) / σ_j``. The paper exchanges the statistics before training; here they travel with
    round 1's updates, so in round 1 (no bank yet) a client normalizes with its own statistics. Evaluation batches:
    the client's own statistics. Composable with any aggregation (the ``fedrdn`` strategy uses FedAvg).
    """

    def transform_batch(self, trainer: FederatedTrainer, pl_module: LightningModule, batch: Any, stage: Split) -> Any:
        images, targets = images_and_targets(batch, type(self).__name__)
        client = _current_client(trainer)
        own = self.own_statistics(trainer, client)
        if stage == "train":
            sites = list({**self.bank, client: own}.values())
            means, stds = torch.stack([s["mean"] for s in sites]), torch.stack([s["std"] for s in sites])
            normalized = random_site_normalization(images, means, stds)
        else:
            normalized = normalize(images, own["mean"], own["std"])
        return type(batch)([normalized, targets])

    def own_statistics(self, trainer: FederatedTrainer, client: str) -> Statistics:
        """``client``'s statistics, computed from its training split the first time they are needed."""
        if client not in self.client_summaries:
            # The pass must not move torch's global RNG, which the runner seeded for the client's training.
            with torch.random.fork_rng(devices=[]):
                mean, std = channel_statistics(images for images, _ in _training_loader(trainer, client))
            self.client_summaries[client] = {"mean": mean, "std": std}
        return self.client_summaries[client]


def _training_loader(trainer: FederatedTrainer, client: str) -> SplitLoader:
    if client == POOLED_CLIENT:  # centralized training: the union of the training clients' data
        return trainer.datamodule.pooled_dataloader(trainer.federation.training_clients)
    return trainer.datamodule.dataloader(client, "train")


def _current_client(trainer: FederatedTrainer) -> str:
    client = trainer.current_client
    if client is None:
        raise RuntimeError(
            "RandomDomainNormalization transforms a client's batches: it needs the federated orchestrator "
            "(harmofl.FederatedTrainer) running a client."
        )
    return client
