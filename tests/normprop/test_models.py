"""Model specs and builders (section 5's shorthand, the NIN preset, baselines)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normprop import (
    NIN_CIFAR,
    NormPropConv2d,
    NormPropLinear,
    SpecError,
    activation_stats,
    build_model,
    parse_spec,
)
from normprop.models import ConvSpec, PoolSpec


def _caret_column(message: str) -> tuple[int, int]:
    """(start, length) of the caret run under the spec line, relative to the spec."""
    _, spec_line, caret_line = message.split("\n")
    offset = len(spec_line) - len(spec_line.lstrip())
    start = caret_line.index("^")
    return start - offset, caret_line.count("^")


@pytest.mark.parametrize("spec,token", [
    ("C(16,3,1,1)-Q(2,2,0,max)", "Q(2,2,0,max)"),
    ("C(16,3,1,1)-P(2,2,0,mean)", "P(2,2,0,mean)"),
    ("C(16,3,1,1)-C(0,3,1,1)", "C(0,3,1,1)"),
    ("C(8,3,1,1)-P(2,2,2,max)-C(8,1,1,0)", "P(2,2,2,max)"),
    ("mlp:64,x,32", "x"),
    ("mlp:64,0", "0"),
])
def test_bad_spec_error_points_at_the_token(spec, token):
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    start, length = _caret_column(str(info.value))
    assert spec[start:start + length] == token
    assert isinstance(info.value, ValueError)


def test_parse_spec_and_presets():
    assert parse_spec("mlp:256, 128") == [256, 128]
    assert parse_spec("mlp") == []
    nin = parse_spec("nin-cifar")
    assert nin == parse_spec(NIN_CIFAR)
    assert sum(isinstance(layer, ConvSpec) for layer in nin) == 9
    assert nin[2] == PoolSpec(3, 2, 1, "max") and nin[-1] == PoolSpec(8, 8, 0, "avg")
    with pytest.raises(SpecError, match="empty model spec"):
        parse_spec("")


def test_nin_preset_builds_and_runs():
    torch.manual_seed(0)
    net = build_model("nin-cifar", (3, 32, 32), 10)
    convs = [m for m in net.modules() if isinstance(m, NormPropConv2d)]
    assert len(convs) == 9
    assert all(c.activation is not None for c in convs[:-1])
    assert convs[-1].activation is None  # C(10,1,1,0) + global average pooling = the output
    assert not any(isinstance(m, NormPropLinear) for m in net.modules())
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net(x[:1]).shape == (1, 10)  # batch size 1 trains and serves
    # CIFAR-100 variant from section 5.5: the last conv has 100 filters.
    nin100 = build_model(NIN_CIFAR.replace("C(10,1,1,0)", "C(100,1,1,0)"), (3, 32, 32), 100)
    assert nin100(x[:1]).shape == (1, 100)


@pytest.mark.parametrize("norm,layer_type", [("batchnorm", nn.BatchNorm1d),
                                             ("layernorm", nn.LayerNorm), ("none", nn.ReLU)])
def test_mlp_baselines_share_the_architecture(norm, layer_type):
    torch.manual_seed(0)
    net = build_model("mlp:32,16", 10, 3, norm=norm)
    assert sum(isinstance(m, layer_type) for m in net.modules()) == 2
    assert not any(isinstance(m, (NormPropLinear, NormPropConv2d)) for m in net.modules())
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 32), (32, 16), (16, 3)]
    assert net(torch.randn(4, 10)).shape == (4, 3)
    assert net.config["norm"] == norm


@pytest.mark.parametrize("norm,layer_type", [("batchnorm", nn.BatchNorm2d),
                                             ("layernorm", nn.GroupNorm)])
def test_conv_baselines(norm, layer_type):
    net = build_model("C(8,3,1,1)-P(2,2,0,max)-C(8,3,1,0)", (3, 10, 10), 5, norm=norm)
    assert sum(isinstance(m, layer_type) for m in net.modules()) == 2
    assert net(torch.randn(2, 3, 10, 10)).shape == (2, 5)  # flattened into an output Linear


def test_conv_spec_without_output_conv_gets_an_output_linear():
    net = build_model("C(8,3,1,1)-P(2,2,0,avg)", (3, 8, 8), 4)
    assert isinstance(net.layers[-1], NormPropLinear) and net.layers[-1].activation is None
    assert net.layers[-1].in_features == 8 * 4 * 4
    assert net(torch.randn(1, 3, 8, 8)).shape == (1, 4)


def test_mlp_flattens_image_input_and_other_activations():
    net = build_model("mlp:16", (2, 3, 3), 4, activation="tanh")
    assert isinstance(net.layers[0], nn.Flatten)
    assert net.layers[1].in_features == 18 and net.layers[1].activation.name == "tanh"
    assert net.layers[1].gamma_init == pytest.approx(1 / activation_stats("tanh").jacobian_factor)
    assert net(torch.randn(3, 2, 3, 3)).shape == (3, 4)
    gamma_one = build_model("mlp:16", 5, 2, gamma_init=1.0)
    assert torch.equal(gamma_one.layers[0].gamma, torch.ones(16))


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown norm 'groupnorm'; known: normprop, batchnorm"):
        build_model("mlp:8", 4, 2, norm="groupnorm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        build_model("mlp:8", 4, 2, activation="swish")
    with pytest.raises(ValueError, match="num_outputs must be positive"):
        build_model("mlp:8", 4, 0)
    with pytest.raises(ValueError, match=r"needs input_shape \(C, H, W\)"):
        build_model("C(8,3,1,1)", 12, 2)
    with pytest.raises(ValueError, match="too small for the spec"):
        build_model("C(8,5,1,0)-C(8,5,1,0)", (3, 6, 6), 2)
    with pytest.raises(ValueError, match="unknown data normalisation mode"):
        build_model("mlp:8", 4, 2, data_norm="whiten")  # type: ignore[arg-type]


def test_config_rebuilds_the_same_architecture():
    net = build_model("nin-cifar", (3, 32, 32), 10, activation="prelu", data_norm="running",
                      half_life=1000.0, clip=5.0, gamma_init=0.9)
    again = build_model(**net.config)
    assert again.config == net.config
    assert [type(m) for m in again.modules()] == [type(m) for m in net.modules()]
    assert net.input_shape == (3, 32, 32) and net.num_outputs == 10
