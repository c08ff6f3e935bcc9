"""Server-side aggregation as small pure functions over state dicts (FedAvg and its FedBN variant).

The weighted mean is split into a sum and a division so that several processes can each sum the
clients they hold, add their partial sums with one all-reduce, and divide once: the result is the
same as one process summing every client. Sums are accumulated in float64, so the order in which
clients are added does not change the float32 result in practice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

StateDict = Mapping[str, Tensor]
ClientWeighting = Literal["uniform", "samples"]

# Every normalization layer torch ships: the FedBN-style "norm" choice keeps all of them local.
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def client_weights(sample_counts: Sequence[int], weighting: ClientWeighting) -> list[float]:
    """Aggregation weights: 1 per client (``uniform``, as the reference code) or its training-sample count."""
    if weighting == "uniform":
        return [1.0] * len(sample_counts)
    if weighting == "samples":
        if any(n <= 0 for n in sample_counts):
            raise ValueError(
                f"Sample-count weighting needs every client to have training samples, got {sample_counts}."
            )
        return [float(n) for n in sample_counts]
    raise ValueError(f"Unknown client weighting {weighting!r}; expected 'uniform' or 'samples'.")


def weighted_sum(
    states: Sequence[StateDict], weights: Sequence[float], like: StateDict, device: torch.device | None = None
) -> dict[str, Tensor]:
    """``Σ_k w_k·θ_k`` for every key of ``like``, in float64 on ``device`` (default: ``like``'s devices);
    zeros when no states."""
    if len(states) != len(weights):
        raise ValueError(f"Got {len(states)} client states but {len(weights)} weights.")
    summed = {key: torch.zeros_like(value, dtype=torch.float64, device=device) for key, value in like.items()}
    for state, weight in zip(states, weights):
        add_weighted_(summed, state, weight)
    return summed


def add_weighted_(summed: dict[str, Tensor], state: StateDict, weight: float) -> None:
    """``summed[key] += weight·state[key]`` in place for every key of ``summed`` (a client added to a sum)."""
    for key, total in summed.items():
        total.add_(state[key].to(device=total.device, dtype=torch.float64), alpha=weight)


def mean_from_sum(summed: StateDict, total_weight: float, like: StateDict) -> dict[str, Tensor]:
    """Divide a :func:`weighted_sum` by the total weight and cast each key back to ``like``'s dtype.

    Integer buffers (a BatchNorm's ``num_batches_tracked``) are rounded to the nearest integer rather than
    truncated, and keep their dtype.
    """
    if total_weight <= 0:
        raise ValueError(f"The total aggregation weight must be > 0, got {total_weight}.")
    mean: dict[str, Tensor] = {}
    for key, reference in like.items():
        value = summed[key] / total_weight
        if not (reference.is_floating_point() or reference.is_complex()):
            value = value.round()
        mean[key] = value.to(dtype=reference.dtype, device=reference.device)
    return mean


def weighted_average(
    states: Sequence[StateDict], weights: Sequence[float], keys: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """The weighted mean of client states over ``keys`` (default: every key of the first state)."""
    if not states:
        raise ValueError("Cannot average zero client states.")
    selected = list(states[0]) if keys is None else list(keys)
    like = {key: states[0][key] for key in selected}
    return mean_from_sum(weighted_sum(states, weights, like), float(sum(weights)), like)


def coordinate_median(states: Sequence[StateDict], like: StateDict) -> dict[str, Tensor]:
    """The coordinate-wise median of client states over the keys of ``like`` (robust to a minority of outliers;
    an even count takes the mean of the two middle values). Client weights do not apply."""
    return _mean_of_middle(states, (len(states) - 1) // 2, like)


def trimmed_mean(states: Sequence[StateDict], trim_ratio: float, like: StateDict) -> dict[str, Tensor]:
    """Coordinate-wise mean after dropping the ``floor(trim_ratio·n)`` largest and smallest values of every
    coordinate (Yin et al. 2018); client weights do not apply."""
    return _mean_of_middle(states, trim_count(len(states), trim_ratio), like)


def trim_count(count: int, trim_ratio: float) -> int:
    """How many values :func:`trimmed_mean` drops on each side of ``count``: ``floor(trim_ratio·count)``."""
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}.")
    return math.floor(trim_ratio * count + 1e-9)  # 0.3·10 is 2.9999999999999996 in floating point


def _mean_of_middle(states: Sequence[StateDict], dropped: int, like: StateDict) -> dict[str, Tensor]:
    """Per coordinate, the mean of the values left after dropping the ``dropped`` smallest and largest; integer
    buffers are rounded."""
    if not states:
        raise ValueError("Cannot aggregate zero client states.")
    kept = slice(dropped, len(states) - dropped)
    center: dict[str, Tensor] = {}
    for key, reference in like.items():
        stacked = torch.stack([state[key].to(device=reference.device, dtype=torch.float64) for state in states])
        value = stacked.sort(dim=0).values[kept].mean(dim=0)
        if not reference.is_floating_point():
            value = value.round()
        center[key] = value.to(reference.dtype)
    return center


def resolve_module_types(names: Sequence[str]) -> tuple[type[nn.Module], ...]:
    """Module classes from names: ``"norm"`` (every normalization layer) or a ``torch.nn`` class name."""
    resolved: list[type[nn.Module]] = []
    for name in names:
        if name == "norm":
            resolved.extend(NORM_MODULE_TYPES)
            continue
        module_type = getattr(nn, name, None)
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise ValueError(
                f"Unknown module type {name!r} for keys kept local: use 'norm' (every normalization layer) "
                "or a torch.nn class name such as 'BatchNorm2d' or 'GroupNorm'."
            )
        resolved.append(module_type)
    return tuple(resolved)


def local_state_keys(model: nn.Module, module_types: tuple[type[nn.Module], ...]) -> set[str]:
    """State-dict keys (parameters and buffers) of every submodule that is an instance of ``module_types``.

    Selecting by module type, not by a substring such as ``"bn"`` in the key, is what works on timm and smp
    models, whose normalization layers have many names.
    """
    if not module_types:
        return set()
    state_keys = set(model.state_dict())
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, module_types):
            for name in module.state_dict():
                key = f"{prefix}.{name}" if prefix else name
                if key in state_keys:
                    keys.add(key)
    return keys


def merge_states(global_state: StateDict, local_state: StateDict) -> dict[str, Tensor]:
    """A client's full state: the global weights, overridden by the keys that client keeps local."""
    return {**global_state, **local_state}
