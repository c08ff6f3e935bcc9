"""DP-FedAvg as an aggregator (``trainer.aggregator: harmofl.private_aggregation.DPFedAvg``): client-level
differential privacy in the central model, the maths in :mod:`harmofl.differential_privacy`.

Each process clips its own participants' updates and sums them; one all-reduce adds the sums (and the counts of
unclipped updates); every process then adds the same noise, drawn from the run's noise secret and the round, so
the result does not depend on how clients are spread over processes (up to float summation order).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from harmofl import aggregation
from harmofl import differential_privacy as dp
from harmofl.aggregation import StateDict
from harmofl.aggregators import Aggregator
from harmofl.federation.collectives import all_reduce_sum_
from harmofl.federation.topology import Federation

_UNCLIPPED = "\0unclipped"  # the count of unclipped updates, all-reduced with the sums (no key of a state dict)


class DPFedAvg(Aggregator):
    """DP-FedAvg (McMahan et al., ICLR 2018): the server clips each participant's update ``θ_k − θ`` to L2 norm
    ``clipping_norm`` over every floating-point shared entry, averages them with uniform weights over the expected
    number of participants ``m`` (``trainer.clients_per_round``, not the number that answered) and adds Gaussian
    noise of std ``noise_multiplier·clipping_norm/m`` per coordinate. Each round reports ``privacy/epsilon`` for
    ``delta`` from Opacus' RDP accountant, with sampling rate ``m / N`` of the ``N`` training clients.

    Integer buffers (BatchNorm's ``num_batches_tracked``) keep the global value: nothing unclipped or un-noised
    leaves the clients. Keys kept local (``trainer.local_modules``) never reach the server. Float buffers (BatchNorm
    running statistics) are clipped and noised like weights; keep norms local when they are used in evaluation.
    Only the model update is private: amplitude targets, SCAFFOLD's controls and other callback state are not.

    Args:
        noise_multiplier: ``z``, the noise std in units of the clipping norm (> 0). With ``adaptive``, the total
            of the update noise and the count noise (Andrew et al.'s ``z``).
        clipping_norm: ``S``, the bound on each update's L2 norm (> 0); with ``adaptive``, its initial value.
        delta: the δ of the (ε, δ) reported, in (0, 1); well below 1 / the number of sites.
        adaptive: adapt the clipping norm to the ``target_unclipped_quantile`` of the update norms (Andrew et al.,
            NeurIPS 2021), reported each round as ``privacy/clipping_norm``.
        target_unclipped_quantile: ``γ``, the fraction of updates the adaptive norm leaves unclipped.
        clip_learning_rate: ``η_C``, the geometric step of the adaptive norm.
        count_noise_std: ``σ_b``, the std of the noise on the count of unclipped updates; must exceed
            ``noise_multiplier / 2``. None: ``m / 20``, as Andrew et al. recommend.
        noise_seed: for reproducible experiments only: a fixed seed of the noise, which anyone who knows it can
            subtract. None (deployments): a secret drawn once per run from the operating system, kept in the
            server's checkpoint so that a resumed run adds the noise of the uninterrupted one.
    """

    # Uniform weights over a fixed denominator: FedNova's step-weighted mean would break the sensitivity bound.
    weighted = False

    def __init__(
        self,
        noise_multiplier: float = 1.0,
        clipping_norm: float = 1.0,
        delta: float = 1e-5,
        adaptive: bool = False,
        target_unclipped_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        count_noise_std: float | None = None,
        noise_seed: int | None = None,
    ) -> None:
        dp.check_privacy_settings(noise_multiplier, clipping_norm, delta)
        if not 0.0 <= target_unclipped_quantile <= 1.0:
            raise ValueError(
                f"DPFedAvg's target_unclipped_quantile must be in [0, 1], got {target_unclipped_quantile}."
            )
        if not clip_learning_rate > 0:
            raise ValueError(f"DPFedAvg's clip_learning_rate must be > 0, got {clip_learning_rate}.")
        if adaptive and count_noise_std is not None:
            dp.update_noise_multiplier(noise_multiplier, count_noise_std)  # refuses a too small σ_b now
        if noise_seed is not None:
            rank_zero_warn(
                f"DPFedAvg noise_seed={noise_seed}: anyone who knows it can remove the noise. Use it for experiments "
                "only; deployments leave it unset (a secret seed)."
            )
        self.noise_multiplier, self.delta, self.adaptive = noise_multiplier, delta, adaptive
        self.target_unclipped_quantile, self.clip_learning_rate = target_unclipped_quantile, clip_learning_rate
        self.count_noise_std = count_noise_std
        #: The clipping norm of the next round (adaptive clipping moves it).
        self.clipping_norm = clipping_norm
        self.accountant = dp.PrivacyAccountant()
        self._noise_secret = noise_seed
        self._metrics: dict[str, float] = {}

    def start_round(self, round_idx: int, federation: Federation) -> None:
        weights = set(federation.client_weight.values())
        if weights != {1.0}:
            raise ValueError(
                "DPFedAvg bounds each client's influence with uniform weights: set trainer.client_weighting: "
                f"uniform (the clients' weights are {federation.client_weight})."
            )
        self._round_idx = round_idx
        self._expected = len(federation.participants(round_idx))
        self._sample_rate = self._expected / len(federation.trainees)
        self._count_noise_std = self.count_noise_std or self._expected / 20
        self._update_multiplier = (
            dp.update_noise_multiplier(self.noise_multiplier, self._count_noise_std)
            if self.adaptive
            else self.noise_multiplier
        )

    def reset(self, shared: StateDict, device: torch.device) -> None:
        self._device = device
        self._global = {key: value for key, value in shared.items() if value.is_floating_point()}
        self._sums = {
            key: torch.zeros_like(value, dtype=torch.float64, device=device) for key, value in self._global.items()
        }
        self._unclipped = 0

    def add(self, client: str, update: StateDict, weight: float) -> None:
        delta = {
            key: update[key].to(total.device, torch.float64) - self._global[key].to(total.device, torch.float64)
            for key, total in self._sums.items()
        }
        clipped, within = dp.clip_update(delta, self.clipping_norm)
        for key, total in self._sums.items():
            total.add_(clipped[key])
        self._unclipped += int(within)

    def center(self, fabric: Fabric, shared: StateDict, order: Sequence[str], total_weight: float) -> dict[str, Tensor]:
        count = torch.tensor([float(self._unclipped)], dtype=torch.float64, device=self._device)
        totals = {**self._sums, _UNCLIPPED: count}  # one all-reduce for the sums and the count
        all_reduce_sum_(fabric, totals)
        if self._noise_secret is None:  # rank 0's secret for every process: they add the same noise
            self._noise_secret = int(fabric.broadcast(secrets.randbits(63)))
        generator = dp.noise_generator(self._noise_secret, self._round_idx)
        std = dp.noise_std(self._update_multiplier, self.clipping_norm, self._expected)
        noise = dp.gaussian_noise(self._sums, std, generator)
        center = dict(shared)  # integer buffers keep the global value
        for key, total in self._sums.items():
            reference = shared[key]
            mean = total / self._expected + noise[key].to(total.device)
            center[key] = (reference.to(total.device, torch.float64) + mean).to(reference.device, reference.dtype)
        self.accountant.step(self._update_multiplier, self._sample_rate)
        self._metrics = {"privacy/epsilon": self.accountant.epsilon(self.delta), "privacy/delta": self.delta}
        if self.adaptive:
            self._metrics["privacy/clipping_norm"] = self.clipping_norm
            fraction = dp.noisy_unclipped_fraction(float(count), self._count_noise_std, self._expected, generator)
            self.clipping_norm = dp.adapted_clipping_norm(
                self.clipping_norm, fraction, self.target_unclipped_quantile, self.clip_learning_rate
            )
        return center

    def combine(self, values: Sequence[StateDict], weights: Sequence[float]) -> dict[str, Tensor]:
        # Callback values (amplitude targets, SCAFFOLD's controls) get the plain mean: no clipping nor noise covers
        # them, so say so rather than let ε look like it does.
        rank_zero_warn(
            "DPFedAvg: the per-client values a callback shares are averaged without clipping or noise; the reported "
            "privacy/epsilon does not cover them (configs/strategies/dp_fedavg.yaml runs without callbacks)."
        )
        return aggregation.weighted_average(values, weights)

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            "clipping_norm": self.clipping_norm,
            "noise_secret": self._noise_secret,
            "accountant_history": self.accountant.history,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "accountant_history" not in state:
            raise ValueError(
                "The checkpoint holds no DPFedAvg state: its rounds were not trained with DPFedAvg, so no privacy "
                "accounting covers them. Start a new run with DPFedAvg instead of continuing this one."
            )
        self.clipping_norm = float(state["clipping_norm"])
        self._noise_secret = state["noise_secret"]
        self.accountant = dp.PrivacyAccountant(state["accountant_history"])
