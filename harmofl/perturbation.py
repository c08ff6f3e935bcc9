"""Weight perturbation (HarmoFL's answer to global drift): a sharpness-aware step around any optimizer.

One local step, with ``g`` the gradient of the loss at the weights ``w``:

1. backward at ``w`` gives ``g``;
2. :meth:`WeightPerturbation.perturb`: ``δ = α·g / (‖g‖₂ + 1e-12)`` with ``‖g‖₂`` the global L2 norm over
   every parameter that has a gradient; ``w ← w + δ``; gradients are cleared;
3. backward at ``w + δ`` gives ``g'``;
4. :meth:`WeightPerturbation.step`: ``w`` is restored exactly, ``g'`` is optionally clipped, and the base
   optimizer steps with ``g'`` (momentum and weight decay live in the base optimizer, not in ``δ``).

This is non-adaptive SAM with ``ρ = α``. With ``α = 0`` the wrapper is the base optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
NORM_EPS = 1e-12


class WeightPerturbation(Optimizer):
    """Wraps a base optimizer (SGD, Adam, AdamW, …) with the weight-perturbation step.

    Args:
        params: the model's parameters (or parameter groups).
        base_optimizer: a callable that builds the base optimizer from parameter groups, e.g.
            ``functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9)``.
        alpha: the perturbation radius α (0.05 in every reference experiment).
        max_grad_norm: clip the global L2 norm of the gradient used for the update to this value.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: Callable[[ParamsT], Optimizer],
        alpha: float = 0.05,
        max_grad_norm: float | None = None,
    ) -> None:
        if alpha < 0:
            raise ValueError(f"The perturbation radius alpha must be >= 0, got {alpha}.")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm}.")
        super().__init__(params, {})
        self.base_optimizer = base_optimizer(self.param_groups)
        # One set of parameter groups, shared with the base optimizer, so that learning-rate schedulers and
        # `state_dict` see a single optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.alpha = alpha
        self.max_grad_norm = max_grad_norm

    @property
    def perturbs(self) -> bool:
        """Whether :meth:`perturb` moves the weights (``α > 0``); with ``α = 0`` the second pass is redundant."""
        return self.alpha > 0

    def _params(self) -> list[Tensor]:
        # Read the base optimizer's groups: `load_state_dict` replaces them, and wrappers that copied this
        # object's attributes (Fabric's optimizer) would otherwise hold a stale list.
        return [p for group in self.base_optimizer.param_groups for p in group["params"]]

    def _params_with_grad(self) -> list[Tensor]:
        return [p for p in self._params() if p.grad is not None]

    @torch.no_grad()
    def perturb(self) -> Tensor:
        """Move every parameter with a gradient to ``w + α·g/‖g‖``, clear gradients; returns ``‖g‖₂``."""
        params = self._params_with_grad()
        if not params:
            raise RuntimeError("perturb() found no gradients: call backward on the loss at the current weights first.")
        grad_norm = global_grad_norm(params)
        scale = self.alpha / (grad_norm + NORM_EPS)
        for p in params:
            # The state dict is shared with Fabric's optimizer wrapper (a shallow copy), so the saved weights
            # are found again by `step()` whichever object it is called on.
            self.state[p]["unperturbed"] = p.detach().clone()
            gradient = cast(Tensor, p.grad)  # params hold only parameters with gradients
            p.add_(gradient * scale.to(gradient.dtype))
        for p in params:
            p.grad = None
        return grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`perturb` (a no-op when nothing is perturbed)."""
        for p in self._params():
            saved = self.state.get(p, {}).pop("unperturbed", None)
            if saved is not None:
                p.copy_(saved)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Restore the unperturbed weights, clip, then step the base optimizer with the current gradients."""
        if closure is not None:
            # Lightning's manual optimization passes a closure that does nothing; a real one re-evaluates the
            # loss at the perturbed weights and fills the gradients the update uses.
            with torch.enable_grad():
                closure()
        self.restore()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params_with_grad(), self.max_grad_norm)
        return self.base_optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        # Only the base optimizer's state (momentum, Adam moments) lives across steps; the saved weights of a
        # perturbation are transient.
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def global_grad_norm(params: Iterable[Tensor]) -> Tensor:
    """The L2 norm of all gradients taken together, as one vector, in float32."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        raise ValueError("No parameter has a gradient.")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
