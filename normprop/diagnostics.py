"""Diagnostics the paper uses: covariate shift (fig. 2), layer Jacobians (3.4), coherence (Prop. 1).

* :func:`layer_input_stats` -- per-unit mean/std of each hidden layer's standardised input. For a
  NormProp layer that is ``u_i = W_i . x / ||W_i||``, which NormProp claims stays ~N(0, 1); for a
  BatchNorm/LayerNorm baseline it is the normaliser's output before its affine; for an
  un-normalised net, the pre-activation. Plotting its drift over training is figure 2.
* :func:`layer_jacobian` / :func:`jacobian_singular_values` -- section 3.4 predicts
  ``E[J J^T] = (0.5 / c1^2) I = 1.47 I`` for a ReLU layer with ``gamma = 1`` (singular values
  ~1.21) and ~``I`` with ``gamma = 1/1.21``.
* :func:`coherence` -- ``max_{i != j} |w_i . w_j| / (||w_i|| ||w_j||)``; Proposition 1 bounds how
  far the pre-activation covariance is from diagonal by it (:func:`canonical_error_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import NormPropConv2d, NormPropLinear

__all__ = [
    "LayerStats",
    "layer_input_stats",
    "probe_modules",
    "layer_jacobian",
    "jacobian_singular_values",
    "coherence",
    "canonical_error_bound",
]


@dataclass
class LayerStats:
    """Per-unit statistics of one hidden layer's standardised input over a batch.

    Attributes:
        name: the module's name inside the model.
        mean: per-unit (per-channel for conv) mean, shape ``(units,)``.
        std: per-unit standard deviation, shape ``(units,)``.
    """

    name: str
    mean: Tensor
    std: Tensor


def probe_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose standardised input :func:`layer_input_stats` reports, in order."""
    found: list[tuple[str, nn.Module]] = []
    weights: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, (NormPropLinear, NormPropConv2d)):
            if m.activation is not None:
                found.append((name, m))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            found.append((name, m))
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            weights.append((name, m))
    if found:
        return found
    return weights[:-1]  # an un-normalised net: every weight layer but the output


def _standardised(module: nn.Module, inp: Tensor, out: Tensor) -> Tensor:
    if isinstance(module, NormPropLinear):
        w = module.weight / module.weight.norm(dim=1, keepdim=True)
        return F.linear(inp, w)
    if isinstance(module, NormPropConv2d):
        w = module.weight / module.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return module._conv_forward(inp, w, None)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) and module.affine:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return (out - module.bias.view(shape)) / module.weight.view(shape)
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return (out - module.bias) / module.weight
    return out


def _per_unit(t: Tensor) -> tuple[Tensor, Tensor]:
    dims = (0,) + tuple(range(2, t.dim()))
    return t.mean(dim=dims), t.std(dim=dims, unbiased=False)


@torch.no_grad()
def layer_input_stats(model: nn.Module, x: Tensor) -> list[LayerStats]:
    """Run ``x`` through ``model`` and return per-unit mean/std of each hidden layer's input.

    The model's mode is used as is (call ``model.eval()`` for validation statistics, as fig. 2).
    """
    probes = probe_modules(model)
    records: dict[str, Tensor] = {}
    handles = []
    for name, module in probes:
        def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
            records[name] = _standardised(mod, args[0], out).detach()
        handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    stats = []
    for name, _ in probes:
        mean, std = _per_unit(records[name].double())
        stats.append(LayerStats(name, mean, std))
    return stats


def layer_jacobian(layer: nn.Module, x: Tensor) -> Tensor:
    """Jacobian ``d layer(x) / d x`` of a layer at one input vector ``x`` of shape ``(n,)``."""
    fn = lambda v: layer(v.unsqueeze(0)).squeeze(0)  # noqa: E731
    return torch.autograd.functional.jacobian(fn, x.detach())


def jacobian_singular_values(layer: nn.Module, x: Tensor) -> Tensor:
    """Singular values of :func:`layer_jacobian` at ``x`` (section 3.4)."""
    return torch.linalg.svdvals(layer_jacobian(layer, x))


def coherence(weight: Tensor) -> float:
    """Coherence of the rows (filters) of ``weight`` (the paper's footnote 1, Proposition 1)."""
    w = weight.detach().flatten(1).double()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gram = (w @ w.T).abs()
    gram.fill_diagonal_(0.0)
    return float(gram.max()) if gram.numel() > 1 else 0.0


def canonical_error_bound(weight: Tensor, sigma: float = 1.0) -> float:
    """Right-hand side of eq. 3: ``sigma^2 mu sqrt(sum_{i != j} ||W_i||^2 ||W_j||^2)``."""
    sq = weight.detach().flatten(1).double().pow(2).sum(dim=1)
    cross = float(sq.sum() ** 2 - (sq**2).sum())
    return sigma**2 * coherence(weight) * cross**0.5
