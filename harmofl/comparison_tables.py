"""The tables of ``cli.py compare``: measurements of every run → per-site tables with confidence intervals, the
paired comparison to a baseline, and the honest "best or tied" row.

A :class:`Measurement` is one test metric of one client in one run. Its ``role`` says how that client took part:
``in-federation`` (it trained) or ``unseen`` (held out of training: it only evaluated the global model). Under
the leave-one-site-out protocol a site trains in several folds; its in-federation value for a seed is the mean
over those folds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from harmofl.significance import confidence_interval, paired_difference, tied_with_best

Role = Literal["in-federation", "unseen"]
ROLES: tuple[Role, ...] = ("in-federation", "unseen")
MEAN_COLUMN = "mean"

# strategy -> site (or the mean column) -> seed -> value
SiteValues = dict[str, dict[str, dict[int, float]]]


@dataclass(frozen=True)
class Measurement:
    strategy: str
    seed: int
    fold: str  # the held-out site of a leave-one-site-out run; "" for a run with every site
    client: str
    role: Role
    metric: str
    value: float


def site_values(measurements: Iterable[Measurement], role: Role, metric: str) -> SiteValues:
    """Per strategy, site and seed, the ``metric`` of the sites in ``role`` (averaged over the folds a site took
    part in), plus the mean column: per seed, the mean over sites."""
    collected: dict[str, dict[str, dict[int, list[float]]]] = {}
    for m in measurements:
        if m.role == role and m.metric == metric:
            collected.setdefault(m.strategy, {}).setdefault(m.client, {}).setdefault(m.seed, []).append(m.value)
    values: SiteValues = {}
    for strategy, sites in collected.items():
        per_site = {site: {seed: statistics.fmean(v) for seed, v in seeds.items()} for site, seeds in sites.items()}
        seeds = sorted(set.intersection(*(set(s) for s in per_site.values())))
        per_site[MEAN_COLUMN] = {seed: statistics.fmean(s[seed] for s in per_site.values()) for seed in seeds}
        values[strategy] = per_site
    return values


def columns(values: SiteValues) -> list[str]:
    """The sites of a table in name order, then the mean column."""
    return [*sorted({site for per_site in values.values() for site in per_site} - {MEAN_COLUMN}), MEAN_COLUMN]


def format_interval(samples: Sequence[float]) -> str:
    return _interval_text(*confidence_interval(samples))


def _interval_text(mean: float, half_width: float, signed: bool = False) -> str:
    """``mean ± half-width`` to 3 decimals, the mean alone when there is no interval (one sample)."""
    center = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return center if math.isnan(half_width) else f"{center} ± {half_width:.3f}"


def markdown_table(values: SiteValues, strategies: Sequence[str], caption: str) -> list[str]:
    """Rows strategies, columns sites and mean; mean ± 95 % CI over seeds. A column's best is bold only when its
    paired difference (over seeds) to every other strategy excludes zero; the last row names it, or the tie."""
    names = [name for name in strategies if name in values]
    header = columns(values)
    verdicts = {column: _verdict(values, names, column) for column in header}
    lines = [caption, "", "| strategy | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name in names:
        cells = []
        for column in header:
            samples = list(values[name].get(column, {}).values())
            cell = format_interval(samples) if samples else "–"
            cells.append(f"**{cell}**" if verdicts[column] == [name] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| best | " + " | ".join(_best_cell(verdicts[column]) for column in header) + " |")
    return lines


def _verdict(values: SiteValues, names: Sequence[str], column: str) -> list[str]:
    """The strategies tied with the column's best over the seeds every strategy has ([] if none)."""
    present = [name for name in names if values[name].get(column)]
    if not present:
        return []
    seeds = sorted(set.intersection(*(set(values[name][column]) for name in present)))
    if not seeds:
        return []
    return tied_with_best({name: [values[name][column][seed] for seed in seeds] for name in present})


def _best_cell(tied: list[str]) -> str:
    if not tied:
        return "–"
    return tied[0] if len(tied) == 1 else "tied: " + ", ".join(tied)


def paired_rows(values: SiteValues, strategies: Sequence[str], baseline: str) -> dict[str, str]:
    """Per strategy, its difference to ``baseline`` over matched (seed × site) pairs: mean ± 95 % CI, the
    Wilcoxon signed-rank p-value (``*`` where p < 0.05) and the number of pairs, as one markdown cell group."""
    if baseline not in values:
        return {}
    cells = {}
    for name in strategies:
        if name == baseline or name not in values:
            continue
        pairs = [
            (seeds[seed], values[baseline][site][seed])
            for site, seeds in values[name].items()
            if site != MEAN_COLUMN and site in values[baseline]
            for seed in sorted(seeds)
            if seed in values[baseline][site]
        ]
        if not pairs:
            continue
        result = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
        interval = _interval_text(result.mean, result.half_width, signed=True)
        marker = " *" if result.significant else ""
        p_value = f"{result.p_value:.3f}" if result.p_value >= 0.001 else "< 0.001"
        cells[name] = f"{interval} | {p_value}{marker} | {result.pairs}"
    return cells


def paired_table(by_role: dict[Role, SiteValues], strategies: Sequence[str], baseline: str) -> list[str]:
    """One row per strategy: its paired difference to ``baseline`` in each role that has values."""
    roles = [role for role in ROLES if by_role.get(role)]
    rows = {role: paired_rows(by_role[role], strategies, baseline) for role in roles}
    if not any(rows.values()):
        return []
    header = "| strategy | " + " | ".join(f"{role} Δ vs {baseline} | p | pairs" for role in roles) + " |"
    lines = [header, "|---" * (1 + 3 * len(roles)) + "|"]
    for name in strategies:
        if name == baseline or not any(name in rows[role] for role in roles):
            continue
        lines.append(f"| {name} | " + " | ".join(rows[role].get(name, "– | – | –") for role in roles) + " |")
    return lines
