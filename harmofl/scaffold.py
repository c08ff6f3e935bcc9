"""SCAFFOLD's control variates (Karimireddy et al., ICML 2020), as pure functions over name → tensor maps.

The server keeps a control variate ``c``, each client ``i`` its own ``c_i`` (both start at 0). In a round:

1. the client's local steps use the corrected gradient ``g_i(y) − c_i + c``;
2. after ``K`` SGD steps of learning rate ``η`` from the global model ``x`` to ``y_i`` (option II):
   ``c_i⁺ = c_i − c + (x − y_i) / (K·η)``, and the client reports ``Δc_i = c_i⁺ − c_i``;
3. the server moves the model as FedAvg does and ``c ← c + (|S|/N)·mean_{i∈S} Δc_i`` over the ``|S|``
   participants of ``N`` clients.

With SGD momentum ``ρ``, a constant gradient ``g`` moves the weights by ``η·a_K·g`` in ``K`` steps, with
``a_K = (K − ρ(1 − ρ^K)/(1 − ρ)) / (1 − ρ)`` (FedNova's normalizer); ``K·η`` is replaced by ``a_K·η`` so that
the control variate still estimates the client's gradient. ``ρ = 0`` gives the paper's ``K·η``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

Controls = Mapping[str, Tensor]


def accumulated_steps(num_steps: int, momentum: float = 0.0) -> float:
    """``a_K``: how many plain gradient steps ``K`` SGD steps with momentum ``ρ`` add up to (also FedNova's
    normalizer, :class:`harmofl.server_optimizers.FedNova`)."""
    if num_steps < 1:
        raise ValueError(f"The number of local steps must be >= 1, got {num_steps}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"SGD momentum must be in [0, 1), got {momentum}.")
    if momentum == 0:
        return float(num_steps)
    return (num_steps - momentum * (1 - momentum**num_steps) / (1 - momentum)) / (1 - momentum)


def gradient_correction(server_control: Controls, client_control: Controls) -> dict[str, Tensor]:
    """``c − c_i``: what a client adds to every gradient of its local steps."""
    return {name: server_control[name] - client_control[name] for name in server_control}


def updated_client_control(
    client_control: Controls,
    server_control: Controls,
    global_weights: Controls,
    local_weights: Controls,
    num_steps: int,
    lr: float,
    momentum: float = 0.0,
) -> dict[str, Tensor]:
    """``c_i⁺ = c_i − c + (x − y_i) / (a_K·η)`` (option II of the paper)."""
    if lr <= 0:
        raise ValueError(f"SCAFFOLD needs a learning rate > 0, got {lr}.")
    scale = 1.0 / (accumulated_steps(num_steps, momentum) * lr)
    return {
        name: client_control[name] - server_control[name] + (global_weights[name] - local_weights[name]) * scale
        for name in client_control
    }


def updated_server_control(server_control: Controls, mean_delta: Controls, participation: float) -> dict[str, Tensor]:
    """``c + (|S|/N)·mean Δc_i``; ``participation`` is ``|S|/N``."""
    if not 0.0 < participation <= 1.0:
        raise ValueError(f"The participating fraction |S|/N must be in (0, 1], got {participation}.")
    return {
        name: server_control[name] + participation * mean_delta[name].to(server_control[name])
        for name in server_control
    }
