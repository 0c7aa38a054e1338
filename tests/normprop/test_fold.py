"""Folding (DESIGN section 1), state_dict round trips and the unit-norm projection (sec. 4.4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normprop import (
    NormPropConv2d,
    NormPropLinear,
    build_model,
    fold,
    normprop_layers,
    paper_optimizer,
    project_weights_,
    train_step,
)
from normprop.fold import FoldedConv2d

CONV_SPEC = "C(8,3,1,1)-P(2,2,0,max)-C(12,3,2,1)-C(12,1,1,0)-P(3,2,1,avg)-C(10,1,1,0)-P(2,2,0,avg)"


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 20,
           batch: int = 8) -> None:
    opt = paper_optimizer(net, lr=0.05)
    for i in range(steps):
        j = (i * batch) % len(x)
        result = train_step(net, opt, x[j:j + batch], y[j:j + batch])
        assert result.skipped is None


def _perturb_(net: nn.Module, seed: int) -> None:
    """gamma, beta and PReLU slopes away from their initial values, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("activation", ["relu", "prelu", "tanh", "elu"])
def test_fold_mlp_exact_in_float64(activation):
    torch.manual_seed(0)
    net = build_model("mlp:32,16", 12, 5, activation=activation, data_norm="running").double()
    net.data_norm.update(torch.randn(50, 12, dtype=torch.float64) * 3 + 1)
    _perturb_(net, 1)
    folded = fold(net)
    assert not any(isinstance(m, (NormPropLinear, NormPropConv2d)) for m in folded.modules())
    x = torch.randn(20, 12, dtype=torch.float64) * 3 + 1
    assert torch.allclose(folded(x), net.eval()(x), rtol=0, atol=1e-10)


def test_fold_conv_net_with_padding_pooling_exact_in_float64():
    torch.manual_seed(0)
    net = build_model(CONV_SPEC, (3, 16, 16), 10, data_norm="running").double()
    net.data_norm.update(torch.randn(20, 3, 16, 16, dtype=torch.float64) * 2 + 0.5)
    _perturb_(net, 2)
    folded = fold(net)
    # Zero padding in the normalised space is a constant in the folded one: a bias map.
    assert any(isinstance(m, FoldedConv2d) for m in folded.modules())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64) * 2 + 0.5
    assert torch.allclose(folded(x), net.eval()(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("spec,shape", [("mlp:64,64", (20,)), (CONV_SPEC, (3, 16, 16))])
def test_fold_after_training_float32(spec, shape):
    torch.manual_seed(0)
    net = build_model(spec, shape, 10, data_norm="batch")
    x = torch.randn(64, *shape) * 2 + 1
    y = torch.randint(0, 10, (64,))
    _train(net, x, y)
    folded = fold(net)
    with torch.no_grad():
        assert torch.allclose(folded(x), net.eval()(x), atol=2e-4, rtol=1e-4)
    # The folded net is a copy: training the original afterwards does not change it.
    before = folded(x[:4]).detach().clone()
    _train(net, x, y, steps=2)
    assert torch.equal(folded(x[:4]).detach(), before)


def test_fold_with_clip_keeps_an_affine_clamp():
    torch.manual_seed(0)
    net = build_model("mlp:16", 4, 3, data_norm="global", clip=1.5)
    net.data_norm.fit(torch.randn(100, 4))
    x = torch.randn(30, 4) * 4
    assert torch.allclose(fold(net)(x), net.eval()(x), atol=1e-5)


def test_fold_nin_preset():
    torch.manual_seed(0)
    net = build_model("nin-cifar", (3, 32, 32), 10, data_norm="running")
    net.data_norm.update(torch.randn(4, 3, 32, 32))
    _perturb_(net, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net.eval()(x)
        assert torch.allclose(fold(net)(x), want, atol=1e-4 * max(1.0, float(want.abs().max())))


def test_fold_rejects_other_models():
    with pytest.raises(TypeError, match="expects a NormPropNet"):
        fold(nn.Sequential(nn.Linear(2, 2)))  # type: ignore[arg-type]


@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_state_dict_round_trip_after_training(activation):
    torch.manual_seed(0)
    net = build_model(CONV_SPEC, (3, 16, 16), 10, activation=activation, data_norm="batch",
                      half_life=500)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    _train(net, x, y, steps=5)
    state = net.state_dict()
    assert {"data_norm.running_mean", "data_norm.running_m2", "data_norm.count"} <= set(state)
    clone = build_model(**net.config)
    clone.load_state_dict(state)
    for k, v in clone.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), net.eval()(x))
    # Training continues identically from the loaded state.
    opt_a, opt_b = paper_optimizer(net, lr=0.01), paper_optimizer(clone, lr=0.01)
    ra = train_step(net, opt_a, x[:4], y[:4])
    rb = train_step(clone, opt_b, x[:4], y[:4])
    assert ra.loss == rb.loss
    for (n, a), b in zip(net.named_parameters(), clone.parameters()):
        assert torch.equal(a, b), n


def test_project_weights_leaves_unit_norms_and_the_function():
    torch.manual_seed(0)
    net = build_model(CONV_SPEC, (3, 16, 16), 10).double()
    with torch.no_grad():
        for layer in normprop_layers(net):
            shape = (layer.weight.shape[0],) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(torch.rand(shape, dtype=torch.float64) * 5 + 0.01)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    before = net.eval()(x)
    assert project_weights_(net) is net
    layers = normprop_layers(net)
    assert len(layers) == 4
    for layer in layers:
        norms = layer.weight.flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-12)
    assert torch.allclose(net(x), before, atol=1e-10)  # eq. 9 / 11 ignore the row scale
    assert project_weights_(nn.Linear(2, 2)) is not None  # nothing to project: a no-op


def test_train_step_projects_after_every_step():
    torch.manual_seed(0)
    net = build_model("mlp:16,16", 8, 3)
    opt = paper_optimizer(net, lr=0.5, weight_decay=5e-3)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    train_step(net, opt, x, y)
    for layer in normprop_layers(net):
        norms = layer.weight.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    train_step(net, opt, x, y, project=False)
    norms = torch.cat([layer.weight.norm(dim=1) for layer in normprop_layers(net)])
    assert (norms - 1).abs().max() > 1e-4  # without the projection the norms drift


@pytest.mark.parametrize("geometry", [dict(kernel_size=5, padding=2), dict(kernel_size=1, padding=2),
                                      dict(kernel_size=3, stride=2, padding=1),
                                      dict(kernel_size=3, padding=(0, 1))])
def test_folded_conv_equals_conv_plus_bias_map(geometry):
    """FoldedConv2d adds exactly the bias map, whatever the padding geometry."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **geometry).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    out_shape = conv(x).shape[1:]
    # A map like fold() makes: the constant image (with padding) through the conv, plus a bias.
    const = torch.randn(1, 3, 1, 1, dtype=torch.float64).expand(1, 3, 9, 8)
    bias_map = conv._conv_forward(const, conv.weight, None)[0] + torch.randn(4, 1, 1,
                                                                             dtype=torch.float64)
    assert bias_map.shape == out_shape
    folded = FoldedConv2d(conv, conv.weight.detach(), bias_map)
    want = conv._conv_forward(x, conv.weight, None) + bias_map
    assert torch.allclose(folded(x), want, rtol=0, atol=1e-12)
    # Without pad_value the map is added whole; reloading a map is picked up.
    state = folded.state_dict()
    state["bias_map"] = torch.randn(out_shape, dtype=torch.float64)
    folded.load_state_dict(state)
    want = conv._conv_forward(x, conv.weight, None) + state["bias_map"]
    assert torch.allclose(folded(x), want, rtol=0, atol=1e-12)
