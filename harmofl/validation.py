"""Server-side checks of a client's update before it is aggregated, as pure functions over state dicts.

An update is the state a client sends (its weights after local training, without the keys it keeps local).
It must have the global model's keys, shapes and dtypes and finite values; its distance from the global
model, ``‖θ_k − θ‖₂`` over every floating-point entry, may be bounded: updates beyond the bound are scaled
back onto it (``clip``) or refused (``reject``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]
NormPolicy = Literal["clip", "reject"]


class InvalidUpdate(ValueError):
    """A client update the server must not aggregate."""


def check_update(update: StateDict, global_state: StateDict) -> None:
    """Raise :class:`InvalidUpdate` naming the first problem: missing or extra keys, a shape or dtype that differs
    from the global model's, or a NaN/Inf value (used for checkpoints too)."""
    missing, extra = sorted(set(global_state) - set(update)), sorted(set(update) - set(global_state))
    if missing or extra:
        raise InvalidUpdate(
            f"its keys differ from the global model's: missing keys {missing[:10]}, extra keys {extra[:10]}"
        )
    for key, reference in global_state.items():
        value = update[key]
        if value.shape != reference.shape or value.dtype != reference.dtype:
            raise InvalidUpdate(
                f"{key!r} is {value.dtype} {tuple(value.shape)}, the global model's is "
                f"{reference.dtype} {tuple(reference.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidUpdate(f"{key!r} holds NaN or Inf values")


def update_distance(update: StateDict, global_state: StateDict) -> float:
    """``‖θ_k − θ‖₂`` over every floating-point entry, in float64."""
    squares = [
        torch.sum((update[key].double() - reference.double().to(update[key].device)) ** 2)
        for key, reference in global_state.items()
        if reference.is_floating_point()
    ]
    return math.sqrt(float(sum(squares))) if squares else 0.0


def bound_update(
    update: StateDict, global_state: StateDict, max_distance: float, policy: NormPolicy
) -> dict[str, Tensor]:
    """The update, or (``clip``) ``θ + (θ_k − θ)·max_distance/‖θ_k − θ‖`` when it lies farther than
    ``max_distance``; ``reject`` raises :class:`InvalidUpdate` instead."""
    if max_distance <= 0:
        raise ValueError(f"The update distance bound must be > 0, got {max_distance}.")
    distance = update_distance(update, global_state)
    if distance <= max_distance:
        return dict(update)
    if policy == "reject":
        raise InvalidUpdate(
            f"the update lies {distance:.4g} from the global model, beyond the bound {max_distance:.4g}"
        )
    if policy != "clip":
        raise ValueError(f"Unknown update bound policy {policy!r}; expected 'clip' or 'reject'.")
    scale = max_distance / distance
    clipped = dict(update)
    for key, reference in global_state.items():
        if reference.is_floating_point():
            start = reference.to(update[key].device)
            clipped[key] = start + (update[key] - start) * scale
    return clipped


@dataclass(frozen=True)
class UpdateGuard:
    """The server's guard on every update: :func:`check_update`, then :func:`bound_update` when a bound is set.

    Args:
        max_distance: a bound on ``‖θ_k − θ‖₂`` (``trainer.max_update_distance``); None: unbounded.
        policy: ``clip`` scales an update beyond the bound back onto it; ``reject`` refuses it.
    """

    max_distance: float | None = None
    policy: NormPolicy = "clip"

    def __post_init__(self) -> None:
        if self.policy not in ("clip", "reject"):
            raise ValueError(f"trainer.update_distance_policy must be one of ('clip', 'reject'), got {self.policy!r}.")
        if self.max_distance is not None and self.max_distance <= 0:
            raise ValueError(f"trainer.max_update_distance must be > 0 or null (no bound), got {self.max_distance}.")

    def check(self, update: StateDict, shared: StateDict) -> dict[str, Tensor]:
        """``update`` checked against the global ``shared`` weights and bounded; raises :class:`InvalidUpdate`
        when refused."""
        check_update(update, shared)
        if self.max_distance is None:
            return dict(update)
        return bound_update(update, shared, self.max_distance, self.policy)
