"""FedFA's feature augmentation (Zhou & Konukoglu, ICLR 2023, arXiv 2301.12995): small pure functions and the layer.

During training a feature map's per-sample, per-channel statistics (μ, σ) are replaced by draws from Gaussians
centred on them, ``(x − μ)/σ · σ̂ + μ̂``, so that the network sees the feature styles other sites might have. The
Gaussians' variance is the batch variance of the statistics scaled per channel by how much the federation's sites
disagree on that channel (:func:`channel_weights` of the server's variance of the clients' running statistics).
The callback :class:`callbacks.FeatureAugmentation` places the layers in a network and runs the server side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def feature_statistics(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and standard deviation ``sqrt(var + eps)`` over the spatial dimensions of
    ``x`` ``[B, C, *spatial]`` (unbiased variance, as the authors' code): two ``[B, C]`` tensors."""
    spatial = tuple(range(2, x.dim()))
    return x.mean(dim=spatial), (x.var(dim=spatial) + eps).sqrt()


def channel_weights(federation_variance: Tensor, eps: float) -> Tensor:
    """γ per channel: ``v' = 1/(1 + 1/(v + eps))`` normalized to average 1 over the channels, so that channels on
    which the sites disagree most get the widest augmentation."""
    weight = 1.0 / (1.0 + 1.0 / (federation_variance + eps))
    return weight.numel() * weight / weight.sum()


def augmentation_scales(
    mu: Tensor, sigma: Tensor, var_mu_fed: Tensor, var_sigma_fed: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """The standard deviations ``[C]`` of the Gaussians around μ and σ ``[B, C]``: ``Σ² = (γ + 1)·(var_b + eps)``,
    with ``var_b`` the unbiased variance over the batch and γ the :func:`channel_weights` of the federation's
    variances ``var_mu_fed`` and ``var_sigma_fed`` ``[C]``."""
    var_mu = (channel_weights(var_mu_fed, eps) + 1.0) * (mu.var(dim=0) + eps)
    var_sigma = (channel_weights(var_sigma_fed, eps) + 1.0) * (sigma.var(dim=0) + eps)
    return var_mu.sqrt(), var_sigma.sqrt()


def restyle(x: Tensor, mu: Tensor, sigma: Tensor, new_mu: Tensor, new_sigma: Tensor) -> Tensor:
    """``(x − μ)/σ · σ̂ + μ̂``: ``x`` ``[B, C, *spatial]`` normalized with its statistics ``[B, C]``, then given the
    new ones."""
    shape = (*mu.shape, *[1] * (x.dim() - 2))
    mu, sigma, new_mu, new_sigma = (s.reshape(shape) for s in (mu, sigma, new_mu, new_sigma))
    return (x - mu) / sigma * new_sigma + new_mu


def federation_variance(values: Sequence[Tensor]) -> Tensor:
    """Unbiased variance over the clients of their tensors (the server's ``v_μ`` or ``v_σ``, per channel)."""
    if len(values) < 2:
        raise ValueError(f"The variance over clients needs at least 2 clients' values, got {len(values)}.")
    return torch.stack(list(values)).var(dim=0)


def check_settings(probability: float, momentum: float) -> None:
    """Refuse a probability or momentum outside ``[0, 1]``, naming it."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"The augmentation probability must be in [0, 1], got {probability}.")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"The running statistics' momentum must be in [0, 1], got {momentum}.")


class FeatureStatisticsAugmentation(nn.Module):
    """FedFA's layer: in training, with probability ``probability`` per forward, re-styles a feature map
    ``[B, C, *spatial]`` with statistics drawn around its own; identity otherwise and in evaluation.

    Buffers (all ``[C]``, in the state dict so that the federation aggregates and checkpoints them):
    ``running_mean`` and ``running_std``, momentum averages of the batch's mean statistics (each client's are sent
    to the server); ``federation_var_mean`` and ``federation_var_std``, the server's variance of the clients'
    running statistics (1 until the server sets them).

    Args:
        channels: the feature map's channels C.
        probability: chance that a training forward is augmented (drawn from torch's global RNG).
        momentum: weight of the past in the running statistics (0.99: each augmented batch adds 1 %).
        eps: added to variances before square roots and divisions.
    """

    running_mean: Tensor
    running_std: Tensor
    federation_var_mean: Tensor
    federation_var_std: Tensor

    def __init__(self, channels: int, probability: float = 0.5, momentum: float = 0.99, eps: float = 1e-6) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}.")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}.")
        check_settings(probability, momentum)
        self.channels, self.probability, self.momentum, self.eps = channels, probability, momentum, eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_std", torch.ones(channels))
        self.register_buffer("federation_var_mean", torch.ones(channels))
        self.register_buffer("federation_var_std", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or torch.rand(()) >= self.probability:
            return x
        self._check_shape(x)
        if x.shape[0] < 2 or math.prod(x.shape[2:]) < 2:
            # One sample has no batch variance, one pixel no spatial variance: both would be NaN.
            warnings.warn(
                f"FeatureStatisticsAugmentation passes a feature map of shape {tuple(x.shape)} through unchanged: "
                "it needs at least 2 samples and 2 spatial positions. Place it after an earlier stage, or use "
                "larger images or batches.",
                stacklevel=2,
            )
            return x
        mu, sigma = feature_statistics(x, self.eps)
        self._update_running(mu, sigma)
        std_mu, std_sigma = augmentation_scales(mu, sigma, self.federation_var_mean, self.federation_var_std, self.eps)
        new_mu = mu + torch.randn_like(mu) * std_mu
        new_sigma = sigma + torch.randn_like(sigma) * std_sigma
        return restyle(x, mu, sigma, new_mu, new_sigma).to(x.dtype)

    def _check_shape(self, x: Tensor) -> None:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(
                f"FeatureStatisticsAugmentation was built for feature maps [B, {self.channels}, *spatial], got shape "
                f"{tuple(x.shape)}: place it after a stage whose output has {self.channels} channels."
            )

    @torch.no_grad()
    def _update_running(self, mu: Tensor, sigma: Tensor) -> None:
        new = 1.0 - self.momentum
        self.running_mean.mul_(self.momentum).add_(mu.mean(dim=0).to(self.running_mean.dtype), alpha=new)
        self.running_std.mul_(self.momentum).add_(sigma.mean(dim=0).to(self.running_std.dtype), alpha=new)

    def extra_repr(self) -> str:
        return f"{self.channels}, probability={self.probability}, momentum={self.momentum}, eps={self.eps}"
