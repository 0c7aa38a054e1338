"""NormProp layers: eq. 9 / 11 / 12 computed exactly, and the fast path's gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normprop import NormPropConv2d, NormPropLinear, activation_stats, project_weights_

torch.set_default_dtype(torch.float32)


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eq. 9 / 11 / 12 written out with plain autograd ops, nothing shared with the layer."""
    w = layer.weight
    norms = w.flatten(1).norm(dim=1) + layer.eps
    scaled = w * (layer.gamma / norms).view((-1,) + (1,) * (w.dim() - 1))
    if isinstance(layer, NormPropLinear):
        pre = F.linear(x, scaled, layer.beta)
    else:
        pre = nn.Conv2d._conv_forward(layer, x, scaled, layer.beta)  # torch's own padding modes
    act = layer.activation
    if act is None:
        return pre
    if act.name == "relu":
        c2, c1 = 1 / math.sqrt(2 * math.pi), math.sqrt(0.5 * (1 - 1 / math.pi))
        return (F.relu(pre) - c2) / c1
    if act.name == "prelu":
        a = act.a
        c2 = (1 - a) / math.sqrt(2 * math.pi)
        c1 = torch.sqrt(0.5 * ((1 + a * a) - (1 - a) ** 2 / math.pi))
        shape = (1, -1) + (1,) * (pre.dim() - 2) if a.numel() > 1 else ()
        if shape:
            c2, c1 = c2.view(shape), c1.view(shape)
        return (F.prelu(pre, a) - c2) / c1
    s = activation_stats(act.name, **act.params)
    fn = {"tanh": torch.tanh, "identity": lambda t: t, "elu": F.elu, "sigmoid": torch.sigmoid}
    return (fn[act.name](pre) - s.mean) / s.std


def scramble_(layer: nn.Module, seed: int) -> None:
    """Rows far from unit norm, gamma and beta away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shape = (layer.weight.shape[0],) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(torch.rand(shape, generator=g, dtype=layer.weight.dtype) * 4 + 0.05)
        layer.gamma.copy_(torch.rand(layer.gamma.shape, generator=g) * 2 - 0.5)
        layer.beta.copy_(torch.randn(layer.beta.shape, generator=g))


def assert_matches_reference(layer: nn.Module, x: torch.Tensor, atol: float = 1e-12) -> None:
    x = x.clone().requires_grad_(True)
    params = [x] + list(layer.parameters())
    out, want = layer(x), reference(layer, x)
    assert out.shape == want.shape
    assert torch.allclose(out, want, rtol=0, atol=atol), (out - want).abs().max()
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad((out * upstream).sum(), params)
    ref = torch.autograd.grad((want * upstream).sum(), params)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, got, ref):
        assert torch.allclose(a, b, rtol=0, atol=atol * max(1.0, float(b.abs().max()))), \
            (name, (a - b).abs().max())


LINEAR_CASES = [
    # (activation, params, input shape): fewer rows than inputs takes the output-side path,
    # more takes the weight-side one; both must give the same numbers as autograd.
    ("relu", {}, (3, 17)),
    ("relu", {}, (40, 17)),
    ("relu", {}, (17,)),
    ("relu", {}, (2, 5, 17)),
    (None, {}, (3, 17)),
    (None, {}, (40, 17)),
    ("tanh", {}, (3, 17)),
    ("tanh", {}, (40, 17)),
    ("prelu", {"a": 0.2}, (3, 17)),
    ("prelu", {"a": 0.2, "num_parameters": 11}, (40, 17)),
    ("identity", {}, (5, 17)),
    ("elu", {}, (30, 17)),
]


@pytest.mark.parametrize("activation,params,shape", LINEAR_CASES)
@pytest.mark.parametrize("unit_rows", [True, False])
def test_linear_fast_path_matches_autograd_float64(activation, params, shape, unit_rows):
    torch.manual_seed(0)
    layer = NormPropLinear(17, 11, activation=activation, **params).double()
    scramble_(layer, seed=1)
    if unit_rows:  # projected: the forward then skips ||W_i|| (rows_known_unit)
        project_weights_(layer)
        assert layer.rows_known_unit()
    else:
        assert not layer.rows_known_unit()
    assert_matches_reference(layer, torch.randn(*shape, dtype=torch.float64))


@pytest.mark.parametrize("activation", ["relu", None, "tanh"])
@pytest.mark.parametrize("unit_rows", [True, False])
def test_linear_fast_path_with_a_zero_gamma(activation, unit_rows):
    """A unit switched off (gamma_i = 0): the output no longer tells W_i . x, so the backward
    keeps the product itself for gamma's gradient (and a GPU always does); the same numbers as
    autograd either way."""
    torch.manual_seed(0)
    layer = NormPropLinear(17, 11, activation=activation).double()
    scramble_(layer, seed=2)
    with torch.no_grad():
        layer.gamma[3] = 0.0
    if unit_rows:
        project_weights_(layer)
    assert_matches_reference(layer, torch.randn(4, 17, dtype=torch.float64))


CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 1), stride=(1, 2), padding=(1, 0), dilation=2),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=1, groups=4),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=[str(k) for k in CONV_CASES])
@pytest.mark.parametrize("activation", ["relu", None, "tanh", "prelu"])
@pytest.mark.parametrize("unit_rows", [True, False])
def test_conv_matches_eq_11_with_stride_padding_groups(kwargs, activation, unit_rows):
    torch.manual_seed(0)
    layer = NormPropConv2d(4, 8, activation=activation, **kwargs).double()
    scramble_(layer, seed=2)
    if unit_rows:
        project_weights_(layer)
        assert layer.rows_known_unit()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    # Same geometry as a plain convolution with the same arguments.
    plain = nn.Conv2d(4, 8, **kwargs).double()
    assert layer(x).shape == plain(x).shape
    assert_matches_reference(layer, x)


def test_float32_fast_path_agrees_with_float64_formula():
    torch.manual_seed(0)
    layer = NormPropLinear(64, 32)
    scramble_(layer, seed=3)
    x = torch.randn(8, 64)
    ref = reference(layer.double(), x.double()).float()
    assert torch.allclose(layer.float()(x), ref, atol=1e-5)


def test_init_unit_rows_gamma_is_inverse_jacobian_factor():
    torch.manual_seed(0)
    lin, conv = NormPropLinear(30, 20), NormPropConv2d(3, 6, 5, groups=3)
    for layer in (lin, conv):
        norms = layer.weight.flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
        assert torch.allclose(layer.gamma, torch.full_like(layer.gamma, 1 / 1.2112), atol=1e-4)
        assert torch.equal(layer.beta, torch.zeros_like(layer.beta))
    assert NormPropLinear(3, 2, activation=None).gamma_init == 1.0
    assert NormPropLinear(3, 2, gamma_init=1.0).gamma_init == 1.0
    # Glorot normal before the projection: rows are random directions, not a fixed pattern.
    assert lin.weight.std().item() == pytest.approx(1 / math.sqrt(30), rel=0.2)


def test_output_does_not_depend_on_row_scale():
    """Eq. 9 divides by ||W_i||: rescaling a row by c > 0 leaves the layer's function unchanged."""
    torch.manual_seed(0)
    layer = NormPropLinear(12, 6).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([0.1, 2.0, 3.0, 7.0, 0.5, 1.0],
                                       dtype=torch.float64).unsqueeze(1))
    assert torch.allclose(layer(x), before, atol=1e-12)


def test_weight_gradient_is_tangent_to_unit_rows():
    """With ||W_i|| = 1 the gradient is g - (g . w) w, orthogonal to each row."""
    torch.manual_seed(0)
    layer = NormPropLinear(20, 10).double()
    with torch.no_grad():  # unit rows to float64 precision (init projects in float32)
        layer.weight.div_(layer.weight.norm(dim=1, keepdim=True))
    x = torch.randn(4, 20, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    # cos(angle) between each row and its gradient; eps = 1e-12 in ||W|| + eps leaves ~1e-12.
    cos = (layer.weight.grad * layer.weight).sum(dim=1) / layer.weight.grad.norm(dim=1)
    assert cos.abs().max() < 1e-10
    assert layer.weight.grad.abs().max() > 1e-3


def test_no_batch_statistics_sample_alone_equals_sample_in_batch():
    torch.manual_seed(0)
    layer = NormPropConv2d(3, 5, 3, padding=1).train()
    x = torch.randn(6, 3, 7, 7)
    together = layer(x)
    for i in range(6):
        assert torch.allclose(layer(x[i:i + 1]), together[i:i + 1], atol=1e-5)


def test_zero_row_stays_finite():
    layer = NormPropLinear(4, 3).double()
    with torch.no_grad():
        layer.weight[1].zero_()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(layer.weight.grad).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("make,shape", [
    (lambda: NormPropLinear(9, 6), (4, 9)),
    (lambda: NormPropLinear(9, 6, activation="prelu"), (20, 9)),
    (lambda: NormPropConv2d(2, 4, 3, padding=1), (2, 2, 5, 5)),
])
def test_composite_path_same_numbers_and_twice_differentiable(make, shape):
    torch.manual_seed(0)
    layer = make().double()
    scramble_(layer, seed=4)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    fast = layer(x)
    layer.fast_path = False
    slow = layer(x)
    assert torch.allclose(fast, slow, atol=1e-12)
    # Second derivatives need the composite path; the fast path says so instead of being wrong.
    (gx,) = torch.autograd.grad(slow.pow(2).sum(), x, create_graph=True)
    assert gx.pow(2).sum().requires_grad
    (hess_slow,) = torch.autograd.grad(gx.pow(2).sum(), x)
    layer.fast_path = True
    (gx_fast,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    assert torch.allclose(gx_fast, gx, atol=1e-12)
    assert hess_slow.abs().max() > 0
    if isinstance(layer, NormPropLinear) and shape[0] < 9:
        # The fast backward is first order only, and says so rather than give wrong numbers.
        with pytest.raises(RuntimeError, match="once_differentiable"):
            gx_fast.pow(2).sum().backward()
    # So for the weight, on every path (the check runs only under create_graph=True).
    (gw_fast,) = torch.autograd.grad(layer(x).pow(2).sum(), layer.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gw_fast.pow(2).sum().backward()


def test_torch_func_transforms_use_the_composite_path():
    torch.manual_seed(0)
    layer = NormPropLinear(5, 3).double()
    x = torch.randn(5, dtype=torch.float64)
    jac = torch.func.jacrev(lambda v: layer(v))(x)
    want = torch.autograd.functional.jacobian(lambda v: reference(layer, v), x)
    assert torch.allclose(jac, want, atol=1e-12)


def test_replacing_the_activation_module_is_respected():
    from normprop import Activation

    torch.manual_seed(0)
    layer = NormPropLinear(6, 4).double()
    layer.activation = Activation("tanh").double()
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(layer(x), reference(layer, x), atol=1e-12)


def test_unit_row_shortcut_is_exact_or_invalidated():
    """After a projection the forward skips ||W_i|| (= 1); every tracked change re-enables it."""
    import copy
    import pickle

    from normprop import paper_optimizer, project_weights_

    torch.manual_seed(0)
    layer = NormPropLinear(16, 8).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    assert not layer.rows_known_unit()  # .double() made new storage: not known until projected
    project_weights_(layer)
    assert layer.rows_known_unit()
    assert torch.allclose(layer(x), reference(layer, x), atol=1e-12)
    # An optimiser step changes the rows: the norm is taken again, so the output stays eq. 9.
    opt = paper_optimizer(layer, lr=0.5)
    layer(x).pow(2).sum().backward()
    opt.step()
    assert not layer.rows_known_unit()
    assert torch.allclose(layer(x), reference(layer, x), atol=1e-12)
    project_weights_(layer)
    with torch.no_grad():  # a user's in-place edit
        layer.weight[0].mul_(3.0)
    assert not layer.rows_known_unit()
    assert torch.allclose(layer(x), reference(layer, x), atol=1e-12)
    # load_state_dict: unit rows are recognised, others are not.
    project_weights_(layer)
    unit_state = copy.deepcopy(layer.state_dict())
    fresh = NormPropLinear(16, 8).double()
    fresh.load_state_dict(unit_state)
    assert fresh.rows_known_unit() and torch.equal(fresh(x), layer(x))
    scaled = {k: (v * 2 if k == "weight" else v) for k, v in unit_state.items()}
    fresh.load_state_dict(scaled)
    assert not fresh.rows_known_unit()
    assert torch.allclose(fresh(x), reference(fresh, x), atol=1e-12)
    # Copies have their own storage; they recompute the norm until projected.
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.allclose(clone(x), layer(x), atol=1e-12)
    # The untracked route: .data edits. project_weights_ afterwards restores the invariant.
    layer.weight.data.mul_(2.0)
    project_weights_(layer)
    assert torch.allclose(layer(x), reference(layer, x), atol=1e-12)
