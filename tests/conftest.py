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

import pytest


@pytest.fixture
def trainer_kwargs(tmp_path):
    """In-process, CPU, quiet trainer settings writing under a temporary folder."""
    return dict(accelerator="cpu", devices=1, enable_progress_bar=False, default_root_dir=str(tmp_path / "run"))
