"""Model builders: MLPs and conv nets from the paper's shorthand (section 5).

A spec is either ``"mlp:256,256"`` (hidden widths) or the paper's conv shorthand
``C(filters,size,stride,pad)`` / ``P(kernel,stride,pad,max|avg)`` joined by ``-``, e.g. the
Network-in-Network the paper trains on CIFAR-10 (:data:`NIN_CIFAR`, also ``"nin-cifar"``).

Every net is ``DataNorm -> hidden layers -> output layer``. With ``norm="normprop"`` the hidden
layers are :class:`~normprop.layers.NormPropLinear` / :class:`~normprop.layers.NormPropConv2d`;
``"batchnorm"``, ``"layernorm"`` and ``"none"`` build the same architecture from plain torch
layers, for comparisons (same data layer, same initialisation family).

If a conv spec already ends in ``num_outputs`` channels at 1x1 (as NIN does: ``C(10,1,1,0)`` then
global average pooling), its last convolution is the output layer (no activation); otherwise the
features are flattened into an output linear layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

import torch
from torch import Tensor, nn

from .activations import Activation
from .data_norm import DataNorm, DataNormMode
from .layers import NormPropConv2d, NormPropLinear, glorot_normal_

__all__ = [
    "NIN_CIFAR",
    "PRESETS",
    "ConvSpec",
    "PoolSpec",
    "SpecError",
    "parse_spec",
    "build_model",
    "NormPropNet",
    "Norm",
]

#: The paper's Network in Network for CIFAR-10 (section 5, "Experimental Protocols").
NIN_CIFAR = ("C(192,5,1,2)-C(160,1,1,0)-P(3,2,1,max)-C(96,1,1,0)-C(192,5,1,2)-C(192,1,1,0)-"
             "P(3,2,1,avg)-C(192,1,1,0)-C(192,5,1,0)-C(192,1,1,2)-C(10,1,1,0)-P(8,8,0,avg)")
PRESETS: dict[str, str] = {"nin-cifar": NIN_CIFAR}

Norm = Literal["normprop", "batchnorm", "layernorm", "none"]
_NORMS: tuple[str, ...] = ("normprop", "batchnorm", "layernorm", "none")


class SpecError(ValueError):
    """A bad model spec; the message shows the spec with a caret under the bad token."""


@dataclass(frozen=True)
class ConvSpec:
    """``C(filters, size, stride, pad)``."""

    filters: int
    size: int
    stride: int
    pad: int


@dataclass(frozen=True)
class PoolSpec:
    """``P(kernel, stride, pad, max|avg)``."""

    kernel: int
    stride: int
    pad: int
    kind: Literal["max", "avg"]


LayerSpec = Union[ConvSpec, PoolSpec]
_CONV = re.compile(r"C\((\d+),(\d+),(\d+),(\d+)\)")
_POOL = re.compile(r"P\((\d+),(\d+),(\d+),(max|avg)\)")


def _spec_error(spec: str, start: int, length: int, why: str) -> SpecError:
    caret = " " * start + "^" * max(1, length)
    return SpecError(f"{why}\n  {spec}\n  {caret}")


def parse_spec(spec: str) -> list[int] | list[LayerSpec]:
    """Parse ``"mlp:W1,W2,..."`` into hidden widths, or the conv shorthand into layer specs.

    Examples::

        >>> parse_spec("mlp:256,128")
        [256, 128]
        >>> parse_spec("C(16,3,1,1)-P(2,2,0,max)")
        [ConvSpec(filters=16, size=3, stride=1, pad=1), PoolSpec(kernel=2, stride=2, pad=0, kind='max')]
        >>> parse_spec("C(16,3,1,1)-Q(2,2,0,max)")
        Traceback (most recent call last):
        ...
        normprop.models.SpecError: unknown layer 'Q(2,2,0,max)'; expected C(filters,size,stride,pad) or P(kernel,stride,pad,max|avg)
          C(16,3,1,1)-Q(2,2,0,max)
                      ^^^^^^^^^^^^
    """
    spec = PRESETS.get(spec, spec)
    compact = spec.replace(" ", "")
    if compact.startswith("mlp:") or compact == "mlp":
        body = compact[4:]
        widths: list[int] = []
        pos = 4
        for tok in body.split(",") if body else []:
            if not tok.isdigit() or int(tok) <= 0:
                raise _spec_error(compact, pos, len(tok),
                                  f"bad hidden width {tok!r}; expected a positive integer")
            widths.append(int(tok))
            pos += len(tok) + 1
        return widths
    if not compact:
        raise _spec_error(compact, 0, 0, "empty model spec")
    layers: list[LayerSpec] = []
    pos = 0
    for tok in compact.split("-"):
        if m := _CONV.fullmatch(tok):
            f, k, s, p = (int(g) for g in m.groups())
            if f <= 0 or k <= 0 or s <= 0:
                raise _spec_error(compact, pos, len(tok), f"bad convolution {tok!r}: "
                                  "filters, size and stride must be positive")
            layers.append(ConvSpec(f, k, s, p))
        elif m := _POOL.fullmatch(tok):
            k, s, p = (int(g) for g in m.groups()[:3])
            if k <= 0 or s <= 0 or 2 * p > k:
                raise _spec_error(compact, pos, len(tok), f"bad pooling {tok!r}: kernel and "
                                  "stride must be positive and pad at most half the kernel")
            layers.append(PoolSpec(k, s, p, m.group(4)))  # type: ignore[arg-type]
        else:
            raise _spec_error(compact, pos, len(tok), f"unknown layer {tok!r}; expected "
                              "C(filters,size,stride,pad) or P(kernel,stride,pad,max|avg)")
        pos += len(tok) + 1
    if not layers:
        raise _spec_error(compact, 0, len(compact), "empty model spec")
    return layers


class NormPropNet(nn.Module):
    """``layers(data_norm(x))`` with the build arguments kept for snapshots and folding.

    Attributes:
        data_norm: the data layer (:class:`~normprop.data_norm.DataNorm`).
        layers: hidden layers and the output layer, an :class:`torch.nn.Sequential`.
        config: the arguments of :func:`build_model` (JSON-serialisable).
    """

    def __init__(self, data_norm: DataNorm, layers: nn.Sequential, config: dict[str, Any]) -> None:
        super().__init__()
        self.data_norm = data_norm
        self.layers = layers
        self.config = dict(config)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.config["input_shape"])

    @property
    def num_outputs(self) -> int:
        return int(self.config["num_outputs"])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.data_norm(x))


def _plain_linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias)
    glorot_normal_(layer.weight, n_in, n_out)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def _plain_conv(c_in: int, c: ConvSpec, bias: bool) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c.filters, c.size, c.stride, c.pad, bias=bias)
    r = c.size * c.size
    glorot_normal_(conv.weight, c_in * r, c.filters * r)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _hidden_linear(n_in: int, n_out: int, norm: str, activation: str,
                   gamma_init: float | None) -> list[nn.Module]:
    if norm == "normprop":
        return [NormPropLinear(n_in, n_out, activation=activation, gamma_init=gamma_init)]
    act = _plain_activation(activation)
    if norm == "batchnorm":
        return [_plain_linear(n_in, n_out, bias=False), nn.BatchNorm1d(n_out), act]
    if norm == "layernorm":
        return [_plain_linear(n_in, n_out, bias=False), nn.LayerNorm(n_out), act]
    return [_plain_linear(n_in, n_out, bias=True), act]


def _hidden_conv(c_in: int, c: ConvSpec, norm: str, activation: str,
                 gamma_init: float | None) -> list[nn.Module]:
    if norm == "normprop":
        return [NormPropConv2d(c_in, c.filters, c.size, c.stride, c.pad, activation=activation,
                               gamma_init=gamma_init)]
    act = _plain_activation(activation)
    if norm == "batchnorm":
        return [_plain_conv(c_in, c, bias=False), nn.BatchNorm2d(c.filters), act]
    if norm == "layernorm":
        # Per-sample normalisation over (C, H, W), the conv analogue of LayerNorm.
        return [_plain_conv(c_in, c, bias=False), nn.GroupNorm(1, c.filters), act]
    return [_plain_conv(c_in, c, bias=True), act]


class _RawActivation(nn.Module):
    """A plain activation (no re-standardisation) for the baseline nets."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.inner = Activation(name)
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.inner.raw(x)


def _plain_activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU(init=0.25)
    return _RawActivation(name)


def _output_linear(n_in: int, n_out: int, norm: str) -> nn.Module:
    if norm == "normprop":
        return NormPropLinear(n_in, n_out, activation=None)
    return _plain_linear(n_in, n_out, bias=True)


def build_model(spec: str, input_shape: int | Sequence[int], num_outputs: int,
                activation: str = "relu", *, norm: Norm = "normprop",
                data_norm: DataNormMode = "batch", half_life: float | None = None,
                clip: float | None = None, gamma_init: float | None = None) -> NormPropNet:
    """Build a NormProp (or baseline) network from a spec string.

    Args:
        spec: ``"mlp:256,256"``, the conv shorthand, or a preset name (``"nin-cifar"``).
        input_shape: feature count (MLP) or ``(C, H, W)`` (conv; an MLP flattens it).
        num_outputs: classes (logits) or regression targets.
        activation: hidden activation name.
        norm: ``"normprop"`` or a baseline: ``"batchnorm"``, ``"layernorm"``, ``"none"``.
        data_norm: data-layer mode, see :class:`~normprop.data_norm.DataNorm`.
        half_life: exponential forgetting of the running data statistics (samples).
        clip: bound on standardised inputs.
        gamma_init: override ``gamma``'s initial value (default: the Jacobian factor's inverse).

    Examples::

        >>> net = build_model("mlp:64,64", 20, 3)
        >>> net(torch.randn(1, 20)).shape
        torch.Size([1, 3])
        >>> build_model("nin-cifar", (3, 32, 32), 10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(_NORMS)}")
    if num_outputs <= 0:
        raise ValueError(f"num_outputs must be positive, got {num_outputs}")
    shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(d) for d in input_shape)
    parsed = parse_spec(spec)
    config: dict[str, Any] = dict(spec=spec, input_shape=list(shape), num_outputs=num_outputs,
                                  activation=activation, norm=norm, data_norm=data_norm,
                                  half_life=half_life, clip=clip, gamma_init=gamma_init)
    dn = DataNorm(shape[0], mode=data_norm, half_life=half_life, clip=clip)
    modules: list[nn.Module] = []
    if not parsed or isinstance(parsed[0], int):  # an MLP
        n_in = math.prod(shape)
        if len(shape) > 1:
            modules.append(nn.Flatten())
        for width in parsed:  # type: ignore[assignment]
            modules += _hidden_linear(n_in, int(width), norm, activation, gamma_init)  # type: ignore[arg-type]
            n_in = int(width)  # type: ignore[arg-type]
        modules.append(_output_linear(n_in, num_outputs, norm))
        return NormPropNet(dn, nn.Sequential(*modules), config)

    if len(shape) != 3:
        raise ValueError(f"a conv spec needs input_shape (C, H, W), got {shape}")
    convs = [i for i, s in enumerate(parsed) if isinstance(s, ConvSpec)]
    out_shape = _trace_shape(parsed, shape)  # type: ignore[arg-type]
    last_conv_is_output = (convs and out_shape == (num_outputs, 1, 1)
                           and parsed[convs[-1]].filters == num_outputs)  # type: ignore[union-attr]
    c_in = shape[0]
    for i, layer in enumerate(parsed):
        if isinstance(layer, ConvSpec):
            if last_conv_is_output and i == convs[-1]:
                if norm == "normprop":
                    modules.append(NormPropConv2d(c_in, layer.filters, layer.size, layer.stride,
                                                  layer.pad, activation=None))
                else:
                    modules.append(_plain_conv(c_in, layer, bias=True))
            else:
                modules += _hidden_conv(c_in, layer, norm, activation, gamma_init)
            c_in = layer.filters
        else:
            assert isinstance(layer, PoolSpec)
            modules.append(_pool(layer))
    modules.append(nn.Flatten())
    if not last_conv_is_output:
        modules.append(_output_linear(math.prod(out_shape), num_outputs, norm))
    return NormPropNet(dn, nn.Sequential(*modules), config)


def _pool(p: PoolSpec) -> nn.Module:
    if p.kind == "max":
        return nn.MaxPool2d(p.kernel, p.stride, p.pad)
    # count_include_pad=False: border windows average real units only, so pooling commutes with
    # the layer's affine re-standardisation ("pooling does not recompute statistics", sec. 3.3)
    # and folding stays exact.
    return nn.AvgPool2d(p.kernel, p.stride, p.pad, count_include_pad=False)


def _trace_shape(layers: list[LayerSpec], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    c, h, w = shape
    for layer in layers:
        if isinstance(layer, ConvSpec):
            h = (h + 2 * layer.pad - layer.size) // layer.stride + 1
            w = (w + 2 * layer.pad - layer.size) // layer.stride + 1
            c = layer.filters
        else:
            h = (h + 2 * layer.pad - layer.kernel) // layer.stride + 1
            w = (w + 2 * layer.pad - layer.kernel) // layer.stride + 1
        if h <= 0 or w <= 0:
            raise ValueError(f"input {shape} is too small for the spec: it shrinks to {h}x{w}")
    return c, h, w
