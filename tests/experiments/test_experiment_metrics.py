"""The experiments' metrics on inputs small enough to check by hand."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest

from benchmarks.experiments import metrics as M
from benchmarks.experiments.report import fmt_ci, md_table, update_section


def test_t_interval_by_hand():
    # mean 2, sample sd 1, t(0.975, 2) = 4.3027, half-width 4.3027 / sqrt(3) = 2.4841
    mean, half = M.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)


def test_t_interval_textbook_quantiles():
    assert M.t_quantile(0.95, 1) == pytest.approx(12.706, abs=1e-3)
    assert M.t_quantile(0.95, 4) == pytest.approx(2.776, abs=1e-3)
    assert M.t_quantile(0.90, 9) == pytest.approx(1.833, abs=1e-3)


def test_t_cdf_fallback_without_scipy():
    # The numpy-only fallback must agree with the table: P(T <= 2.776 | 4 dof) = 0.975.
    assert M._t_cdf(2.776, 4) == pytest.approx(0.975, abs=2e-4)
    assert M._t_cdf(12.706, 1) == pytest.approx(0.975, abs=2e-4)


def test_t_interval_edge_cases():
    assert M.t_interval([4.0])[0] == 4.0 and math.isnan(M.t_interval([4.0])[1])
    assert all(math.isnan(v) for v in M.t_interval([]))
    assert M.t_interval([1.0, 1.0, 1.0]) == (1.0, 0.0)
    assert math.isnan(M.t_interval([1.0, float("nan")])[0])  # a diverged run is not hidden


def test_curve_interval_is_pointwise_t_interval():
    runs = np.array([[0.0, 1.0, 5.0], [2.0, 3.0, 5.0], [4.0, 8.0, 5.0]])
    mean, half = M.curve_interval(runs)
    for j in range(3):
        m, h = M.t_interval(runs[:, j])
        assert mean[j] == pytest.approx(m) and half[j] == pytest.approx(h)
    with pytest.raises(ValueError):
        M.curve_interval(np.zeros(3))


def test_ratio_interval():
    r, lo, hi = M.ratio_interval([2.0, 4.0], [1.0, 2.0])
    assert (r, lo, hi) == (2.0, 2.0, 2.0)
    r, lo, hi = M.ratio_interval([1.0, 1.2, 0.9], [1.0, 1.0, 1.0])
    assert lo < r < hi
    with pytest.raises(ValueError):
        M.ratio_interval([1.0], [1.0, 2.0])


def test_prequential_accuracy_by_hand():
    got = M.prequential_accuracy([True, False, True, True, False])
    assert got.tolist() == pytest.approx([1, 1 / 2, 2 / 3, 3 / 4, 3 / 5])


def test_rolling_accuracy_by_hand():
    got = M.rolling_accuracy([1, 0, 0, 1, 1, 1], window=3)
    assert got.tolist() == pytest.approx([1, 1 / 2, 1 / 3, 1 / 3, 2 / 3, 1])
    assert M.rolling_accuracy([1, 0], window=1).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        M.rolling_accuracy([1], window=0)


def test_recovery_samples():
    # before the drift: 4/4 right; after: wrong, wrong, then right. Full windows of 2 after the
    # drift reach 0.9 * 1.0 at the 4th post-drift sample.
    c = [1, 1, 1, 1, 0, 0, 1, 1, 1]
    assert M.recovery_samples(c, drift_at=4, window=2) == 4.0
    assert M.recovery_samples([1, 1, 0, 0, 0], drift_at=2, window=2) == math.inf
    with pytest.raises(ValueError):
        M.recovery_samples([1, 1], drift_at=2, window=1)


def test_fmt_and_table():
    assert fmt_ci(0.5, 0.01, scale=100) == "50.00 ± 1.00"
    assert fmt_ci(float("nan"), 1.0) == "n/a"
    assert fmt_ci(2.0, float("nan")) == "2.00"
    assert md_table(["a"], [["1"], ["2"]]).splitlines() == ["| a |", "|---|", "| 1 |", "| 2 |"]


def test_update_section_keeps_hand_written_text(tmp_path):
    path = tmp_path / "RESULTS.md"
    update_section(path, "one", "first")
    path.write_text(path.read_text() + "\nhand-written discussion\n")
    update_section(path, "two", "second")
    update_section(path, "one", "first, rerun")
    text = path.read_text()
    assert "first, rerun" in text and "first\n" not in text
    assert "second" in text and "hand-written discussion" in text
    assert text.count("<!-- BEGIN one -->") == 1


@pytest.mark.parametrize("module", ["metrics", "report", "datasets"])
def test_docstring_examples(module):
    mod = importlib.import_module(f"benchmarks.experiments.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0
