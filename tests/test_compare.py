"""The comparison command: strategies × seeds as fit subprocesses, reuse, resume, and the tables."""

import csv
import json
import subprocess

import pytest

from harmofl import compare, compare_jobs, run_key
from harmofl.run_folder import RunFolderInUse, RunFolderLock

from helpers import REPO, run_cli

TINY = (
    "--trainer.rounds 1 --data.num_sites 2 --data.train_per_site 16 --data.val_per_site 8 "
    "--data.test_per_site 8 --data.image_size 32 --data.batch_size 8"
)


@pytest.fixture
def spy(monkeypatch):
    """Records the fit commands the comparison starts (and still runs them)."""
    calls = []
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        calls.append(list(command))
        return real_popen(command, **kwargs)

    monkeypatch.setattr(compare_jobs.subprocess, "Popen", popen)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return calls


def test_compare_writes_tables_reuses_finished_runs_and_resumes_interrupted_ones(tmp_path, spy):
    config = tmp_path / "demo.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text())
    output = compare.run_comparison(config, "harmofl,fedavg", "0,1", tmp_path, TINY)
    assert len(spy) == 4
    with (output / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2 * 2  # strategies x seeds x clients x (accuracy, auroc)
    assert {row["strategy"] for row in rows} == {"harmofl", "fedavg"}
    assert {(row["role"], row["fold"]) for row in rows} == {("in-federation", "")}
    table = (output / "comparison.md").read_text()
    assert "| harmofl |" in table and "| fedavg |" in table and " ± " in table and "| best |" in table
    assert "Unseen sites" not in table  # nothing was held out
    assert "| harmofl | " in table.split("Paired difference to fedavg")[1]
    assert (output / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    compare.run_comparison(config, "harmofl,fedavg", "0,1", tmp_path, TINY)
    assert len(spy) == 4  # every run reused

    (tmp_path / "fedavg" / "seed_1" / run_key.DONE_FILE).unlink()  # as if killed after its last checkpoint
    compare.run_comparison(config, "harmofl,fedavg", "0,1", tmp_path, TINY)
    assert len(spy) == 5 and "--ckpt_path" in spy[-1]

    # Other code, or an edited config: the finished run is neither reused nor overwritten.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_key, "code_version", lambda: "0.1.0+edited")
        refusal = r"seed_1' holds a run .* code version 0\.1\.0\+\w+, this is 0\.1\.0\+edited"
        with pytest.raises(FileExistsError, match=refusal):
            compare.run_comparison(config, "fedavg", "1", tmp_path, TINY)
    config.write_text(config.read_text().replace("rounds: 20", "rounds: 3"))
    with pytest.raises(FileExistsError, match=r"config file .*demo\.yaml changed.*--rerun_changed true"):
        compare.run_comparison(config, "fedavg", "1", tmp_path, TINY)
    assert len(spy) == 5
    finished = (tmp_path / "fedavg" / "seed_1" / "summary.json").read_text()
    compare.run_comparison(config, "fedavg", "1", tmp_path, TINY, rerun_changed=True)
    assert len(spy) == 6 and "--ckpt_path" not in spy[-1]
    [aside] = (tmp_path / "fedavg").glob("seed_1.replaced-*")
    assert (aside / "summary.json").read_text() == finished  # moved aside, not deleted


def test_leave_one_site_out_trains_without_each_site_and_tables_it_as_unseen(tmp_path, spy):
    config = tmp_path / "demo.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text())
    tiny = TINY.replace("--data.num_sites 2", "--data.num_sites 3")
    output = compare.run_comparison(config, "fedavg", "0", tmp_path, tiny, protocol="loso", held_out="site_0,site_2")
    assert len(spy) == 2
    assert [command[command.index("--trainer.held_out_clients") + 1] for command in spy] == ['["site_0"]', '["site_2"]']
    with (output / "comparison.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["metric"] == "accuracy"]
    unseen = {(row["fold"], row["client"]) for row in rows if row["role"] == "unseen"}
    assert unseen == {("site_0", "site_0"), ("site_2", "site_2")}  # each fold's held-out site, and only it
    trained = {(row["fold"], row["client"]) for row in rows if row["role"] == "in-federation"}
    assert trained == {("site_0", "site_1"), ("site_0", "site_2"), ("site_2", "site_0"), ("site_2", "site_1")}
    table = (output / "comparison.md").read_text()
    unseen_table = table.split("Unseen sites")[1]
    assert "| strategy | site_0 | site_2 | mean |" in unseen_table and "--protocol loso" in table
    assert (output / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "fedavg" / "site_2" / "seed_0" / "summary.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "loso", "held_out": "site_9"}, "Cannot hold out.*site_9.*site_0"),
        ({"held_out": "site_0"}, "needs --protocol loso"),
        ({"protocol": "lopo"}, "Unknown protocol 'lopo'"),
    ],
)
def test_bad_protocol_settings_are_refused_before_any_run(tmp_path, spy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare.run_comparison(str(REPO / "configs" / "demo.yaml"), "fedavg", "0", tmp_path, **kwargs)
    assert spy == []


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
    assert "No paired differences: the baseline 'fedavg' is not among the strategies" in table


def test_a_run_key_holds_the_code_version_and_every_config_file_the_run_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.yaml").write_text("class_path: harmofl.ClassificationClient\n")
    (tmp_path / "base.yaml").write_text("model: model.yaml\ntrainer:\n  rounds: 2\n")
    (tmp_path / "overlay.yaml").write_text("trainer:\n  rounds: 3\n")
    (tmp_path / "extra.yaml").write_text("{}\n")
    command = ["cli.py", "fit", "--config", "base.yaml", "--config=overlay.yaml", "--data", "extra.yaml"]
    key = run_key.run_key(command)
    assert list(key["config_sha256"]) == ["base.yaml", "overlay.yaml", "extra.yaml", "model.yaml"]
    assert key["code_version"] == run_key.code_version() and key["code_version"].startswith("0.1.0+")

    (tmp_path / "model.yaml").write_text("class_path: harmofl.SegmentationClient\n")  # a file the config names
    edited = run_key.run_key(command)
    assert edited != key and run_key.key_difference(key, edited) == "config file model.yaml changed"
    monkeypatch.setattr(run_key, "code_version", lambda: "0.1.0+other")
    assert "made by code version" in run_key.key_difference(edited, run_key.run_key(command))
    with pytest.raises(FileNotFoundError, match="'missing.yaml'"):
        run_key.run_key(["--config", "missing.yaml"])


@pytest.mark.parametrize("strategy", ["../x", "/tmp/x", "a/b", ".hidden", ".."])
def test_strategy_names_that_would_escape_the_output_folder_are_refused(tmp_path, spy, strategy):
    with pytest.raises(ValueError, match="neither plain names"):
        compare.run_comparison(str(REPO / "configs" / "demo.yaml"), strategy, "0", tmp_path / "out")
    assert spy == [] and not (tmp_path / "x").exists()


def test_an_overlay_file_outside_the_output_folder_runs_in_a_folder_named_by_its_sanitized_stem(tmp_path):
    overlay = tmp_path / "..my sweep;1.yaml"
    overlay.write_text("trainer:\n  rounds: 1\n")
    overlays = compare._overlays(f"fedavg,{overlay}")
    assert overlays == {"fedavg": compare.STRATEGY_DIR / "fedavg.yaml", "my_sweep_1": overlay}
    with pytest.raises(ValueError, match="'../evil/seed_0' would lie outside the output folder"):
        compare._inside(tmp_path / "out", compare.Path("..", "evil", "seed_0"))  # a site name of ".." (loso)


def test_a_second_comparison_into_the_same_output_folder_is_refused(tmp_path, spy):
    with RunFolderLock(tmp_path), pytest.raises(RunFolderInUse, match="being written by another run"):
        compare.run_comparison(str(REPO / "configs" / "demo.yaml"), "fedavg", "0", tmp_path)
    assert spy == []


def test_a_folder_with_files_compare_did_not_make_is_not_overwritten(tmp_path, spy):
    run = tmp_path / "fedavg" / "seed_0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"rounds": 9}))
    with pytest.raises(FileExistsError, match="fedavg/seed_0' holds a run .* records no key"):
        compare.run_comparison(str(REPO / "configs" / "demo.yaml"), "fedavg", "0", tmp_path, TINY)
    assert spy == [] and json.loads((run / "summary.json").read_text()) == {"rounds": 9}
