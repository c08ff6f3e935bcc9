"""Client-level differential privacy in the central model, as pure functions: DP-FedAvg (McMahan et al., ICLR 2018)
with optional adaptive clipping (Andrew et al., NeurIPS 2021), and the privacy accountant.

Each round the server clips every participant's update ``Δ_k = θ_k − θ`` to an L2 norm of at most ``S`` (over
every floating-point shared entry), sums the clipped updates, adds Gaussian noise of std ``z·S`` per coordinate and
divides by the *expected* number of participants ``m`` (not the number that answered): one client then moves the
mean by at most ``S/m``, and the noise on the mean has std ``z·S/m``.

Adaptive clipping moves ``S`` towards the ``γ`` quantile of the update norms: ``S ← S·exp(−η_C·(b̃ − γ))`` with
``b̃`` the fraction of unclipped updates, counted with Gaussian noise of std ``σ_b``. Releasing that count costs
privacy too; the update noise multiplier becomes ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`` so that the pair costs what
one Gaussian mechanism of multiplier ``z`` costs (Andrew et al., Theorem 1).

The accountant is Opacus' RDP accountant (one step per round, sampling rate ``q = m / N`` of the ``N`` training
clients). It assumes Poisson sampling, while the rounds sample exactly ``m`` clients without replacement: the same
approximation DP-FedAvg's paper makes. With every client in every round, ``q = 1``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
from opacus.accountants import RDPAccountant
from torch import Tensor

StateDict = Mapping[str, Tensor]


def check_privacy_settings(noise_multiplier: float, clipping_norm: float, delta: float) -> None:
    """Refuse a noise multiplier or clipping norm that is not > 0, or a δ outside (0, 1), naming the value."""
    if not noise_multiplier > 0:
        raise ValueError(
            f"DP-FedAvg's noise_multiplier must be > 0, got {noise_multiplier}: without noise there is no privacy "
            "guarantee (use harmofl.aggregators.Mean for a plain mean)."
        )
    if not clipping_norm > 0:
        raise ValueError(f"DP-FedAvg's clipping_norm must be > 0, got {clipping_norm}.")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"DP-FedAvg's delta must be in (0, 1), got {delta}; well below 1/(number of sites).")


def update_norm(delta: StateDict) -> float:
    """``‖Δ‖₂`` over every entry of ``delta``, in float64."""
    return math.sqrt(sum(float(value.double().square().sum()) for value in delta.values()))


def clip_update(delta: StateDict, clipping_norm: float) -> tuple[dict[str, Tensor], bool]:
    """``Δ·min(1, S/‖Δ‖)`` in float64, and whether ``Δ`` was within the norm (``‖Δ‖ ≤ S``: not clipped)."""
    norm = update_norm(delta)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {key: value.double() * scale for key, value in delta.items()}, norm <= clipping_norm


def noise_std(noise_multiplier: float, clipping_norm: float, expected_participants: int) -> float:
    """``z·S/m``: the per-coordinate std of the Gaussian noise on the mean of the clipped updates."""
    return noise_multiplier * clipping_norm / expected_participants


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``: the update noise multiplier that, with the noisy count of adaptive
    clipping (std ``σ_b``), costs the privacy of multiplier ``z`` alone. Needs ``σ_b > z/2``."""
    if not 2.0 * count_noise_std > noise_multiplier:
        raise ValueError(
            f"Adaptive clipping's count_noise_std={count_noise_std} must exceed noise_multiplier/2 = "
            f"{noise_multiplier / 2}: the noisy count of unclipped updates would cost all of the privacy budget. "
            "Raise count_noise_std (Andrew et al. use expected participants / 20) or turn adaptive off."
        )
    return (noise_multiplier**-2 - (2.0 * count_noise_std) ** -2) ** -0.5


def adapted_clipping_norm(
    clipping_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """``S·exp(−η_C·(b̃ − γ))``: the next clipping norm, lower when more than the ``γ`` fraction were unclipped."""
    return clipping_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def noisy_unclipped_fraction(
    unclipped: float, count_noise_std: float, expected_participants: int, generator: torch.Generator
) -> float:
    """``b̃ = (Σ_k 1[‖Δ_k‖ ≤ S] + N(0, σ_b²)) / m``: adaptive clipping's noisy fraction of unclipped updates."""
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_noise_std
    return (unclipped + noise) / expected_participants


def noise_generator(secret: int, round_idx: int) -> torch.Generator:
    """A CPU generator for round ``round_idx``'s noise, from the run's noise secret: every process draws the same
    noise, and a resumed run the noise of the uninterrupted one."""
    digest = hashlib.sha256(f"dp-fedavg/{secret}/{round_idx}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def gaussian_noise(like: StateDict, std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """``N(0, std²)`` float64 noise shaped as each entry of ``like``, on the CPU, drawn in ``like``'s key order."""
    return {
        key: torch.randn(value.shape, generator=generator, dtype=torch.float64) * std for key, value in like.items()
    }


class PrivacyAccountant:
    """Opacus' RDP accountant over a run's rounds: one Gaussian-mechanism step per round.

    Args:
        history: the steps so far, as Opacus keeps them: ``(noise_multiplier, sample_rate, steps)`` triples.
    """

    def __init__(self, history: Sequence[Sequence[float]] = ()) -> None:
        self._accountant = RDPAccountant()
        self._accountant.history = [(float(z), float(q), int(steps)) for z, q, steps in history]

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Account for one round of noise multiplier ``z_Δ`` and sampling rate ``q = m / N``."""
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """The ε of (ε, δ)-DP spent by the rounds so far (0 before the first)."""
        return float(self._accountant.get_epsilon(delta))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._accountant.history)
