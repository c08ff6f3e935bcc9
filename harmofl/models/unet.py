"""The U-Net that HarmoFL's reference code trains on prostate MRI (2.5D slices, 3 channels).

Four encoder levels of ``base_features·(1, 2, 4, 8)`` channels (32-64-128-256 by default),
a bottleneck of ``16·base_features`` (512), and a mirrored decoder. Each level is two
3×3 convolutions (no bias), each followed by a norm and a ReLU; 2×2 max-pooling goes down,
a 2×2 stride-2 transposed convolution goes up, and the upsampled map is concatenated
(upsampled first, skip second) with the encoder map of the same level. A 1×1 convolution
gives the logits. Inputs need H and W divisible by 16.

Parameter names follow the reference (``encoder1.enc1_conv1``, ``upconv4``,
``decoder4.dec4_conv1``, ``conv``), so its checkpoints load here; under "batch_stats" its
norm layers hold no state. The amplitude normalization the reference puts in front of the
network is not part of this module.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from harmofl.models.norm import norm_layer

NUM_LEVELS = 4
DOWNSAMPLING = 2**NUM_LEVELS


def _double_conv(in_channels: int, out_channels: int, name: str, norm: str) -> nn.Sequential:
    """(3×3 conv, norm, ReLU) twice; ``name`` prefixes the layer names, as in the reference."""
    return nn.Sequential(
        OrderedDict(
            [
                (f"{name}_conv1", nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)),
                (f"{name}_norm1", norm_layer(norm, out_channels)),
                (f"{name}_relu1", nn.ReLU(inplace=True)),
                (f"{name}_conv2", nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)),
                (f"{name}_norm2", norm_layer(norm, out_channels)),
                (f"{name}_relu2", nn.ReLU(inplace=True)),
            ]
        )
    )


class HarmoFLUNet(nn.Module):
    """U-Net as in HarmoFL's reference code; returns logits ``[B, num_classes, H, W]``."""

    def __init__(
        self,
        num_classes: int = 2,
        in_chans: int = 3,
        base_features: int = 32,
        norm: str = "batch_stats",
    ) -> None:
        super().__init__()
        if min(num_classes, in_chans, base_features) < 1:
            raise ValueError(
                f"num_classes, in_chans and base_features must be >= 1, got {num_classes}, {in_chans}, {base_features}."
            )
        widths = [base_features * 2**level for level in range(NUM_LEVELS)]
        in_widths = [in_chans, *widths[:-1]]

        # Attributes encoder{i}, pool{i}, upconv{i}, decoder{i} (level i, 1-based) carry the
        # reference's names, which its checkpoints use; they are built in the reference's order
        # (encoder, bottleneck, decoder from the deepest level up) so that a seed gives its weights.
        for i, (w_in, w) in enumerate(zip(in_widths, widths), start=1):
            self.add_module(f"encoder{i}", _double_conv(w_in, w, f"enc{i}", norm))
            self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.bottleneck = _double_conv(widths[-1], 2 * widths[-1], "bottleneck", norm)
        for i in range(NUM_LEVELS, 0, -1):
            # The level below (or the bottleneck) is 2·w wide, and so is the concatenation
            # of the upsampled map with the skip.
            w = widths[i - 1]
            self.add_module(f"upconv{i}", nn.ConvTranspose2d(2 * w, w, kernel_size=2, stride=2))
            self.add_module(f"decoder{i}", _double_conv(2 * w, w, f"dec{i}", norm))
        self.conv = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % DOWNSAMPLING or width % DOWNSAMPLING:
            raise ValueError(
                f"HarmoFLUNet needs H and W divisible by {DOWNSAMPLING}, got {height}×{width}; pad or crop the input."
            )
        skips = []
        for i in range(1, NUM_LEVELS + 1):
            x = getattr(self, f"encoder{i}")(x)
            skips.append(x)
            x = getattr(self, f"pool{i}")(x)
        x = self.bottleneck(x)
        for i in range(NUM_LEVELS, 0, -1):
            x = getattr(self, f"upconv{i}")(x)
            x = getattr(self, f"decoder{i}")(torch.cat([x, skips[i - 1]], dim=1))
        return self.conv(x)
