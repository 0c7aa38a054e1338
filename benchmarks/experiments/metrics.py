"""Metrics the experiments report: 95% t-intervals, prequential accuracy, drift recovery.

Every curve in the paper's figures carries a 95% confidence interval over runs ("caps on markers
show 95% confidence interval"); we compute it the textbook way, over seeds, with Student's t
(few seeds: the normal quantile 1.96 would understate it -- with 3 seeds t is 4.30).

Prequential ("test-then-train") accuracy is how an online learner is scored (Dawid 1984; River's
``evaluate.progressive_val_score``): each sample is predicted *before* the model learns from it,
so every prediction is on unseen data and no hold-out set is needed.

Examples:

    >>> mean, half = t_interval([1.0, 2.0, 3.0])
    >>> round(mean, 3), round(half, 3)               # sd 1, t(0.975, 2) = 4.303, / sqrt(3)
    (2.0, 2.484)
    >>> prequential_accuracy([1, 0, 1, 1]).round(3).tolist()
    [1.0, 0.5, 0.667, 0.75]
    >>> rolling_accuracy([1, 0, 1, 1], window=2).tolist()
    [1.0, 0.5, 0.5, 1.0]
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "t_quantile",
    "t_interval",
    "curve_interval",
    "prequential_accuracy",
    "rolling_accuracy",
    "recovery_samples",
    "ratio_interval",
]


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t quantile ``t_{(1+confidence)/2, dof}``.

    Uses scipy when present; otherwise inverts the t CDF by bisection on its regularised
    incomplete-beta form (numpy only, so the tests need no scipy).

    >>> round(t_quantile(0.95, 2), 3), round(t_quantile(0.95, 4), 3), round(t_quantile(0.95, 1000), 2)
    (4.303, 2.776, 1.96)
    """
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    p = 0.5 + confidence / 2.0
    try:  # pragma: no cover - exercised wherever scipy is installed
        from scipy.stats import t as student_t

        return float(student_t.ppf(p, dof))
    except ImportError:  # pragma: no cover
        pass
    lo, hi = 0.0, 1e3  # pragma: no cover
    for _ in range(200):  # pragma: no cover
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)  # pragma: no cover


def _t_cdf(t: float, dof: int) -> float:  # pragma: no cover - fallback only
    # P(T <= t) for t >= 0 via numerical integration of the density (Simpson, fine grid).
    xs = np.linspace(0.0, t, 4001)
    c = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
    ys = c * (1 + xs**2 / dof) ** (-(dof + 1) / 2)
    h = xs[1] - xs[0]
    area = h / 3 * (ys[0] + ys[-1] + 4 * ys[1:-1:2].sum() + 2 * ys[2:-1:2].sum())
    return 0.5 + float(area)


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided t confidence interval of the mean.

    Non-finite values (a diverged run) are kept: the mean is then ``nan``, which is the honest
    summary. A single value has no spread: half-width ``nan``.

    >>> t_interval([5.0])
    (5.0, nan)
    """
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        return float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan")
    sd = float(v.std(ddof=1))
    return mean, t_quantile(confidence, v.size - 1) * sd / math.sqrt(v.size)


def curve_interval(runs: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise :func:`t_interval` of curves ``runs`` of shape ``(seeds, T)``.

    >>> m, h = curve_interval(np.array([[0.0, 1.0], [2.0, 1.0]]))
    >>> m.tolist(), round(float(h[0]), 3), float(h[1])
    ([1.0, 1.0], 12.706, 0.0)
    """
    runs = np.asarray(runs, dtype=float)
    if runs.ndim != 2:
        raise ValueError(f"runs must be (seeds, T), got shape {runs.shape}")
    mean = runs.mean(axis=0)
    if runs.shape[0] < 2:
        return mean, np.full_like(mean, np.nan)
    half = t_quantile(confidence, runs.shape[0] - 1) * runs.std(axis=0, ddof=1) / math.sqrt(runs.shape[0])
    return mean, half


def ratio_interval(a: Sequence[float], b: Sequence[float],
                   confidence: float = 0.95) -> tuple[float, float, float]:
    """Ratio of means ``mean(a) / mean(b)`` with a 95% interval from the t-interval of
    ``log(a_i / b_i)`` over paired runs (a ratio is multiplicative, so its interval is taken on
    the log scale and mapped back). Returns ``(ratio, low, high)``.

    >>> r, lo, hi = ratio_interval([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    >>> r, lo, hi
    (2.0, 2.0, 2.0)
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired runs needed: a and b must have the same length")
    logs = np.log(a / b)
    m, h = t_interval(logs, confidence)
    ratio = float(a.mean() / b.mean())
    if math.isnan(h):
        return ratio, float("nan"), float("nan")
    return ratio, float(math.exp(m - h)), float(math.exp(m + h))


def prequential_accuracy(correct: Sequence[float] | np.ndarray) -> np.ndarray:
    """Cumulative test-then-train accuracy after each sample: ``cumsum(correct) / (1..n)``."""
    c = np.asarray(correct, dtype=float).ravel()
    return np.cumsum(c) / np.arange(1, c.size + 1)


def rolling_accuracy(correct: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Accuracy over the last ``window`` samples (fewer at the start), after each sample.

    This is what shows a drift and the recovery from it; the cumulative curve hides both.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    c = np.asarray(correct, dtype=float).ravel()
    csum = np.concatenate([[0.0], np.cumsum(c)])
    idx = np.arange(1, c.size + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def recovery_samples(correct: Sequence[float] | np.ndarray, drift_at: int, window: int,
                     fraction: float = 0.9) -> float:
    """Samples after the drift until the rolling accuracy is back to ``fraction`` of its level
    just before the drift (rolling accuracy over the ``window`` samples ending at ``drift_at``).

    The rolling window is restarted at the drift, so pre-drift samples cannot count towards the
    recovery. ``inf`` when it never recovers.

    >>> recovery_samples([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], drift_at=4, window=2)
    4.0
    """
    c = np.asarray(correct, dtype=float).ravel()
    if not 0 < drift_at < c.size:
        raise ValueError(f"drift_at must lie inside the stream (1..{c.size - 1}), got {drift_at}")
    before = c[max(0, drift_at - window):drift_at].mean()
    after = rolling_accuracy(c[drift_at:], window)
    full = np.arange(1, after.size + 1) >= window  # judge only full windows
    hits = np.nonzero(full & (after >= fraction * before))[0]
    return float(hits[0] + 1) if hits.size else float("inf")
