"""Server optimizers: how the server turns the clients' weighted mean into the next global model.

Each is a small object over state dicts, in plain torch (FedOpt, Reddi et al., ICLR 2021). With the
pseudo-gradient ``Δ = mean_k(θ_k) − θ``:

- :class:`FedAvg`: ``θ ← θ + η·Δ`` (``η = 1``: the weighted mean itself, McMahan et al. 2017);
- :class:`FedAvgM`: ``m ← β·m + Δ``, ``θ ← θ + η·m`` (server momentum, Hsu et al. 2019);
- :class:`FedAdam`: ``m ← β₁m + (1−β₁)Δ``, ``v ← β₂v + (1−β₂)Δ²``, ``θ ← θ + η·m / (√v + τ)``;
- :class:`FedYogi`: as FedAdam with ``v ← v − (1−β₂)·Δ²·sign(v − Δ²)``;
- :class:`FedNova`: normalized averaging by each client's number of local steps (Wang et al. 2020).

Moments start at ``m = 0`` and ``v = τ²`` (the paper's ``v₋₁ ≥ τ²``). Every floating-point key is updated
(weights and float buffers alike, as Flower's strategies do); integer buffers take the clients' mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from harmofl.scaffold import accumulated_steps

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class Contribution:
    """What the server knows of one participant's round: its aggregation weight and its local steps."""

    weight: float
    num_steps: int


class ServerOptimizer:
    """Base class: :meth:`step` maps (global state, clients' weighted mean) to the next global state.

    The mean the server receives weighs client ``k`` by ``weight_k · aggregation_factor(steps_k)``.
    """

    #: Whether :meth:`step` needs the weighted mean (a robust aggregator's center will not do).
    needs_weighted_mean: bool = False

    def aggregation_factor(self, num_steps: int) -> float:
        """Multiplier of a client's aggregation weight, from its number of local steps (1 for most)."""
        return 1.0

    def step(
        self, global_state: StateDict, client_mean: StateDict, contributions: Sequence[Contribution] = ()
    ) -> dict[str, Tensor]:
        return _apply(global_state, client_mean, self.update)

    def update(self, key: str, current: Tensor, pseudo_gradient: Tensor) -> Tensor:
        """The next value of one floating-point entry."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the server optimizer's state (moments) from a checkpoint."""


class FedAvg(ServerOptimizer):
    """``θ ← θ + lr·Δ``; with ``lr = 1`` the clients' weighted mean, exactly."""

    def __init__(self, lr: float = 1.0) -> None:
        _check_positive("lr", lr)
        self.lr = lr

    def step(
        self, global_state: StateDict, client_mean: StateDict, contributions: Sequence[Contribution] = ()
    ) -> dict[str, Tensor]:
        # lr 1 returns the mean itself rather than θ + (mean − θ), which can differ in the last bit.
        return dict(client_mean) if self.lr == 1.0 else super().step(global_state, client_mean, contributions)

    def update(self, key: str, current: Tensor, pseudo_gradient: Tensor) -> Tensor:
        return current + self.lr * pseudo_gradient


class FedNova(ServerOptimizer):
    """Normalized averaging (Wang et al., NeurIPS 2020): clients that ran more local steps do not dominate.

    Client ``k`` ran ``τ_k`` steps of SGD with momentum ``ρ``; its update is normalized by
    ``a_k = τ_k`` (``ρ = 0``) or ``a_k = (τ_k − ρ(1 − ρ^τ_k)/(1 − ρ)) / (1 − ρ)``, and the server steps
    ``θ ← θ − τ_eff · Σ_k p_k (θ − θ_k)/a_k`` with ``p_k`` the normalized weights and ``τ_eff = Σ_k p_k a_k``.
    With equal steps everywhere this is FedAvg.

    Args:
        momentum: the clients' SGD momentum ``ρ`` (0.9 in the reference Camelyon17 protocol).
    """

    needs_weighted_mean = True

    def __init__(self, momentum: float = 0.0) -> None:
        _check_unit_interval("momentum", momentum)
        self.momentum = momentum

    def normalizer(self, num_steps: int) -> float:
        """``a_k``: the norm of the client's accumulated local-step coefficients."""
        if num_steps < 1:
            raise ValueError(f"FedNova needs every participant to run >= 1 local step, got {num_steps}.")
        return accumulated_steps(num_steps, self.momentum)

    def aggregation_factor(self, num_steps: int) -> float:
        # The server receives Σ w_k/a_k · θ_k / Σ w_k/a_k; `step` rescales the move towards it.
        return 1.0 / self.normalizer(num_steps)

    def step(
        self, global_state: StateDict, client_mean: StateDict, contributions: Sequence[Contribution] = ()
    ) -> dict[str, Tensor]:
        if not contributions:
            raise ValueError("FedNova needs the participants' weights and local steps.")
        total = sum(c.weight for c in contributions)
        tau_effective = sum(c.weight * self.normalizer(c.num_steps) for c in contributions) / total
        normalized_total = sum(c.weight * self.aggregation_factor(c.num_steps) for c in contributions) / total
        # θ − τ_eff Σ p_k (θ − θ_k)/a_k = θ + τ_eff · (Σ p_k/a_k) · (mean_{w/a} − θ)
        coefficient = tau_effective * normalized_total
        return _apply(global_state, client_mean, lambda key, current, delta: current + coefficient * delta)


class _MomentServerOptimizer(ServerOptimizer):
    """Keeps per-key moment tensors, checkpointed with the run."""

    def __init__(self) -> None:
        self.moments: dict[str, dict[str, Tensor]] = {}

    def state_dict(self) -> dict[str, Any]:
        # Copies: a checkpoint must not change as the server keeps stepping.
        return {
            "moments": {
                name: {k: v.detach().to("cpu", copy=True) for k, v in m.items()} for name, m in self.moments.items()
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.moments = {
            name: {k: v.clone() for k, v in moments.items()} for name, moments in state.get("moments", {}).items()
        }

    def _moment(self, name: str, key: str, like: Tensor, initial: float = 0.0) -> Tensor:
        moments = self.moments.setdefault(name, {})
        if key not in moments:
            moments[key] = torch.full_like(like, initial)
        moments[key] = moments[key].to(like)
        return moments[key]


class FedAvgM(_MomentServerOptimizer):
    """Server momentum: ``m ← momentum·m + Δ``, ``θ ← θ + lr·m``."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        _check_positive("lr", lr)
        _check_unit_interval("momentum", momentum)
        self.lr, self.momentum = lr, momentum

    def update(self, key: str, current: Tensor, pseudo_gradient: Tensor) -> Tensor:
        momentum = self._moment("m", key, current)
        momentum.mul_(self.momentum).add_(pseudo_gradient)
        return current + self.lr * momentum


class FedAdam(_MomentServerOptimizer):
    """Adam on the server (Reddi et al. 2021, Algorithm 2), without bias correction."""

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__()
        _check_positive("lr", lr)
        _check_positive("tau", tau)
        _check_unit_interval("beta1", beta1)
        _check_unit_interval("beta2", beta2)
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau

    def second_moment(self, second: Tensor, squared: Tensor) -> None:
        second.mul_(self.beta2).add_(squared, alpha=1.0 - self.beta2)

    def update(self, key: str, current: Tensor, pseudo_gradient: Tensor) -> Tensor:
        first = self._moment("m", key, current)
        second = self._moment("v", key, current, initial=self.tau**2)
        first.mul_(self.beta1).add_(pseudo_gradient, alpha=1.0 - self.beta1)
        self.second_moment(second, pseudo_gradient.square())
        return current + self.lr * first / (second.sqrt() + self.tau)


class FedYogi(FedAdam):
    """Yogi on the server: the second moment moves by ``(1−β₂)·Δ²`` towards ``Δ²`` (Reddi et al. 2021)."""

    def second_moment(self, second: Tensor, squared: Tensor) -> None:
        second.sub_((1.0 - self.beta2) * squared * torch.sign(second - squared))


def _apply(
    global_state: StateDict, client_mean: StateDict, update: Callable[[str, Tensor, Tensor], Tensor]
) -> dict[str, Tensor]:
    """``update(key, θ, Δ)`` on every floating-point key; integer buffers take the clients' mean."""
    new_state = dict(client_mean)
    for key, mean in client_mean.items():
        if mean.is_floating_point():
            current = global_state[key]
            new_state[key] = update(key, current, mean.to(current) - current)
    return new_state


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"Server optimizer {name} must be > 0, got {value}.")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Server optimizer {name} must be in [0, 1), got {value}.")
