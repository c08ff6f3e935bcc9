"""Model package: the reference networks, the norm kinds and the factories by name."""

from __future__ import annotations

import os
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded, even by accident

import pytest
import torch
import torchvision
from torch import nn

from harmofl.models import (
    NORM_KINDS,
    create_classifier,
    create_segmenter,
    list_registered,
    norm_layer,
    register_classifier,
    register_segmenter,
    registry,
)

DENSENET = "harmofl_densenet121"
UNET = "harmofl_unet"
NORM_TYPES = {
    "batch_stats": nn.BatchNorm2d,
    "batch": nn.BatchNorm2d,
    "group": nn.GroupNorm,
    "instance": nn.InstanceNorm2d,
}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)
    return [m for m in model.modules() if isinstance(m, norm_types)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_densenet_output_shape(num_classes: int) -> None:
    model = create_classifier(DENSENET, num_classes=num_classes)
    assert model(torch.rand(2, 3, 96, 96)).shape == (2, num_classes)


def test_densenet_pads_after_block1_only() -> None:
    # The reference's ZeroPad2d(2) sits between dense block 1 and transition 1.
    model = create_classifier(DENSENET, num_classes=2)
    names = [name for name, _ in model.features.named_children()]
    assert names.index("zero_padding") == names.index("denseblock1") + 1
    assert names[names.index("zero_padding") + 1] == "transition1"
    pads = [m for m in model.modules() if isinstance(m, nn.ZeroPad2d)]
    assert len(pads) == 1 and pads[0].padding == (2, 2, 2, 2)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_unet_output_shape(size: tuple[int, int]) -> None:
    model = create_segmenter(UNET, num_classes=2)
    assert model(torch.rand(2, 3, *size)).shape == (2, 2, *size)


def test_unet_widths() -> None:
    model = create_segmenter(UNET, num_classes=2)
    encoder_widths = [getattr(model, f"encoder{i}")[0].out_channels for i in range(1, 5)]
    assert encoder_widths == [32, 64, 128, 256]
    assert model.bottleneck[0].out_channels == 512


def test_unet_rejects_size_not_divisible_by_16() -> None:
    with pytest.raises(ValueError, match="40×40"):
        create_segmenter(UNET, num_classes=2)(torch.rand(1, 3, 40, 40))


def test_reference_nets_accept_one_channel() -> None:
    x = torch.rand(2, 1, 96, 96)
    assert create_classifier(DENSENET, num_classes=2, in_chans=1)(x).shape == (2, 2)
    assert create_segmenter(UNET, num_classes=2, in_chans=1)(x).shape == (2, 2, 96, 96)


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_layer_types(kind: str) -> None:
    layer = norm_layer(kind, 48)
    assert type(layer) is NORM_TYPES[kind]
    assert layer(torch.rand(2, 48, 4, 4)).shape == (2, 48, 4, 4)


def test_batch_stats_has_no_state() -> None:
    layer = norm_layer("batch_stats", 8)
    assert not layer.affine and not layer.track_running_stats
    assert layer.state_dict() == {}
    standard = norm_layer("batch", 8)
    assert standard.affine and standard.track_running_stats


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (48, 24), (96, 32), (7, 7), (1, 1)])
def test_group_norm_groups(channels: int, groups: int) -> None:
    assert norm_layer("group", channels).num_groups == groups


def test_unknown_norm_kind() -> None:
    with pytest.raises(ValueError, match="'layer'.*batch_stats"):
        norm_layer("layer", 8)


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_reference_nets_use_the_norm_kind(kind: str) -> None:
    models = [
        (create_classifier(DENSENET, num_classes=2, norm=kind), torch.rand(2, 3, 96, 96)),
        (create_segmenter(UNET, num_classes=2, norm=kind), torch.rand(2, 3, 32, 32)),
    ]
    for model, x in models:
        norms = _norm_modules(model)
        assert norms and all(type(m) is NORM_TYPES[kind] for m in norms)
        model(x)
        model.eval()
        with torch.no_grad():
            model(x)


def test_batch_stats_nets_have_no_norm_state() -> None:
    # The reference evaluates with batch statistics: no running stats, nothing learned in the norms.
    for model in (create_classifier(DENSENET, num_classes=2), create_segmenter(UNET, num_classes=2)):
        assert not list(model.buffers())
        assert all(not m.track_running_stats and not m.affine for m in _norm_modules(model))


def test_densenet_parameter_count_matches_torchvision() -> None:
    reference = torchvision.models.densenet121(weights=None, num_classes=2)
    affine = sum(_num_params(m) for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
    # Same layers as torchvision's DenseNet-121; "batch_stats" only drops the BatchNorm affine terms.
    assert _num_params(create_classifier(DENSENET, num_classes=2, norm="batch")) == _num_params(reference)
    assert _num_params(create_classifier(DENSENET, num_classes=2)) == _num_params(reference) - affine


def test_timm_classifier() -> None:
    model = create_classifier("resnet10t", num_classes=3)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3)
    assert create_classifier("resnet10t", num_classes=3, in_chans=1)(torch.rand(2, 1, 64, 64)).shape == (2, 3)


def test_smp_segmenter() -> None:
    model = create_segmenter("resnet18", num_classes=2)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2, 64, 64)


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="'no_such_net'.*timm.list_models"):
        create_classifier("no_such_net", num_classes=2)
    with pytest.raises(ValueError, match="'no_such_encoder'.*get_encoder_names"):
        create_segmenter("no_such_encoder", num_classes=2)


@pytest.mark.parametrize("factory", [create_classifier, create_segmenter])
@pytest.mark.parametrize("name", [DENSENET, UNET, "resnet18"])
def test_downloads_refused(factory: Callable[..., nn.Module], name: str) -> None:
    with pytest.raises(ValueError, match=f"pretrained=True.*{name}"):
        factory(name, num_classes=2, pretrained=True)


def test_encoder_weights_refused() -> None:
    with pytest.raises(ValueError, match="'imagenet'.*'resnet18'"):
        create_segmenter("resnet18", num_classes=2, encoder_weights="imagenet")


def test_pretrained_false_is_accepted() -> None:
    assert isinstance(create_classifier(DENSENET, num_classes=2, pretrained=False), nn.Module)


def test_list_registered() -> None:
    assert list_registered() == {"classifier": [DENSENET], "segmenter": [UNET]}


def test_registry_takes_precedence_and_rejects_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_CLASSIFIERS", dict(registry._CLASSIFIERS))
    monkeypatch.setattr(registry, "_SEGMENTERS", dict(registry._SEGMENTERS))

    @register_classifier("resnet10t")  # shadows the timm model of that name
    def tiny_classifier(num_classes: int, in_chans: int) -> nn.Module:
        return nn.Identity()

    @register_segmenter("tiny")
    def tiny_segmenter(num_classes: int, in_chans: int) -> nn.Module:
        return nn.Conv2d(in_chans, num_classes, kernel_size=1)

    assert isinstance(create_classifier("resnet10t", num_classes=2), nn.Identity)
    assert create_segmenter("tiny", num_classes=4, in_chans=1)(torch.rand(1, 1, 8, 8)).shape == (1, 4, 8, 8)
    assert list_registered()["segmenter"] == ["harmofl_unet", "tiny"]
    with pytest.raises(ValueError, match="'tiny'"):
        register_segmenter("tiny")(tiny_segmenter)
