"""The demo tasks ``overhead.py`` times: per task its data, its client and the plain loop's recipe of the same, and
the :class:`Workload` of one run (what a worker is started with)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import _harness  # noqa: F401  first: the repository on sys.path, the environment torch reads
import torch
import torch.nn.functional as F
from plain_loop import Recipe
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from harmofl import ClassificationClient, FederatedClient, SegmentationClient
from harmofl.clients.segmentation import foreground_segmentation_metrics
from harmofl.data import DemoHistology, DemoNuclei, FederatedDataModule
from harmofl.losses import ce_dice_loss
from harmofl.models import create_classifier, create_segmenter, use_batch_statistics

NUM_CLASSES = 2  # DemoHistology: tumour-like cluster or not; DemoNuclei: background or nucleus
UNET_KWARGS = {"base_features": 8}
SEED = 0


@dataclass(frozen=True)
class Task:
    """What differs between the demo tasks: the data, the client, and the plain loop's recipe of the same."""

    description: str
    data: Callable[..., FederatedDataModule]
    sizes: dict[str, int]  # the demo configuration's data sizes, each a command-line option
    client: Callable[..., FederatedClient]  # the client class with its network settings
    recipe: Recipe


TASKS: dict[str, Task] = {
    "classification": Task(  # configs/demo.yaml
        description="DemoHistology, test_resnet, SGD, reference harmonization",
        data=DemoHistology,
        sizes={"train_per_site": 192, "val_per_site": 64, "test_per_site": 128, "batch_size": 32},
        client=functools.partial(ClassificationClient, backbone="test_resnet", batch_norm_stats="batch"),
        recipe=Recipe(
            network=lambda: use_batch_statistics(create_classifier("test_resnet", num_classes=NUM_CLASSES, in_chans=3)),
            optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4),
            preset="reference",
            loss=F.cross_entropy,
            metrics=lambda: MetricCollection({"accuracy": BinaryAccuracy(), "auroc": BinaryAUROC()}),
            predictions=lambda logits: logits.softmax(dim=1)[:, 1],  # the positive class's probability
        ),
    ),
    "segmentation": Task(  # configs/demo_seg.yaml
        description="DemoNuclei, harmofl_unet (8 base features), Adam, paper harmonization",
        data=DemoNuclei,
        sizes={"train_per_site": 96, "val_per_site": 32, "test_per_site": 64, "batch_size": 16},
        client=functools.partial(SegmentationClient, backbone="harmofl_unet", backbone_kwargs=UNET_KWARGS),
        recipe=Recipe(
            network=lambda: create_segmenter("harmofl_unet", num_classes=NUM_CLASSES, in_chans=3, **UNET_KWARGS),
            optimizer=functools.partial(torch.optim.Adam, lr=0.003, weight_decay=1e-4),
            preset="paper",
            loss=ce_dice_loss,
            metrics=lambda: foreground_segmentation_metrics(NUM_CLASSES),  # as harmofl.SegmentationClient builds them
            predictions=lambda logits: logits.argmax(dim=1),
        ),
    ),
}


@dataclass(frozen=True)
class Workload:
    """What one run does; the federation itself is generated once per process and shared by its runs."""

    task: str
    rounds: int
    clients: int
    image_size: int
    train_per_site: int
    val_per_site: int
    test_per_site: int
    batch_size: int
    accelerator: str = "cpu"  # both runs' device: cpu or cuda (benchmarks/gpu.py)

    @property
    def spec(self) -> Task:
        return TASKS[self.task]

    def data(self) -> FederatedDataModule:
        """The demo federation, set up (generated, or read from the demo cache): never timed."""
        sizes = {name: getattr(self, name) for name in self.spec.sizes}
        data = self.spec.data(num_sites=self.clients, image_size=self.image_size, seed=SEED, **sizes)
        data.setup("fit")
        return data

    def options(self) -> list[str]:
        """The command-line options that give this workload (to start a worker with)."""
        return [
            item
            for spec in dataclasses.fields(self)
            for item in (f"--{spec.name.replace('_', '-')}", str(getattr(self, spec.name)))
        ]


def workload_from(args: argparse.Namespace, task: str) -> Workload:
    """The task's workload: its demo sizes, each replaced by the option given."""
    sizes = {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in TASKS[task].sizes.items()
    }
    return Workload(task, args.rounds, args.clients, args.image_size, **sizes, accelerator=args.accelerator)
