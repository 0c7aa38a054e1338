"""Small pieces every experiment module shares: the scale of a run and progress bars."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm.auto import tqdm

from .datasets import Dataset, load

__all__ = ["Scale", "progress", "dataset"]


@dataclass(frozen=True)
class Scale:
    """How big a run is: epochs, learning-rate halving period, data subset sizes."""

    epochs: int
    halve_every: int
    n_train: int | None = None
    n_test: int | None = None


FULL = Scale(epochs=30, halve_every=10)      # the paper halves every 10 epochs (section 5)
QUICK = Scale(epochs=2, halve_every=1, n_train=200, n_test=100)


def scale(quick: bool) -> Scale:
    return QUICK if quick else FULL


def dataset(name: str, quick: bool) -> Dataset:
    d = load(name)
    s = scale(quick)
    return d.subset(s.n_train, s.n_test) if quick else d


def progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="ep", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5)
