"""Test-wide environment: nothing may reach the network, W&B never blocks."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")
# Flower (tests/test_flower*.py): no usage events, no update check, no dependency installation.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
# Generated demo data is cached per session here, never in the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = __import__("tempfile").mkdtemp(prefix="harmofl-test-cache-")

import functools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from harmofl.clients import ClassificationClient, SegmentationClient  # noqa: E402
from harmofl.data import DemoHistology, DemoNuclei  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
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
    settings = dict(backbone="harmofl_unet", backbone_kwargs={"base_features": 4},
                    optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    return SegmentationClient(**{**settings, **kwargs})


@pytest.fixture
def trainer_kwargs(tmp_path):
    """In-process, CPU, quiet trainer settings writing under a temporary folder."""
    return dict(accelerator="cpu", devices=1, enable_progress_bar=False, default_root_dir=str(tmp_path / "run"))


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    process = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=environment,
                             capture_output=True, text=True, timeout=600)
    if check:
        assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    return process
