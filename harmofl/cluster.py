"""``compare --launcher submitit``: the comparison's fits as jobs of a cluster, through `submitit`_ (a SLURM job
array; its ``local`` and ``debug`` executors run the same jobs on this machine).

The jobs are the :class:`~harmofl.compare_jobs.FitJob` s a local comparison would run, with the same reuse and
resume markers: each cluster job runs :func:`~harmofl.compare_jobs.run_logged` (the fit's output in its run
folder's ``compare_fit.log``), compare waits for all of them, marks each that succeeded done, and builds the tables
from the run folders as it does locally. The cluster gives each job its devices and cores (``gpus_per_node``,
``cpus_per_task`` of ``--submitit_parameters``); submitit's own logs go to ``<output>/submitit``. The optional
extra installs it: ``pip install -e .[cluster]``.

.. _submitit: https://github.com/facebookincubator/submitit
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harmofl.compare_jobs import FitJob, run_logged
from harmofl.run_key import mark_done


def import_submitit() -> Any:
    """The ``submitit`` module, or an error saying how to install it."""
    try:
        import submitit
    except ImportError as error:
        raise ImportError(
            "compare --launcher submitit needs the optional package submitit: pip install -e .[cluster] "
            "(or pip install 'submitit>=1.5'), or run the fits on this machine with --launcher local."
        ) from error
    return submitit


def run_fits_on_cluster(
    jobs: Sequence[FitJob],
    folder: Path,
    parallelism: int,
    parameters: Mapping[str, Any],
    cluster: str | None = None,
    environment: Mapping[str, str] | None = None,
) -> list[FitJob]:
    """Submit ``jobs`` as one job array, at most ``parallelism`` running at once, and wait for all of them; mark
    each that succeeds done; return those that failed. On Ctrl-C or an error, every job is cancelled.

    Args:
        jobs: the fits, as a local comparison runs them.
        folder: submitit's folder (its pickles and each job's own log).
        parallelism: SLURM's array parallelism (``--jobs``).
        parameters: ``AutoExecutor.update_parameters`` arguments, e.g. ``{"slurm_partition": "gpu",
            "timeout_min": 120, "gpus_per_node": 1, "cpus_per_task": 8}``.
        cluster: submitit's cluster: None picks SLURM where it is installed, else ``local``; ``debug`` runs the
            jobs one by one in this process.
        environment: variables every fit gets on top of the job's (thread counts).
    """
    submitit = import_submitit()
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**{"name": "harmofl-compare", "slurm_array_parallelism": parallelism, **parameters})
    submitted = executor.map_array(run_logged, jobs, [dict(environment or {})] * len(jobs))
    failed = []
    try:
        for fit, job in zip(jobs, submitted):
            if _exit_status(fit, job, submitit) == 0:
                mark_done(fit.directory, fit.key)
            else:
                failed.append(fit)
    except BaseException:
        for job in submitted:
            job.cancel(check=False)
        raise
    return failed


def _exit_status(fit: FitJob, job: Any, submitit: Any) -> int:
    """The fit's exit status; -1 when the cluster job itself failed (timed out, preempted, node lost), whose
    reason is in submitit's log of the job, named here."""
    try:
        return int(job.result())
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
        print(f"{fit.label}: the cluster job {job.job_id} failed; its log: {job.paths.stderr}\n{error}", flush=True)
        return -1
