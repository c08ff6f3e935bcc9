"""Run folders: every output written atomically, and one writer per folder."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harmofl import reporting, run_folder
from harmofl.cli import main
from harmofl.run_folder import RunFolderInUse, RunFolderLock, atomic_write_text
from harmofl.trainer import FederatedTrainer

from helpers import CLI_TINY, REPO, tiny_classifier, tiny_histology

WRITERS = {
    "summary.json": lambda path: reporting.write_json({"rounds": 2}, path),
    "metrics.csv": lambda path: reporting.write_metrics_csv([{"round": 1, "client": "a", "split": "val"}], path),
    "convergence.png": lambda path: reporting.plot_lines({"a": [(1, 0.5), (2, 0.6)]}, "accuracy", path),
    "marker.json": lambda path: atomic_write_text(path, "new"),
}


def test_an_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "out" / "summary.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("name", WRITERS)
def test_a_write_that_fails_before_its_rename_keeps_the_old_file_and_the_other_writers_temporary_files(
    tmp_path, monkeypatch, name
):
    path = tmp_path / name
    path.write_text("old")
    # A concurrent writer of the same file, mid-write: its temporary file must survive our failure.
    concurrent = tmp_path / f"{run_folder.temporary_prefix(path)}other_writer"
    concurrent.write_text("half")

    def dying_replace(source, destination):
        raise OSError(28, "No space left on device")  # the disk filled, or the process was stopped, here

    monkeypatch.setattr(run_folder.os, "replace", dying_replace)
    with pytest.raises(OSError, match="No space left"):
        WRITERS[name](path)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, concurrent.name])


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="killed"), run_folder.atomic_file(path) as handle:
        handle.write(b"round,cl")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_a_second_writer_of_a_folder_is_refused_with_the_holder_and_what_to_do(tmp_path):
    with RunFolderLock(tmp_path / "run"):
        # A second open file description, as another process would have: flock refuses it too.
        with pytest.raises(RunFolderInUse, match=r"'.*run' is being written by another run \(pid \d+ on .+: .*\)"):
            RunFolderLock(tmp_path / "run").acquire()
        with pytest.raises(RunFolderInUse, match="another folder .*--trainer.default_root_dir"):
            RunFolderLock(tmp_path / "run").acquire()
    with RunFolderLock(tmp_path / "run") as lock:  # released: free again
        assert lock.held


# Loads run_folder.py alone (standard library only): the holder starts in a fraction of a second. It holds the
# lock of folder argv[2], forks a child if asked (as a DataLoader worker is forked while a run holds its folder),
# prints the child's pid (0: none) and sleeps.
HOLDER = textwrap.dedent(
    """
    import importlib.util, multiprocessing, sys, time
    spec = importlib.util.spec_from_file_location("run_folder", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.RunFolderLock(sys.argv[2]).acquire()
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
    if sys.argv[3] == "fork":
        worker.start()
    print(worker.pid or 0, flush=True)
    time.sleep(60)
    """
)


def start_holder(folder: Path, fork: bool) -> tuple[subprocess.Popen, int]:
    """A process holding ``folder``'s lock, and its forked child's pid (0 without ``fork``)."""
    mode = "fork" if fork else "alone"
    command = [sys.executable, "-c", HOLDER, str(REPO / "harmofl" / "run_folder.py"), str(folder), mode]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    return holder, int(holder.stdout.readline())


def test_a_live_holder_in_another_process_blocks_and_a_killed_one_does_not(tmp_path):
    folder = tmp_path / "run"
    holder, _ = start_holder(folder, fork=False)
    try:
        with pytest.raises(RunFolderInUse, match=f"pid {holder.pid} on "):
            RunFolderLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: the kernel releases the lock
        holder.wait(timeout=10)
    with RunFolderLock(folder):
        pass


def test_a_killed_holder_frees_its_folder_though_its_forked_workers_live_on(tmp_path):
    folder = tmp_path / "run"
    holder, worker = start_holder(folder, fork=True)
    try:
        with pytest.raises(RunFolderInUse):
            RunFolderLock(folder).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        os.kill(worker, 0)  # the orphaned worker is still alive...
        with RunFolderLock(folder):  # ...and holds no copy of the lock
            pass
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_a_fit_into_a_held_folder_is_refused_before_it_writes_and_releases_the_lock_when_it_fails(trainer_kwargs):
    folder = Path(trainer_kwargs["default_root_dir"])
    with RunFolderLock(folder):
        with pytest.raises(RunFolderInUse, match="being written by another run"):
            FederatedTrainer(rounds=1, **trainer_kwargs).fit(tiny_classifier(), tiny_histology())
        assert [p.name for p in folder.iterdir()] == [run_folder.LOCK_FILE]
    missing = str(folder.parent / "none.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FederatedTrainer(rounds=1, **trainer_kwargs).fit(tiny_classifier(), tiny_histology(), ckpt_path=missing)
    with RunFolderLock(folder):  # the failed fit gave the folder back
        pass


def test_cli_fit_into_a_folder_another_fit_holds_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    arguments = ["fit", "--config", "configs/demo.yaml", *CLI_TINY, "--trainer.default_root_dir", str(folder)]
    monkeypatch.setattr(sys, "argv", ["cli.py", *arguments])
    monkeypatch.chdir(REPO)
    with RunFolderLock(folder), pytest.raises(RunFolderInUse, match=str(folder)):
        main()
    assert [p.name for p in folder.iterdir()] == [run_folder.LOCK_FILE]  # no config.yaml, checkpoint or metrics
    assert json.loads((folder / run_folder.LOCK_FILE).read_text())["pid"] > 0


def test_outputs_of_a_plot_are_complete_files(tmp_path):
    path = tmp_path / "convergence.png"
    WRITERS["convergence.png"](path)
    assert path.read_bytes()[:4] == b"\x89PNG" and Path(path).stat().st_size > 1000
