"""The command line, end to end (in subprocesses, errors in this process): fit, test, two processes, errors, W&B."""

import json
import sys

import pytest
import torch

from harmofl.checkpoint import load_checkpoint
from harmofl.cli import main as cli_main
from harmofl.reporting import read_metrics_csv

from helpers import CLI_TINY, REPO, fit_tiny_demo, run_cli


def test_fit_writes_outputs_under_runs_config_name_and_test_reproduces_the_best_round(tmp_path):
    config = str(REPO / "configs" / "demo.yaml")
    fit = run_cli("fit", "--config", config, "--trainer.rounds", "2", *CLI_TINY, cwd=tmp_path)
    run = tmp_path / "runs" / "demo"
    for name in (
        "config.yaml",
        "metrics.csv",
        "summary.json",
        "convergence.png",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (run / name).is_file(), name
    assert "site_0" in fit.stdout and "mean" in fit.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and set(summary["clients"]) == {f"site_{i}" for i in range(4)}
    assert len(read_metrics_csv(run / "metrics.csv")) == 2 * 5 * 3

    # The configuration the run saved is all `test` needs (fit-only settings such as the executor are not in it).
    best = str(run / "checkpoints" / "best.ckpt")
    tested = run_cli("test", "--config", str(run / "config.yaml"), "--ckpt_path", best, cwd=tmp_path)
    assert "site_3" in tested.stdout
    test_summary = json.loads((run / "checkpoints" / "test_summary.json").read_text())
    assert test_summary["best_round"] == summary["best_round"]
    for client, splits in summary["clients"].items():
        assert test_summary["clients"][client]["test"] == splits["test"]


def test_two_processes_aggregate_the_same_weights_as_one(tmp_path):
    """Clients spread over two gloo processes give one process's global model (same thread count)."""
    states = {}
    for devices in (1, 2):
        root = tmp_path / f"devices{devices}"
        fit_tiny_demo(root, devices)
        states[devices] = load_checkpoint(root / "checkpoints" / "last.ckpt")
    one, two = states[1], states[2]
    assert one["global_state"].keys() == two["global_state"].keys()
    for key, value in one["global_state"].items():
        torch.testing.assert_close(two["global_state"][key], value, atol=1e-6, rtol=0, msg=key)
    assert set(two["clients"]) == set(one["clients"])  # every client's state reached the checkpoint
    torch.testing.assert_close(
        two["callbacks"]["AmplitudeHarmonization"]["shared_target"],
        one["callbacks"]["AmplitudeHarmonization"]["shared_target"],
    )


def test_segmentation_demo_runs_through_the_cli(tmp_path):
    run_cli(
        "fit",
        "--config",
        "configs/demo_seg.yaml",
        "--trainer.rounds",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
        *CLI_TINY,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["mean"]["test"]) == {"dice", "iou", "hd95"}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (["--trainer.roundz", "3"], "roundz"),
        (["--trainer.precision", "16-mixed"], "16-mixed"),
        (["--model.init_args.alpha", "-1"], "alpha"),
        (["--trainer.rounds", "0"], "trainer.rounds"),
        (["--trainer.rounds", "many"], "rounds"),
        (["--trainer.client_failure", "ignore"], "client_failure"),
        (["--data.init_args.batch_size", "0"], "batch_size"),
    ],
)
def test_bad_configuration_fails_before_training_with_the_key_named(tmp_path, override, named, monkeypatch, capsys):
    # In this process (the command line's own code, without a process start per case).
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "cli.py",
            "fit",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            *CLI_TINY,
            *override,
        ],
    )
    with pytest.raises((SystemExit, ValueError)) as failure:
        cli_main()
    assert failure.type is ValueError or failure.value.code != 0
    assert named in str(failure.value) + capsys.readouterr().err
    assert not (tmp_path / "metrics.csv").exists()


def test_wandb_logs_offline_without_a_key(tmp_path):
    process = run_cli(
        "fit",
        "--config",
        "configs/demo.yaml",
        "--trainer.rounds",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.logger.init_args.project",
        "harmofl-test",
        *CLI_TINY,
        env={"WANDB_MODE": None, "WANDB_API_KEY": None, "WANDB_DIR": None},
    )
    assert "W&B logs offline" in process.stdout + process.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
