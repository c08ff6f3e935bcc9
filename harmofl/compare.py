"""``python cli.py compare``: every strategy × seed (× held-out site) on the same data and splits, then tables.

A strategy is a YAML overlay in ``configs/strategies/`` (or any overlay file) applied on top of the base config
(HarmoFL as configured, FedAvg, FedBN, FedProx, FedNova, FedAvgM, FedAdam, FedYogi, SCAFFOLD, MOON, FedSAM,
FedDG's amplitude exchange, FedRDN, FedFA, harmonization only, local training, pooled centralized training).

Protocols: ``federated`` trains one federation of every site per strategy and seed (sites the base config holds
out stay unseen); ``loso`` (leave one site out) trains one federation per held-out site, which evaluates the global
model every round without ever training or sending anything.

Each run is a ``cli.py fit`` subprocess writing to ``<output>/<strategy>/seed_<seed>`` (``loso``:
``<output>/<strategy>/<site>/seed_<seed>``). Outputs: ``comparison.csv`` (one row per test metric of a client in a
run), ``comparison.md`` (in-federation and unseen-site tables, mean ± 95 % CI over seeds, paired differences to the
baseline with Wilcoxon p-values, "tied" where the best is not distinguishable) and ``comparison.png`` (convergence
per strategy, averaged over seeds and folds).

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

import csv
import io
import json
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from harmofl import reporting
from harmofl.comparison_tables import ROLES, Measurement, Role, SiteValues, markdown_table, paired_table, site_values
from harmofl.run_folder import RunFolderLock, atomic_write_text
from harmofl.run_key import claim, finished, mark_done, run_key

REPO = Path(__file__).resolve().parents[1]
STRATEGY_DIR = REPO / "configs" / "strategies"
DEFAULT_STRATEGIES = (
    "harmofl,fedavg,fedbn,fedprox,fednova,fedavgm,fedadam,fedyogi,scaffold,moon,fedsam,harmonization,local,pooled"
)
Protocol = Literal["federated", "loso"]
# A strategy name becomes a folder name: one path component, no hidden or parent folder.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Run:
    """One fit of the comparison: ``fold`` is the site a ``loso`` run holds out ("" otherwise)."""

    strategy: str
    overlay: Path
    seed: int
    fold: str
    directory: Path


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
) -> Path:
    """Run every strategy × seed on ``config`` and write comparison.csv / .md / .png.

    Args:
        config: the base configuration (data, model, trainer); HarmoFL as configured there.
        strategies: comma-separated names of ``configs/strategies/*.yaml``, or paths of other overlay files
            (a sweep's variants), named by their file name.
        seeds: comma-separated seeds (``seed_everything`` of each run).
        output_dir: where runs and results go; default ``runs/compare_<config name>`` (``_loso`` appended).
        overrides: extra ``cli.py fit`` arguments for every run, e.g. ``"--trainer.rounds 5"``.
        protocol: ``federated`` (one federation of every site) or ``loso`` (leave one site out: one federation
            per held-out site, which is evaluated as an unseen site).
        held_out: ``loso`` only: comma-separated sites to hold out in turn; default every site of the data.
        baseline: the strategy every other one is compared with, pair by pair (seed × site).
        rerun_changed: a run folder holding a run made with another key (code, config files or command) is moved
            aside to ``<run>.replaced-<UTC time>`` and run again; without it compare refuses to touch it.

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
    folds = _folds(Path(config), extra, held_out) if protocol == "loso" else [""]
    output = Path(output_dir or Path("runs") / f"compare_{Path(config).stem}{'_loso' if protocol == 'loso' else ''}")
    runs = [
        Run(name, overlay, seed, fold, _inside(output, Path(name, fold, f"seed_{seed}")))
        for name, overlay in overlays.items()
        for fold in folds
        for seed in seed_values
    ]
    with RunFolderLock(output):
        for run in runs:
            _fit(Path(config), run, extra, rerun_changed)
        measurements = [m for run in runs for m in _measurements(run)]
        metric = _primary_metric(measurements)
        _write_csv(measurements, output / "comparison.csv")
        command = _command_line(config, overlays, seeds, overrides, protocol, held_out, baseline)
        table = _markdown(measurements, list(overlays), metric, baseline, seeds, command)
        atomic_write_text(output / "comparison.md", table)
        _plot(runs, metric, output / "comparison.png")
    print(table)
    return output


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


def _fit(config: Path, run: Run, extra: list[str], rerun_changed: bool) -> None:
    """One ``cli.py fit`` subprocess, unless a run of the same key already finished in the run's folder; an
    interrupted run of the same key continues from its ``last.ckpt``; a run of another key is refused or, with
    ``rerun_changed``, moved aside."""
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
        return
    last = run.directory / "checkpoints" / "last.ckpt"
    interrupted = claim(run.directory, key, rerun_changed)
    resume = ["--ckpt_path", str(last)] if interrupted and last.is_file() else []
    print(f"running {label} -> {run.directory}", flush=True)
    result = subprocess.run([*command, *resume], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{result.stderr[-4000:]}")
    mark_done(run.directory, key)


def _measurements(run: Run) -> list[Measurement]:
    """The test metrics of every client at the run's best round (chosen on the training sites' validation mean:
    never on an unseen site), with the role each client had."""
    summary = json.loads((run.directory / "summary.json").read_text())
    roles: list[tuple[Role, dict[str, Any]]] = [
        ("in-federation", summary["clients"]),
        ("unseen", summary.get("held_out", {})),
    ]
    return [
        Measurement(run.strategy, run.seed, run.fold, client, role, name, float(value))
        for role, clients in roles
        for client, splits in clients.items()
        for name, value in splits.get("test", {}).items()
    ]


def _primary_metric(measurements: Sequence[Measurement]) -> str:
    names = dict.fromkeys(m.metric for m in measurements)
    if not names:
        raise RuntimeError("The runs wrote no test metrics: check that the data has test splits.")
    return "accuracy" if "accuracy" in names else next(iter(names))


def _write_csv(measurements: Sequence[Measurement], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([field.name for field in fields(Measurement)])
    writer.writerows(astuple(m) for m in measurements)
    atomic_write_text(path, text.getvalue())


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
    if overrides:
        parts.append(f"--overrides '{overrides}'")
    return " ".join(parts)


def _markdown(
    measurements: Sequence[Measurement], names: list[str], metric: str, baseline: str, seeds: str, command: str
) -> str:
    by_role: dict[Role, SiteValues] = {role: site_values(measurements, role, metric) for role in ROLES}
    lines = [
        f"Test {metric} at each run's best round (chosen on the training sites' validation mean, never on an unseen "
        f"site); mean ± 95 % CI (Student t) over seeds {seeds}. A column's best is bold only when its paired "
        "difference over seeds to every other strategy excludes zero; the row `best` names it or the tie.",
        "",
        f"Command: `{command}`",
        "",
    ]
    captions = {
        "in-federation": "In-federation sites (each site's test split; under leave-one-site-out, the mean over the "
        "folds in which it trained):",
        "unseen": "Unseen sites (held out of training; evaluated with the global model and the shared state):",
    }
    for role, values in by_role.items():
        if values:
            lines += ["", *markdown_table(values, names, captions[role]), ""]
    paired = paired_table(by_role, names, baseline)
    if baseline not in names:
        lines += ["", f"No paired differences: the baseline {baseline!r} is not among the strategies (`--baseline`)."]
    elif paired:
        lines += [
            "",
            f"Paired difference to {baseline} over (seed × site) pairs: mean ± 95 % CI, Wilcoxon signed-rank "
            "two-sided p-value (* p < 0.05), number of pairs. Sites within a seed are not independent: read p as "
            "a screen, not a proof.",
            "",
            *paired,
        ]
    return "\n".join(lines) + "\n"


def _plot(runs: Sequence[Run], metric: str, path: Path) -> None:
    """Per strategy, the mean validation ``metric`` of the training sites over rounds and, under
    leave-one-site-out, the held-out site's test ``metric``; each averaged over seeds and folds."""
    panels: dict[str, dict[str, dict[int, list[float]]]] = {f"in-federation: mean val {metric}": {}}
    for run in runs:
        for row in reporting.read_metrics_csv(run.directory / "metrics.csv"):
            if metric not in row:
                continue
            if row["client"] == reporting.MEAN and row["split"] == "val":
                panel = f"in-federation: mean val {metric}"
            elif run.fold and row["client"] == run.fold and row["split"] == "test":
                panel = f"unseen site: test {metric}"
            else:
                continue
            panels.setdefault(panel, {}).setdefault(run.strategy, {}).setdefault(row["round"], []).append(row[metric])
    series = {
        title: {
            name: [(r, statistics.fmean(v)) for r, v in sorted(by_round.items())] for name, by_round in lines.items()
        }
        for title, lines in panels.items()
    }
    reporting.plot_panels(series, path, emphasized="harmofl")
