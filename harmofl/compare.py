"""``python cli.py compare``: every strategy × seed on the same data and splits, then one table.

A strategy is a YAML overlay in ``configs/strategies/`` applied on top of the base config (HarmoFL as
configured, FedAvg, FedBN, FedProx, FedNova, FedAvgM, FedAdam, FedYogi, SCAFFOLD, MOON, FedSAM,
harmonization only, local training, pooled centralized training). Each run is a ``cli.py fit``
subprocess writing to ``<output>/<strategy>/seed_<seed>``; a finished run (same command, same config file
contents) is reused, an interrupted one continues from its ``last.ckpt``. Outputs:
``comparison.csv`` (strategy, seed, client, metric, value: test metrics at each run's best round),
``comparison.md`` (mean ± std over seeds, best per column in bold) and ``comparison.png`` (mean
validation metric per strategy over rounds, averaged over seeds).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from harmofl import reporting

REPO = Path(__file__).resolve().parents[1]
STRATEGY_DIR = REPO / "configs" / "strategies"
DONE_FILE = "compare_done.json"
STARTED_FILE = "compare_started.json"
DEFAULT_STRATEGIES = (
    "harmofl,fedavg,fedbn,fedprox,fednova,fedavgm,fedadam,fedyogi,scaffold,moon,fedsam,harmonization,local,pooled"
)


def available_strategies() -> list[str]:
    return sorted(path.stem for path in STRATEGY_DIR.glob("*.yaml"))


def run_comparison(
    config: str = "configs/demo.yaml",
    strategies: str = DEFAULT_STRATEGIES,
    seeds: str = "0,1,2",
    output_dir: str | None = None,
    overrides: str = "",
) -> Path:
    """Run every strategy × seed on ``config`` and write comparison.csv / .md / .png.

    Args:
        config: the base configuration (data, model, trainer); HarmoFL as configured there.
        strategies: comma-separated names of ``configs/strategies/*.yaml``.
        seeds: comma-separated seeds (``seed_everything`` of each run).
        output_dir: where runs and results go; default ``runs/compare_<config name>``.
        overrides: extra ``cli.py fit`` arguments for every run, e.g. ``"--trainer.rounds 5"``.

    Returns:
        The output folder.
    """
    names = [name.strip() for name in strategies.split(",") if name.strip()]
    unknown = [name for name in names if not (STRATEGY_DIR / f"{name}.yaml").is_file()]
    if unknown or not names:
        raise ValueError(f"Unknown strategies {unknown or names}; available: {available_strategies()}.")
    seed_values = [int(seed) for seed in seeds.split(",") if seed.strip()]
    if not seed_values:
        raise ValueError(f"Give at least one seed, got {seeds!r}.")
    output = Path(output_dir or Path("runs") / f"compare_{Path(config).stem}")
    extra = shlex.split(overrides)
    runs = {
        (name, seed): _run(Path(config), name, seed, output / name / f"seed_{seed}", extra)
        for name in names
        for seed in seed_values
    }
    summaries = {key: json.loads((run / "summary.json").read_text()) for key, run in runs.items()}
    histories = {key: reporting.read_metrics_csv(run / "metrics.csv") for key, run in runs.items()}
    metric = _primary_metric(summaries)
    _write_csv(summaries, output / "comparison.csv")
    (output / "comparison.md").write_text(_markdown(summaries, names, metric, Path(config), seeds, overrides))
    _plot(histories, names, metric, output / "comparison.png")
    print((output / "comparison.md").read_text())
    return output


def _run(config: Path, strategy: str, seed: int, run_dir: Path, extra: list[str]) -> Path:
    """One ``cli.py fit`` subprocess, unless the same command on the same config files already finished in
    ``run_dir``; an interrupted run of the same command and files continues from its ``last.ckpt``."""
    overlay = STRATEGY_DIR / f"{strategy}.yaml"
    command = [
        sys.executable,
        str(REPO / "cli.py"),
        "fit",
        "--config",
        str(config),
        "--config",
        str(overlay),
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    # The files' contents are part of the key: an edited config must not reuse results made with the old one.
    key = {"command": command[1:], "config_sha256": _digest([config, overlay])}
    done, started = run_dir / DONE_FILE, run_dir / STARTED_FILE
    if _holds(done, key):
        print(f"reusing {run_dir}")
        return run_dir
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = ["--ckpt_path", str(last)] if last.is_file() and _holds(started, key) and not done.is_file() else []
    done.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(key) + "\n")
    print(f"running {strategy} seed {seed} -> {run_dir}", flush=True)
    result = subprocess.run([*command, *resume], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{strategy} (seed {seed}) failed:\n{result.stderr[-4000:]}")
    done.write_text(json.dumps(key) + "\n")
    return run_dir


def _digest(files: list[Path]) -> str:
    hasher = hashlib.sha256()
    for file in files:
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


def _holds(marker: Path, key: dict[str, Any]) -> bool:
    return marker.is_file() and json.loads(marker.read_text()) == key


def _primary_metric(summaries: dict[tuple[str, int], dict[str, Any]]) -> str:
    test_metrics = next(iter(summaries.values()))["mean"]["test"]
    return "accuracy" if "accuracy" in test_metrics else next(iter(test_metrics))


def _write_csv(summaries: dict[tuple[str, int], dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["strategy", "seed", "client", "metric", "value"])
        for (strategy, seed), summary in summaries.items():
            clients = {**{c: s["test"] for c, s in summary["clients"].items()}, reporting.MEAN: summary["mean"]["test"]}
            for client, metrics in clients.items():
                for name, value in metrics.items():
                    writer.writerow([strategy, seed, client, name, value])


def _markdown(
    summaries: dict[tuple[str, int], dict[str, Any]],
    names: list[str],
    metric: str,
    config: Path,
    seeds: str,
    overrides: str,
) -> str:
    """Per-client and mean test ``metric``: mean ± std over seeds, the best mean per column in bold."""
    clients = [*next(iter(summaries.values()))["clients"], reporting.MEAN]

    def values(strategy: str, client: str) -> list[float]:
        return [
            (s["mean"]["test"] if client == reporting.MEAN else s["clients"][client]["test"])[metric]
            for (name, _), s in summaries.items()
            if name == strategy
        ]

    means = {(name, client): statistics.fmean(values(name, client)) for name in names for client in clients}
    best = {client: max(means[(name, client)] for name in names) for client in clients}
    lines = [
        f"Test {metric} at each run's best round (mean ± std over seeds {seeds}); best per column in bold.",
        "",
        f"Command: `python cli.py compare --config {config} --strategies {','.join(names)} --seeds {seeds}"
        + (f" --overrides '{overrides}'" if overrides else "")
        + "`",
        "",
        "| strategy | " + " | ".join(clients) + " |",
        "|---" * (len(clients) + 1) + "|",
    ]
    for name in names:
        cells = []
        for client in clients:
            samples = values(name, client)
            spread = statistics.stdev(samples) if len(samples) > 1 else 0.0
            cell = f"{means[(name, client)]:.3f} ± {spread:.3f}"
            cells.append(f"**{cell}**" if means[(name, client)] == best[client] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(histories: dict[tuple[str, int], list[dict[str, Any]]], names: list[str], metric: str, path: Path) -> None:
    """Mean validation ``metric`` over clients per round, averaged over seeds, one line per strategy."""
    series: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        by_round: dict[int, list[float]] = {}
        for (strategy, _), rows in histories.items():
            if strategy == name:
                for row in rows:
                    if row["client"] == reporting.MEAN and row["split"] == "val" and metric in row:
                        by_round.setdefault(row["round"], []).append(row[metric])
        series[name] = [(r, statistics.fmean(values)) for r, values in sorted(by_round.items())]
    reporting.plot_lines(series, f"mean val {metric}", path, emphasized="harmofl")
