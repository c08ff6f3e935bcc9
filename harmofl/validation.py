"""Server-side checks of a client's update before it is aggregated, as pure functions over state dicts.

An update is the state a client sends (its weights after local training, without the keys it keeps local).
It must have the global model's keys, shapes and dtypes, finite values, and integer and variance entries in range;
its distance from the global model, ``‖θ_k − θ‖₂`` over every floating-point entry, may be bounded: updates beyond
the bound are scaled back onto it (``clip``) or refused (``reject``). A site's amplitude target is checked by
:func:`check_amplitude_window`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from harmofl.amplitude import window_shape

StateDict = Mapping[str, Tensor]
NormPolicy = Literal["clip", "reject"]
ImageShape = tuple[int, int, int]
Claim = TypeVar("Claim", bound=Hashable)


#: The largest magnitude of an integer entry (a BatchNorm's ``num_batches_tracked``): float64, in which updates are
#: summed, holds every integer up to 2**53 exactly, and a weighted mean of such values casts back to int64 safely.
MAX_INTEGER_ENTRY = 2**53
#: The largest channel count or side of the images an amplitude target may claim to come from.
MAX_IMAGE_SIDE = 2**20


class InvalidUpdate(ValueError):
    """A client update the server must not aggregate."""


def check_update(update: StateDict, global_state: StateDict) -> None:
    """Raise :class:`InvalidUpdate` naming the first problem: missing or extra keys, a shape or dtype that differs
    from the global model's, a NaN/Inf value, or a value out of :func:`check_entry_range`'s range (used for
    checkpoints too)."""
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
        check_entry_range(key, value)


def check_entry_range(key: str, value: Tensor) -> None:
    """Raise :class:`InvalidUpdate` for an entry no honest client sends: an integer beyond ``±MAX_INTEGER_ENTRY``
    (its aggregate would overflow int64), a negative counter (``*num_batches_tracked``) or a negative variance
    (``*running_var``)."""
    if value.numel() == 0 or value.dtype == torch.bool or value.is_complex():
        return
    if value.is_floating_point():
        if key.endswith("running_var") and (low := value.min().item()) < 0:
            raise InvalidUpdate(f"{key!r} holds a negative variance ({low:.4g}); variances are >= 0")
        return
    low, high = value.min().item(), value.max().item()
    floor = 0 if key.endswith("num_batches_tracked") else -MAX_INTEGER_ENTRY
    if low < floor or high > MAX_INTEGER_ENTRY:
        raise InvalidUpdate(
            f"{key!r} holds integers in [{low}, {high}], outside [{floor}, 2**53]: a weighted mean of them could "
            "overflow int64"
        )


def check_amplitude_window(
    window: Any, image_shape: Any, band: float, max_pixel_value: float
) -> tuple[Tensor, ImageShape]:
    """Raise :class:`InvalidUpdate` unless ``window`` is a site's plausible amplitude target: a floating-point tensor
    of exactly (no broadcasting) the ``band`` window's shape for images of ``image_shape`` ``[C, H, W]`` (integers up
    to ``MAX_IMAGE_SIDE``), finite, >= 0 and <= ``H·W·max_pixel_value``; returns both, ``image_shape`` as a tuple.

    The bound is that of the unnormalized FFT that :func:`~harmofl.amplitude.amplitude_spectrum` takes:
    ``|F(k)| = |Σ x·e^{-iθ}| <= Σ|x| <= H·W·max|x|``, and a running mean of such amplitudes stays within it. A relative
    1e-4 allows for rounding."""
    if not (
        isinstance(image_shape, (list, tuple))
        and len(image_shape) == 3
        and all(type(size) is int and 1 <= size <= MAX_IMAGE_SIDE for size in image_shape)
    ):
        raise InvalidUpdate(
            f"the amplitude target's image shape {image_shape!r} is not [C, H, W] of integers in [1, 2**20]"
        )
    shape = (image_shape[0], image_shape[1], image_shape[2])
    if not isinstance(window, Tensor) or not window.is_floating_point():
        kind = f"a {window.dtype} tensor" if isinstance(window, Tensor) else type(window).__name__
        raise InvalidUpdate(f"the amplitude target is {kind}, not a floating-point tensor")
    expected = window_shape(shape, band)
    if tuple(window.shape) != expected:
        raise InvalidUpdate(
            f"the amplitude target has shape {tuple(window.shape)}; the band={band} window of images {shape} is "
            f"{expected}"
        )
    if not bool(torch.isfinite(window).all()):
        raise InvalidUpdate("the amplitude target holds NaN or Inf values")
    if (low := window.min().item()) < 0:
        raise InvalidUpdate(f"the amplitude target holds a negative amplitude ({low:.4g}); amplitudes are >= 0")
    bound = shape[1] * shape[2] * max_pixel_value
    if (high := window.max().item()) > bound * (1 + 1e-4):
        raise InvalidUpdate(
            f"the amplitude target reaches {high:.6g}, beyond H·W·max_pixel_value = {shape[1]}·{shape[2]}·"
            f"{max_pixel_value} = {bound:.6g}, the largest amplitude of such images; if the images really exceed "
            f"|{max_pixel_value}|, raise the harmonization callback's max_pixel_value"
        )
    return window, shape


def agreed_value(claims: Mapping[str, Claim], what: str) -> Claim:
    """The value a strict majority of the clients' ``claims`` share (honest clients all agree, so a minority of
    others cannot choose it); ``ValueError`` naming every claim when none has a majority."""
    counts = Counter(claims.values())
    if counts:
        value, count = counts.most_common(1)[0]
        if count * 2 > len(claims):
            return value
    raise ValueError(
        f"No strict majority of the clients agree on {what}: {dict(claims)}. Every client must run the same "
        "configuration and data format."
    )


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
