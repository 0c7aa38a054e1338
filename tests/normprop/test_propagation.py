"""Propagation of the data normalisation through depth (sections 3.3, 3.4)."""

from __future__ import annotations

import math

import pytest
import torch

from normprop import NormPropLinear, build_model, jacobian_singular_values, layer_input_stats
from normprop.diagnostics import canonical_error_bound, coherence

DEPTH, WIDTH = 20, 512


def _profile(norm: str, gamma_init: float | None, seed: int = 0) -> tuple[list[float], list[float]]:
    """Average per-unit std and |mean| of each hidden layer's input, N(0, 1) data, fresh net."""
    torch.manual_seed(seed)
    net = build_model("mlp:" + ",".join([str(WIDTH)] * DEPTH), WIDTH, 10, norm=norm,
                      data_norm="none", gamma_init=gamma_init)
    x = torch.randn(1000, WIDTH, generator=torch.Generator().manual_seed(seed + 1))
    stats = layer_input_stats(net.eval(), x)
    assert len(stats) == DEPTH
    return ([float(s.std.mean()) for s in stats], [float(s.mean.abs().mean()) for s in stats])


@pytest.fixture(scope="module")
def mlp_profiles() -> dict[str, tuple[list[float], list[float]]]:
    return {"gamma1": _profile("normprop", 1.0), "paper": _profile("normprop", None),
            "plain": _profile("none", None)}


def test_normprop_mlp_keeps_every_hidden_layer_standardised(mlp_profiles):
    stds, means = mlp_profiles["gamma1"]
    for layer, (s, m) in enumerate(zip(stds, means), start=1):
        assert 0.85 <= s <= 1.2, (layer, s)
        assert m < 0.15, (layer, m)


def test_plain_glorot_relu_net_collapses(mlp_profiles):
    stds, _ = mlp_profiles["plain"]
    assert stds[0] > 0.5
    assert stds[-1] < 1e-2  # measured ~1e-3..2e-4 at layer 20, depending on the seed
    assert all(b < a for a, b in zip(stds, stds[1:]))  # shrinks at every layer
    assert mlp_profiles["gamma1"][0][-1] > 100 * stds[-1]


def test_paper_gamma_trades_spread_for_jacobian(mlp_profiles):
    """gamma = 1/1.21 makes the Jacobian ~isometric (below) but the spread shrinks with depth."""
    stds, _ = mlp_profiles["paper"]
    assert stds[0] == pytest.approx(1.0, abs=0.05)  # the first layer sees the data itself
    assert stds[4] < 0.5 and stds[-1] < 0.3          # measured ~0.16 at layer 20 here
    assert stds[-1] < stds[9] < stds[4] < stds[0]
    assert stds[-1] > 0.05                           # ... but far from the plain net's collapse


def _conv_profile(norm: str, gamma_init: float | None) -> list[float]:
    torch.manual_seed(0)
    spec = "-".join(["C(32,3,1,0)"] * 10)  # no padding: zero borders lower the variance
    net = build_model(spec, (16, 26, 26), 10, norm=norm, data_norm="none", gamma_init=gamma_init)
    x = torch.randn(24, 16, 26, 26, generator=torch.Generator().manual_seed(1))
    stats = layer_input_stats(net.eval(), x)
    assert len(stats) == 10
    if norm == "normprop" and gamma_init == 1.0:
        for layer, s in enumerate(stats, start=1):
            assert float(s.mean.abs().mean()) < 0.15, layer
    return [float(s.std.mean()) for s in stats]


def test_normprop_conv_net_keeps_every_hidden_layer_standardised():
    stds = _conv_profile("normprop", 1.0)
    assert all(0.85 <= s <= 1.2 for s in stds), stds
    plain = _conv_profile("none", None)
    assert plain[-1] < 0.05 and plain[-1] < plain[0] / 20, plain
    paper = _conv_profile("normprop", None)
    assert paper[-1] < 0.5 < paper[0], paper


@pytest.mark.parametrize("gamma_init,want", [(1.0, 0.5 / (0.5 * (1 - 1 / math.pi))), (None, 1.0)])
def test_relu_layer_jacobian_singular_values(gamma_init, want):
    """Section 3.4: E[J J^T] = (0.5 / c1^2) I = 1.47 I with gamma = 1; ~I with gamma = 1/1.21."""
    torch.manual_seed(0)
    layer = NormPropLinear(128, 128, gamma_init=gamma_init).double()
    g = torch.Generator().manual_seed(1)
    sq = torch.stack([jacobian_singular_values(layer, torch.randn(128, generator=g,
                                                                  dtype=torch.float64)) ** 2
                      for _ in range(10)])
    mean_sq = float(sq.mean())
    assert mean_sq == pytest.approx(want, rel=0.04)
    if gamma_init == 1.0:
        assert math.sqrt(mean_sq) == pytest.approx(1.21, abs=0.03)


def test_coherence_and_canonical_error_bound():
    eye = torch.eye(4)
    assert coherence(eye) == 0.0 and canonical_error_bound(eye) == 0.0
    same = torch.ones(3, 5)
    assert coherence(same) == pytest.approx(1.0)
    # Unit rows: sqrt(sum_{i != j} 1) = sqrt(m (m - 1)).
    assert canonical_error_bound(same / same.norm(dim=1, keepdim=True)) == pytest.approx(math.sqrt(6))
    torch.manual_seed(0)
    wide = NormPropLinear(512, 64).weight
    assert coherence(wide) < 0.3  # random rows in 512 dims are nearly incoherent
