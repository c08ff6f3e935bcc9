"""Does a norm after the first convolution undo HarmoFL's DC-only harmonization? Measured in float64.

DC-only harmonization (``band=0``, the ``reference`` preset) adds a constant to every channel of every image. A
convolution turns a constant per input channel into a constant per output channel, except where its window covers
zero padding, and a norm that subtracts a mean over the pixels of that output channel removes such a constant. So
the question is how much of the harmonization the first block ``conv -> norm`` still passes on, per norm:

- **interior**: outputs whose receptive field lies inside the image; **border**: outputs that see zero padding;
  **whole**: the whole map; **unpadded**: the whole map of the same block with ``padding=0`` (no border at all).
- Each figure is ``||block(h(x)) - block(x)|| / ||block(x)||`` over those outputs, ``h`` the harmonization.
- Norms have no affine part. "none" is the bare convolution: its ``||block(x)||`` holds the images' mean level
  (about 0.8 on a 0..1 scale), which the normalized outputs do not, so its figures read smaller for that reason.

Cases, on the demo federation (``DemoHistology``, 4 sites x 8 training images): one shift for the whole batch
(``site_1``'s batch moved by the offset of its batch mean to the target: the site-level part of the harmonization);
DC-only harmonization of one site's batch (what a client trains on); DC-only, band 0.05 and band 0.5 of the mixed
batch of every site. The target is the federation's mean amplitude. Then the stems of the networks the presets
use, with batch statistics, and the first case's interior against the image size.

    python benchmarks/mechanism.py    # deterministic, about 15 s on one core
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor, nn

from harmofl.amplitude import amplitude_spectrum, harmonize
from harmofl.data.demo import DemoHistology

IMAGE_SIZE = 64
IMAGES_PER_SITE = 8
WIDTH = 16
SEED = 0
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "BatchNorm, batch statistics": lambda c: nn.BatchNorm2d(c, affine=False, track_running_stats=False),
    "InstanceNorm": lambda c: nn.InstanceNorm2d(c),
    "GroupNorm, 4 groups of 4": lambda c: nn.GroupNorm(c // 4, c, affine=False),
    "GroupNorm, 8 groups of 2": lambda c: nn.GroupNorm(c // 2, c, affine=False),
    "none": lambda c: nn.Identity(),
}
# (kernel, stride, padding, output channels) of the first convolution, each followed by a norm.
STEMS = {
    "harmofl_unet enc1_conv1: 3x3/1, pad 1": (3, 1, 1, 32),
    "test_resnet conv1.0: 3x3/2, pad 1": (3, 2, 1, 16),
    "harmofl_densenet121 conv0: 7x7/2, pad 3": (7, 2, 3, 64),
}
SIZES = (32, 64, 128, 256)


def first_block(norm: nn.Module, out_channels: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Module:
    """``conv -> norm`` in float64, its convolution weights drawn from a fixed seed (the same for every norm)."""
    conv = nn.Conv2d(3, out_channels, kernel, stride=stride, padding=padding, bias=False)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
    return nn.Sequential(conv, norm).double()


def border_mask(block: nn.Module, image_shape: torch.Size) -> Tensor:
    """Outputs whose receptive field covers zero padding: those where an all-ones kernel over ones falls short."""
    conv = block[0]
    ones = torch.ones(1, 1, *image_shape[-2:], dtype=torch.float64)
    kernel = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64)
    counts = nn.functional.conv2d(ones, kernel, stride=conv.stride, padding=conv.padding)[0, 0]
    return counts < kernel.numel()


def relative_changes(block: nn.Module, x: Tensor, h: Tensor) -> dict[str, float]:
    """``||block(h) - block(x)|| / ||block(x)||`` over the interior, the border and the whole map."""
    with torch.no_grad():
        before, after = block(x), block(h)
    border = border_mask(block, x.shape)
    regions = {"interior": ~border, "border": border, "whole": torch.ones_like(border)}
    return {
        name: ((after - before)[..., mask].norm() / before[..., mask].norm()).item() for name, mask in regions.items()
    }


def demo_batches(image_size: int) -> list[Tensor]:
    """Every demo site's training images, float64."""
    data = DemoHistology(
        num_sites=4, train_per_site=IMAGES_PER_SITE, val_per_site=0, test_per_site=0, image_size=image_size, cache=False
    )
    data.setup()
    return [data.dataset(client, "train").tensors[0].double() for client in data.client_names]


def cases(sites: list[Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Name -> (images, harmonized images), the target being the federation's mean amplitude."""
    mixed = torch.cat(sites)
    target = amplitude_spectrum(mixed).mean(0)
    site = sites[1]
    target_mean = target[:, 0, 0] / (site.shape[-2] * site.shape[-1])
    site_offset = (target_mean - site.mean(dim=(0, 2, 3)))[None, :, None, None]
    return {
        "one shift for the whole batch (site_1)": (site, site + site_offset),
        "DC-only, one site's batch (site_1)": (site, harmonize(site, target, 0.0)),
        "DC-only, mixed batch": (mixed, harmonize(mixed, target, 0.0)),
        "band 0.05, mixed batch": (mixed, harmonize(mixed, target, 0.05)),
        "band 0.5, mixed batch": (mixed, harmonize(mixed, target, 0.5)),
    }


def markdown(headers: list[str], rows: list[list[str]], labels: int = 2) -> None:
    """A markdown table: the first ``labels`` columns left-aligned, the figures right-aligned."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if i < labels else "---:" for i in range(len(headers))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def main() -> None:
    torch.set_num_threads(1)
    sites = demo_batches(IMAGE_SIZE)
    all_cases = cases(sites)
    print(
        f"Demo histology, 4 sites x {IMAGES_PER_SITE} images of 3x{IMAGE_SIZE}x{IMAGE_SIZE}, float64. "
        f"||block(h(x)) - block(x)|| / ||block(x)||.\n"
    )

    print(f"First block: conv 3x3/1, zero padding 1, {WIDTH} channels -> norm (no affine).\n")
    rows = []
    for case, (x, h) in all_cases.items():
        for name, make_norm in NORMS.items():
            padded = relative_changes(first_block(make_norm(WIDTH), WIDTH), x, h)
            unpadded = relative_changes(first_block(make_norm(WIDTH), WIDTH, padding=0), x, h)["whole"]
            rows.append([case, name, *(f"{value:.2e}" for value in padded.values()), f"{unpadded:.2e}"])
    markdown(["case", "norm", "interior", "border", "whole", "unpadded"], rows)

    print("The stems of the preset networks, each followed by BatchNorm with batch statistics (no affine).\n")
    rows = []
    for case in list(all_cases)[:3]:
        x, h = all_cases[case]
        for stem, (kernel, stride, padding, width) in STEMS.items():
            norm = NORMS["BatchNorm, batch statistics"](width)
            changes = relative_changes(first_block(norm, width, kernel, stride, padding), x, h)
            rows.append([case, stem, *(f"{value:.2e}" for value in changes.values())])
    markdown(["case", "stem", "interior", "border", "whole"], rows)

    print("One shift for the whole batch (site_1), conv 3x3/1 pad 1: the interior against the image size.\n")
    rows = []
    for size in SIZES:
        x, h = cases(demo_batches(size))["one shift for the whole batch (site_1)"]
        interiors = [
            relative_changes(first_block(NORMS[name](WIDTH), WIDTH), x, h)["interior"]
            for name in ("BatchNorm, batch statistics", "InstanceNorm")
        ]
        rows.append([f"{size}x{size}", *(f"{value:.2e}" for value in interiors)])
    markdown(["image", "BatchNorm interior", "InstanceNorm interior"], rows, labels=1)


if __name__ == "__main__":
    main()
