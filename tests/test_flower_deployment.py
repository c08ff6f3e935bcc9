"""Flower's deployment runtime on loopback: a SuperLink and two SuperNodes as processes bound to 127.0.0.1,
``flwr run`` of this repository's app for 2 rounds of the demo, and the final global weights bitwise equal to
``cli.py fit``'s, run at the sites' thread count. Nothing leaves the machine: telemetry and update checks are off,
no Ray, every process stopped."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[flower]'")

from harmofl.checkpoint import load_checkpoint
from harmofl.flower.loopback import LoopbackDeployment, flower_environment
from harmofl.reporting import read_metrics_csv

from helpers import FLOWER_TINY, REPO, run_cli


def test_two_sites_on_loopback_train_what_the_in_process_orchestrator_trains(tmp_path):
    env = {**flower_environment(tmp_path / "home"), "OMP_NUM_THREADS": "1"}  # two sites share this machine's cores
    output = tmp_path / "server"
    run_config = (
        f"config='configs/demo.yaml' overrides='{FLOWER_TINY}' num-sites=2 output-dir='{output}' reply-timeout=300"
    )
    with LoopbackDeployment(tmp_path / "deployment", ["site_0", "site_1"], env) as deployment:
        status = deployment.run(REPO, run_config, timeout=400)
        assert status == "finished:completed", f"{status}\n{deployment.logs()}"
    assert not deployment.leftover, f"processes left running: {deployment.leftover}"

    # The reference: `cli.py fit` of the same configuration in a process with the environment of the SuperNodes
    # (OMP_NUM_THREADS=1 above), not in this process, whose thread count is the machine's: other thread counts
    # reduce convolutions in another order (1e-5 apart after 2 rounds on a 2-core machine).
    reference = tmp_path / "in_process"
    run_cli(
        "fit",
        "--config",
        "configs/demo.yaml",
        *(f"--{item}" for item in FLOWER_TINY.split()),
        f"--trainer.default_root_dir={reference}",
        "--trainer.enable_progress_bar=false",
        env=env,
    )
    deployed = load_checkpoint(output / "checkpoints" / "last.ckpt")
    simulated = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    assert deployed["round"] == simulated["round"] == 2
    assert deployed["global_state"].keys() == simulated["global_state"].keys()
    for key, value in simulated["global_state"].items():
        # The same arithmetic at the same thread count, in other processes: bitwise equal (measured).
        torch.testing.assert_close(deployed["global_state"][key], value, rtol=0, atol=0, msg=key)
    assert deployed["history"] == simulated["history"] and deployed["best_round"] == simulated["best_round"]
    assert read_metrics_csv(output / "metrics.csv") == read_metrics_csv(reference / "metrics.csv")
    assert (output / "summary.json").is_file() and (output / "checkpoints" / "best.ckpt").is_file()
