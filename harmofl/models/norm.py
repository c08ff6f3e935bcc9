"""Normalization layers for the reference networks, chosen by name.

The reference code normalizes with ``BatchNorm2d(affine=False, track_running_stats=False)``
everywhere ("batch_stats"): no learned scale and shift, no running statistics, so evaluation
uses the statistics of the evaluation batch itself. The other kinds are the usual
alternatives; "group" and "instance" do not depend on the batch at all.
"""

from __future__ import annotations

from torch import nn

NORM_KINDS: tuple[str, ...] = ("batch_stats", "batch", "group", "instance")

# GroupNorm's customary upper bound on the number of groups (Wu & He, 2018).
_MAX_GROUPS = 32


def _num_groups(channels: int) -> int:
    """The largest divisor of ``channels`` that is at most 32."""
    return next(g for g in range(min(_MAX_GROUPS, channels), 0, -1) if channels % g == 0)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A 2-d normalization layer of the given kind (one of :data:`NORM_KINDS`) over ``channels``."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}.")
    if kind == "batch_stats":
        return nn.BatchNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(_num_groups(channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"Unknown norm kind {kind!r}; use one of {list(NORM_KINDS)}.")


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` normalize with the current batch's statistics, in evaluation too.

    This is the reference code's choice, applied to any timm or smp network: running statistics averaged
    over sites with different scanners describe no site, and need many steps to settle. Learned scale and
    shift are kept. Results then depend on the evaluation batch size, as in the reference.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
    return model
