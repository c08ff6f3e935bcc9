"""The comparison command: strategies × seeds as fit subprocesses, reuse, resume, and the tables."""

import csv
import subprocess

import pytest

from harmofl import compare

from helpers import REPO, run_cli

TINY = (
    "--trainer.rounds 1 --data.num_sites 2 --data.train_per_site 16 --data.val_per_site 8 "
    "--data.test_per_site 8 --data.image_size 32 --data.batch_size 8"
)


@pytest.fixture
def spy(monkeypatch):
    """Records the fit commands the comparison starts (and still runs them)."""
    calls = []
    real_run = subprocess.run

    def run(command, **kwargs):
        calls.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(compare.subprocess, "run", run)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return calls


def test_compare_writes_tables_reuses_finished_runs_and_resumes_interrupted_ones(tmp_path, spy):
    config = tmp_path / "demo.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text())
    output = compare.run_comparison(config, "harmofl,fedavg", "0,1", tmp_path, TINY)
    assert len(spy) == 4
    with (output / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 3 * 2  # strategies x seeds x (clients + mean) x (accuracy, auroc)
    assert {row["strategy"] for row in rows} == {"harmofl", "fedavg"}
    table = (output / "comparison.md").read_text()
    assert "| harmofl |" in table and "| fedavg |" in table and "**" in table and " ± " in table
    assert (output / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    compare.run_comparison(config, "harmofl,fedavg", "0,1", tmp_path, TINY)
    assert len(spy) == 4  # every run reused

    (tmp_path / "fedavg" / "seed_1" / compare.DONE_FILE).unlink()  # as if killed after its last checkpoint
    compare.run_comparison(config, "harmofl,fedavg", "0,1", tmp_path, TINY)
    assert len(spy) == 5 and "--ckpt_path" in spy[-1]

    config.write_text(config.read_text().replace("rounds: 20", "rounds: 3"))  # an edited config is not reused
    compare.run_comparison(config, "fedavg", "1", tmp_path, TINY)
    assert len(spy) == 6 and "--ckpt_path" not in spy[-1]


def test_unknown_strategy_is_rejected_with_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match="'fedmagic'.*harmofl"):
        compare.run_comparison(strategies="harmofl,fedmagic", output_dir=tmp_path)


def test_compare_through_the_cli_uses_the_given_config(tmp_path):
    run_cli(
        "compare",
        "--config",
        "configs/demo_seg.yaml",
        "--strategies",
        "local",
        "--seeds",
        "3",
        "--output_dir",
        str(tmp_path),
        "--overrides",
        TINY,
    )
    table = (tmp_path / "comparison.md").read_text()
    assert "| local |" in table and "Test dice" in table and "--config configs/demo_seg.yaml" in table
