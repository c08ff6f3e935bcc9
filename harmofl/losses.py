"""Segmentation loss of the reference protocol: (cross-entropy + soft Dice) / 2."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

DICE_SMOOTH = 1e-5


def soft_dice_loss(logits: Tensor, targets: Tensor, smooth: float = DICE_SMOOTH) -> Tensor:
    """``1 - mean_c (2·Σ p_c·y_c + s) / (Σ p_c + Σ y_c + s)`` over the foreground classes ``c >= 1``.

    ``logits`` is ``[B, C, H, W]``, ``targets`` is ``[B, H, W]`` of class indices; sums run over the whole
    batch, so that an image with no foreground does not dominate the loss.
    """
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"soft_dice_loss needs logits with >= 2 classes (background first), got {num_classes}.")
    probs = logits.float().softmax(dim=1)[:, 1:]
    onehot = F.one_hot(targets.long(), num_classes).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


def ce_dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The reference's segmentation loss: the mean of pixel-wise cross-entropy and soft Dice."""
    return 0.5 * (F.cross_entropy(logits.float(), targets.long()) + soft_dice_loss(logits, targets))


__all__ = ["ce_dice_loss", "soft_dice_loss"]
