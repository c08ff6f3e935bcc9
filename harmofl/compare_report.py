"""What ``compare`` writes once every fit has ended, read from the run folders alone (so it does not depend on how
or where the fits ran): ``comparison.csv``, ``comparison.md`` and ``comparison.png``."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from harmofl import reporting
from harmofl.comparison_tables import ROLES, Measurement, Role, SiteValues, markdown_table, paired_table, site_values
from harmofl.run_folder import atomic_write_text


@dataclass(frozen=True)
class Run:
    """One fit of the comparison: ``fold`` is the site a ``loso`` run holds out ("" otherwise)."""

    strategy: str
    overlay: Path
    seed: int
    fold: str
    directory: Path


def measurements(run: Run) -> list[Measurement]:
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


def primary_metric(measurements: Sequence[Measurement]) -> str:
    names = dict.fromkeys(m.metric for m in measurements)
    if not names:
        raise RuntimeError("The runs wrote no test metrics: check that the data has test splits.")
    return "accuracy" if "accuracy" in names else next(iter(names))


def write_csv(measurements: Sequence[Measurement], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([field.name for field in fields(Measurement)])
    writer.writerows(astuple(m) for m in measurements)
    atomic_write_text(path, text.getvalue())


def markdown(
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


def plot(runs: Sequence[Run], metric: str, path: Path) -> None:
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
