"""``python cli.py compare``: every strategy × seed (× held-out site) on the same data and splits, then tables.

A strategy is a YAML overlay in ``configs/strategies/`` (or any overlay file) applied on top of the base config
(HarmoFL as configured, FedAvg, FedBN, FedProx, FedNova, FedAvgM, FedAdam, FedYogi, SCAFFOLD, MOON, FedSAM,
FedDG's amplitude exchange, FedRDN, FedFA, harmonization only, local training, pooled centralized training).

Protocols: ``federated`` trains one federation of every site per strategy and seed (sites the base config holds
out stay unseen); ``loso`` (leave one site out) trains one federation per held-out site, which evaluates the global
model every round without ever training or sending anything.

Each run is a ``cli.py fit`` subprocess writing to ``<output>/<strategy>/seed_<seed>`` (``loso``:
``<output>/<strategy>/<site>/seed_<seed>``), its output in the run folder's ``compare_fit.log``; ``--jobs N`` runs N
at once, each on a GPU of its own or its share of the CPU cores (:mod:`harmofl.compare_jobs`), ``--launcher
submitit`` as jobs of a cluster (:mod:`harmofl.cluster`). A failed fit does not stop the others; compare then fails,
naming each failed run and its log. The tables are built from the run folders once every fit has ended, so they do
not depend on ``--jobs``. Outputs: ``comparison.csv`` (one row per test metric of a client in a
run), ``comparison.md`` (in-federation and unseen-site tables, mean ± 95 % CI over seeds, paired differences to the
baseline with Wilcoxon p-values, "tied" where the best is not distinguishable) and ``comparison.png`` (convergence
per strategy, averaged over seeds and folds). Fit's own arguments (``--trainer.*``, ``--model.*``, ``--data.*``;
:mod:`harmofl.compare_cli`) are checked with each strategy's overlay by fit's parser before any run starts
(:func:`check_fit_arguments`). With a ``WandbLogger`` the comparison is one W&B group (:mod:`harmofl.compare_wandb`).

Reuse. A run folder records the key of the run it holds (:func:`harmofl.run_key.run_key`: the fit command, the code
version, the SHA-256 of every config file the run reads) in ``compare_started.json``, then ``compare_done.json``
once finished. A finished run with the same key is reused, an interrupted one continues from its ``last.ckpt``. A
folder holding a run made with another key (or files compare did not make) is never overwritten: compare refuses,
naming the folder and how the keys differ; pass a new ``--output_dir``, or ``--rerun_changed true`` to move the old
run aside to ``<run>.replaced-<UTC time>`` (kept, not deleted) and run again.

Safety. Compare holds its output folder's lock and each fit its run folder's (:mod:`harmofl.run_folder`), so a
second comparison into the same folder is refused; every file is written atomically. Strategy names are plain names
(no ``/``, no ``..``) or overlay files, whose run folders take the file's sanitized stem; every run folder is
checked to lie inside the output folder.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentError

from harmofl import cluster, compare_jobs, compare_report, compare_wandb
from harmofl.compare_jobs import FitJob
from harmofl.compare_report import Run
from harmofl.run_folder import RunFolderLock, atomic_write_text
from harmofl.run_key import claim, finished, run_key

REPO = Path(__file__).resolve().parents[1]
STRATEGY_DIR = REPO / "configs" / "strategies"
DEFAULT_STRATEGIES = (
    "harmofl,fedavg,fedbn,fedprox,fednova,fedavgm,fedadam,fedyogi,scaffold,moon,fedsam,harmonization,local,pooled"
)
Protocol = Literal["federated", "loso"]
Launcher = Literal["local", "submitit"]
# A strategy name becomes a folder name: one path component, no hidden or parent folder.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def available_strategies() -> list[str]:
    return sorted(path.stem for path in STRATEGY_DIR.glob("*.yaml"))


def run_comparison(
    config: str = "configs/demo.yaml",
    strategies: str = DEFAULT_STRATEGIES,
    seeds: str = "0,1,2",
    output_dir: str | None = None,
    overrides: str = "",
    protocol: Protocol = "federated",
    held_out: str = "",
    baseline: str = "fedavg",
    rerun_changed: bool = False,
    jobs: int = 1,
    threads_per_job: int = 0,
    launcher: Launcher = "local",
    submitit_parameters: dict[str, Any] | None = None,
    submitit_cluster: str | None = None,
) -> Path:
    """Run every strategy × seed on ``config`` and write comparison.csv / .md / .png.

    Args:
        config: the base configuration (data, model, trainer); HarmoFL as configured there.
        strategies: comma-separated names of ``configs/strategies/*.yaml``, or paths of other overlay files
            (a sweep's variants), named by their file name.
        seeds: comma-separated seeds (``seed_everything`` of each run).
        output_dir: where runs and results go; default ``runs/compare_<config name>`` (``_loso`` appended).
        overrides: extra ``cli.py fit`` arguments for every run, e.g. ``"--trainer.rounds 5"`` (on the command
            line, fit's arguments may also be given directly: ``--trainer.rounds 5``). Part of each run's key.
        protocol: ``federated`` (one federation of every site) or ``loso`` (leave one site out: one federation
            per held-out site, which is evaluated as an unseen site).
        held_out: ``loso`` only: comma-separated sites to hold out in turn; default every site of the data.
        baseline: the strategy every other one is compared with, pair by pair (seed × site).
        rerun_changed: a run folder holding a run made with another key (code, config files or command) is moved
            aside to ``<run>.replaced-<UTC time>`` and run again; without it compare refuses to touch it.
        jobs: how many fits run at once. On this machine each gets a GPU of its own where CUDA devices are visible
            (at most one job per device) and its share of the cores; with ``submitit``, the array's parallelism.
        threads_per_job: CPU threads of each fit (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``); 0: the cores //
            ``jobs`` on this machine, the cluster's allocation with ``submitit``.
        launcher: ``local`` (this machine) or ``submitit`` (a cluster's job array; ``pip install -e .[cluster]``).
        submitit_parameters: ``submitit.AutoExecutor.update_parameters`` arguments, e.g. ``{"slurm_partition":
            "gpu", "timeout_min": 120, "gpus_per_node": 1, "cpus_per_task": 8}``.
        submitit_cluster: submitit's cluster: unset picks SLURM where it is installed; ``local`` or ``debug`` try
            the jobs on this machine.

    Returns:
        The output folder.
    """
    overlays = _overlays(strategies)
    seed_values = [int(seed) for seed in seeds.split(",") if seed.strip()]
    if not seed_values:
        raise ValueError(f"Give at least one seed, got {seeds!r}.")
    if protocol not in ("federated", "loso"):
        raise ValueError(f"Unknown protocol {protocol!r}; use 'federated' or 'loso' (leave one site out).")
    extra = shlex.split(overrides)
    if held_out and protocol != "loso":
        raise ValueError(f"held_out={held_out!r} needs --protocol loso; the federated protocol holds out none.")
    fit_config = check_fit_arguments(Path(config), overlays, extra)
    folds = _folds(Path(config), extra, held_out) if protocol == "loso" else [""]
    output = Path(output_dir or Path("runs") / f"compare_{Path(config).stem}{'_loso' if protocol == 'loso' else ''}")
    wandb_summary = compare_wandb.summary_init_arguments(fit_config)  # None: no WandbLogger
    runs = [
        Run(name, overlay, seed, fold, _inside(output, Path(name, fold, f"seed_{seed}")))
        for name, overlay in overlays.items()
        for fold in folds
        for seed in seed_values
    ]
    slots = _slots(launcher, jobs, threads_per_job)  # refused before any run
    with RunFolderLock(output):
        group = output.resolve().name if wandb_summary is not None else None
        pending = [job for run in runs if (job := _fit_job(Path(config), run, extra, rerun_changed, group)) is not None]
        if launcher == "submitit":
            cluster_folder = output / ".submitit"  # hidden: no strategy's folder can have its name
            parameters = submitit_parameters or {}
            failed = cluster.run_fits_on_cluster(pending, cluster_folder, jobs, parameters, submitit_cluster, slots[0])
        else:
            failed = compare_jobs.run_fits(pending, slots)
        if failed:
            raise RuntimeError(compare_jobs.failure_report(failed, len(pending)))
        measurements = [m for run in runs for m in compare_report.measurements(run)]
        metric = compare_report.primary_metric(measurements)
        compare_report.write_csv(measurements, output / "comparison.csv")
        command = _command_line(config, overlays, seeds, overrides, protocol, held_out, baseline)
        table = compare_report.markdown(measurements, list(overlays), metric, baseline, seeds, command)
        atomic_write_text(output / "comparison.md", table)
        compare_report.plot(runs, metric, output / "comparison.png")
        if wandb_summary is not None and group is not None:
            compare_wandb.log_summary(wandb_summary, group, output, command)
    print(table)
    return output


def _slots(launcher: Launcher, jobs: int, threads_per_job: int) -> list[dict[str, str]]:
    """The environment of each running fit (:func:`harmofl.compare_jobs.job_environments`); with ``submitit``, the
    one every job gets: the threads asked for, the cluster giving each job its devices and cores. Raises before any
    run on bad numbers, more jobs than GPUs, or a launcher that is not installed."""
    if launcher == "local":
        gpus = compare_jobs.visible_gpus()
        return compare_jobs.job_environments(jobs, compare_jobs.cpu_cores(), gpus, threads_per_job)
    if launcher == "submitit":
        cluster.import_submitit()
        checked = compare_jobs.job_environments(jobs, 1, [], threads_per_job)
        return checked[:1] if threads_per_job else [{}]
    raise ValueError(f"Unknown launcher {launcher!r}; use 'local' (this machine) or 'submitit' (a cluster).")


def _overlays(strategies: str) -> dict[str, Path]:
    """Strategy name → overlay file: a plain name of ``configs/strategies/``, or the path of a YAML overlay
    (named by its file's stem, made a plain name)."""
    entries = [entry.strip() for entry in strategies.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"Give at least one strategy; available: {available_strategies()}.")
    bad = [entry for entry in entries if not entry.endswith((".yaml", ".yml")) and not PLAIN_NAME.fullmatch(entry)]
    if bad:
        raise ValueError(
            f"Strategies {bad} are neither plain names (letters, digits, '_', '-', '.'; no '/' or leading '.': a "
            f"name becomes a run folder) nor overlay files (*.yaml); available: {available_strategies()}."
        )
    paths = [Path(entry) if entry.endswith((".yaml", ".yml")) else STRATEGY_DIR / f"{entry}.yaml" for entry in entries]
    unknown = [entry for entry, path in zip(entries, paths, strict=True) if not path.is_file()]
    if unknown:
        raise ValueError(f"Unknown strategies {unknown}; available: {available_strategies()} or an overlay file.")
    overlays = {_plain_name(path.stem): path for path in paths}
    if len(overlays) != len(entries):
        raise ValueError(f"Strategies must have distinct names, got {entries}.")
    return overlays


def _plain_name(stem: str) -> str:
    """An overlay file's stem as a folder name: other characters replaced by ``_``, no leading dots."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".")
    if not name:
        raise ValueError(f"Overlay file name {stem!r} makes no folder name: rename the file (letters, digits, '_').")
    return name


def _inside(output: Path, relative: Path) -> Path:
    """``output / relative``, refused if it resolves outside ``output`` (a site name with ``..`` or ``/``)."""
    directory = output / relative
    if relative.is_absolute() or not directory.resolve().is_relative_to(output.resolve()):
        raise ValueError(
            f"Run folder {str(relative)!r} would lie outside the output folder {str(output)!r}: strategy and site "
            "names must be plain folder names."
        )
    return directory


def _folds(config: Path, extra: list[str], held_out: str) -> list[str]:
    """The sites a ``loso`` comparison holds out in turn: ``held_out``, checked against the data's sites."""
    from harmofl.cli import build  # the CLI imports this module

    sites = build(["--config", str(config), *extra]).datamodule.client_names
    chosen = [site.strip() for site in held_out.split(",") if site.strip()] or list(sites)
    unknown = [site for site in chosen if site not in sites]
    if unknown:
        raise ValueError(f"Cannot hold out {unknown}: the data's sites are {sites}.")
    if len(sites) < 3:
        raise ValueError(f"Leaving one site out needs at least 3 sites (a federation of 2 or more), got {sites}.")
    return chosen


def check_fit_arguments(config: Path, overlays: dict[str, Path], extra: list[str]) -> Any:
    """Check the fit arguments with each strategy's overlay by fit's own parser, before any run starts; the fit
    config of the first strategy.

    Raises:
        ValueError: a key or value fit refuses, naming the strategy and fit's message.
    """
    from harmofl.cli import parse_fit_config  # the CLI imports this module

    configs = []
    for name, overlay in overlays.items():
        try:
            configs.append(parse_fit_config(["--config", str(config), "--config", str(overlay), *extra])[1])
        except ArgumentError as error:
            raise ValueError(
                f"The fit arguments {shlex.join(extra)!r} with strategy {name!r} ({overlay}) are refused by "
                f"`cli.py fit`: {error}. See `python cli.py fit --help`."
            ) from error
    return configs[0]


def _fit_job(config: Path, run: Run, extra: list[str], rerun_changed: bool, group: str | None) -> FitJob | None:
    """The ``cli.py fit`` that ``run`` needs, its folder claimed; None if a run of the same key already finished in
    the run's folder. An interrupted run of the same key continues from its ``last.ckpt``; a run of another key is
    refused or, with ``rerun_changed``, moved aside. ``group``: the W&B group the run joins (None: no W&B)."""
    command = [
        sys.executable,
        str(REPO / "cli.py"),
        "fit",
        "--config",
        str(config),
        "--config",
        str(run.overlay),
        "--seed_everything",
        str(run.seed),
        "--trainer.default_root_dir",
        str(run.directory),
        "--trainer.enable_progress_bar",
        "false",
        *(["--trainer.held_out_clients", json.dumps([run.fold])] if run.fold else []),
        *extra,
    ]
    key = run_key(command[1:])
    label = f"{run.strategy} seed {run.seed}" + (f" holding out {run.fold}" if run.fold else "")
    if finished(run.directory, key):
        print(f"reusing {run.directory}")
        return None
    last = run.directory / "checkpoints" / "last.ckpt"
    interrupted = claim(run.directory, key, rerun_changed)
    resume = ["--ckpt_path", str(last)] if interrupted and last.is_file() else []
    print(f"{'resuming' if resume else 'running'} {label} -> {run.directory}", flush=True)
    environment = compare_wandb.run_environment(group, run) if group is not None else {}
    return FitJob(label, (*command, *resume), run.directory, key, environment)


def _command_line(
    config: str, overlays: dict[str, Path], seeds: str, overrides: str, protocol: str, held_out: str, baseline: str
) -> str:
    strategies = ",".join(name if path.parent == STRATEGY_DIR else str(path) for name, path in overlays.items())
    parts = [f"python cli.py compare --config {config} --strategies {strategies} --seeds {seeds}"]
    if protocol != "federated":
        parts.append(f"--protocol {protocol}")
    if held_out:
        parts.append(f"--held_out {held_out}")
    if baseline != "fedavg":
        parts.append(f"--baseline {baseline}")
    fit_arguments = shlex.split(overrides)
    return " ".join([*parts, *([shlex.join(fit_arguments)] if fit_arguments else [])])
