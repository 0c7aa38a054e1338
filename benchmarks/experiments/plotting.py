"""Plot helpers: mean curves over seeds with 95% t-intervals (bands, or caps as the paper)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import curve_interval  # noqa: E402

__all__ = ["plt", "curve", "save", "COLORS"]

COLORS = {
    "NormProp": "#d62728", "BatchNorm": "#1f77b4", "LayerNorm": "#2ca02c", "none": "#7f7f7f",
}


def curve(ax, x, runs, label: str, color: str | None = None, caps: bool = False,
          marker: str | None = None, **kw) -> None:
    """Mean of ``runs`` (seeds x T) against ``x`` with its 95% interval: a shaded band, or
    error bars with caps (``caps=True``, as the paper's figures 1, 3 and 4)."""
    mean, half = curve_interval(np.asarray(runs, dtype=float))
    x = np.asarray(x)
    if caps:
        ax.errorbar(x, mean, yerr=np.nan_to_num(half), label=label, color=color, capsize=3,
                    marker=marker or "o", markersize=3, linewidth=1.2, **kw)
    else:
        (line,) = ax.plot(x, mean, label=label, color=color, linewidth=1.4, marker=marker, **kw)
        ax.fill_between(x, mean - np.nan_to_num(half), mean + np.nan_to_num(half),
                        color=line.get_color(), alpha=0.2, linewidth=0)


def save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_axis(ax) -> None:
    """Keep an accuracy axis within [0, 100]: a wide t-interval over 3 seeds can poke past 100%,
    which only wastes space."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, 0.0), min(hi, 100.5))
