"""The DenseNet-121 variant that HarmoFL's reference code trains on Camelyon17 (3×96×96 patches).

It is torchvision's DenseNet-121 layout (blocks 6-12-24-16, growth rate 32, bottleneck width
4·32, 64 initial features, transitions halving channels and resolution) with two changes
taken from the reference: a ``ZeroPad2d(2)`` between dense block 1 and transition 1, and
every normalization built by :func:`~harmofl.models.norm.norm_layer` (the reference uses
"batch_stats"). The amplitude normalization the reference puts in front of the network is
not part of this module.

Parameter names follow the reference (``features.conv0``,
``features.denseblock1.denselayer1.conv1``, ``features.transition1.conv``, ``classifier``),
so its checkpoints load here; under "batch_stats" its norm layers hold no state.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from harmofl.models.norm import norm_layer

BLOCK_CONFIG: tuple[int, ...] = (6, 12, 24, 16)
GROWTH_RATE = 32
BN_SIZE = 4
NUM_INIT_FEATURES = 64
# 96×96 inputs reach block 1 at 24×24; padding to 28×28 leaves 3×3 (not 2×2) after the
# last transition. The reference pads here, and only here.
PAD_AFTER_BLOCK1 = 2


class _DenseLayer(nn.Sequential):
    """norm-ReLU-1×1 conv-norm-ReLU-3×3 conv; its output is concatenated to its input."""

    def __init__(self, in_features: int, norm: str) -> None:
        width = BN_SIZE * GROWTH_RATE
        super().__init__(
            OrderedDict(
                [
                    ("norm1", norm_layer(norm, in_features)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("conv1", nn.Conv2d(in_features, width, kernel_size=1, bias=False)),
                    ("norm2", norm_layer(norm, width)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("conv2", nn.Conv2d(width, GROWTH_RATE, kernel_size=3, padding=1, bias=False)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, super().forward(x)], dim=1)


def _dense_block(num_layers: int, in_features: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict((f"denselayer{i + 1}", _DenseLayer(in_features + i * GROWTH_RATE, norm)) for i in range(num_layers))
    )


def _transition(in_features: int, out_features: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("norm", norm_layer(norm, in_features)),
                ("relu", nn.ReLU(inplace=True)),
                ("conv", nn.Conv2d(in_features, out_features, kernel_size=1, bias=False)),
                ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
            ]
        )
    )


class HarmoFLDenseNet121(nn.Module):
    """DenseNet-121 as in HarmoFL's reference code; returns logits ``[B, num_classes]``."""

    def __init__(self, num_classes: int = 2, in_chans: int = 3, norm: str = "batch_stats") -> None:
        super().__init__()
        if num_classes < 1 or in_chans < 1:
            raise ValueError(f"num_classes and in_chans must be >= 1, got {num_classes} and {in_chans}.")
        features = nn.Sequential(
            OrderedDict(
                [
                    (
                        "conv0",
                        nn.Conv2d(in_chans, NUM_INIT_FEATURES, kernel_size=7, stride=2, padding=3, bias=False),
                    ),
                    ("norm0", norm_layer(norm, NUM_INIT_FEATURES)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        channels = NUM_INIT_FEATURES
        for i, num_layers in enumerate(BLOCK_CONFIG):
            features.add_module(f"denseblock{i + 1}", _dense_block(num_layers, channels, norm))
            channels += num_layers * GROWTH_RATE
            if i == 0:
                features.add_module("zero_padding", nn.ZeroPad2d(PAD_AFTER_BLOCK1))
            if i < len(BLOCK_CONFIG) - 1:
                features.add_module(f"transition{i + 1}", _transition(channels, channels // 2, norm))
                channels //= 2
        features.add_module("norm5", norm_layer(norm, channels))
        self.features = features
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference's initialisation (torchvision's DenseNet): He-normal convolutions, zero
        # classifier bias; the classifier weight keeps PyTorch's default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.features(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
