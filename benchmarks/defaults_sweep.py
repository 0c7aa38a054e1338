"""Defaults sweep: one-pass prequential accuracy of the worker's training path on real streams.

The issue asks for a default model configuration that "must learn well at batch size 1 on a
stream it has never seen, with no per-data-set tuning", with the learning rate scaled by the
batch size the worker actually takes. This script measures exactly what the worker does --
:class:`service.trainer.ModelTrainer` (batch data normalisation with running statistics,
``scaled_lr(lr, batch, "sqrt")``, SGD momentum, unit-norm projection, test-then-train scoring)
-- on each stream once, in arrival order, over a grid of learning rate x batch size (x momentum,
x architecture), and prints one table per setting plus the mean over streams.

Streams (all bundled, no download): scikit-learn's digits, breast_cancer, wine, iris; River's
ImageSegments, Phishing and Bananas (if River is installed); and a synthetic stream with an
abrupt concept drift halfway (the class means move), shuffled once with a fixed seed.

Run::

    python benchmarks/defaults_sweep.py            # the full grid (several minutes, 2 cores)
    python benchmarks/defaults_sweep.py --quick    # fewer settings
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.codec import Sample  # noqa: E402
from service.settings import ModelConfig  # noqa: E402
from service.trainer import ModelTrainer  # noqa: E402

Stream = tuple[np.ndarray, np.ndarray]


def _sklearn(name: str) -> Callable[[], Stream]:
    def load() -> Stream:
        from sklearn import datasets
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
        return x.astype(np.float32), y.astype(np.int64)
    return load


def _river(name: str) -> Callable[[], Stream]:
    def load() -> Stream:
        from river import datasets
        rows, labels = [], []
        for xi, yi in getattr(datasets, name)():
            rows.append([float(v) for v in xi.values()])
            labels.append(yi)
        classes = {c: i for i, c in enumerate(sorted(set(labels), key=str))}
        return (np.asarray(rows, dtype=np.float32),
                np.asarray([classes[c] for c in labels], dtype=np.int64))
    return load


def _drift(n: int = 4000, features: int = 10, classes: int = 4, seed: int = 7) -> Stream:
    rng = np.random.default_rng(seed)
    before = rng.normal(0, 1.5, size=(classes, features))
    after = rng.normal(0, 1.5, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    centres = np.where((np.arange(n) < n // 2)[:, None], before[y], after[y])
    return (centres + rng.normal(size=(n, features))).astype(np.float32), y.astype(np.int64)


STREAMS: dict[str, Callable[[], Stream]] = {
    "digits": _sklearn("digits"),
    "breast_cancer": _sklearn("breast_cancer"),
    "wine": _sklearn("wine"),
    "iris": _sklearn("iris"),
    "image_segments": _river("ImageSegments"),
    "phishing": _river("Phishing"),
    "bananas": _river("Bananas"),
    "drift": _drift,
}


def load_streams(names: list[str]) -> dict[str, Stream]:
    out = {}
    for name in names:
        try:
            x, y = STREAMS[name]()
        except ImportError as exc:
            print(f"# skipping {name}: {exc}", file=sys.stderr)
            continue
        if name != "drift":  # arrival order: one fixed shuffle (the files are sorted by class)
            order = np.random.default_rng(0).permutation(len(x))
            x, y = x[order], y[order]
        out[name] = (x, y)
    return out


def prequential(x: np.ndarray, y: np.ndarray, batch: int, **config: object) -> float:
    """One pass, test-then-train, through the worker's trainer; accuracy over every sample."""
    cfg = ModelConfig(input_shape=[x.shape[1]], num_classes=int(y.max()) + 1, max_batch=batch,
                      **config)  # type: ignore[arg-type]
    trainer = ModelTrainer(cfg, torch.device("cpu"))
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if batch == 1:
            trainer.train_batch([Sample(xb[0], int(yb[0]))])
        else:
            trainer.train_arrays(np.ascontiguousarray(xb), yb)
    return trainer.score_total / len(x)


def sweep(streams: dict[str, Stream], lrs: list[float], batches: list[int],
          title: str, **config: object) -> dict[tuple[float, int], float]:
    """Print one table (rows: stream; columns: lr per batch) and return the means."""
    cols = [(lr, b) for b in batches for lr in lrs]
    print(f"\n### {title}\n")
    print("| stream | " + " | ".join(f"b={b} lr={lr:g}" for lr, b in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    scores: dict[tuple[float, int], list[float]] = {c: [] for c in cols}
    for name, (x, y) in streams.items():
        row = []
        for lr, b in cols:
            acc = prequential(x, y, b, lr=lr, **config)
            scores[(lr, b)].append(acc)
            row.append(f"{acc:.3f}")
        print(f"| {name} (n={len(x)}) | " + " | ".join(row) + " |", flush=True)
    means = {c: statistics.mean(v) for c, v in scores.items()}
    print("| **mean** | " + " | ".join(f"**{means[c]:.3f}**" for c in cols) + " |", flush=True)
    return means


def heldout(streams: dict[str, Stream], lrs: list[float], passes: int = 3, **config: object) -> None:
    """Held-out accuracy after ``passes`` passes at batch size 1 (70/30 split): does the
    default keep learning past the first pass, not just start fast?"""
    print(f"\n### held-out accuracy after {passes} passes at batch size 1 (70/30 split)\n")
    print("| stream | " + " | ".join(f"lr={lr:g}" for lr in lrs) + " |")
    print("|---|" + "---:|" * len(lrs))
    for name, (x, y) in streams.items():
        cut = int(0.7 * len(x))
        row = []
        for lr in lrs:
            cfg = ModelConfig(input_shape=[x.shape[1]], num_classes=int(y.max()) + 1,
                              max_batch=1, lr=lr, **config)  # type: ignore[arg-type]
            trainer = ModelTrainer(cfg, torch.device("cpu"))
            rng = np.random.default_rng(1)
            for _ in range(passes):
                for i in rng.permutation(cut):
                    trainer.train_batch([Sample(x[i], int(y[i]))])
            trainer.model.eval()
            with torch.no_grad():
                pred = trainer.model(torch.from_numpy(x[cut:])).argmax(1).numpy()
            row.append(f"{float((pred == y[cut:]).mean()):.3f}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", default=",".join(STREAMS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tables", default="grid,momentum,linear,arch,heldout,clip",
                        help="which tables: grid, momentum, linear, arch, heldout, clip")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    streams = load_streams(args.streams.split(","))
    default = ModelConfig()
    lrs = [0.001, 0.003, 0.01, 0.03] if args.quick else [0.001, 0.003, 0.01, 0.03, 0.1]
    started = time.time()
    print(f"# defaults sweep: one-pass prequential accuracy; torch {torch.__version__}; "
          f"defaults lr={default.lr}, lr_scaling={default.lr_scaling}; data_norm={default.data_norm}, "
          f"clip={default.clip}, "
          f"weight_decay={default.weight_decay}")
    tables = set(args.tables.split(","))
    if "grid" in tables:
        sweep(streams, lrs, [1, 16, 64], f"{default.spec}, momentum 0.9, sqrt scaling "
              "(lr x batch)", spec=default.spec, momentum=0.9, lr_scaling="sqrt")
    if "momentum" in tables:
        sweep(streams, lrs, [1], f"{default.spec}, momentum 0 (batch 1)", spec=default.spec,
              momentum=0.0)
    if "linear" in tables:
        sweep(streams, [0.0005, 0.001, 0.002], [16, 64], f"{default.spec}, momentum 0.9, "
              "linear scaling", spec=default.spec, momentum=0.9, lr_scaling="linear")
    if "arch" in tables and not args.quick:
        sweep(streams, [0.001, 0.003], [1], "mlp:128,128, momentum 0.9 (batch 1)",
              spec="mlp:128,128", momentum=0.9)
    if "heldout" in tables and not args.quick:
        heldout({k: v for k, v in streams.items() if k in ("digits", "image_segments",
                                                            "phishing")},
                [0.001, 0.003], spec=default.spec, momentum=0.9)
    if "clip" in tables and not args.quick:
        sweep(streams, [0.001], [1, 64], f"{default.spec}, momentum 0.9, no input clipping",
              spec=default.spec, momentum=0.9, clip=None)
    print(f"\n# {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
