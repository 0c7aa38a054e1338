"""Real data sets that need no download at run time, and the streams built from them.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), as
  ``(1, 8, 8)`` images for the conv nets; split 70/30, stratified, fixed seed.
* ``mnist1d``: MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package with its
  default arguments (seed 42): the standard 4,000 train / 1,000 test split, 40 features.
* ``segment``: River's bundled UCI Image Segmentation stream (2,310 samples, 18 features,
  7 classes) -- the classic online-learning benchmark; needs ``river``.

As in the paper (section 5, "We use test set during validation for convergence analysis"), the
test split doubles as the validation set for the per-epoch curves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "load", "DATASETS", "Stream", "make_stream", "STREAMS"]


@dataclass(frozen=True)
class Dataset:
    """A train/test split as float32 tensors, with the shape a model should expect."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    input_shape: tuple[int, ...]
    num_classes: int

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first ``n_train`` / ``n_test`` samples (quick configurations)."""
        return Dataset(self.name, self.x_train[:n_train], self.y_train[:n_train],
                       self.x_test[:n_test], self.y_test[:n_test], self.input_shape,
                       self.num_classes)


def _split(x: np.ndarray, y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)


@lru_cache(maxsize=None)
def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = _split(x.astype(np.float32), y, test_size=0.3, seed=0)
    as_img = lambda a: torch.from_numpy(np.ascontiguousarray(a)).view(-1, 1, 8, 8)  # noqa: E731
    return Dataset("digits", as_img(xtr), torch.from_numpy(ytr).long(), as_img(xte),
                   torch.from_numpy(yte).long(), (1, 8, 8), 10)


@lru_cache(maxsize=None)
def _mnist1d() -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # defaults: 5,000 samples, 4,000/1,000 split, seed 42
    f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return Dataset("mnist1d", f(d["x"]), torch.from_numpy(np.asarray(d["y"])).long(),
                   f(d["x_test"]), torch.from_numpy(np.asarray(d["y_test"])).long(), (40,), 10)


@lru_cache(maxsize=None)
def _segment_arrays() -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    from river import datasets

    rows = list(datasets.ImageSegments())
    features = list(rows[0][0].keys())
    classes = sorted({y for _, y in rows})
    x = np.array([[r[0][k] for k in features] for r in rows], dtype=np.float32)
    y = np.array([classes.index(r[1]) for r in rows], dtype=np.int64)
    return x, y, features, classes


@lru_cache(maxsize=None)
def _segment() -> Dataset:
    x, y, _, classes = _segment_arrays()
    xtr, xte, ytr, yte = _split(x, y, test_size=0.3, seed=0)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Dataset("segment", t(xtr), t(ytr).long(), t(xte), t(yte).long(), (18,), len(classes))


DATASETS = {"digits": _digits, "mnist1d": _mnist1d, "segment": _segment}


def load(name: str) -> Dataset:
    """Load a bundled data set by name (cached)."""
    try:
        return DATASETS[name]()
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None


# -- streams -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stream:
    """A finite stream: features ``x`` (n, d) float32, labels ``y`` (n,), and where it drifts.

    ``drift_at`` is the index of the first sample after the drift (``None``: stationary).
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    drift_at: int | None = None
    drift: str | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def river_items(self) -> list[tuple[dict[str, float], int]]:
        """The stream as River expects it: ``(dict of features, label)`` pairs."""
        keys = [f"x{i}" for i in range(self.x.shape[1])]
        return [(dict(zip(keys, map(float, row))), int(label)) for row, label in zip(self.x, self.y)]


def _pool(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """All samples of a data set (train and test together), flattened to vectors."""
    if name == "segment":
        x, y, _, classes = _segment_arrays()
        return x, y, len(classes)
    d = load(name)
    x = torch.cat([d.x_train, d.x_test]).flatten(1).numpy()
    y = torch.cat([d.y_train, d.y_test]).numpy()
    return x, y, d.num_classes


def feature_shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sensor recalibration: every feature rescaled by a factor in [0.5, 2] and offset by
    +-2 of its standard deviations (the same transform for every sample after the drift)."""
    sd = x.std(axis=0) + 1e-6
    scale = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=x.shape[1]))
    offset = rng.choice([-2.0, 2.0], size=x.shape[1]) * sd
    return (x * scale + offset).astype(np.float32)


def label_permutation(y: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A concept drift: classes relabelled by a random derangement (every class changes)."""
    while True:
        perm = rng.permutation(num_classes)
        if np.all(perm != np.arange(num_classes)):
            return perm[y]


def make_stream(name: str, seed: int, limit: int | None = None) -> Stream:
    """A shuffled stream over a whole data set; ``"<data>+shift"`` / ``"<data>+relabel"`` add a
    feature shift / label permutation at the halfway point.

    >>> s = make_stream("digits+relabel", seed=0, limit=100)
    >>> len(s), s.drift_at, s.drift
    (100, 50, 'relabel')
    """
    base, _, drift = name.partition("+")
    x, y, k = _pool(base)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x, y = x.copy(), y.copy()
    if not drift:
        return Stream(name, x, y, k)
    half = len(y) // 2
    if drift == "shift":
        x[half:] = feature_shift(x[half:], rng)
    elif drift == "relabel":
        y[half:] = label_permutation(y[half:], k, rng)
    else:
        raise ValueError(f"unknown drift {drift!r}; known: shift, relabel")
    return Stream(name, x, y, k, drift_at=half, drift=drift)


STREAMS = ("segment", "digits", "mnist1d", "segment+shift", "mnist1d+relabel")
