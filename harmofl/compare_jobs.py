"""How ``compare`` runs its fits: ``--jobs N`` of them at once on this machine, each a process of its own.

Each running fit holds one *slot*: a GPU of its own where CUDA devices are visible (``CUDA_VISIBLE_DEVICES`` set to
that one device), and its share of the CPU cores in any case (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``, which
torch reads at start-up for its thread pool and Lightning leaves alone once set). A standard bounded thread pool
starts the fits; each fit runs in a session of its own, its output in ``<run folder>/compare_fit.log``, and its whole
process group (Fabric's extra processes included) is killed when it ends, when compare is interrupted (Ctrl-C) or
when compare itself fails. A failed fit does not stop the others: :func:`run_fits` returns the failed ones once all
have ended. A cluster runs the same :class:`FitJob` s through :mod:`harmofl.cluster`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import shlex
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmofl.run_key import mark_done

LOG_FILE = "compare_fit.log"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class FitJob:
    """One fit to run: its words for messages, its full command line (interpreter first), its run folder, and the
    run key written to the folder's done marker once it succeeds, and variables of its own (W&B's run name)."""

    label: str
    command: tuple[str, ...]
    directory: Path
    key: Mapping[str, Any] = field(compare=False)
    environment: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def log(self) -> Path:
        """Where the fit's standard output and error go (appended: a resumed run keeps its first attempt's)."""
        return self.directory / LOG_FILE


def visible_gpus(environment: Mapping[str, str] = os.environ) -> list[str]:
    """The CUDA devices a fit may be given, as ``CUDA_VISIBLE_DEVICES`` names them: that variable's entries where
    it is set (``""``: none), else every device torch counts."""
    if "CUDA_VISIBLE_DEVICES" in environment:
        return [device.strip() for device in environment["CUDA_VISIBLE_DEVICES"].split(",") if device.strip()]
    import torch  # only here: the pool itself needs no torch

    return [str(index) for index in range(torch.cuda.device_count())]


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, which a container or ``taskset`` may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def job_environments(jobs: int, cores: int, gpus: Sequence[str], threads_per_job: int = 0) -> list[dict[str, str]]:
    """The environment of each of ``jobs`` slots: ``threads_per_job`` CPU threads (0: ``cores // jobs``, at least
    1) and, where ``gpus`` are visible, one GPU each.

    Raises:
        ValueError: ``jobs`` below 1, ``threads_per_job`` negative, or more jobs than visible GPUs.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}.")
    if threads_per_job < 0:
        raise ValueError(f"--threads_per_job must be 0 (the cores shared out) or more, got {threads_per_job}.")
    if gpus and jobs > len(gpus):
        raise ValueError(
            f"--jobs {jobs} would put two fits on one GPU: {len(gpus)} CUDA device(s) are visible ({','.join(gpus)}). "
            f"Pass --jobs {len(gpus)} or fewer, or CUDA_VISIBLE_DEVICES='' to run the fits on the CPU."
        )
    threads = str(threads_per_job or max(1, cores // jobs))
    return [
        {**dict.fromkeys(THREAD_VARIABLES, threads), **({"CUDA_VISIBLE_DEVICES": gpus[slot]} if gpus else {})}
        for slot in range(jobs)
    ]


def start_fit(job: FitJob, environment: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``job``'s command in a session of its own (its process group is the fit's processes), with this process's
    environment updated by ``job.environment`` and ``environment``; the command line and its output appended to
    ``job.log``."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with job.log.open("ab") as log:
        environment = {**job.environment, **environment}
        settings = " ".join(f"{name}={value}" for name, value in sorted(environment.items()))
        log.write(f"{settings} {shlex.join(job.command)}\n".lstrip().encode())
        log.flush()
        return subprocess.Popen(
            job.command, env={**os.environ, **environment}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``process`` leads (what is left of it)."""
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited already
        os.killpg(process.pid, signal.SIGKILL)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """:func:`kill_group`, then wait for ``process``."""
    kill_group(process)
    process.wait()


def run_logged(job: FitJob, environment: Mapping[str, str]) -> int:
    """Run ``job`` to its end as :func:`start_fit` starts it and return its exit status; nothing of it outlives
    the call, even when it is interrupted (a cluster job runs this)."""
    process = start_fit(job, environment)
    try:
        return process.wait()
    finally:
        stop_group(process)


def run_fits(jobs: Sequence[FitJob], slots: Sequence[Mapping[str, str]]) -> list[FitJob]:
    """Run ``jobs`` (in their order), ``len(slots)`` at a time, each with a free slot's environment; mark each that
    succeeds done; return those that failed, once every job has ended. On an error or Ctrl-C, every running fit's
    process group is killed, no further job starts, and the exception propagates."""
    free: queue.SimpleQueue[Mapping[str, str]] = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)
    running: set[subprocess.Popen[bytes]] = set()
    guard = threading.Lock()
    stopping = threading.Event()

    def run(job: FitJob) -> bool:
        slot = free.get_nowait()  # never empty: the pool runs as many jobs at once as there are slots
        try:
            with guard:
                if stopping.is_set():
                    return False
                process = start_fit(job, slot)
                running.add(process)
            try:
                succeeded = process.wait() == 0
            finally:
                stop_group(process)  # what Fabric's launcher left behind, or the whole fit on an interruption
                with guard:
                    running.discard(process)
            if succeeded:
                mark_done(job.directory, job.key)
            outcome = "finished" if succeeded else "stopped" if stopping.is_set() else "FAILED"
            print(f"{outcome} {job.label} (log: {job.log})", flush=True)
            return succeeded
        finally:
            free.put(slot)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(slots)), thread_name_prefix="fit") as pool:
        futures = [pool.submit(run, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()  # an error stops everything at once, not when the jobs before it have ended
            succeeded = [future.result() for future in futures]
        except BaseException:
            stopping.set()
            for future in futures:
                future.cancel()
            with guard:
                for process in running:
                    kill_group(process)
            raise
    return [job for job, success in zip(jobs, succeeded) if not success]


def failure_report(failed: Sequence[FitJob], total: int, lines: int = 15) -> str:
    """The message compare fails with: each failed fit, its log file and the log's last ``lines`` lines."""
    parts = [f"{len(failed)} of {total} fits failed (the others finished and are kept for a rerun to reuse):"]
    for job in failed:
        tail = job.log.read_text(errors="replace").splitlines()[-lines:] if job.log.is_file() else ["(no log)"]
        parts += [f"- {job.label}: log {job.log}", *(f"    {line}" for line in tail)]
    return "\n".join(parts)
