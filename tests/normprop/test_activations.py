"""Activation constants (paper Remark 1, Remark 2, section 3.4, eq. 12)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from normprop import (
    KNOWN_ACTIVATIONS,
    Activation,
    NormPropLinear,
    activation_function,
    activation_stats,
    gaussian_expectation,
    prelu_mean_std,
)

SQRT_2PI = math.sqrt(2 * math.pi)
# Activations with parameters, as (name, params) pairs; every known name appears at least once.
CASES = [
    ("relu", {}),
    ("prelu", {}),
    ("prelu", {"a": 0.1}),
    ("leaky_relu", {}),
    ("leaky_relu", {"negative_slope": 0.2}),
    ("identity", {}),
    ("tanh", {}),
    ("sigmoid", {}),
    ("elu", {}),
    ("elu", {"alpha": 0.5}),
    ("gelu", {}),
    ("silu", {}),
    ("softplus", {}),
]


def test_every_known_activation_is_covered():
    assert {name for name, _ in CASES} == set(KNOWN_ACTIVATIONS)


def test_relu_closed_form_remark_1():
    s = activation_stats("relu")
    assert s.mean == pytest.approx(1 / SQRT_2PI, abs=1e-12)
    assert s.std == pytest.approx(math.sqrt(0.5 * (1 - 1 / math.pi)), abs=1e-12)
    # Section 3.4: E[J J^T] = (0.5 / c1^2) I = 1.47 I, singular values 1.21, gamma = 1/1.21.
    assert s.jacobian_factor**2 == pytest.approx(0.5 / s.std**2, abs=1e-12)
    assert s.jacobian_factor**2 == pytest.approx(1.467, abs=1e-3)
    assert s.jacobian_factor == pytest.approx(1.2112, abs=1e-4)
    assert s.gamma_init == pytest.approx(1 / 1.2112, abs=1e-4)


@pytest.mark.parametrize("name,key,a", [("prelu", "a", 0.25), ("prelu", "a", 0.1),
                                        ("prelu", "a", -0.3), ("leaky_relu", "negative_slope", 0.01),
                                        ("leaky_relu", "negative_slope", 0.2)])
def test_prelu_closed_form_remark_2(name, key, a):
    s = activation_stats(name, **{key: a})
    assert s.mean == pytest.approx((1 - a) / SQRT_2PI, abs=1e-12)
    assert s.std == pytest.approx(math.sqrt(0.5 * ((1 + a * a) - (1 - a) ** 2 / math.pi)), abs=1e-12)
    assert s.jacobian_factor == pytest.approx(math.sqrt(0.5 * (1 + a * a)) / s.std, abs=1e-12)


def _quad_moments(f, df) -> tuple[float, float, float]:
    """E[f], std[f], sqrt(E[f'^2])/std by adaptive quadrature (independent of the library's)."""
    pdf = lambda z: math.exp(-0.5 * z * z) / SQRT_2PI  # noqa: E731
    opts = dict(points=[0.0], limit=200, epsabs=1e-13, epsrel=1e-13)
    m = integrate.quad(lambda z: f(z) * pdf(z), -14, 14, **opts)[0]
    v = integrate.quad(lambda z: (f(z) - m) ** 2 * pdf(z), -14, 14, **opts)[0]
    d2 = integrate.quad(lambda z: df(z) ** 2 * pdf(z), -14, 14, **opts)[0]
    return m, math.sqrt(v), math.sqrt(d2) / math.sqrt(v)


_sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
_phi = lambda z: 0.5 * (1 + special.erf(z / math.sqrt(2)))  # noqa: E731
_SMOOTH = {
    "tanh": (math.tanh, lambda z: 1 - math.tanh(z) ** 2),
    "sigmoid": (_sig, lambda z: _sig(z) * (1 - _sig(z))),
    "elu": (lambda z: z if z > 0 else math.expm1(z), lambda z: 1.0 if z > 0 else math.exp(z)),
    "gelu": (lambda z: z * _phi(z), lambda z: _phi(z) + z * math.exp(-0.5 * z * z) / SQRT_2PI),
    "silu": (lambda z: z * _sig(z), lambda z: _sig(z) * (1 + z * (1 - _sig(z)))),
    "softplus": (lambda z: math.log1p(math.exp(z)) if z < 30 else z, _sig),
}


@pytest.mark.parametrize("name", sorted(_SMOOTH))
def test_numerical_constants_match_independent_quadrature(name):
    f, df = _SMOOTH[name]
    m, s, j = _quad_moments(f, df)
    got = activation_stats(name)
    assert got.mean == pytest.approx(m, abs=1e-6)
    assert got.std == pytest.approx(s, abs=1e-6)
    assert got.jacobian_factor == pytest.approx(j, abs=1e-6)


def test_closed_forms_of_smooth_activations():
    # Symmetry: tanh is odd, sigmoid(z) - 1/2 is odd.
    assert activation_stats("tanh").mean == pytest.approx(0.0, abs=1e-12)
    assert activation_stats("sigmoid").mean == pytest.approx(0.5, abs=1e-12)
    # E[Z Phi(Z)] = E[phi(Z)] = 1 / (2 sqrt(pi)).
    assert activation_stats("gelu").mean == pytest.approx(1 / (2 * math.sqrt(math.pi)), abs=1e-9)
    # E[elu_alpha(Z)] = 1/sqrt(2 pi) + alpha (e^{1/2} Phi(-1) - 1/2).
    for alpha in (1.0, 0.5):
        want = 1 / SQRT_2PI + alpha * (math.exp(0.5) * _phi(-1.0) - 0.5)
        assert activation_stats("elu", alpha=alpha).mean == pytest.approx(want, abs=1e-9)
    assert activation_stats("identity").mean == 0.0
    assert activation_stats("identity").std == 1.0
    assert activation_stats("identity").jacobian_factor == 1.0


@pytest.fixture(scope="module")
def gaussian_draws() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(2_000_000, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}{p}" for n, p in CASES])
def test_constants_match_monte_carlo(name, params, gaussian_draws):
    """Mean, variance and E[s'^2] of 2e6 draws agree within 5 standard errors."""
    z = gaussian_draws.clone().requires_grad_(True)
    y = activation_function(name, **params)(z)
    (dy,) = torch.autograd.grad(y.sum(), z)
    y, dy = y.detach().numpy(), dy.numpy()
    n = y.size
    s = activation_stats(name, **params)
    mean, var = y.mean(), y.var()
    se_mean = math.sqrt(var / n)
    se_var = math.sqrt(np.mean((y - mean) ** 4) - var**2) / math.sqrt(n) + 1e-15
    assert abs(mean - s.mean) < 5 * se_mean + 1e-12
    assert abs(var - s.std**2) < 5 * se_var + 1e-12
    d2 = dy**2
    want_d2 = (s.jacobian_factor * s.std) ** 2
    assert abs(d2.mean() - want_d2) < 5 * d2.std() / math.sqrt(n) + 1e-12


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}{p}" for n, p in CASES])
def test_activation_module_restandardises_a_gaussian(name, params, gaussian_draws):
    """Eq. 12: (s(Z) - c2) / c1 has mean 0 and std 1 (Monte Carlo, 2e6 draws)."""
    params = dict(params)
    if name == "leaky_relu":
        params.setdefault("negative_slope", 0.01)
    out = Activation(name, **params).double()(gaussian_draws).detach()
    assert abs(float(out.mean())) < 5 / math.sqrt(out.numel())
    assert abs(float(out.std()) - 1.0) < 5e-3


def test_gaussian_expectation_of_polynomials():
    assert gaussian_expectation(lambda z: z**2) == pytest.approx(1.0, abs=1e-12)
    assert gaussian_expectation(lambda z: z**4) == pytest.approx(3.0, abs=1e-12)
    assert gaussian_expectation(torch.abs) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-12)


def test_prelu_constant_gradients_match_finite_differences():
    a = torch.tensor([0.25, -0.1, 0.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: prelu_mean_std(t), (a,), eps=1e-6, atol=1e-9)
    # Closed form: d c2/da = -1/sqrt(2 pi); d c1/da = (a + (1 - a)/pi) / (2 c1).
    mean, std = prelu_mean_std(a)
    (dm,) = torch.autograd.grad(mean.sum(), a)
    (ds,) = torch.autograd.grad(std.sum(), a)
    av = a.detach()
    assert torch.allclose(dm, torch.full_like(av, -1 / SQRT_2PI), atol=1e-12)
    assert torch.allclose(ds, (av + (1 - av) / math.pi) / (2 * std.detach()), atol=1e-12)


def test_prelu_layer_gradient_flows_through_the_constants():
    """The slope's gradient includes the constants' dependence on it (Remark 2)."""
    torch.manual_seed(0)
    act = Activation("prelu", num_parameters=4, a=0.2).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    target = torch.randn(64, 4, dtype=torch.float64)

    def loss(a: torch.Tensor, constants_follow_a: bool = True) -> torch.Tensor:
        mean, std = prelu_mean_std(a if constants_follow_a else a.detach())
        return (((torch.nn.functional.prelu(x, a) - mean) / std - target) ** 2).sum()

    assert torch.autograd.gradcheck(loss, (act.a.detach().clone().requires_grad_(True),))
    module_loss = ((act(x) - target) ** 2).sum()
    (g_module,) = torch.autograd.grad(module_loss, act.a)
    a = act.a.detach().clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad(loss(a), a)
    (g_frozen,) = torch.autograd.grad(loss(a, constants_follow_a=False), a)
    assert torch.allclose(g_module, g_full, atol=1e-10)
    assert (g_full - g_frozen).abs().max() > 1e-3  # the constants' share is not negligible
    # Central finite differences on the module itself.
    h = 1e-6
    for i in range(4):
        with torch.no_grad():
            act.a[i] += h
            up = float(((act(x) - target) ** 2).sum())
            act.a[i] -= 2 * h
            down = float(((act(x) - target) ** 2).sum())
            act.a[i] += h
        assert g_module[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-6)


def test_unknown_activation_names_give_a_clear_error():
    for make in (lambda: activation_stats("swish"), lambda: Activation("swish"),
                 lambda: NormPropLinear(3, 2, activation="swish"),
                 lambda: activation_function("Relu")):
        with pytest.raises(ValueError, match=r"unknown activation .*known activations: relu, prelu"):
            make()
