"""``trainer.evaluate_every_n_rounds``: clients evaluate after every n-th round and after the last; the other rounds
have training rows only, training is unchanged, and the best round is the best evaluated one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harmofl.checkpoint import load_checkpoint
from harmofl.cli import build
from harmofl.federation.run_record import RunRecord
from harmofl.reporting import read_metrics_csv

from helpers import FLOWER_TINY

THREE_ROUNDS = FLOWER_TINY.replace("trainer.rounds=2", "trainer.rounds=3")


def fit(folder: Path, every: int) -> Path:
    overrides = [f"--{item}" for item in THREE_ROUNDS.split()]
    cli = build(
        [
            "--config",
            "configs/demo.yaml",
            *overrides,
            f"--trainer.evaluate_every_n_rounds={every}",
            f"--trainer.default_root_dir={folder}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    return folder


def test_a_round_without_evaluation_is_recorded_but_never_the_best(tmp_path):
    record = RunRecord(tmp_path, rounds=3, held_out=[], metric="accuracy")
    record.add_round(1, {"a": {"train": {"loss": 0.5}, "val": {"accuracy": 0.4}}})
    rows = record.add_round(2, {"a": {"train": {"loss": 0.3}}})
    assert [(row["client"], row["split"]) for row in rows] == [("a", "train"), ("mean", "train")]
    assert record.best_round == 1 and record.last_score == 0.4
    assert "Round 2/3: not evaluated (last: round 1) (best round 1)" in record.round_line(2)


def test_evaluating_every_second_round_trains_the_same_and_picks_the_best_evaluated_round(tmp_path):
    torch.set_num_threads(1)  # both runs reduce in the same order
    every_round, every_second = fit(tmp_path / "every", 1), fit(tmp_path / "second", 2)
    full, sparse = (load_checkpoint(path / "checkpoints" / "last.ckpt") for path in (every_round, every_second))
    for key, value in full["global_state"].items():
        torch.testing.assert_close(sparse["global_state"][key], value, rtol=0, atol=0, msg=key)
    # Round 1 is not evaluated (rounds 2 and 3, the last, are): its train rows only.
    assert sparse["history"] == [row for row in full["history"] if row["round"] != 1 or row["split"] == "train"]
    assert read_metrics_csv(every_second / "metrics.csv") == sparse["history"]
    mean_val = {
        row["round"]: row["accuracy"] for row in full["history"] if (row["client"], row["split"]) == ("mean", "val")
    }
    best = max((2, 3), key=lambda round_number: (mean_val[round_number], -round_number))
    assert sparse["best_round"] == best
    assert json.loads((every_second / "summary.json").read_text())["best_round"] == best
    assert load_checkpoint(every_second / "checkpoints" / "best.ckpt")["round"] == best


def test_the_interval_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="evaluate_every_n_rounds must be >= 1"):
        fit(tmp_path, 0)
