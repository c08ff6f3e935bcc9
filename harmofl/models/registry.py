"""Model factories by name: the reference networks first, then timm (classifiers) or
segmentation_models_pytorch U-Nets (segmenters).

A builder is any callable ``(num_classes, in_chans, **kwargs) -> nn.Module``. Nothing is ever
downloaded: timm models are built with ``pretrained=False`` and smp encoders with
``encoder_weights=None``, and timm's own weight loading (``checkpoint_path``, ``pretrained_cfg``...) is refused;
load local weights after building instead (``model.weights_path``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import segmentation_models_pytorch as smp
import timm
from torch import nn

from harmofl.models.densenet import HarmoFLDenseNet121
from harmofl.models.unet import HarmoFLUNet

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

_CLASSIFIERS: dict[str, Builder] = {}
_SEGMENTERS: dict[str, Builder] = {}

# smp builds any timm backbone as an encoder when its name carries this prefix.
_SMP_TIMM_PREFIX = "tu-"


def _register(table: dict[str, Builder], kind: str, name: str) -> Callable[[B], B]:
    def decorator(builder: B) -> B:
        if name in table:
            raise ValueError(f"A {kind} named {name!r} is already registered; choose another name.")
        table[name] = builder
        return builder

    return decorator


def register_classifier(name: str) -> Callable[[B], B]:
    """Decorator: register a classifier builder under ``name`` (checked before timm's names)."""
    return _register(_CLASSIFIERS, "classifier", name)


def register_segmenter(name: str) -> Callable[[B], B]:
    """Decorator: register a segmenter builder under ``name`` (checked before smp's encoders)."""
    return _register(_SEGMENTERS, "segmenter", name)


def list_registered() -> dict[str, list[str]]:
    """Names registered here (not timm's or smp's), by task."""
    return {"classifier": sorted(_CLASSIFIERS), "segmenter": sorted(_SEGMENTERS)}


# timm.create_model's arguments that load weights from a file or a hub (smp hands its extra arguments on to
# timm.create_model for "tu-" encoders). timm's loader may unpickle a checkpoint in full, so a file named there
# could run code; model.weights_path is read with weights_only=True instead.
_WEIGHT_LOADING_ARGUMENTS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _refuse_downloads(name: str, kwargs: dict[str, Any]) -> None:
    """Drop ``pretrained=False``; refuse any request for downloaded weights, or for weights timm would load."""
    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"pretrained=True was asked for model {name!r}, but nothing is downloaded at run time; "
            "build it with pretrained=False and load a local weights file into it instead."
        )
    if kwargs.get("encoder_weights") is not None:
        raise ValueError(
            f"encoder_weights={kwargs['encoder_weights']!r} was asked for model {name!r}, but nothing is "
            "downloaded at run time; leave it unset and load a local weights file instead."
        )
    kwargs.pop("encoder_weights", None)
    loading = [key for key in _WEIGHT_LOADING_ARGUMENTS if key in kwargs]
    if loading:
        raise ValueError(
            f"{', '.join(f'{key}={kwargs[key]!r}' for key in loading)} was given for model {name!r} (model."
            "backbone_kwargs), which would make timm load weights itself, without weights_only; remove it and give "
            "the file as model.weights_path (a local state dict, read with weights_only=True)."
        )


def create_classifier(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A classifier returning logits ``[B, num_classes]``: a registered name, else any timm model name."""
    _refuse_downloads(name, kwargs)
    if name in _CLASSIFIERS:
        return _CLASSIFIERS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    raise ValueError(
        f"Unknown classifier {name!r}; use one of {sorted(_CLASSIFIERS)} or any name in timm.list_models()."
    )


def _is_smp_encoder(name: str) -> bool:
    if name.startswith(_SMP_TIMM_PREFIX):
        return timm.is_model(name[len(_SMP_TIMM_PREFIX) :])
    return name in smp.encoders.get_encoder_names()


def create_segmenter(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A segmenter returning logits ``[B, num_classes, H, W]``: a registered name, else an smp U-Net
    with that encoder (randomly initialised)."""
    _refuse_downloads(name, kwargs)
    if name in _SEGMENTERS:
        return _SEGMENTERS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    if _is_smp_encoder(name):
        return smp.Unet(encoder_name=name, encoder_weights=None, in_channels=in_chans, classes=num_classes, **kwargs)
    raise ValueError(
        f"Unknown segmenter {name!r}; use one of {sorted(_SEGMENTERS)}, an encoder in "
        f"segmentation_models_pytorch.encoders.get_encoder_names(), or '{_SMP_TIMM_PREFIX}<timm model name>'."
    )


register_classifier("harmofl_densenet121")(HarmoFLDenseNet121)
register_segmenter("harmofl_unet")(HarmoFLUNet)
