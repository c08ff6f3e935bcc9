"""What a norm after the first convolution leaves of DC-only harmonization (``band=0``, a per-image, per-channel
mean shift), in float64 on demo images: which shifts cancel exactly, and what zero padding and per-image shifts
leave. ``benchmarks/mechanism.py`` prints the same figures for more cases."""

import pytest
import torch
from torch import nn

from harmofl.amplitude import amplitude_spectrum, harmonize
from harmofl.data.demo import DemoHistology

WIDTH = 16
NORMS = {
    "batch_stats": lambda: nn.BatchNorm2d(WIDTH, affine=False, track_running_stats=False),
    "instance": lambda: nn.InstanceNorm2d(WIDTH),
    "group": lambda: nn.GroupNorm(4, WIDTH, affine=False),
    "none": nn.Identity,
}
EXACT = 1e-10  # float64 round-off of a cancellation, with a wide margin (measured: about 3e-14)


def _block(norm: str, padding: int) -> nn.Module:
    """conv 3x3 (no bias) -> norm, with the same fixed random weights for every norm and padding."""
    conv = nn.Conv2d(3, WIDTH, 3, padding=padding, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    return nn.Sequential(conv, NORMS[norm]()).double()


def _changes(norm: str, x: torch.Tensor, h: torch.Tensor, padding: int = 1) -> dict[str, float]:
    """||block(h) - block(x)|| / ||block(x)|| over the interior (outputs that see no padding) and the 1-pixel border."""
    with torch.no_grad():
        block = _block(norm, padding)
        before, after = block(x), block(h)
    interior = torch.zeros(before.shape[-2:], dtype=torch.bool)
    interior[1:-1, 1:-1] = True
    if padding == 0:
        interior[:] = True
    regions = {"interior": interior, "border": ~interior, "whole": torch.ones_like(interior)}
    return {
        name: ((after - before)[..., mask].norm() / before[..., mask].norm()).item()
        for name, mask in regions.items()
        if mask.any()
    }


@pytest.fixture(scope="module")
def sites():
    data = DemoHistology(num_sites=4, train_per_site=8, val_per_site=0, test_per_site=0, cache=False)
    data.setup()
    return [data.dataset(client, "train").tensors[0].double() for client in data.client_names]


@pytest.fixture(scope="module")
def target(sites):
    return amplitude_spectrum(torch.cat(sites)).mean(0)


@pytest.fixture(scope="module")
def batch_shift(sites, target):
    """site_1's batch and the same batch moved by one per-channel shift: its batch mean's offset to the target."""
    x = sites[1]
    offset = target[:, 0, 0] / (x.shape[-2] * x.shape[-1]) - x.mean(dim=(0, 2, 3))
    return x, x + offset[None, :, None, None]


@pytest.mark.parametrize("norm", ["batch_stats", "instance"])
def test_a_shift_shared_by_the_batch_cancels_exactly_only_without_padding(batch_shift, norm):
    x, h = batch_shift
    unpadded = _changes(norm, x, h, padding=0)["whole"]
    assert unpadded < EXACT, (
        f"{norm}: the conv turns a per-channel input shift into a per-channel constant, which the norm's mean "
        f"removes; without padding nothing else changes, so the output must be unchanged (got {unpadded:.1e})"
    )
    padded = _changes(norm, x, h)
    assert padded["border"] > 2 * padded["interior"], (
        f"{norm}: border outputs see zero padding, not the shifted values, so the shift reaches them only in part "
        f"and they must change most (border {padded['border']:.1e}, interior {padded['interior']:.1e})"
    )
    # Measured at 64x64: interior 5e-2, border 1.4e-1.
    assert padded["interior"] > 1e-2, (
        f"{norm}: the border outputs enter the norm's mean and variance, so the interior is not cancelled exactly "
        f"with zero padding either (got {padded['interior']:.1e})"
    )


def test_instance_norm_cancels_per_image_dc_harmonization(sites, target):
    x = torch.cat(sites)
    h = harmonize(x, target, band=0.0)
    unpadded = _changes("instance", x, h, padding=0)["whole"]
    assert unpadded < EXACT, (
        "InstanceNorm subtracts each image's own channel means, so DC-only harmonization (a per-image shift) must "
        f"cancel exactly without padding (got {unpadded:.1e})"
    )


@pytest.mark.parametrize("padding", [0, 1])
def test_batch_norm_does_not_cancel_per_image_shifts(sites, target, padding):
    x = torch.cat(sites)
    h = harmonize(x, target, band=0.0)
    batch_stats = _changes("batch_stats", x, h, padding)["interior"]
    none = _changes("none", x, h, padding)["interior"]
    assert batch_stats > 0.1, (
        "BatchNorm subtracts the batch's mean only: DC-only harmonization gives every image the same channel means, "
        f"so the spread of the images' means around the batch mean remains (got {batch_stats:.1e})"
    )
    # Measured on the mixed batch of 4 sites x 8: batch statistics 0.55-0.57, no norm 0.12 (about 4.7x). Without a
    # norm ||block(x)|| holds the images' mean level; after BatchNorm it does not, and the harmonization also removes
    # the images' mean spread from the batch variance that BatchNorm divides by.
    assert batch_stats > 2 * none, (
        "BatchNorm with batch statistics does not shrink the change DC-only harmonization makes to a mixed batch: "
        f"{batch_stats:.2f} with it, {none:.2f} without a norm"
    )


@pytest.mark.parametrize("norm", ["group", "none"])
def test_group_norm_and_no_norm_keep_even_a_batch_wide_shift(batch_shift, norm):
    x, h = batch_shift
    change = _changes(norm, x, h, padding=0)["whole"]
    assert change > 0.1, (
        f"{norm}: the per-output-channel constants differ between the channels of a group (GroupNorm removes only "
        f"their group mean), and without a norm nothing removes them (got {change:.1e})"
    )
