"""The FedFA callback: feature-augmentation layers after a network's stages, and the server's variance of the
clients' feature statistics (maths in :mod:`harmofl.feature_augmentation`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from harmofl.feature_augmentation import FeatureStatisticsAugmentation, check_settings, federation_variance
from harmofl.federation.callback import FederatedCallback
from harmofl.federation.store import to_host

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer

#: The attribute of the LightningModule that holds the layers (their state-dict keys start with it).
MODULE_NAME = "feature_augmentation"
#: The four residual stages of timm's (and torchvision's) ResNets, as in FedFA's ResNet experiments.
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
#: Each layer's running statistics, and the server's variance of them over the clients.
STATISTICS = {"running_mean": "federation_var_mean", "running_std": "federation_var_std"}


class FeatureAugmentation(FederatedCallback):
    """FedFA (Zhou & Konukoglu, ICLR 2023): a :class:`~harmofl.feature_augmentation.FeatureStatisticsAugmentation`
    layer after each of ``stages``, on top of the orchestrator's aggregation (FedAvg by default).

    Lightning's ``setup`` hook adds the layers to the LightningModule (``pl_module.feature_augmentation``, keyed by
    stage name with dots as ``_``) before the orchestrator takes the global state, so their buffers are aggregated
    and checkpointed like any BatchNorm's; a forward hook on each stage passes its output through its layer.
    After local training each client records its layers' running feature means and stds (2·C numbers per layer);
    after aggregation the server sets every layer's ``federation_var_mean`` / ``federation_var_std`` to the unbiased
    variance of the participants' records (at least 2 participants; otherwise they stay as they were), which
    widens the augmentation on the channels where the sites disagree.

    Args:
        stages: submodules of ``pl_module.model`` (dotted names for ``get_submodule``) after which a layer goes.
            The default fits timm's and torchvision's ResNets (e.g. ``test_resnet``); for ``harmofl_unet`` use
            ``[encoder1, encoder2, encoder3, encoder4]``, for ``harmofl_densenet121``
            ``[features.transition1, features.transition2, features.transition3]``. A stage's output channels are
            those of its last convolution or normalization layer (no dummy forward); a layer checks them at its
            first augmented forward and names the mismatch.
        probability: chance that a layer augments a training forward.
        momentum: weight of the past in the layers' running statistics.
    """

    def __init__(self, stages: Sequence[str] = RESNET_STAGES, probability: float = 0.5, momentum: float = 0.99) -> None:
        check_settings(probability, momentum)
        if isinstance(stages, str) or not stages:
            raise ValueError(f"stages must be a non-empty list of submodule names, got {stages!r}.")
        keys = [_layer_key(stage) for stage in stages]
        if len(set(keys)) != len(keys):
            raise ValueError(f"stages must name distinct submodules (dots read as '_'), got {list(stages)}.")
        self.stages, self.probability, self.momentum = list(stages), probability, momentum
        #: Per client: the round it last trained in and its layers' running statistics after it.
        self.client_statistics: dict[str, dict[str, Any]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Add the layers and their hooks to ``pl_module`` once (setup runs again for evaluation)."""
        expected = [_layer_key(name) for name in self.stages]
        existing = getattr(pl_module, MODULE_NAME, None)
        if existing is not None:
            if not isinstance(existing, nn.ModuleDict) or list(existing) != expected:
                raise ValueError(
                    f"pl_module.{MODULE_NAME} already exists and is not this callback's layers {expected}: use one "
                    "FeatureAugmentation callback per model."
                )
            return
        network = getattr(pl_module, "model", None)
        if not isinstance(network, nn.Module):
            raise TypeError(f"FeatureAugmentation needs the network as pl_module.model, got {type(network).__name__}.")
        layers = nn.ModuleDict()
        for name in self.stages:
            module = _stage(network, name)
            layer = FeatureStatisticsAugmentation(output_channels(module, name), self.probability, self.momentum)
            layers[_layer_key(name)] = layer
            module.register_forward_hook(_augment_output(layer))
        pl_module.add_module(MODULE_NAME, layers)

    # -- federated hooks, fired by the orchestrator --------------------------------------------------------

    def on_train_client_end(
        self, trainer: FederatedTrainer, pl_module: LightningModule, client: str, loss: float
    ) -> None:
        """Record ``client``'s running statistics after its local training, for the server."""
        layers = _layers(pl_module)
        self.client_statistics[client] = {
            "round": trainer.current_round,
            **{stat: {key: to_host(getattr(layer, stat)) for key, layer in layers.items()} for stat in STATISTICS},
        }

    def shares_client_states(self) -> bool:
        """Always: the server needs every participant's running statistics for the variance."""
        return True

    def on_aggregate(self, trainer: FederatedTrainer, pl_module: LightningModule, round_idx: int) -> None:
        """Set the global ``federation_var_*`` buffers to the variance over this round's participants (every process
        takes part in the gather)."""
        this_round = {c: s for c, s in self.client_statistics.items() if s["round"] == round_idx}
        records = list(trainer.gather_client_values(this_round).values())
        if len(records) < 2:
            return
        for key, layer in _layers(pl_module).items():
            for stat, federation_buffer in STATISTICS.items():
                variance = federation_variance([record[stat][key] for record in records])
                global_key = f"{MODULE_NAME}.{key}.{federation_buffer}"
                trainer.global_state[global_key] = variance.to(trainer.global_state[global_key].dtype)
                getattr(layer, federation_buffer).copy_(variance)

    # -- state: everything global is in the global weights; each client's record is its own ------------------

    def client_state_dict(self, client: str) -> dict[str, Any]:
        return self.client_statistics.get(client, {})

    def load_client_state_dict(self, client: str, state: dict[str, Any]) -> None:
        if state:
            self.client_statistics[client] = state
        else:
            self.client_statistics.pop(client, None)


def output_channels(module: nn.Module, name: str) -> int:
    """The channels of ``module``'s output: those of its last convolution or normalization layer (in registration
    order, which is the forward order of sequential stages such as ResNet's)."""
    for submodule in reversed(list(module.modules())):
        for attribute in ("out_channels", "num_features", "num_channels"):  # Conv*, BatchNorm*/InstanceNorm*, GroupNorm
            channels = getattr(submodule, attribute, None)
            if isinstance(channels, int):
                return channels
    raise ValueError(
        f"Stage {name!r} ({type(module).__name__}) has no convolution or normalization layer to read its output "
        "channels from: choose a stage that ends with one."
    )


def _stage(network: nn.Module, name: str) -> nn.Module:
    try:
        return network.get_submodule(name)
    except AttributeError as error:
        children = [child for child, _ in network.named_children()][:12]
        raise ValueError(
            f"FeatureAugmentation stage {name!r} is not a submodule of the network ({type(network).__name__}); its "
            f"top-level submodules are {children}. Set the callback's stages to names of this network."
        ) from error


def _augment_output(layer: FeatureStatisticsAugmentation) -> Any:
    """The forward hook of a stage. It reads the stage's own training flag, so a frozen evaluation copy of the
    network (MOON's reference models are deep copies, hooks included) passes features through unchanged."""

    def hook(stage: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        return layer(output) if stage.training else output

    return hook


def _layers(pl_module: LightningModule) -> nn.ModuleDict:
    layers = getattr(pl_module, MODULE_NAME, None)
    if not isinstance(layers, nn.ModuleDict):
        raise RuntimeError("FeatureAugmentation's layers are missing: its Lightning setup hook did not run.")
    return layers


def _layer_key(stage: str) -> str:
    return stage.replace(".", "_")
