"""The comparison's statistics against their formulas, and the tables built from run measurements."""

import math
import statistics

import pytest

from harmofl.comparison_tables import Measurement, markdown_table, paired_rows, site_values
from harmofl.significance import confidence_interval, paired_difference, tied_with_best

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)


def test_confidence_interval_is_the_student_t_interval():
    values = [0.90, 0.92, 0.97]
    mean, half_width = confidence_interval(values)
    assert mean == pytest.approx(0.93)
    assert half_width == pytest.approx(T_975_DF2 * statistics.stdev(values) / math.sqrt(3))
    assert math.isnan(confidence_interval([0.5])[1])
    with pytest.raises(ValueError, match="at least one"):
        confidence_interval([])


def test_paired_difference_uses_the_exact_wilcoxon_signed_rank_distribution():
    # n distinct positive differences: the only as-extreme outcomes are all-positive and all-negative, 2 / 2^n.
    five = paired_difference([1.1, 1.2, 1.3, 1.4, 1.5], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert five.p_value == pytest.approx(2 / 2**5) and not five.significant and five.pairs == 5
    six = paired_difference([2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [1.0] * 6)
    assert six.p_value == pytest.approx(2 / 2**6) and six.significant
    assert six.mean == pytest.approx(3.5)
    assert paired_difference([0.5, 0.6], [0.5, 0.6]).p_value == 1.0
    with pytest.raises(ValueError, match="match"):
        paired_difference([1.0], [1.0, 2.0])


def test_a_best_is_named_only_when_its_paired_difference_to_each_other_excludes_zero():
    clear = {"a": [0.90, 0.91, 0.92], "b": [0.80, 0.81, 0.82]}
    assert tied_with_best(clear) == ["a"]
    # b is better on average, but its lead over a changes sign between seeds: tied.
    noisy = {"a": [0.90, 0.80, 0.85], "b": [0.86, 0.90, 0.86], "c": [0.50, 0.52, 0.51]}
    assert tied_with_best(noisy) == ["b", "a"]
    assert tied_with_best({"a": [0.9], "b": [0.8]}) == ["a", "b"]  # one seed: nothing is distinguishable


def _measurements():
    """Two strategies, two seeds, a leave-one-site-out of three sites (s0, s1 held out in turn)."""
    rows = []
    for strategy, offset in (("good", 0.1), ("base", 0.0)):
        for seed in (0, 1):
            for fold, trained in (("s0", ("s1", "s2")), ("s1", ("s0", "s2"))):
                for site in trained:
                    value = 0.5 + offset + 0.01 * seed + (0.02 if fold == "s0" else 0.0)
                    rows.append(Measurement(strategy, seed, fold, site, "in-federation", "accuracy", value))
                rows.append(Measurement(strategy, seed, fold, fold, "unseen", "accuracy", 0.4 + offset + 0.01 * seed))
    return rows


def test_site_values_average_a_site_over_the_folds_it_trained_in():
    values = site_values(_measurements(), "in-federation", "accuracy")
    assert values["good"]["s2"] == {0: pytest.approx(0.61), 1: pytest.approx(0.62)}  # trained in both folds
    assert values["good"]["s0"] == {0: pytest.approx(0.60), 1: pytest.approx(0.61)}  # only in fold s1
    assert values["good"]["mean"][0] == pytest.approx((0.61 + 0.62 + 0.60) / 3)
    unseen = site_values(_measurements(), "unseen", "accuracy")
    assert set(unseen["base"]) == {"s0", "s1", "mean"}


def test_tables_state_the_tie_and_the_pairs():
    values = site_values(_measurements(), "unseen", "accuracy")
    table = "\n".join(markdown_table(values, ["good", "base"], "Unseen sites:"))
    assert "| good | **0.505 ± 0.064** |" in table  # +0.1 on every seed: distinguishable, bold
    assert table.splitlines()[-1].startswith("| best | good | good | good |")
    same = {"x": values["base"], "y": values["base"]}
    assert "tied: x, y" in "\n".join(markdown_table(same, ["x", "y"], ""))
    cells = paired_rows(values, ["good", "base"], "base")
    assert cells["good"].endswith("| 4")  # 2 seeds x 2 unseen sites
    assert cells["good"].startswith("+0.100")
