"""Exact resume after SIGKILL, checkpoints that survive a kill while being written, and determinism."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from harmofl.checkpoint import load_checkpoint
from harmofl.reporting import read_metrics_csv
from harmofl.trainer import FederatedTrainer

from helpers import CLI_TINY, REPO, fit_tiny_demo, tiny_classifier, tiny_histology

# Every piece of state a resume must restore: momentum, server momentum, a running amplitude target shared
# every round, SCAFFOLD's control variates, and the per-round participant sample.
STATEFUL = [
    "--config",
    "configs/demo.yaml",
    "--config",
    "configs/strategies/scaffold.yaml",
    "--trainer.callbacks+=callbacks.AmplitudeHarmonization",
    "--trainer.callbacks.preset=paper",
    "--trainer.callbacks.share_target=every_round",
    "--trainer.server_optimizer=harmofl.server_optimizers.FedAvgM",
    "--trainer.clients_per_round=3",
    "--model.init_args.alpha=0.05",
    *CLI_TINY,
]
ROUNDS = 6


def _fit_command(root, *extra):
    return [
        sys.executable,
        str(REPO / "cli.py"),
        "fit",
        *STATEFUL,
        "--trainer.rounds",
        str(ROUNDS),
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def _environment():
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _checkpoint_round(path):
    try:
        return load_checkpoint(path)["round"]
    except (FileNotFoundError, ValueError):
        return 0


def test_a_run_killed_mid_training_resumes_to_the_same_results(tmp_path):
    reference = tmp_path / "uninterrupted"
    subprocess.run(_fit_command(reference), env=_environment(), check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _fit_command(killed), env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while _checkpoint_round(last) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # no clean-up, no final save
    process.wait()
    assert process.returncode == -signal.SIGKILL
    interrupted_at = _checkpoint_round(last)
    assert 2 <= interrupted_at < ROUNDS

    subprocess.run(
        _fit_command(killed, "--ckpt_path", str(last)), env=_environment(), check=True, capture_output=True, timeout=600
    )
    assert read_metrics_csv(killed / "metrics.csv") == read_metrics_csv(reference / "metrics.csv")
    assert json.loads((killed / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    resumed, uninterrupted = load_checkpoint(last), load_checkpoint(reference / "checkpoints" / "last.ckpt")
    for key, value in uninterrupted["global_state"].items():
        torch.testing.assert_close(resumed["global_state"][key], value, atol=1e-6, rtol=0, msg=key)
    for name in ("Scaffold", "AmplitudeHarmonization"):
        assert resumed["callbacks"][name].keys() == uninterrupted["callbacks"][name].keys()
    torch.testing.assert_close(resumed["server_optimizer"], uninterrupted["server_optimizer"], atol=1e-6, rtol=0)


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, sys, torch
    from harmofl.checkpoint import save_checkpoint

    path = sys.argv[1]
    save_checkpoint({"round": 1, "weights": torch.ones(1000)}, __import__("pathlib").Path(path))
    original = torch.save

    def dying_save(data, handle, *args, **kwargs):
        handle.write(b"PK\\x03\\x04 only the first bytes of a checkpoint")
        handle.flush()
        os._exit(137)  # killed in the middle of writing

    torch.save = dying_save
    save_checkpoint({"round": 2, "weights": torch.zeros(1000)}, __import__("pathlib").Path(path))
    """
)


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    process = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], cwd=REPO, capture_output=True)
    assert process.returncode == 137, process.stderr
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.tmp.")  # the dead writer's temporary file
    checkpoint = load_checkpoint(path)
    assert checkpoint["round"] == 1 and torch.equal(checkpoint["weights"], torch.ones(1000))
    from harmofl.checkpoint import save_checkpoint

    save_checkpoint({"round": 2}, path)  # the next save removes what the killed writer left
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_kill_before_the_best_copy_is_mended_on_resume(trainer_kwargs):
    """Killed after last.ckpt was written and before it was copied to best.ckpt: resuming copies it."""
    FederatedTrainer(rounds=1, **trainer_kwargs).fit(tiny_classifier(), tiny_histology())
    checkpoints = Path(trainer_kwargs["default_root_dir"]) / "checkpoints"
    (checkpoints / "best.ckpt").unlink()  # as if the run died between the two writes of round 1, its best round
    FederatedTrainer(rounds=1, **trainer_kwargs).fit(tiny_classifier(), tiny_histology(), ckpt_path="last")
    assert (checkpoints / "best.ckpt").read_bytes() == (checkpoints / "last.ckpt").read_bytes()
    assert load_checkpoint(checkpoints / "best.ckpt")["best_round"] == 1


@pytest.mark.parametrize("devices", [1, 2])
def test_the_same_config_and_seed_give_the_same_summary(tmp_path, devices):
    summaries = []
    for attempt in range(2):
        root = tmp_path / f"run{attempt}"
        fit_tiny_demo(root, devices)
        summaries.append((root / "summary.json").read_text())
    assert summaries[0] == summaries[1]
