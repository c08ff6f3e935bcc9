"""The statistics of a comparison, as a paper reports them: means with confidence intervals over seeds, paired
differences to a baseline with a Wilcoxon signed-rank test, and whether a best is distinguishable from the rest.

Plain functions over lists of floats (scipy for the t quantile and the Wilcoxon test).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05


def confidence_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """``(mean, half-width)`` of the Student-t interval ``mean ± t_{(1+c)/2, n-1} · s / √n``; the half-width is
    NaN for a single value (no spread to estimate from)."""
    if not values:
        raise ValueError("confidence_interval needs at least one value.")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    quantile = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1))
    return mean, quantile * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class PairedDifference:
    """``candidate − baseline`` over matched pairs: mean with its t interval, the Wilcoxon signed-rank p-value
    (two-sided; 1.0 when every difference is zero) and the number of pairs."""

    mean: float
    half_width: float
    p_value: float
    pairs: int

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE


def paired_difference(candidate: Sequence[float], baseline: Sequence[float]) -> PairedDifference:
    """The paired comparison of two methods measured on the same pairs (same seed, same site)."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError(f"Paired values must be non-empty and match, got {len(candidate)} and {len(baseline)}.")
    differences = [a - b for a, b in zip(candidate, baseline, strict=True)]
    mean, half_width = confidence_interval(differences)
    if all(d == 0 for d in differences):
        p_value = 1.0
    else:
        # Exact null distribution for small samples; zero differences are dropped (Wilcoxon's convention).
        p_value = float(stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)
    return PairedDifference(mean, half_width, p_value, len(differences))


def tied_with_best(paired_values: Mapping[str, Sequence[float]], confidence: float = CONFIDENCE) -> list[str]:
    """The methods not distinguishable from the one of highest mean: the best itself, and every method whose
    paired difference to it (over the same seeds) has a ``confidence`` t interval that contains zero.

    One name means a clear best; several mean "tied". With a single pair nothing is distinguishable."""
    if not paired_values:
        raise ValueError("tied_with_best needs at least one method.")
    best = max(paired_values, key=lambda name: statistics.fmean(paired_values[name]))
    tied = [best]
    for name, values in paired_values.items():
        if name == best:
            continue
        mean, half_width = confidence_interval(
            [a - b for a, b in zip(paired_values[best], values, strict=True)], confidence
        )
        if math.isnan(half_width) or mean - half_width <= 0:
            tied.append(name)
    return tied
