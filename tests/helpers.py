"""Builders and runners the tests share: tiny demo federations, tiny clients, ``cli.py`` in a subprocess."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

from harmofl.clients import ClassificationClient, SegmentationClient
from harmofl.data import DemoHistology, DemoNuclei
from harmofl.federation.topology import Federation

REPO = Path(__file__).resolve().parents[1]
# The demo at a Flower test's size: 2 sites, 32x32 patches, 2 rounds (run-config overrides, `key=value`).
FLOWER_TINY = (
    "trainer.rounds=2 data.init_args.num_sites=2 data.init_args.train_per_site=32 data.init_args.val_per_site=16 "
    "data.init_args.test_per_site=16 data.init_args.image_size=32 data.init_args.batch_size=16"
)
# The demo at a CLI test's size (flags for `cli.py fit`).
CLI_TINY = [
    "--data.init_args.train_per_site",
    "16",
    "--data.init_args.val_per_site",
    "8",
    "--data.init_args.test_per_site",
    "8",
    "--data.init_args.image_size",
    "32",
    "--data.init_args.batch_size",
    "8",
    "--trainer.enable_progress_bar",
    "false",
]
SGD = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4)


def tiny_histology(num_sites: int = 2, **kwargs) -> DemoHistology:
    settings = dict(train_per_site=16, val_per_site=8, test_per_site=8, image_size=32, batch_size=8)
    return DemoHistology(num_sites=num_sites, **{**settings, **kwargs})


def tiny_nuclei(num_sites: int = 2, **kwargs) -> DemoNuclei:
    settings = dict(train_per_site=8, val_per_site=4, test_per_site=4, image_size=32, batch_size=4)
    return DemoNuclei(num_sites=num_sites, **{**settings, **kwargs})


def tiny_classifier(**kwargs) -> ClassificationClient:
    torch.manual_seed(0)
    settings = dict(backbone="test_resnet", batch_norm_stats="batch", optimizer=SGD, alpha=0.05)
    return ClassificationClient(**{**settings, **kwargs})


def tiny_segmenter(**kwargs) -> SegmentationClient:
    torch.manual_seed(0)
    settings = dict(
        backbone="harmofl_unet",
        backbone_kwargs={"base_features": 4},
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
    )
    return SegmentationClient(**{**settings, **kwargs})


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    process = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    return process


def fit_tiny_demo(root: Path, devices: int, rounds: int = 2) -> None:
    """``cli.py fit`` of the tiny demo into ``root`` on ``devices`` CPU processes, one thread each (so that runs
    with other process layouts do the same arithmetic)."""
    run_cli(
        "fit",
        "--config",
        "configs/demo.yaml",
        "--trainer.rounds",
        str(rounds),
        "--trainer.devices",
        str(devices),
        "--trainer.default_root_dir",
        str(root),
        *CLI_TINY,
        env={"OMP_NUM_THREADS": "1"},
    )


def federation_of(train_samples: dict[str, int], **settings) -> Federation:
    """``Federation.build`` of ``train_samples`` with one process, every client training each round, uniform weights,
    seed 0; ``settings`` override any of them."""
    defaults = dict(
        held_out=[],
        pool_clients=False,
        clients_per_round=None,
        client_weighting="uniform",
        seed=0,
        world_size=1,
        min_clients=1,
    )
    return Federation.build(train_samples, **{**defaults, **settings})
