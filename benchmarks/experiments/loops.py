"""Training and evaluation loops shared by the experiments (the paper's protocol, section 5).

SGD with momentum 0.9 and weight decay 5e-4 (:func:`normprop.paper_optimizer`), learning rate
halved on a fixed schedule, shuffled mini-batches, and the unit-norm projection after every step
(:func:`normprop.train_step`; it is a no-op for the baselines, which have no NormProp layers).
Every method gets the same loop, optimiser, schedule and learning rate.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from normprop import build_model, halve_lr_every, paper_optimizer, train_step

from .datasets import Dataset

__all__ = ["seed_everything", "make_model", "evaluate", "train_epoch", "History", "fit", "lr_for_batch"]

#: Architectures. The conv net is a 10-layer Network-in-Network in miniature (the paper's NIN
#: has 12; we keep its C/P pattern, 1x1 "mlpconv" layers and global average pooling output).
DIGITS_CONV = ("C(32,3,1,1)-C(32,1,1,0)-P(2,2,0,max)-C(64,3,1,1)-C(64,1,1,0)-P(2,2,0,max)-"
               "C(64,1,1,0)-C(64,1,1,0)-C(10,1,1,0)-P(2,2,0,avg)")
MNIST1D_MLP = "mlp:256,256,256"
ARCH = {"digits": DIGITS_CONV, "mnist1d": MNIST1D_MLP, "segment": "mlp:128,128"}

#: The paper's learning rates: 0.05 at batch size 50, 0.08 at 100 (sections 5.1-5.5).
BASE_LR, BASE_BATCH = 0.05, 50


def lr_for_batch(batch_size: int) -> float:
    """The paper's two points (0.05 at 50, 0.08 at 100) and ``sqrt`` scaling in between/beyond.

    ``normprop.scaled_lr(0.05, b, "sqrt", 50)`` gives 0.071 at 100 where the paper used 0.08; we
    use the paper's value at 100 and the square-root rule elsewhere ("larger initial learning
    rate for larger batch size improves performance", section 4.4).
    """
    from normprop import scaled_lr

    if batch_size == 100:
        return 0.08
    return scaled_lr(BASE_LR, batch_size, rule="sqrt", base_batch=BASE_BATCH)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


def make_model(data: Dataset, norm: str, data_norm: str = "batch", spec: str | None = None,
               **kwargs) -> nn.Module:
    """The data set's architecture with the given hidden normalisation; global data
    normalisation is fitted on the training split."""
    model = build_model(spec or ARCH[data.name], data.input_shape, data.num_classes, norm=norm,
                        data_norm=data_norm, **kwargs)
    if data_norm == "global":
        model.data_norm.fit(data.x_train)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Accuracy in eval mode (NormProp: the same function as training; BN: running stats)."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        out = model(x[i:i + batch_size])
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(1, len(y))


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                batch_size: int, gen: torch.Generator) -> tuple[float, int, int]:
    """One shuffled pass; returns (mean finite loss, steps skipped as non-finite, steps).

    The last incomplete batch is dropped when it would hold one sample and the model has
    BatchNorm (which cannot train on it); otherwise it is kept.
    """
    model.train()
    perm = torch.randperm(len(y), generator=gen)
    losses, skipped = [], 0
    for i in range(0, len(y), batch_size):
        idx = perm[i:i + batch_size]
        if len(idx) == 1 and batch_size > 1:
            continue  # a ragged single-sample tail: BN cannot normalise it; skip for every method
        r = train_step(model, opt, x[idx], y[idx])
        losses.append(r.loss)
        skipped += r.skipped is not None
    finite = [v for v in losses if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), skipped, len(losses)


@dataclass
class History:
    """Per-epoch record of one training run (index 0 = before training)."""

    val_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    skipped: int = 0
    diverged: bool = False
    extra: list = field(default_factory=list)


def fit(model: nn.Module, data: Dataset, epochs: int, batch_size: int, lr: float,
        gen: torch.Generator, halve_every: int | None = None,
        on_epoch: Callable[[nn.Module, int], object] | None = None,
        progress=None) -> History:
    """Train ``epochs`` epochs; record validation (= test split) accuracy after each epoch.

    ``train_step`` skips a non-finite step without touching the weights; a run where more than
    10% of an epoch's steps were skipped (or the weights went non-finite) is marked diverged and
    stops, its later epochs padded with its last accuracy by the plots.
    """
    opt = paper_optimizer(model, lr)
    sched = halve_lr_every(opt, halve_every) if halve_every else None
    h = History()
    h.val_acc.append(evaluate(model, data.x_test, data.y_test))
    if on_epoch is not None:
        h.extra.append(on_epoch(model, 0))
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss, skipped, steps = train_epoch(model, opt, data.x_train, data.y_train, batch_size,
                                           gen)
        h.epoch_seconds.append(time.perf_counter() - t0)
        h.skipped += skipped
        h.train_loss.append(loss)
        if sched is not None:
            sched.step()
        h.val_acc.append(evaluate(model, data.x_test, data.y_test))
        if on_epoch is not None:
            h.extra.append(on_epoch(model, epoch))
        if progress is not None:
            progress.update(1)
        if (skipped > 0.1 * steps or not math.isfinite(loss)
                or not all(bool(torch.isfinite(p).all()) for p in model.parameters())):
            h.diverged = True
            if progress is not None:
                progress.update(epochs - epoch)
            break
    return h


def pad_curve(values: list[float], length: int) -> np.ndarray:
    """A diverged run's curve, padded with its last value to the common length."""
    v = np.asarray(values, dtype=float)
    if v.size >= length:
        return v[:length]
    return np.concatenate([v, np.full(length - v.size, v[-1] if v.size else np.nan)])
