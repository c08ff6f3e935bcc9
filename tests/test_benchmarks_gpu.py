"""benchmarks/gpu.py without a GPU: it refuses clearly, and its CPU dry run prints every row of its table."""

import os
import re
import subprocess
import sys

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    # No CUDA device, even on a machine with one; one thread per process, as the suite's other runs.
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,  # Fabric's extra process of the 2-process row goes with the session
    )


def test_refuses_without_cuda_naming_it():
    process = run_script("--quick")
    assert process.returncode != 0
    assert "benchmarks/gpu.py needs a CUDA device; torch.cuda.is_available() is False" in process.stderr
    assert "--cpu-dry-run" in process.stderr  # what to do instead
    assert "Traceback" not in process.stderr


def test_cpu_dry_run_prints_every_row():
    process = run_script("--cpu-dry-run", "--quick")
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    table = process.stdout[process.stdout.index("\nmeasure") :].strip().split("\n\n")[0]  # up to the blank line
    # Columns are 2 or more spaces apart: measure, setting, result, relative, note.
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[1:]]
    expected = [  # (measure, setting) of every row, in order, and a piece of its result
        ("client step", "fp32", "steps/s"),
        ("client step", "bf16-mixed", "steps/s"),
        ("client step", "bf16-mixed, channels-last", "steps/s"),
        ("client step", "bf16-mixed, channels-last, torch.compile", "steps/s"),
        ("harmonization", "reference preset", "ms/batch"),
        ("harmonization", "paper preset", "ms/batch"),
        ("orchestrator/plain", "demo classification", ""),
        ("client parallelism", "2 processes on 2 CPU devices vs 1", "x"),
    ]
    assert len(rows) == len(expected), table
    for row, (measure, setting, result) in zip(rows, expected):
        assert row[0].startswith(measure) and (row[1] == setting or row[1].startswith(f"{setting}, ")), (row, table)
        assert result in row[2] and row[2] != "failed", (row, table)
    for row in rows[-2:]:  # the orchestrator did the plain loop's work, with 1 process and with 2
        assert row[-1].startswith("same work: weights 0.0e+00"), (row, table)
