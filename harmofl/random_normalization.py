"""FedRDN's random domain normalization (Yan et al., CVPR 2025, arXiv 2306.09363), in plain torch.

Each site ``k`` summarizes its training images by their per-channel mean ``μ_k`` and standard deviation ``σ_k``
over every pixel, and shares them once. During local training each image is normalized with the statistics of a
site ``j`` drawn uniformly over the ``K`` sites (its own included), ``x̂ = (x − μ_j) / σ_j``: an input-level
augmentation that shows every site the other sites' intensity distributions. At evaluation a site normalizes with
its own statistics. Everything is batched and runs on the images' device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from harmofl.amplitude import check_images


def channel_statistics(batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation ``[C]`` over every pixel of every image in ``batches``.

    The batches ``[B, C, H, W]`` are accumulated one by one as float64 sums, so that a client's whole training split
    streams through once; the statistics come back in float32.
    """
    count, total, total_sq = 0, None, None
    for images in batches:
        check_images(images)
        values = images.detach().to(torch.float64)
        if total is not None and total.shape[0] != values.shape[1]:
            raise ValueError(
                f"Image batches disagree on their channels: {total.shape[0]} then {values.shape[1]}; every image of "
                "a client must have the same channels."
            )
        sums, sums_sq = values.sum(dim=(0, 2, 3)), values.square().sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = sums_sq if total_sq is None else total_sq + sums_sq
        count += values.numel() // values.shape[1]
    if total is None or total_sq is None or count == 0:
        raise ValueError("No images to compute channel statistics from: the client's training split is empty.")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    constant = [channel for channel, value in enumerate(std.tolist()) if value == 0.0]
    if constant:
        raise ValueError(
            f"Channels {constant} are constant over the images (std 0): they cannot be normalized; drop them or "
            "check the data."
        )
    return mean.float(), std.float()


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x − μ) / σ`` per channel, with ``mean`` and ``std`` of shape ``[C]``; same dtype as ``images``."""
    check_images(images)
    channels = images.shape[1]
    for name, value in (("mean", mean), ("std", std)):
        if value.shape != (channels,):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, the images have {channels} channels: expected ({channels},)."
            )
    return (images - mean.to(images)[:, None, None]) / std.to(images)[:, None, None]


def random_site_normalization(images: Tensor, means: Tensor, stds: Tensor) -> Tensor:
    """Each image normalized with the statistics of a site drawn uniformly, per image, over the ``K`` rows of
    ``means`` and ``stds`` (``[K, C]``), from torch's global RNG on the images' device."""
    check_images(images)
    batch, channels = images.shape[:2]
    for name, value in (("means", means), ("stds", stds)):
        if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] != channels:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}: expected [K, {channels}] (K >= 1 sites' statistics of the "
                f"images' {channels} channels)."
            )
    if means.shape != stds.shape:
        raise ValueError(f"means {tuple(means.shape)} and stds {tuple(stds.shape)} must hold the same sites.")
    sites = torch.randint(means.shape[0], (batch,), device=images.device)
    mean = means.to(images)[sites][:, :, None, None]
    std = stds.to(images)[sites][:, :, None, None]
    return (images - mean) / std
