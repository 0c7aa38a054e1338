"""NormProp layers: closed-form normalised fully connected and convolutional layers.

The paper's idea (sections 3.2-3.3): if the layer input ``x`` has zero mean and identity
covariance, then ``u_i = W_i . x / ||W_i||`` is ~N(0, 1) whenever the rows of ``W`` are roughly
incoherent (Proposition 1), so no batch statistics are needed. The activation's Gaussian moments
``c1``, ``c2`` then re-standardise the output, and the next layer sees the same canonical input
again -- by induction, normalisation *propagates* from the data layer to every hidden layer.

    o_i = ( s( gamma_i * (W_i . x) / ||W_i||_2 + beta_i ) - c2 ) / c1          (eq. 9, 12)
    o_i = ( s( gamma_i * (W_i * x) / ||W_i||_F + beta_i ) - c2 ) / c1          (eq. 11, conv)

Where this breaks: the input must be standardised (see :mod:`normprop.data_norm`), rows must stay
incoherent, and ``gamma``/``beta`` may drift the statistics during training -- they are learnt,
exactly as BatchNorm's affine parameters are. Because nothing depends on the batch, batch size 1
trains and serving computes exactly the training function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import Activation, activation_stats

__all__ = ["NormPropLinear", "NormPropConv2d", "NormPropLayer", "glorot_normal_"]


def glorot_normal_(weight: Tensor, fan_in: int, fan_out: int) -> Tensor:
    """Normalized initialisation (Glorot & Bengio 2010), used by the paper (section 4.2)."""
    std = math.sqrt(2.0 / float(fan_in + fan_out))
    with torch.no_grad():
        return weight.normal_(0.0, std)


def _row_norms(weight: Tensor) -> Tensor:
    """``||W_i||``: L2 norm of each output row (Linear) or Frobenius norm of each filter (conv)."""
    return weight.flatten(1).norm(dim=1)


class NormPropLayer:
    """Mixin with what every NormProp layer shares: gamma, beta, the activation, the scale."""

    weight: Tensor
    gamma: nn.Parameter
    beta: nn.Parameter
    activation: Activation | None
    eps: float

    def _init_normprop(self, out_features: int, activation: str | None, gamma_init: float | None,
                       **activation_params: float) -> None:
        if activation is None:
            self.activation = None
            default_gamma = 1.0
        else:
            self.activation = Activation(activation, **activation_params)
            default_gamma = activation_stats(activation, **{
                k: v for k, v in activation_params.items() if k != "num_parameters"
            }).gamma_init
        self.gamma_init = float(default_gamma if gamma_init is None else gamma_init)
        self.gamma = nn.Parameter(torch.full((out_features,), self.gamma_init))
        self.beta = nn.Parameter(torch.zeros(out_features))

    def weight_scale(self) -> Tensor:
        """``gamma_i / ||W_i||``: the per-unit factor applied to ``W_i . x`` (eq. 9)."""
        return self.gamma / (_row_norms(self.weight) + self.eps)

    def effective_weight(self) -> Tensor:
        """``gamma_i W_i / ||W_i||`` -- an O(parameters) weight-side pass, not O(activations)."""
        scale = self.weight_scale()
        return self.weight * scale.view((-1,) + (1,) * (self.weight.dim() - 1))

    def _activate(self, pre: Tensor) -> Tensor:
        return pre if self.activation is None else self.activation(pre)


class NormPropLinear(nn.Linear, NormPropLayer):
    """Fully connected NormProp layer (paper eq. 9; eq. 12 for other activations).

    .. math::
        o_i = \\frac{1}{c_1}\\Big[s\\Big(\\frac{\\gamma_i W_i^T x}{\\lVert W_i\\rVert_2}
              + \\beta_i\\Big) - c_2\\Big]

    With ``activation=None`` it is an output layer: ``o_i = gamma_i W_i.x/||W_i|| + beta_i``
    (no activation, no re-standardisation), for logits or regression values.

    Args:
        in_features: size of each input sample.
        out_features: number of units ``m``.
        activation: name from :data:`normprop.KNOWN_ACTIVATIONS`, or ``None`` for an output layer.
        gamma_init: initial ``gamma``; default ``1 / jacobian_factor`` (``1/1.21`` for ReLU,
            section 4.3.1) and 1 for an output layer.
        eps: added to ``||W_i||`` so an all-zero row cannot divide by zero.
        **activation_params: e.g. ``a=0.25`` for PReLU.

    Shape:
        Input ``(N, in_features)``, output ``(N, out_features)``.

    Examples::

        >>> layer = NormPropLinear(20, 8)
        >>> layer(torch.randn(1, 20)).shape   # batch size 1 is fine: no batch statistics
        torch.Size([1, 8])
    """

    def __init__(self, in_features: int, out_features: int, activation: str | None = "relu",
                 gamma_init: float | None = None, eps: float = 1e-12,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **activation_params: float) -> None:
        self.eps = eps
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self._init_normprop(out_features, activation, gamma_init, **activation_params)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        glorot_normal_(self.weight, self.in_features, self.out_features)
        # Unit rows from the start: ||W_i|| = 1 is the invariant projection keeps (section 4.4).
        with torch.no_grad():
            self.weight.div_(_row_norms(self.weight).clamp_min(1e-12).unsqueeze(1))

    def forward(self, x: Tensor) -> Tensor:
        # gamma_i (W_i . x)/||W_i|| + beta_i as one matmul with a folded weight and fused bias.
        pre = F.linear(x, self.effective_weight(), self.beta)
        return self._activate(pre)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class NormPropConv2d(nn.Conv2d, NormPropLayer):
    """Convolutional NormProp layer (paper eq. 11): Frobenius norm per filter.

    .. math::
        o_i = \\frac{1}{c_1}\\Big[s\\Big(\\frac{\\gamma_i (W_i * x)}{\\lVert W_i\\rVert_F}
              + \\beta_i\\Big) - c_2\\Big]

    ``gamma_i``, ``beta_i`` and the constants broadcast over the spatial dimensions. Takes every
    argument of :class:`torch.nn.Conv2d` (stride, padding, dilation, groups, padding_mode); with
    ``groups > 1`` each filter sees only its group, which is still standardised, so the same
    normalisation holds.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode:
            as :class:`torch.nn.Conv2d`.
        activation: name, or ``None`` for a linear output convolution.
        gamma_init: initial ``gamma`` (default ``1/jacobian_factor``).

    Shape:
        Input ``(N, C_in, H, W)``, output ``(N, C_out, H_out, W_out)``.

    Examples::

        >>> conv = NormPropConv2d(3, 16, 3, padding=1)
        >>> conv(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 16, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1,
                 activation: str | None = "relu", gamma_init: float | None = None,
                 padding_mode: str = "zeros", eps: float = 1e-12,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **activation_params: float) -> None:
        self.eps = eps
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_normprop(out_channels, activation, gamma_init, **activation_params)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        receptive = self.weight[0][0].numel()
        fan_in = self.weight.shape[1] * receptive
        fan_out = self.weight.shape[0] * receptive // self.groups
        glorot_normal_(self.weight, fan_in, fan_out)
        with torch.no_grad():
            norms = _row_norms(self.weight).clamp_min(1e-12)
            self.weight.div_(norms.view(-1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        pre = self._conv_forward(x, self.effective_weight(), self.beta)
        return self._activate(pre)
