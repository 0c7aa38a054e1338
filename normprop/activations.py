"""Post-activation statistics of a standard Gaussian (NormProp paper, sections 3.2, 3.4, 4.6).

NormProp keeps every hidden pre-activation ``u`` close to ``N(0, 1)``; after the activation
``s`` the output is re-standardised with the closed-form constants

    c2 = E[s(Z)],    c1 = std[s(Z)],    Z ~ N(0, 1)                         (eq. 12)

and the *Jacobian factor* ``sqrt(E[s'(Z)^2]) / c1`` (section 3.4: ``sqrt(0.5) / c1 = 1.21`` for
ReLU) whose inverse initialises ``gamma`` so the layer Jacobian has singular values near one.

ReLU (Remark 1) and PReLU (Remark 2) use closed forms -- for PReLU they are torch expressions of
the learnable slope ``a``, so gradients flow through the constants. Every other activation is
integrated numerically against the Gaussian once and cached.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ActivationStats",
    "KNOWN_ACTIVATIONS",
    "activation_stats",
    "activation_function",
    "gaussian_expectation",
    "prelu_mean_std",
    "Activation",
]

_SQRT_2PI = math.sqrt(2.0 * math.pi)

#: Activations this module knows, by name. ``prelu`` takes a slope ``a``; ``elu`` an ``alpha``;
#: ``leaky_relu`` a ``negative_slope``.
KNOWN_ACTIVATIONS: tuple[str, ...] = (
    "relu",
    "prelu",
    "leaky_relu",
    "identity",
    "tanh",
    "sigmoid",
    "elu",
    "gelu",
    "silu",
    "softplus",
)


@dataclass(frozen=True)
class ActivationStats:
    """Moments of ``s(Z)`` for ``Z ~ N(0, 1)``.

    Attributes:
        mean: ``c2 = E[s(Z)]``.
        std: ``c1 = std[s(Z)]``.
        jacobian_factor: ``sqrt(E[s'(Z)^2]) / c1``; the typical singular value of a NormProp
            layer's Jacobian with ``gamma = 1`` (1.21 for ReLU). ``gamma`` starts at its inverse.
    """

    mean: float
    std: float
    jacobian_factor: float

    @property
    def gamma_init(self) -> float:
        """``1 / jacobian_factor`` -- the paper's ``1/1.21`` for ReLU (section 4.3.1)."""
        return 1.0 / self.jacobian_factor


def activation_function(name: str, **params: float) -> Callable[[Tensor], Tensor]:
    """The torch function for a named activation with fixed parameters."""
    _check_name(name)
    if name == "relu":
        return F.relu
    if name == "prelu":
        a = float(params.get("a", 0.25))
        return lambda x: torch.where(x > 0, x, a * x)
    if name == "leaky_relu":
        slope = float(params.get("negative_slope", 0.01))
        return lambda x: F.leaky_relu(x, slope)
    if name == "identity":
        return lambda x: x
    if name == "tanh":
        return torch.tanh
    if name == "sigmoid":
        return torch.sigmoid
    if name == "elu":
        alpha = float(params.get("alpha", 1.0))
        return lambda x: F.elu(x, alpha)
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    if name == "softplus":
        return F.softplus
    raise AssertionError(name)  # pragma: no cover - _check_name covers it


def _check_name(name: str) -> None:
    if name not in KNOWN_ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; known activations: {', '.join(KNOWN_ACTIVATIONS)}"
        )


@functools.lru_cache(maxsize=1)
def _gauss_legendre_half_lines(
    points: int = 400, bound: float = 12.0
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and Gaussian-weighted weights on ``[-bound, 0]`` and ``[0, bound]``.

    Splitting at 0 keeps the kink of ReLU-like activations on a panel edge, so the rule is exact
    to float64 rounding for piecewise-smooth ``s``; the tail beyond 12 sigma is below 1e-32.
    """
    x, w = np.polynomial.legendre.leggauss(points)
    half = bound / 2.0
    right = half * (x + 1.0)
    nodes = np.concatenate([-right[::-1], right])
    weights = np.concatenate([w[::-1], w]) * half
    weights = weights * np.exp(-0.5 * nodes**2) / _SQRT_2PI
    return nodes, weights


def gaussian_expectation(fn: Callable[[Tensor], Tensor]) -> float:
    """``E[fn(Z)]`` for ``Z ~ N(0, 1)`` by Gauss-Legendre quadrature split at 0 (float64)."""
    nodes, weights = _gauss_legendre_half_lines()
    values = fn(torch.from_numpy(nodes)).double().numpy()
    return float(np.dot(weights, values))


def _numerical_stats(fn: Callable[[Tensor], Tensor]) -> ActivationStats:
    nodes, weights = _gauss_legendre_half_lines()
    z = torch.from_numpy(nodes).clone().requires_grad_(True)
    y = fn(z)
    (dy,) = torch.autograd.grad(y.sum(), z)
    y = y.detach().double().numpy()
    dy = dy.double().numpy()
    mean = float(np.dot(weights, y))
    var = float(np.dot(weights, (y - mean) ** 2))
    std = math.sqrt(var)
    jac = math.sqrt(float(np.dot(weights, dy**2))) / std
    return ActivationStats(mean=mean, std=std, jacobian_factor=jac)


def prelu_mean_std(a: Tensor | float) -> tuple[Tensor, Tensor]:
    """Remark 2: ``c2 = (1-a)/sqrt(2 pi)``, ``c1 = sqrt(0.5((1+a^2) - (1-a)^2/pi))``.

    Works on tensors so that gradients reach the learnable slope ``a`` through both constants.
    """
    a = torch.as_tensor(a)
    mean = (1.0 - a) / _SQRT_2PI
    std = torch.sqrt(0.5 * ((1.0 + a * a) - (1.0 - a) ** 2 / math.pi))
    return mean, std


@functools.lru_cache(maxsize=None)
def _cached_stats(name: str, params: tuple[tuple[str, float], ...]) -> ActivationStats:
    kwargs = dict(params)
    if name == "relu":
        # Remark 1: E[max(0,Z)] = 1/sqrt(2 pi), var = (1 - 1/pi)/2; E[1(Z>0)] = 1/2.
        std = math.sqrt(0.5 * (1.0 - 1.0 / math.pi))
        return ActivationStats(1.0 / _SQRT_2PI, std, math.sqrt(0.5) / std)
    if name in ("prelu", "leaky_relu"):
        # The same parameter (and default) as activation_function uses for this name.
        a = float(kwargs.get("a", 0.25) if name == "prelu" else kwargs.get("negative_slope", 0.01))
        # float64: torch.as_tensor(float) would round the cached constants to float32.
        mean, std = prelu_mean_std(torch.tensor(a, dtype=torch.float64))
        # E[s'(Z)^2] = (1 + a^2) / 2.
        jac = math.sqrt(0.5 * (1.0 + a * a)) / float(std)
        return ActivationStats(float(mean), float(std), jac)
    if name == "identity":
        return ActivationStats(0.0, 1.0, 1.0)
    return _numerical_stats(activation_function(name, **kwargs))


def activation_stats(name: str, **params: float) -> ActivationStats:
    """Gaussian moments and Jacobian factor of a named activation.

    Args:
        name: one of :data:`KNOWN_ACTIVATIONS`.
        **params: activation parameters: ``a`` for ``prelu`` (default 0.25), ``negative_slope``
            for ``leaky_relu`` (0.01), ``alpha`` for ``elu`` (1.0).

    Examples::

        >>> s = activation_stats("relu")
        >>> round(s.mean, 6), round(s.std, 6), round(s.jacobian_factor, 4)
        (0.398942, 0.583819, 1.2112)
        >>> round(activation_stats("prelu", a=0.25).mean, 6)
        0.299207
        >>> activation_stats("swish")
        Traceback (most recent call last):
        ...
        ValueError: unknown activation 'swish'; known activations: relu, prelu, leaky_relu, identity, tanh, sigmoid, elu, gelu, silu, softplus
    """
    _check_name(name)
    key = tuple(sorted((k, float(v)) for k, v in params.items()))
    return _cached_stats(name, key)


class Activation(nn.Module):
    """``(s(x) - c2) / c1``: an activation followed by its Gaussian re-standardisation (eq. 12).

    For ``prelu`` the slope ``a`` is a learnable parameter (one per layer, or one per unit with
    ``num_parameters``), and ``c1``, ``c2`` are recomputed from it in every forward (Remark 2), so
    the normalisation stays exact while ``a`` trains.

    Args:
        name: activation name, see :data:`KNOWN_ACTIVATIONS`.
        num_parameters: PReLU slopes (1 or the number of units/channels).
        **params: fixed activation parameters; ``a`` sets the PReLU slope's initial value.

    Shape:
        Input ``(N, C, *)``; output the same shape.
    """

    def __init__(self, name: str = "relu", num_parameters: int = 1, **params: float) -> None:
        super().__init__()
        _check_name(name)
        self.name = name
        self.params = dict(params)
        if name == "prelu":
            self.a = nn.Parameter(torch.full((num_parameters,), float(params.get("a", 0.25))))
            self._fn: Callable[[Tensor], Tensor] | None = None
        else:
            stats = activation_stats(name, **params)
            # Python floats drive the arithmetic: a float32 buffer would round the constants
            # for good, even after ``.double()``. The buffers mirror them (device, old readers).
            self._c2, self._inv_c1 = stats.mean, 1.0 / stats.std
            self.register_buffer("c2", torch.tensor(stats.mean), persistent=False)
            self.register_buffer("inv_c1", torch.tensor(1.0 / stats.std), persistent=False)
            self._fn = activation_function(name, **params)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """Current ``(c2, c1)``; tensors broadcastable over the channel dimension."""
        if self.name == "prelu":
            return prelu_mean_std(self.a)
        device = self.c2.device
        return (torch.tensor(self._c2, dtype=torch.float64, device=device),
                torch.tensor(1.0 / self._inv_c1, dtype=torch.float64, device=device))

    def raw(self, x: Tensor) -> Tensor:
        """``s(x)`` without the re-standardisation (used when folding into the next layer)."""
        if self.name == "prelu":
            return F.prelu(x, self.a)
        assert self._fn is not None
        return self._fn(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.name == "prelu":
            mean, std = prelu_mean_std(self.a)
            shape = (1, -1) + (1,) * (x.dim() - 2) if mean.numel() > 1 else ()
            if shape:
                mean, std = mean.view(shape), std.view(shape)
            return (F.prelu(x, self.a) - mean) / std
        if self.name == "identity":
            return x
        assert self._fn is not None
        # Eq. 12: (s(x) - c2) / c1.
        return (self._fn(x) - self._c2) * self._inv_c1

    def extra_repr(self) -> str:
        return f"{self.name!r}" + "".join(f", {k}={v}" for k, v in self.params.items())
