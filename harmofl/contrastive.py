"""MOON's model-contrastive term (Li, He and Song, CVPR 2021) and the representation it compares.

With ``z`` the representation of a batch by the model being trained, ``z_glob`` by the global model the
round started from and ``z_prev`` by the client's own model at the end of its previous round:

``ℓ_con = −log( exp(sim(z, z_glob)/τ) / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ)) )``

with ``sim`` the cosine similarity, averaged over the batch. The client's objective is ``ℓ_task + μ·ℓ_con``:
local representations are pulled towards the global model's and pushed away from the drifted local one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Where a network's representation is read: the input of a layer (a classifier head) or its output.
Tap = Literal["input", "output"]


def model_contrastive_loss(z: Tensor, z_global: Tensor, z_previous: Tensor, temperature: float) -> Tensor:
    """``ℓ_con`` averaged over the batch; ``z*`` are ``[B, D]``."""
    if temperature <= 0:
        raise ValueError(f"The MOON temperature must be > 0, got {temperature}.")
    positive = F.cosine_similarity(z, z_global, dim=1)
    negative = F.cosine_similarity(z, z_previous, dim=1)
    logits = torch.stack([positive, negative], dim=1) / temperature
    # Cross-entropy with the positive pair as the class is exactly −log softmax(logits)[0].
    return F.cross_entropy(logits.float(), torch.zeros(len(z), dtype=torch.long, device=z.device))


def forward_with_representation(network: nn.Module, images: Tensor, layer: str, tap: Tap) -> tuple[Tensor, Tensor]:
    """``(network(images), representation)``: the representation is read at ``layer`` during the same forward.

    Feature maps are averaged over their spatial axes; a list of maps (an encoder's pyramid) gives its last.
    """
    captured: list[Tensor] = []

    def keep_input(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        captured.append(inputs[0])

    def keep_output(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        captured.append(output)

    module = network.get_submodule(layer)
    if tap == "input":
        handle = module.register_forward_pre_hook(keep_input)
    else:
        handle = module.register_forward_hook(keep_output)
    try:
        outputs = network(images)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"Layer {layer!r} ran {len(captured)} times in one forward; expected once.")
    return outputs, flatten_representation(captured[0])


def flatten_representation(features: Tensor | Sequence[Tensor]) -> Tensor:
    """``[B, D]`` from vectors ``[B, D]``, a feature map ``[B, C, H, W]`` (spatial mean) or a pyramid of maps
    (its last, deepest map)."""
    if not isinstance(features, Tensor):
        features = features[-1]
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 2:
        return features
    raise ValueError(
        f"A representation must be [B, D] vectors or [B, C, H, W] maps, got shape {tuple(features.shape)}: "
        "choose another representation layer."
    )
