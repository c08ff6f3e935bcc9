"""``cli.py compare`` takes fit's own arguments: split, checked once by fit's parser, passed to every run."""

import shlex
import sys

import pytest

from harmofl import cli, compare, compare_cli

from helpers import REPO

CONFIG = str(REPO / "configs" / "demo.yaml")


def test_fit_arguments_are_split_from_compares_and_join_the_overrides():
    arguments = ["--config", CONFIG, "--trainer.rounds", "1", "--overrides", "--data.image_size 32", "--seeds", "4"]
    arguments += ["--trainer.default_root_dir", "runs/x", "--model.init_args.alpha=0", "--jobs", "2"]
    settings, print_config = compare_cli.settings_from(arguments)
    assert not print_config
    assert settings["output_dir"] == "runs/x" and settings["seeds"] == "4" and settings["jobs"] == 2
    assert shlex.split(settings["overrides"]) == [
        "--trainer.rounds", "1", "--model.init_args.alpha=0", "--data.image_size", "32"
    ]  # fmt: skip


def test_seed_everything_is_one_seed_and_contradictions_are_refused():
    assert compare_cli.settings_from(["--seed_everything", "7"])[0]["seeds"] == "7"
    with pytest.raises(ValueError, match="--seed_everything 7 and --seeds 1"):
        compare_cli.settings_from(["--seed_everything", "7", "--seeds", "1"])
    with pytest.raises(ValueError, match="both name the comparison's output folder"):
        compare_cli.settings_from(["--trainer.default_root_dir", "a", "--output_dir", "b"])


def test_a_typo_in_a_fit_argument_fails_before_any_run_naming_the_key(tmp_path, monkeypatch):
    arguments = ["--config", CONFIG, "--strategies", "fedavg", "--trainer.roundz", "1"]
    monkeypatch.setattr(sys, "argv", ["cli.py", "compare", *arguments, "--trainer.default_root_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"strategy 'fedavg'.*--trainer.roundz"):
        cli.main()
    assert not any(tmp_path.iterdir())  # nothing started


def test_an_overlay_decides_which_keys_are_valid():
    # DP-FedAvg's overlay configures an aggregator with a clipping norm; FedAvg's has none to set.
    overlays = {name: compare.STRATEGY_DIR / f"{name}.yaml" for name in ("dp_fedavg", "fedavg")}
    with pytest.raises(ValueError, match="strategy 'fedavg'"):
        compare.check_fit_arguments(
            REPO / "configs" / "demo.yaml", overlays, ["--trainer.aggregator.init_args.clipping_norm", "2"]
        )


def test_help_lists_each_strategy_with_its_overlays_first_line(capsys):
    with pytest.raises(SystemExit):
        compare_cli.settings_from(["--help"])
    help_text = capsys.readouterr().out
    assert "  fedavg         FedAvg (McMahan et al. 2017)" in help_text and "--trainer.default_root_dir" in help_text


def test_print_config_shows_compares_settings_and_the_fit_config(capsys, monkeypatch):
    arguments = ["--config", CONFIG, "--trainer.rounds", "3", "--print_config"]
    monkeypatch.setattr(sys, "argv", ["cli.py", "compare", *arguments])
    cli.main()
    printed = capsys.readouterr().out
    assert "compare:\n" in printed and "overrides: --trainer.rounds 3" in printed and "  rounds: 3\n" in printed


def test_the_fit_arguments_are_part_of_each_runs_key(tmp_path):
    """No fit runs: the run folder is claimed with the key of a command that holds the fit arguments, and a
    changed argument is a run of another key, which compare refuses to overwrite."""
    run = compare.Run("fedavg", compare.STRATEGY_DIR / "fedavg.yaml", 0, "", tmp_path / "fedavg" / "seed_0")
    job = compare._fit_job(REPO / "configs" / "demo.yaml", run, ["--trainer.rounds", "1"], False, None)
    assert job is not None and job.key["command"][-2:] == ["--trainer.rounds", "1"] and not job.environment
    with pytest.raises(FileExistsError, match="its command was"):
        compare._fit_job(REPO / "configs" / "demo.yaml", run, ["--trainer.rounds", "2"], False, None)
