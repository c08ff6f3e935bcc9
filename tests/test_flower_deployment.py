"""Flower's deployment runtime on loopback: a SuperLink and two SuperNodes as processes bound to 127.0.0.1,
``flwr run`` of this repository's app for 4 rounds of the demo, stopped (every process killed) after round 2,
restarted and resumed with ``ckpt-path='last'``; the final global weights, history, ``metrics.csv`` and
``summary.json`` bitwise equal to an uninterrupted ``cli.py fit``, run at the sites' thread count (other thread
counts reduce convolutions in another order: 1e-5 apart after 2 rounds on a 2-core machine). Nothing leaves the
machine: telemetry and update checks are off, no Ray, every process stopped."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[flower]'")

from harmofl.checkpoint import load_checkpoint
from harmofl.flower.loopback import LoopbackDeployment, flower_environment
from harmofl.reporting import read_metrics_csv

from helpers import FLOWER_TINY, REPO, run_cli

# FedBN-style local norms on top of HarmoFL: local keys, optimizer state and the amplitude target all matter.
STATEFUL = FLOWER_TINY.replace("trainer.rounds=2", "trainer.rounds=4") + " trainer.local_modules=[norm]"


def test_on_loopback_a_stopped_federation_resumes_after_the_supernodes_restart(tmp_path):
    env = {**flower_environment(tmp_path / "home"), "OMP_NUM_THREADS": "1"}  # two sites share this machine's cores
    output = tmp_path / "server"
    node_config = dict.fromkeys(("site_0", "site_1"), f"state-dir='{tmp_path / 'site-state'}'")
    run_config = (
        f"config='configs/demo.yaml' overrides='{STATEFUL}' num-sites=2 output-dir='{output}' reply-timeout=300"
    )
    last = output / "checkpoints" / "last.ckpt"
    with LoopbackDeployment(tmp_path / "first", ["site_0", "site_1"], env, node_config) as deployment:
        deployment.submit(REPO, run_config)
        deadline = time.monotonic() + 600
        while checkpoint_round(last) < 2:
            assert time.monotonic() < deadline, f"no round-2 checkpoint after 600 s\n{deployment.logs()}"
            time.sleep(0.2)
    # The SuperLink, the SuperNodes and the ServerApp killed at round 2, possibly in round 3. App processes that
    # Flower runs in sessions of their own may outlive the SIGTERMs mid-run: stop() kills them too (its leftover).
    deadline = time.monotonic() + 10
    while deployment.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not deployment.alive(), f"processes still running: {deployment.alive()}"
    stopped_at = checkpoint_round(last)
    assert 2 <= stopped_at < 4

    with LoopbackDeployment(tmp_path / "second", ["site_0", "site_1"], env, node_config) as deployment:
        status = deployment.run(REPO, f"{run_config} ckpt-path='last'", timeout=600)
        assert status == "finished:completed", f"{status}\n{deployment.logs()}"
    assert not deployment.leftover, f"processes left running: {deployment.leftover}"

    # The uninterrupted reference: `cli.py fit` in a process with the SuperNodes' environment (OMP_NUM_THREADS=1).
    reference = tmp_path / "in_process"
    run_cli(
        "fit",
        "--config",
        "configs/demo.yaml",
        *(f"--{item}" for item in STATEFUL.split()),
        f"--trainer.default_root_dir={reference}",
        "--trainer.enable_progress_bar=false",
        env=env,
    )
    deployed = load_checkpoint(last)
    simulated = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    assert deployed["round"] == simulated["round"] == 4
    assert deployed["global_state"].keys() == simulated["global_state"].keys()
    for key, value in simulated["global_state"].items():
        torch.testing.assert_close(deployed["global_state"][key], value, rtol=0, atol=0, msg=key)
    assert deployed["history"] == simulated["history"] and deployed["best_round"] == simulated["best_round"]
    assert read_metrics_csv(output / "metrics.csv") == read_metrics_csv(reference / "metrics.csv")
    assert json.loads((output / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    assert (output / "config.yaml").is_file() and (output / "checkpoints" / "best.ckpt").is_file()


def checkpoint_round(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["round"])
    except (FileNotFoundError, ValueError):
        return 0
