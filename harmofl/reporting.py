"""What a federated run writes and prints: metrics.csv, summary.json, convergence.png and result tables.

Results travel as ``{client: {split: {metric: value}}}``; a history is a list of rows
``{"round", "client", "split", <metric>: value, ...}`` with ``client == "mean"`` for the mean over clients.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harmofl.run_folder import atomic_file, atomic_write_text

Results = Mapping[str, Mapping[str, Mapping[str, float]]]
MEAN = "mean"
#: The ``client`` of the history rows that hold server-side values of a round (DP-FedAvg's ``privacy/epsilon``).
SERVER = "server"


def mean_over_clients(results: Results, held_out: Collection[str] = ()) -> dict[str, dict[str, float]]:
    """``{split: {metric: mean over clients}}``, held-out clients excluded; a metric a client lacks is averaged
    over the others."""
    collected: dict[str, dict[str, list[float]]] = {}
    for client, splits in results.items():
        if client in held_out:
            continue
        for split, metrics in splits.items():
            for name, value in metrics.items():
                collected.setdefault(split, {}).setdefault(name, []).append(float(value))
    return {split: {name: sum(v) / len(v) for name, v in metrics.items()} for split, metrics in collected.items()}


def history_rows(
    round_number: int,
    results: Results,
    held_out: Collection[str] = (),
    server_metrics: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One row per client and split, then the mean rows (over the clients not held out), for one round; then, if
    any ``server_metrics``, one row of them (client ``server``, split ``train``: what the training released)."""
    rows = [
        {"round": round_number, "client": client, "split": split, **metrics}
        for client, splits in results.items()
        for split, metrics in splits.items()
    ]
    rows += [
        {"round": round_number, "client": MEAN, "split": split, **metrics}
        for split, metrics in mean_over_clients(results, held_out).items()
    ]
    if server_metrics:
        rows.append({"round": round_number, "client": SERVER, "split": "train", **server_metrics})
    return rows


def logged_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """History rows as logger series: ``<client>/<split>/<metric>``."""
    return {
        f"{row['client']}/{row['split']}/{name}": value
        for row in rows
        for name, value in row.items()
        if name not in ("round", "client", "split")
    }


def write_metrics_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The long-format history: one row per round, client and split; one column per metric."""
    metric_names = sorted({key for row in rows for key in row} - {"round", "client", "split"})
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["round", "client", "split", *metric_names], restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.csv`` with numbers parsed (empty cells dropped)."""
    with path.open(newline="") as handle:
        return [
            {
                key: (value if key in ("client", "split") else (int(value) if key == "round" else float(value)))
                for key, value in row.items()
                if value != ""
            }
            for row in csv.DictReader(handle)
        ]


def summary(rounds: int, best_round: int | None, results: Results, held_out: Collection[str] = ()) -> dict[str, Any]:
    """The ``summary.json`` structure for ``results`` (the per-client metrics of the kept model); clients held
    out of training are reported under ``held_out``, outside the mean."""

    def section(included: bool) -> dict[str, Any]:
        return {
            client: {split: dict(m) for split, m in splits.items()}
            for client, splits in results.items()
            if (client not in held_out) == included
        }

    result = {
        "rounds": rounds,
        "best_round": best_round,
        "clients": section(True),
        "mean": mean_over_clients(results, held_out),
    }
    if any(client in held_out for client in results):
        result["held_out"] = section(False)
    return result


def results_at_round(rows: Iterable[Mapping[str, Any]], round_number: int, splits: Sequence[str]) -> dict:
    """Rebuild ``{client: {split: metrics}}`` of one round from history rows (mean rows excluded)."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        if row["round"] == round_number and row["client"] != MEAN and row["split"] in splits:
            metrics = {k: v for k, v in row.items() if k not in ("round", "client", "split")}
            results.setdefault(row["client"], {})[row["split"]] = metrics
    return results


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """``data`` as indented JSON, written atomically (:mod:`harmofl.run_folder`)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def plot_convergence(rows: Sequence[Mapping[str, Any]], metric: str, path: Path, split: str = "val") -> None:
    """Per-client (thin) and mean (thick) ``metric`` on ``split`` over rounds."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["split"] == split and metric in row and not math.isnan(float(row[metric])):
            series.setdefault(str(row["client"]), []).append((int(row["round"]), float(row[metric])))
    plot_lines(series, f"{split} {metric}", path, emphasized=MEAN)


def plot_lines(
    series: Mapping[str, Sequence[tuple[int, float]]], ylabel: str, path: Path, emphasized: str | None = None
) -> None:
    """One line per name over rounds; the ``emphasized`` one thick, black, with markers, drawn last."""
    plot_panels({ylabel: series}, path, emphasized)


def plot_panels(
    panels: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path, emphasized: str | None = None
) -> None:
    """One panel per title (its y label), side by side, each with one line per name over rounds; the
    ``emphasized`` name thick, black, with markers, drawn last."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for axis, (ylabel, series) in zip(axes[0], panels.items(), strict=True):
        for name, points in sorted(series.items(), key=lambda item: item[0] == emphasized):
            rounds, values = zip(*sorted(points))
            if name == emphasized:
                axis.plot(rounds, values, marker="o", linewidth=2.5, color="black", label=name)
            else:
                axis.plot(rounds, values, linewidth=1.0, alpha=0.8, label=name)
        axis.set_xlabel("round")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    with atomic_file(path) as handle:
        figure.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(figure)


def print_results_table(
    title: str, results: Results, held_out: Collection[str] = (), console: Console | None = None
) -> None:
    """A per-client table with the mean (of the clients not held out, marked ``(held out)``) as its last row."""
    splits = sorted({split for s in results.values() for split in s}, key=["train", "val", "test"].index)
    columns = [
        (split, name) for split in splits for name in sorted({n for s in results.values() for n in s.get(split, {})})
    ]
    table = Table(title=title)
    table.add_column("client")
    for split, name in columns:
        table.add_column(f"{split} {name}", justify="right")
    mean = mean_over_clients(results, held_out)
    for client, row in [*results.items(), (MEAN, mean)]:
        cells = [f"{row[s][n]:.4f}" if n in row.get(s, {}) else "" for s, n in columns]
        label = f"[bold]{client}[/bold]" if client == MEAN else f"{client} (held out)" if client in held_out else client
        table.add_row(label, *cells)
    (console or Console()).print(table)
