"""``compare --jobs N``: fits side by side, each with its slot's GPU and threads; failures, interruptions, reuse; the
cluster launcher (submitit's local executor)."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from harmofl import compare, compare_jobs, run_key
from harmofl.compare_jobs import FitJob

from helpers import REPO

TINY = (
    "--trainer.rounds 1 --data.num_sites 2 --data.train_per_site 16 --data.val_per_site 8 "
    "--data.test_per_site 8 --data.image_size 32 --data.batch_size 8"
)


def python_job(tmp_path, name, code):
    """A job running ``code`` in Python, with its run folder ``tmp_path / name``."""
    return FitJob(name, (sys.executable, "-c", code), tmp_path / name, {"job": name})


@pytest.mark.parametrize(
    ("jobs", "cores", "gpus", "threads_per_job", "expected"),
    [
        (2, 2, [], 0, [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 2),
        (1, 2, [], 0, [{"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}]),
        (3, 16, [], 0, [{"OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"}] * 3),
        (4, 2, [], 0, [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 4),  # never 0 threads
        (2, 16, [], 3, [{"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}] * 2),
        (
            2,
            16,
            ["4", "6", "7"],
            0,
            [
                {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "CUDA_VISIBLE_DEVICES": "4"},
                {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "CUDA_VISIBLE_DEVICES": "6"},
            ],
        ),
    ],
)
def test_each_slot_gets_its_share_of_the_cores_and_a_gpu_of_its_own(jobs, cores, gpus, threads_per_job, expected):
    assert compare_jobs.job_environments(jobs, cores, gpus, threads_per_job) == expected


def test_more_jobs_than_gpus_are_refused_before_any_run(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--jobs 3 would put two fits on one GPU.*\(0,1\).*--jobs 2 or fewer"):
        compare_jobs.job_environments(3, 16, ["0", "1"])
    with pytest.raises(ValueError, match="--jobs must be at least 1, got 0"):
        compare_jobs.job_environments(0, 16, [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert compare_jobs.visible_gpus() == ["0", "1"]
    with pytest.raises(ValueError, match="--jobs 3 would put two fits on one GPU"):
        compare.run_comparison(str(REPO / "configs" / "demo.yaml"), "fedavg", "0,1,2", tmp_path, TINY, jobs=3)
    assert list(tmp_path.iterdir()) == []  # nothing claimed, nothing run
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert compare_jobs.visible_gpus() == []


def test_a_failing_job_is_reported_with_its_log_while_the_others_finish(tmp_path):
    report = "import os; print('threads', os.environ['OMP_NUM_THREADS'], os.environ['SLOT'])"
    jobs = [
        python_job(tmp_path, "fails", "import sys; print('bad setting'); sys.exit(3)"),
        python_job(tmp_path, "first", report),
        python_job(tmp_path, "second", report),
    ]
    slots = [{"OMP_NUM_THREADS": "1", "SLOT": "a"}, {"OMP_NUM_THREADS": "1", "SLOT": "b"}]
    assert compare_jobs.run_fits(jobs, slots) == [jobs[0]]
    for job in jobs[1:]:
        log = job.log.read_text().splitlines()
        slot = log[1].removeprefix("threads 1 ")  # the slot the job ran with, recorded with its command line
        assert slot in ("a", "b") and log[0] == f"OMP_NUM_THREADS=1 SLOT={slot} {shlex.join(job.command)}"
        assert json.loads((job.directory / run_key.DONE_FILE).read_text()) == {"job": job.label}
    assert not (jobs[0].directory / run_key.DONE_FILE).exists()
    message = compare_jobs.failure_report([jobs[0]], 3)
    assert message.startswith("1 of 3 fits failed") and f"- fails: log {jobs[0].log}" in message
    assert "bad setting" in message


def test_ctrl_c_kills_every_running_fit_and_its_children(tmp_path):
    # Each job starts a child that outlives it unless its process group is killed (as Fabric's processes would).
    code = (
        "import subprocess, sys, time, pathlib; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "pathlib.Path('{pid}').write_text(str(child.pid)); time.sleep(60)"
    )
    pid_files = [tmp_path / f"child_{index}.pid" for index in range(2)]
    jobs = [python_job(tmp_path, f"job_{index}", code.format(pid=pid)) for index, pid in enumerate(pid_files)]
    jobs.append(python_job(tmp_path, "never_started", "print('ran')"))

    def interrupt_when_the_children_run():
        while not all(pid.is_file() and pid.read_text() for pid in pid_files):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_the_children_run, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        compare_jobs.run_fits(jobs, [{}, {}])
    assert time.monotonic() - started < 50  # not waited for: killed
    assert not jobs[2].log.exists()
    for pid_file in pid_files:
        assert not _alive(int(pid_file.read_text()))


def _alive(pid, wait=5.0):
    """Whether ``pid`` still runs after ``wait`` seconds (a killed orphan is reaped by init meanwhile)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    return True


def test_jobs_side_by_side_give_the_same_tables_as_one_at_a_time_and_honour_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU, whatever the machine has
    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(
        compare_jobs.subprocess, "Popen", lambda command, **kw: started.append(command) or real_popen(command, **kw)
    )
    config = tmp_path / "demo.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text())
    broken = tmp_path / "broken.yaml"
    # A valid config (compare checks every config before any run) whose fit fails once it starts.
    broken.write_text("model:\n  init_args:\n    weights_path: no_such_weights.pt\n")
    side_by_side, one_by_one = tmp_path / "jobs_2", tmp_path / "jobs_1"

    # The broken overlay's fit fails at once; the other still runs, and compare names the failure and its log.
    with pytest.raises(RuntimeError, match=r"1 of 2 fits failed") as failure:
        compare.run_comparison(config, f"{broken},fedavg", "0", side_by_side, TINY, jobs=2, threads_per_job=1)
    log = side_by_side / "broken" / "seed_0" / "compare_fit.log"
    assert f"- broken seed 0: log {log}" in str(failure.value) and "no_such_weights.pt" in str(failure.value)
    assert (side_by_side / "fedavg" / "seed_0" / run_key.DONE_FILE).is_file() and len(started) == 2

    compare.run_comparison(config, "fedavg", "0,1", side_by_side, TINY, jobs=2, threads_per_job=1)
    assert len(started) == 3 and started[-1][started[-1].index("--seed_everything") + 1] == "1"  # seed 0 reused
    compare.run_comparison(config, "fedavg", "0,1", one_by_one, TINY, jobs=1, threads_per_job=1)
    assert len(started) == 5
    for name in ("comparison.csv", "comparison.md", "comparison.png"):
        assert (side_by_side / name).read_bytes() == (one_by_one / name).read_bytes(), name
    with (one_by_one / "comparison.csv").open() as handle:
        assert {(row["seed"], row["client"]) for row in csv.DictReader(handle)} == {
            (seed, client) for seed in ("0", "1") for client in ("site_0", "site_1")
        }


def test_the_cluster_launcher_runs_the_same_jobs_through_submitit(tmp_path):
    pytest.importorskip("submitit")
    from harmofl import cluster

    jobs = [
        python_job(tmp_path, "fails", "import sys; print('bad setting'); sys.exit(2)"),
        python_job(tmp_path, "works", "import os; print('threads', os.environ['OMP_NUM_THREADS'])"),
    ]
    failed = cluster.run_fits_on_cluster(
        jobs, tmp_path / ".submitit", 2, {"timeout_min": 5}, "local", {"OMP_NUM_THREADS": "1"}
    )
    assert failed == [jobs[0]] and "bad setting" in jobs[0].log.read_text()
    assert jobs[1].log.read_text().splitlines()[1] == "threads 1"
    assert (jobs[1].directory / run_key.DONE_FILE).is_file() and not (jobs[0].directory / run_key.DONE_FILE).exists()


def test_the_cluster_launcher_says_how_to_install_submitit(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[cluster\]"):
        compare.run_comparison(str(REPO / "configs" / "demo.yaml"), "fedavg", "0", tmp_path, launcher="submitit")
    assert list(tmp_path.iterdir()) == []
