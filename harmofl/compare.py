"""``python cli.py compare``: every strategy × seed (× held-out site) on the same data and splits, then tables.

A strategy is a YAML overlay in ``configs/strategies/`` (or any overlay file) applied on top of the base config
(HarmoFL as configured, FedAvg, FedBN, FedProx, FedNova, FedAvgM, FedAdam, FedYogi, SCAFFOLD, MOON, FedSAM,
FedDG's amplitude exchange, FedRDN, FedFA, harmonization only, local training, pooled centralized training).

Protocols: ``federated`` trains one federation of every site per strategy and seed (sites the base config holds
out stay unseen); ``loso`` (leave one site out) trains one federation per held-out site, which evaluates the global
model every round without ever training or sending anything.

Each run is a ``cli.py fit`` subprocess writing to ``<output>/<strategy>/seed_<seed>`` (``loso``:
``<output>/<strategy>/<site>/seed_<seed>``); a finished run (same command, same config file contents) is reused,
an interrupted one continues from its ``last.ckpt``. Outputs: ``comparison.csv`` (one row per test metric of a
client in a run), ``comparison.md`` (in-federation and unseen-site tables, mean ± 95 % CI over seeds, paired
differences to the baseline with Wilcoxon p-values, "tied" where the best is not distinguishable) and
``comparison.png`` (convergence per strategy, averaged over seeds and folds).
"""

from __future__ import annotations

import csv
import hashlib
import json
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

REPO = Path(__file__).resolve().parents[1]
STRATEGY_DIR = REPO / "configs" / "strategies"
DONE_FILE = "compare_done.json"
STARTED_FILE = "compare_started.json"
DEFAULT_STRATEGIES = (
    "harmofl,fedavg,fedbn,fedprox,fednova,fedavgm,fedadam,fedyogi,scaffold,moon,fedsam,harmonization,local,pooled"
)
Protocol = Literal["federated", "loso"]


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
        Run(name, overlay, seed, fold, output / name / fold / f"seed_{seed}")
        for name, overlay in overlays.items()
        for fold in folds
        for seed in seed_values
    ]
    for run in runs:
        _fit(Path(config), run, extra)
    measurements = [m for run in runs for m in _measurements(run)]
    metric = _primary_metric(measurements)
    _write_csv(measurements, output / "comparison.csv")
    command = _command_line(config, overlays, seeds, overrides, protocol, held_out, baseline)
    (output / "comparison.md").write_text(_markdown(measurements, list(overlays), metric, baseline, seeds, command))
    _plot(runs, metric, output / "comparison.png")
    print((output / "comparison.md").read_text())
    return output


def _overlays(strategies: str) -> dict[str, Path]:
    """Strategy name → overlay file: a name of ``configs/strategies/``, or the path of a YAML overlay."""
    entries = [entry.strip() for entry in strategies.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"Give at least one strategy; available: {available_strategies()}.")
    paths = [Path(entry) if entry.endswith((".yaml", ".yml")) else STRATEGY_DIR / f"{entry}.yaml" for entry in entries]
    unknown = [entry for entry, path in zip(entries, paths, strict=True) if not path.is_file()]
    if unknown:
        raise ValueError(f"Unknown strategies {unknown}; available: {available_strategies()} or an overlay file.")
    overlays = {path.stem: path for path in paths}
    if len(overlays) != len(entries):
        raise ValueError(f"Strategies must have distinct names, got {entries}.")
    return overlays


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


def _fit(config: Path, run: Run, extra: list[str]) -> None:
    """One ``cli.py fit`` subprocess, unless the same command on the same config files already finished in the
    run's folder; an interrupted run of the same command and files continues from its ``last.ckpt``."""
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
    # The files' contents are part of the key: an edited config must not reuse results made with the old one.
    key = {"command": command[1:], "config_sha256": _digest([config, run.overlay])}
    done, started = run.directory / DONE_FILE, run.directory / STARTED_FILE
    label = f"{run.strategy} seed {run.seed}" + (f" holding out {run.fold}" if run.fold else "")
    if _holds(done, key):
        print(f"reusing {run.directory}")
        return
    last = run.directory / "checkpoints" / "last.ckpt"
    resume = ["--ckpt_path", str(last)] if last.is_file() and _holds(started, key) and not done.is_file() else []
    done.unlink(missing_ok=True)
    run.directory.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(key) + "\n")
    print(f"running {label} -> {run.directory}", flush=True)
    result = subprocess.run([*command, *resume], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{result.stderr[-4000:]}")
    done.write_text(json.dumps(key) + "\n")


def _digest(files: list[Path]) -> str:
    hasher = hashlib.sha256()
    for file in files:
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


def _holds(marker: Path, key: dict[str, Any]) -> bool:
    return marker.is_file() and json.loads(marker.read_text()) == key


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
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([field.name for field in fields(Measurement)])
        writer.writerows(astuple(m) for m in measurements)


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
