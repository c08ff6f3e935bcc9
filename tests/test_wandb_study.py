"""A comparison with a W&B logger is one W&B group (offline here): a run per fit and a summary run."""

import json
import sys

from harmofl import cli

from helpers import REPO

TINY = [
    "--trainer.rounds", "1", "--data.num_sites", "2", "--data.train_per_site", "16", "--data.val_per_site", "8",
    "--data.test_per_site", "8", "--data.image_size", "32", "--data.batch_size", "8",
]  # fmt: skip


def test_a_comparison_is_one_wandb_group_of_named_runs_and_a_summary_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    output = tmp_path / "study"
    arguments = ["--config", str(REPO / "configs" / "demo.yaml"), "--strategies", "fedavg", "--seeds", "0"]
    logger = ["--trainer.logger", "WandbLogger", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    monkeypatch.setattr(
        sys, "argv", ["cli.py", "compare", *arguments, *TINY, *logger, f"--trainer.default_root_dir={output}"]
    )
    cli.main()

    # An offline run is one protobuf record log (wandb ships no reader): its strings are stored as they are.
    records = [run.read_bytes() for run in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert len(records) == 2
    fit = next(record for record in records if b"fedavg-seed0" in record)
    summary = next(record for record in records if b"comparison_table" in record)
    for series in (b"site_0/val/accuracy", b"site_1/test/accuracy", b"mean/test/accuracy", b"trainer/global_step"):
        assert series in fit  # per-client and mean curves, stepped by round
    assert b"seed_everything" in fit and b"DemoHistology" in fit  # the resolved config
    assert b"study" in fit and b"study" in summary  # one group, named after the output folder
    assert b"summary" in summary and b"comparison" in summary and b"image-file" in summary
    assert json.loads((output / "fedavg" / "seed_0" / "compare_done.json").read_text())  # a normal compare run
