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

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import native, native_autograd
from .activations import Activation, activation_stats

__all__ = ["NormPropLinear", "NormPropConv2d", "NormPropLayer", "StepLink", "glorot_normal_"]


def glorot_normal_(weight: Tensor, fan_in: int, fan_out: int) -> Tensor:
    """Normalized initialisation (Glorot & Bengio 2010), used by the paper (section 4.2)."""
    std = math.sqrt(2.0 / float(fan_in + fan_out))
    with torch.no_grad():
        return weight.normal_(0.0, std)


def _row_norms(weight: Tensor) -> Tensor:
    """``||W_i||``: L2 norm of each output row (Linear) or Frobenius norm of each filter (conv)."""
    return weight.flatten(1).norm(dim=1)


# -- the training fast path ------------------------------------------------------------------
#
# Both functions below compute eq. 9 / 11 exactly for *any* row norms (the norm is read in the
# forward unless the layer knows its rows are unit, see ``NormPropLayer.rows_known_unit``);
# what they save is autograd's long chain of weight-sized temporaries for ``gamma * W / ||W||``. Their backward is the closed form of that
# chain: with ``n_i = ||W_i||``, ``r_i = n_i + eps``, ``k_i = gamma_i / r_i`` and ``G`` the
# gradient with respect to the scaled rows ``k_i W_i``,
#
#     dL/dW_i     = k_i G_i - (k_i (G_i . W_i) / (r_i n_i)) W_i     (tangent projection; for
#                                                                   n_i = 1, eps = 0 it is
#                                                                   G_i - (G_i . w_i) w_i)
#     dL/dgamma_i = (G_i . W_i) / r_i
#
# Tests check both against autograd through the plain formula in float64.


_Backward = TypeVar("_Backward", bound=Callable[..., tuple])


def _first_order(backward: _Backward) -> _Backward:
    """``once_differentiable``'s guarantee -- differentiating these gradients again is a clear
    error, not silently wrong second derivatives -- paid only where it can matter: under
    ``create_graph=True``, the one case in which a backward runs with grad mode on. Its wrapper
    costs about 10 us a call (measured on CPU), a tenth of a layer's backward at batch size 1."""
    guarded = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads: Tensor) -> tuple:
        if torch.is_grad_enabled():
            return guarded(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper  # type: ignore[return-value]


def _norms_of(flat: Tensor, unit_rows: bool) -> Tensor:
    """Row norms of a 2-D weight; ones when the caller knows the rows are unit (see
    :meth:`NormPropLayer.rows_known_unit`)."""
    if unit_rows:
        return torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
    return torch.linalg.vector_norm(flat, dim=1)


class _NormalizedRows(torch.autograd.Function):
    """``V_i = gamma_i W_i / (||W_i|| + eps)`` (the weight-side pass of eq. 9 / 11)."""

    @staticmethod
    def forward(ctx, weight: Tensor, gamma: Tensor, eps: float,  # type: ignore[override]
                unit_rows: bool = False, link: StepLink | None = None) -> Tensor:
        flat = weight.flatten(1)
        norms = link.norms if link is not None else None
        if norms is None:
            norms = _norms_of(flat, unit_rows)
        r = norms + eps
        k = gamma / r
        ctx.save_for_backward(weight, norms, r, k)
        ctx.link = link
        return weight * k.view((-1,) + (1,) * (weight.dim() - 1))

    @staticmethod
    @_first_order
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weight, norms, r, k = ctx.saved_tensors
        link = ctx.link
        flat_w, flat_g = weight.flatten(1), grad.flatten(1)
        dot = torch.linalg.vecdot(flat_g, flat_w)  # G_i . W_i
        d_weight = d_gamma = None
        if ctx.needs_input_grad[0]:
            n = norms.clamp_min(torch.finfo(norms.dtype).tiny)
            coef = dot / (r * n)
            if link is None:
                d_weight = torch.addcmul(flat_g, flat_w, coef.unsqueeze(1), value=-1.0)
                d_weight.mul_(k.unsqueeze(1))
            elif link.raw:  # ProjectedSGD's native / compile step finishes it
                d_weight = flat_g * k.unsqueeze(1)
                tangent = k * dot / r
                link.tangent = tangent if link.tangent is None else link.tangent + tangent
            else:  # ProjectedSGD's direction: n * dL/dW + (decay / n) W (see fused_sgd)
                nk = n * k
                d_weight = flat_g * nk.unsqueeze(1)
                d_weight.addcmul_(flat_w, (nk * coef - link.decay / n).unsqueeze(1),
                                  value=-1.0)
            d_weight = d_weight.view_as(weight)
        if ctx.needs_input_grad[1]:
            d_gamma = dot / r
        return d_weight, d_gamma, None, None, None


class _ShiftedRelu(torch.autograd.Function):
    """``max(p, floor)`` in place, with ReLU's backward ``g 1(p > floor)`` (one pass).

    ``torch.clamp_min``'s own backward takes a comparison and a ``where`` (two passes, and
    about ten times slower than ReLU's on CPU at NIN's sizes).
    """

    @staticmethod
    def forward(ctx, pre: Tensor, floor: float) -> Tensor:  # type: ignore[override]
        ctx.mark_dirty(pre)
        out = pre.clamp_min_(floor)
        ctx.save_for_backward(out)
        ctx.floor = floor
        return out

    @staticmethod
    @_first_order
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, ctx.floor), None


class StepLink:
    """What :class:`~normprop.fused_sgd.ProjectedSGD` and a :class:`NormPropLinear` pass each
    other every step (a plain object: setting attributes on a module is slow).

    Attributes:
        decay: the optimiser's weight decay ``lam``.
        raw: ``True`` for ProjectedSGD's ``native`` and ``compile`` backends: the backward
            leaves the product ``k_i (G^T x)_i`` in ``weight.grad`` and the tangent
            coefficient in ``tangent``.
        native: the ``native`` backend: the backward's activation-sized part runs in C too.
        norms: ``||W_i||`` as the last training forward read them (the step needs them).
        consts, prepared: see ``__init__``.
        tangent: ``k_i (G_i . W_i) / r_i``, summed over the backwards since the last step.
        probe: the C++ node's route for ``tangent``: its gradient (see the ``tangent`` property).
        owner: a weak reference to the optimiser: once it is gone the layer goes back to the
            plain backward by itself (``weight.grad`` is the gradient again), as after
            :meth:`~normprop.fused_sgd.ProjectedSGD.detach`.
    """

    __slots__ = ("decay", "raw", "norms", "_tangent", "next_norms", "next_key", "owner",
                 "consts", "prepared", "next_prepared", "next_prepared_key", "native", "probe")

    def __init__(self, decay: float, raw: bool,
                 owner: Callable[[], object | None] = lambda: True) -> None:
        self.decay, self.raw, self.owner = decay, raw, owner
        #: ProjectedSGD's native backend: the backward's activation-sized part runs in C too.
        self.native = False
        self.norms: Tensor | None = None
        # The C++ node's tangent coefficients accumulate as this tensor's gradient
        # (normprop.native_autograd); nothing reads its values.
        self.probe: Tensor | None = None
        self._tangent: Tensor | None = None
        # ``||W_i||`` taken by the step right after it wrote W (still in cache), for the next
        # forward -- valid while W's storage and autograd version are those in ``next_key``.
        self.next_norms: Tensor | None = None
        self.next_key: tuple[int, int] | None = None
        # The layer's ``(eps, inv_c1, c2, floor)`` (set by each training forward), and the
        # per-row ``(r, k, shift, all gamma != 0)`` of eq. 9 that the native step computed with
        # the new norms (``next_prepared``), valid while gamma, beta and the constants are
        # those in ``next_prepared_key`` and the norms are the step's; ``prepared`` is what
        # the current forward takes (``None``: it computes them).
        self.consts: tuple[float, float, float, float | None] | None = None
        self.prepared: tuple[Tensor, Tensor, Tensor, bool] | None = None
        self.next_prepared: tuple[Tensor, Tensor, Tensor, bool] | None = None
        self.next_prepared_key: tuple | None = None

    @property
    def tangent(self) -> Tensor | None:
        """``k_i (G_i . W_i) / r_i`` summed over the backwards since the last step: what the
        Python node left, plus what the C++ node left as ``probe.grad`` (moved here on read)."""
        probe = self.probe
        if probe is not None and probe.grad is not None:
            grad = probe.grad
            probe.grad = None
            self._tangent = grad if self._tangent is None else self._tangent + grad
        return self._tangent

    @tangent.setter
    def tangent(self, value: Tensor | None) -> None:
        """Replace the sum, the C++ node's pending part included (``None``: drop it)."""
        if self.probe is not None:
            self.probe.grad = None
        self._tangent = value


def _shift(beta: Tensor, inv_c1: float, c2: float) -> Tensor:
    """``(beta_i - c2) / c1``: the constant part of eq. 9 after the ReLU's re-standardisation."""
    return beta if inv_c1 == 1.0 and c2 == 0.0 else torch.sub(beta, c2).mul_(inv_c1)


def _row_constants(gamma: Tensor, beta: Tensor, norms: Tensor,
                   consts: tuple[float, float, float, float | None]
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``r_i = ||W_i|| + eps``, ``k_i = gamma_i / r_i / c1`` and the shift of eq. 9, rounded
    as the native step rounds them (``csrc/projected_sgd.c``); ``gamma``, ``beta`` detached by
    the caller or under no grad."""
    eps, inv_c1, c2, _ = consts
    r = norms + eps
    k = torch.div(gamma, r)
    if inv_c1 != 1.0:
        k.mul_(inv_c1)
    return r, k, _shift(beta, inv_c1, c2)


class _NormPropLinearRows(torch.autograd.Function):
    """``o = clamp_min(inv_c1 (gamma (x W^T) / (||W|| + eps) + beta - c2), floor)``, 2-D ``x``.

    The output-side form of eq. 9 for batches smaller than ``in_features``: the per-unit scale
    multiplies the ``(N, m)`` product instead of the ``(m, n)`` weight, so no weight-sized tensor
    is made in the forward, and the backward's tangent term needs ``G_i . W_i``, which is the
    activation-sized ``sum_b g_bi z_bi``. ``floor = None`` skips the clamp (other activations
    then run after it, with ``inv_c1 = 1``, ``c2 = 0``). ``consts = (eps, inv_c1, c2, floor)``
    travel as one tuple: every argument of ``apply`` costs Python time at batch size 1.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,  # type: ignore[override]
                consts: tuple[float, float, float, float | None], unit_rows: bool,
                link: StepLink | None) -> Tensor:
        eps, inv_c1, c2, floor = consts
        prepared = None
        # Known unit rows (n_i = 1): r is the scalar 1 + eps, no per-row tensors.
        if link is not None:
            norms, prepared = link.norms, link.prepared
        else:
            norms = None if unit_rows else torch.linalg.vector_norm(weight, dim=1)
        if prepared is not None:  # r, k, shift from the native step (the same formulas)
            r, k, shift, nonzero = prepared
        elif norms is None:
            r = 1.0 + eps
            k = gamma * (inv_c1 / r)
        else:
            r, k, shift = _row_constants(gamma, beta, norms, consts)
        z = x.mm(weight.t())  # W_i . x
        if prepared is None and norms is None:
            shift = _shift(beta, inv_c1, c2)
        # The backward needs u_i = k_i sum_b g_bi z_bi. Where out = k z + shift (g = 0 where the
        # clamp bit), u = sum_b g_bi (out_bi - shift_i): read from ``out``, which the ReLU
        # backward has just read, instead of keeping z -- one activation fewer in memory and a
        # cold read fewer. d gamma = u / gamma then needs gamma != 0, and the test is a host
        # sync, so this is the CPU path; a GPU, or a zero gamma, keeps z.
        via_out = x.device.type == "cpu" and (
            nonzero if prepared is not None else bool(gamma.all()))
        out = torch.addcmul(shift, z, k, out=z) if via_out else torch.addcmul(shift, z, k)
        if floor is not None:
            out.clamp_min_(floor)
        kept = (shift, gamma) if via_out else (z,)
        if norms is None:
            ctx.save_for_backward(x, weight, k, out, *kept)
            ctx.r = r
        else:
            ctx.save_for_backward(x, weight, k, out, *kept, norms, r)
        ctx.inv_c1, ctx.floor, ctx.link, ctx.via_out = inv_c1, floor, link, via_out
        return out

    @staticmethod
    @_first_order
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        via_out = ctx.via_out
        x, weight, k, out = saved[:4]
        rest = saved[6:] if via_out else saved[5:]
        if rest:
            norms, r = rest
        else:  # unit rows: n_i = 1, r_i = 1 + eps
            r, norms = ctx.r, None
        need_x, need_w, need_gamma, need_beta = ctx.needs_input_grad[:4]
        inv_c1, link = ctx.inv_c1, ctx.link
        if (via_out and link is not None and link.native and link.raw and rest
                and native.supports(grad, out, k, saved[4], saved[5], r)):
            return _native_rows_backward(ctx, grad, x, weight, k, out, saved[4], saved[5], r)
        if ctx.floor is not None:
            # relu'(p) = 1(p > 0), and p > 0 exactly where the clamp did not bite.
            grad = torch.ops.aten.threshold_backward(grad, out, ctx.floor)
        d_x = d_w = d_gamma = d_beta = None
        gz = grad * k
        if need_x:
            d_x = gz.mm(weight)
        g_sum = grad.sum(0) if need_beta or (via_out and (need_w or need_gamma)) else None
        if need_w or need_gamma:
            # u_i = k_i (G_i . W_i) with G_i . W_i = sum_b g_bi (W_i . x_b)
            if via_out:
                shift, gamma = saved[4:6]
                u = torch.linalg.vecdot(grad, out, dim=0).addcmul_(shift, g_sum, value=-1.0)
                if need_gamma:
                    d_gamma = u / gamma  # = (G_i . W_i) inv_c1 / r_i
            else:
                s = torch.linalg.vecdot(grad, saved[4], dim=0)
                if need_gamma:
                    d_gamma = s * (inv_c1 / r)
                u = s.mul_(k)
            u_r = u / r  # k_i (G_i . W_i) / r_i: the tangent coefficient
            if need_w and link is not None and link.raw:
                # ProjectedSGD native / compile: k_i (G^T x)_i here, the rest in its step.
                d_w = gz.t().mm(x)
                link.tangent = u_r if link.tangent is None else link.tangent + u_r
            elif need_w and link is not None:
                # ProjectedSGD's direction n * dL/dW + (decay / n) W in the same two passes
                # (the per-row n goes on the small (N, m) factor of the product).
                n = norms.clamp_min(torch.finfo(norms.dtype).tiny)
                d_w = (grad * (k * n)).t().mm(x)
                d_w.addcmul_(weight, u_r.sub_(n.reciprocal().mul_(link.decay)).unsqueeze(1),
                             value=-1.0)
            elif need_w:
                d_w = gz.t().mm(x)
                coef = u_r if norms is None else u_r.div_(
                    norms.clamp_min(torch.finfo(norms.dtype).tiny))
                d_w.addcmul_(weight, coef.unsqueeze(1), value=-1.0)
        if need_beta:
            d_beta = g_sum.mul_(inv_c1) if inv_c1 != 1.0 else g_sum
        return d_x, d_w, d_gamma, d_beta, None, None, None


def _native_rows_backward(ctx, grad: Tensor, x: Tensor, weight: Tensor, k: Tensor,
                          out: Tensor, shift: Tensor, gamma: Tensor,
                          r: Tensor) -> tuple[Tensor | None, ...]:
    """``_NormPropLinearRows.backward`` under ProjectedSGD's native backend: the ReLU mask,
    ``g k``, the sums for ``d gamma``, ``d beta`` and the tangent in one C pass
    (:func:`normprop.native._layer_backward`, nine small torch ops otherwise), then the two
    matmuls. The same numbers as the torch-op path to rounding (tested)."""
    need_x, need_w, need_gamma, need_beta = ctx.needs_input_grad[:4]
    gz, stats = native._layer_backward(grad, out, k, shift, gamma, r, ctx.floor, ctx.inv_c1)
    d_w = None
    if need_w:
        d_w = gz.t().mm(x)  # k_i (G^T x)_i; the rest in ProjectedSGD's step
        link = ctx.link
        link.tangent = stats[1] if link.tangent is None else link.tangent + stats[1]
    return (gz.mm(weight) if need_x else None, d_w, stats[0] if need_gamma else None,
            stats[2] if need_beta else None, None, None, None)


def _native_rows(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
                 consts: tuple[float, float, float, float | None], link: StepLink
                 ) -> Tensor | None:
    """``_NormPropLinearRows`` under ProjectedSGD's native backend as the C++ node of
    :mod:`normprop.native_autograd` (the same numbers without Python in the backward), or
    ``None`` where that node cannot take the layer: not built, a zero ``gamma_i`` (``u`` is then
    not read from the output), another dtype or device. The tangent coefficient arrives as the
    gradient of ``link.probe``, which ``link.tangent`` collects."""
    op = native_autograd.linear_rows()
    if op is None or not x.is_cpu or x.dtype != weight.dtype:
        return None
    prepared = link.prepared
    if prepared is None:  # the step did not prepare them (first step, a changed gamma...)
        r, k, shift = _row_constants(gamma.detach(), beta.detach(), link.norms, consts)
        nonzero = bool(gamma.all())
    else:
        r, k, shift, nonzero = prepared
    if not nonzero or not native.supports(weight, gamma, k, shift, r):
        return None
    probe = link.probe
    if probe is None or probe.dtype != weight.dtype or probe.shape[0] != weight.shape[0]:
        probe = link.probe = torch.zeros(weight.shape[0], dtype=weight.dtype,
                                         requires_grad=True)
    return op(x, weight, gamma, beta, probe, k, shift, r, consts[3], consts[1])


def project_rows_(layers: list[NormPropLayer], eps: float = 1e-12) -> None:
    """Each layer's weight rows (Linear) / filters (conv) to unit L2 norm, in place, and marked
    unit (section 4.4): what :func:`~normprop.training.project_weights_` and
    :class:`~normprop.fused_sgd.ProjectedSGD` both run."""
    if not layers:
        return
    flat = [m.weight.view(m.weight.shape[0], -1) for m in layers]
    torch._foreach_div_(flat, [f.norm(dim=1, keepdim=True).clamp_min_(eps) for f in flat])
    for m in layers:
        # Lets the next forward skip ||W_i|| (= 1) until the weight changes again. An all-zero
        # row stays zero and is then treated as a unit row: its output is 0 either way.
        m.mark_unit_rows_()


# ReLU is positively homogeneous, so (relu(p) - c2) / c1 = max((p - c2) / c1, -c2 / c1): the
# re-standardisation folds into the layer's own scale and bias, and the activation becomes one
# clamp -- the op count of a plain Linear + ReLU.
_RELU_STATS = activation_stats("relu")
_RELU_FOLD = (1.0 / _RELU_STATS.std, _RELU_STATS.mean, -_RELU_STATS.mean / _RELU_STATS.std)


def _mark_unit_rows_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: rows saved after a projection are unit to rounding; mark them
    so a loaded model computes bit for bit what the saved one did."""
    with torch.no_grad():
        norms = module.weight.flatten(1).norm(dim=1)
        tol = 8 * torch.finfo(norms.dtype).eps
        if bool(((norms - 1).abs() <= tol).all()):
            module.mark_unit_rows_()


class NormPropLayer:
    """Mixin with what every NormProp layer shares: gamma, beta, the activation, the scale.

    Attributes:
        fast_path: ``True`` (default) computes eq. 9 / 11 with a closed-form backward (first
            derivatives only); ``False`` composes plain autograd ops -- the same numbers, slower,
            but twice differentiable. Under ``torch.func`` transforms the composite path is used
            automatically.
    """

    weight: Tensor
    gamma: nn.Parameter
    beta: nn.Parameter
    activation: Activation | None
    eps: float
    fast_path: bool = True

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

    def mark_unit_rows_(self) -> None:
        """Record that every row of ``weight`` has unit norm *now* (called by
        :func:`~normprop.training.project_weights_` and at initialisation)."""
        weight = self.weight
        # An inference tensor (made under torch.inference_mode) keeps no version counter: its
        # rows are then never taken as known unit, and each forward reads the norms.
        self._unit_rows_key = None if weight.is_inference() else (weight._version,
                                                                  weight.data_ptr())

    def rows_known_unit(self) -> bool:
        """Whether the weight is unchanged since :meth:`mark_unit_rows_`: same storage and
        the same autograd version counter. While it is, the forward uses ``||W_i|| = 1`` instead
        of reading the weight once more for the norm.

        Any tracked change -- an optimiser step, an in-place edit (also under ``no_grad``),
        ``.to()``, a new ``Parameter`` -- makes it ``False`` and the forward takes the norm
        again, so eq. 9 / 11 stay exact. ``load_state_dict`` marks the rows unit again when
        every norm is within 8 ulps of 1 (weights saved after a projection). The one untracked
        route is an in-place edit through ``weight.data``; call
        :func:`~normprop.training.project_weights_` after one.
        """
        return self._rows_unit(self.weight)

    def _rows_unit(self, weight: Tensor) -> bool:
        key = getattr(self, "_unit_rows_key", None)
        return key is not None and key == (weight._version, weight.data_ptr())

    def _weight_gamma_beta(self) -> tuple[Tensor, Tensor, Tensor]:
        """The three parameters, read from ``_parameters`` once: each ``self.weight`` costs
        about 1 us in ``nn.Module.__getattr__``, and the batch-1 step is made of such costs.
        (A parametrised weight, ``torch.nn.utils.parametrize``, is not in that dict.)"""
        params = self._parameters
        try:
            return params["weight"], params["gamma"], params["beta"]
        except KeyError:
            return self.weight, self.gamma, self.beta

    @property
    def _fused_relu(self) -> tuple[float, float, float] | None:
        """``(1/c1, c2, -c2/c1)`` when the activation is ReLU (read from ``self.activation``;
        through ``_modules``, which holds it when it is a module, for the host time)."""
        act = self._modules.get("activation")
        return _RELU_FOLD if act is not None and act.name == "relu" else None

    def weight_scale(self) -> Tensor:
        """``gamma_i / ||W_i||``: the per-unit factor applied to ``W_i . x`` (eq. 9)."""
        return self.gamma / (_row_norms(self.weight) + self.eps)

    def effective_weight(self) -> Tensor:
        """``gamma_i W_i / ||W_i||`` -- an O(parameters) weight-side pass, not O(activations)."""
        scale = self.weight_scale()
        return self.weight * scale.view((-1,) + (1,) * (self.weight.dim() - 1))

    #: Set by :class:`~normprop.fused_sgd.ProjectedSGD` while it drives this layer.
    fused_link: StepLink | None = None

    @property
    def fused_decay(self) -> float | None:
        """ProjectedSGD's weight decay while it drives this layer, else ``None``."""
        return None if self.fused_link is None else self.fused_link.decay

    def _fused_link(self, weight: Tensor) -> StepLink | None:
        """The :class:`StepLink` when ProjectedSGD drives this layer and the forward will be
        differentiated (its norms then set for the backward and the step), else ``None``."""
        link = self.fused_link
        if link is None:
            return None
        if link.owner() is None:  # the optimiser was dropped without detach()
            self.fused_link = None
            return None
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return None
        if link.next_key == (weight._version, weight.data_ptr()):
            link.norms = link.next_norms
        else:
            link.norms = torch.linalg.vector_norm(weight.detach().flatten(1), dim=1)
        return link

    def _activate(self, pre: Tensor) -> Tensor:
        return pre if self.activation is None else self.activation(pre)

    def _use_fast_path(self) -> bool:
        # Under torch.compile the composite formula is the better input: the compiler fuses
        # its elementwise ops itself, and the fast path's Python-side state (the unit-row key)
        # would be a guard that recompiles after every optimiser step.
        return (self.fast_path and not torch._C._are_functorch_transforms_active()
                and not torch.compiler.is_compiling())

    def _composite_forward(self, x: Tensor) -> Tensor:
        """Eq. 9 / 11 / 12 as plain autograd ops (no custom backward)."""
        weight = self.effective_weight()
        if isinstance(self, nn.Conv2d):
            pre = self._conv_forward(x, weight, self.beta)
        else:
            pre = F.linear(x, weight, self.beta)
        return self._activate(pre)

    def _scaled_affine(self) -> tuple[Tensor, Tensor]:
        """``(gamma / c1, (beta - c2) / c1)`` for fused ReLU, else ``(gamma, beta)``."""
        if self._fused_relu is None:
            return self.gamma, self.beta
        inv_c1, c2, _ = self._fused_relu
        return self.gamma * inv_c1, (self.beta - c2) * inv_c1

    def _finish(self, pre: Tensor) -> Tensor:
        """The activation and eq. 12's re-standardisation, after :meth:`_scaled_affine`."""
        if self._fused_relu is not None:
            if torch.is_grad_enabled():
                return _ShiftedRelu.apply(pre, self._fused_relu[2])
            return pre.clamp_min_(self._fused_relu[2])
        return self._activate(pre)


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
        self.mark_unit_rows_()  # reset_parameters() made the rows unit
        self.register_load_state_dict_post_hook(_mark_unit_rows_after_load)

    def reset_parameters(self) -> None:
        glorot_normal_(self.weight, self.in_features, self.out_features)
        # Unit rows from the start: ||W_i|| = 1 is the invariant projection keeps (section 4.4).
        with torch.no_grad():
            self.weight.div_(_row_norms(self.weight).clamp_min(1e-12).unsqueeze(1))

    def forward(self, x: Tensor) -> Tensor:
        if not self._use_fast_path():
            return self._composite_forward(x)
        weight, gamma, beta = self._weight_gamma_beta()
        rows = x.numel() // max(self.in_features, 1)
        link = self._fused_link(weight)
        unit = link is None and self._rows_unit(weight)
        if x.dim() >= 1 and 0 < rows < self.in_features:
            # Fewer rows than inputs: scale the (N, m) product, not the (m, n) weight (eq. 9).
            relu = self._fused_relu
            consts = (self.eps, *relu[:2], relu[2]) if relu else (self.eps, 1.0, 0.0, None)
            if link is not None:
                link.consts = consts
                link.prepared = link.next_prepared if (
                    link.norms is link.next_norms and link.next_prepared_key == (
                        gamma._version, beta._version, gamma.data_ptr(), beta.data_ptr(),
                        consts)) else None
            x2 = x if x.dim() == 2 else x.reshape(rows, -1)
            out = None
            if link is not None and link.native and link.raw:
                out = _native_rows(x2, weight, gamma, beta, consts, link)
            if out is None:
                out = _NormPropLinearRows.apply(x2, weight, gamma, beta, consts, unit, link)
            if x.dim() != 2:
                out = out.view(*x.shape[:-1], self.out_features)
            return out if relu is not None else self._activate(out)
        # gamma_i (W_i . x)/||W_i|| + beta_i as one matmul with a scaled weight and fused bias.
        gamma, beta = self._scaled_affine()
        pre = F.linear(x, _NormalizedRows.apply(weight, gamma, self.eps, unit, link), beta)
        return self._finish(pre)

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
        self.mark_unit_rows_()  # reset_parameters() made the rows unit
        self.register_load_state_dict_post_hook(_mark_unit_rows_after_load)

    def reset_parameters(self) -> None:
        receptive = self.weight[0][0].numel()
        fan_in = self.weight.shape[1] * receptive
        fan_out = self.weight.shape[0] * receptive // self.groups
        glorot_normal_(self.weight, fan_in, fan_out)
        with torch.no_grad():
            norms = _row_norms(self.weight).clamp_min(1e-12)
            self.weight.div_(norms.view(-1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if not self._use_fast_path():
            return self._composite_forward(x)
        # gamma_i (W_i * x)/||W_i||_F + beta_i: the scale goes on the filters, O(parameters).
        gamma, beta = self._scaled_affine()
        weight = _NormalizedRows.apply(self.weight, gamma, self.eps, self.rows_known_unit())
        pre = self._conv_forward(x, weight, beta)
        return self._finish(pre)
