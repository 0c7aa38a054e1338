"""The shared training loop: the paper's learning-rate rule, divergence bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.experiments import common
from benchmarks.experiments.loops import (evaluate, fit, lr_for_batch, make_model, pad_curve,
                                          seed_everything)


def test_lr_rule_has_the_papers_points():
    assert lr_for_batch(50) == pytest.approx(0.05)
    assert lr_for_batch(100) == pytest.approx(0.08)  # the paper's value, not sqrt's 0.0707
    assert lr_for_batch(1) == pytest.approx(0.05 / math.sqrt(50))
    assert lr_for_batch(128) == pytest.approx(0.08)   # 0.05 * sqrt(128 / 50) = 0.08


def test_pad_curve():
    assert pad_curve([0.1, 0.5], 4).tolist() == [0.1, 0.5, 0.5, 0.5]
    assert pad_curve([0.1, 0.5, 0.7], 2).tolist() == [0.1, 0.5]


def test_fit_records_every_epoch_and_flags_divergence():
    torch.set_num_threads(1)
    data = common.dataset("digits", quick=True)
    gen = seed_everything(0)
    model = make_model(data, "normprop", data_norm="global")
    h = fit(model, data, epochs=2, batch_size=50, lr=0.05, gen=gen, halve_every=1)
    assert len(h.val_acc) == 3 and len(h.epoch_seconds) == 2 and not h.diverged
    assert h.val_acc[-1] == evaluate(model, data.x_test, data.y_test)
    # An absurd rate blows the plain net up; the run must say so and stop early.
    gen = seed_everything(0)
    model = make_model(data, "none")
    h = fit(model, data, epochs=5, batch_size=50, lr=1e6, gen=gen)
    assert h.diverged and len(h.val_acc) < 6
    assert np.isfinite(pad_curve(h.val_acc, 6)).all()
