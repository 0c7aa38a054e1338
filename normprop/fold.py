"""Folding a trained NormProp net into a plain net for serving (DESIGN section 1).

At evaluation time every NormProp quantity is a constant: the data layer is the affine map
``x = (t - mean) / std``; each layer's scale ``gamma_i / ||W_i||`` and shift ``beta_i`` are
fixed; and the re-standardisation ``(s(u) - c2) / c1`` is an affine map of the activation. An
affine map on a layer's *input* is absorbed into that layer's weights and bias:

    W' = diag(gamma / ||W||) W diag(a),      b' = (gamma / ||W||) * (W b_in) + beta

where ``x = a * t + b_in`` is the pending affine map on the input. Max and average pooling (with
``count_include_pad=False``) commute with a per-channel affine map with ``a > 0``, and flattening
only repeats it, so the whole net folds into plain ``nn.Linear``/``nn.Conv2d`` layers and
activations: the cost of an un-normalised net.

A zero-padded convolution sees zeros in the *normalised* space, i.e. ``-b_in / a`` in the folded
space, so its constant term varies near the border; it is computed once for the net's input size
and added as a fixed bias map (exact, the same single add as a bias).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .activations import Activation
from .data_norm import DataNorm
from .layers import NormPropConv2d, NormPropLinear
from .models import NormPropNet

__all__ = ["fold", "Affine", "FoldedConv2d", "FixedActivation"]


class Affine(nn.Module):
    """``a * x + b`` per channel, optionally clamped after (kept only where it cannot fold)."""

    def __init__(self, scale: Tensor, shift: Tensor, clip: float | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", shift.clone())
        self.clip = clip

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))
        return out if self.clip is None else out.clamp(-self.clip, self.clip)


class FoldedConv2d(nn.Conv2d):
    """A plain convolution plus a fixed ``(C_out, H_out, W_out)`` bias map (see module doc).

    ``out = conv(x, W) + bias_map``, the map added in place: on CPU that costs about what a
    fused per-channel bias does (measured), where an out-of-place add allocated and faulted in
    a second output-sized tensor per call.
    """

    def __init__(self, conv: nn.Conv2d, weight: Tensor, bias_map: Tensor) -> None:
        # The folded weight's dtype from the start: copying float64 values into a float32
        # parameter would round them for good.
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, bias=False,
                         padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight)
        self.register_buffer("bias_map", bias_map.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, None).add_(self.bias_map)


class FixedActivation(nn.Module):
    """The raw activation ``s`` with frozen parameters (no re-standardisation)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _plain_activation(act: Activation) -> nn.Module:
    if act.name == "relu":
        return nn.ReLU()
    if act.name == "prelu":
        m = nn.PReLU(num_parameters=act.a.numel(), device=act.a.device, dtype=act.a.dtype)
        with torch.no_grad():
            m.weight.copy_(act.a.detach())
        return m
    return FixedActivation(act.raw, act.name)


class _Pending:
    """The affine map ``x = a * t + b`` between what the folded net carries (t) and what the
    original net's next module expects (x); ``a``, ``b`` are per channel (or per feature)."""

    def __init__(self, channels: int, dtype: torch.dtype, device: torch.device) -> None:
        self.a = torch.ones(channels, dtype=dtype, device=device)
        self.b = torch.zeros(channels, dtype=dtype, device=device)

    def is_identity(self) -> bool:
        return bool((self.a == 1).all() and (self.b == 0).all())


@torch.no_grad()
def fold(model: NormPropNet) -> nn.Sequential:
    """Return a plain ``nn.Sequential`` computing ``model.eval()``'s function.

    The result uses only ``nn.Linear``, ``nn.Conv2d`` (a :class:`FoldedConv2d` where zero
    padding needs a bias map), activations, pooling and ``Flatten``; the data normalisation is
    folded into the first layer (kept as an :class:`Affine` with clamp if ``clip`` is set).
    Parameters are copied: later training of ``model`` does not change the folded net.

    Examples::

        >>> from normprop import build_model
        >>> net = build_model("mlp:32", 10, 3).eval()
        >>> plain = fold(net)
        >>> x = torch.randn(4, 10)
        >>> bool(torch.allclose(plain(x), net(x), atol=1e-5))
        True
    """
    if not isinstance(model, NormPropNet):
        raise TypeError("fold() expects a NormPropNet from normprop.build_model")
    was_training = model.training
    model.eval()
    try:
        return _fold(model)
    finally:
        model.train(was_training)


def _fold(model: NormPropNet) -> nn.Sequential:
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    work = torch.float64
    out: list[nn.Module] = []
    dn: DataNorm = model.data_norm
    pending = _Pending(dn.num_features, work, device)
    if dn.mode != "none":
        mean, std = dn.mean_and_std()
        a, b = 1.0 / std.to(work), -mean.to(work) / std.to(work)
        if dn.clip is None:
            pending.a, pending.b = a, b
        else:
            out.append(Affine(a.to(dtype), b.to(dtype), clip=dn.clip))

    # Track the shape each module sees, to expand per-channel maps at Flatten and size bias maps.
    x = torch.zeros((1, *model.input_shape), dtype=dtype, device=device)

    def materialise() -> None:
        nonlocal pending
        if not pending.is_identity():
            out.append(Affine(pending.a.to(dtype), pending.b.to(dtype)))
        pending = _Pending(x.shape[1] if x.dim() > 1 else 1, work, device)

    for module in model.layers:
        if isinstance(module, NormPropLinear):
            w = module.weight.to(work)
            k = module.weight_scale().to(work)
            new = nn.Linear(module.in_features, module.out_features, device=device, dtype=dtype)
            new.weight.copy_(k[:, None] * w * pending.a[None, :])
            new.bias.copy_(k * (w @ pending.b) + module.beta.to(work))
            out.append(new)
            pending = _after_activation(module.activation, module.out_features, out, work, device)
        elif isinstance(module, NormPropConv2d):
            w = module.weight.to(work)
            k = module.weight_scale().to(work)
            groups = module.groups
            c_out, c_in_g = w.shape[:2]
            a_full = pending.a.view(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g)
            weight = k.view(-1, 1, 1, 1) * w * a_full.reshape(c_out, c_in_g, 1, 1)
            # Constant term: the original conv applied to the constant image b (its padding
            # included), scaled, plus beta.
            const_img = pending.b.view(1, -1, 1, 1).expand(1, -1, *x.shape[2:]).contiguous()
            const = module._conv_forward(const_img, w, None)[0]
            bias_map = k.view(-1, 1, 1) * const + module.beta.to(work).view(-1, 1, 1)
            flat = bias_map.flatten(1)
            if torch.allclose(flat, flat[:, :1].expand_as(flat), rtol=0, atol=1e-12):
                new = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                                module.stride, module.padding, module.dilation, groups,
                                bias=True, padding_mode=module.padding_mode,
                                device=device, dtype=dtype)
                new.weight.copy_(weight)
                new.bias.copy_(flat[:, 0])
            else:
                new = FoldedConv2d(module, weight.to(dtype), bias_map.to(dtype)).to(device)
            out.append(new)
            pending = _after_activation(module.activation, module.out_channels, out, work, device)
        elif isinstance(module, nn.MaxPool2d) or (
            isinstance(module, nn.AvgPool2d) and (not module.count_include_pad or module.padding == 0)
        ):
            if isinstance(module, nn.MaxPool2d) and bool((pending.a <= 0).any()):
                materialise()
            out.append(module)
        elif isinstance(module, nn.Flatten):
            spatial = int(x[0, 0].numel()) if x.dim() > 2 else 1
            pending.a = pending.a.repeat_interleave(spatial)
            pending.b = pending.b.repeat_interleave(spatial)
            out.append(module)
        else:
            materialise()
            out.append(module)
        x = module(x)
    materialise()
    return nn.Sequential(*out).to(device=device, dtype=dtype).eval()


def _after_activation(act: Activation | None, channels: int, out: list[nn.Module],
                      work: torch.dtype, device: torch.device) -> _Pending:
    pending = _Pending(channels, work, device)
    if act is None:
        return pending
    if act.name == "identity":
        return pending
    out.append(_plain_activation(act))
    c2, c1 = act.mean_std()
    c2 = torch.as_tensor(c2, dtype=work, device=device).detach().expand(channels)
    c1 = torch.as_tensor(c1, dtype=work, device=device).detach().expand(channels)
    # (s - c2) / c1 = a * s + b: carried into the next layer's weights.
    pending.a, pending.b = 1.0 / c1, -c2 / c1
    return pending
