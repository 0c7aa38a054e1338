"""The paper's SGD step and unit-norm projection (section 4.4) with fewer passes over the weights.

The plain recipe -- ``loss.backward()``; SGD with momentum ``mu`` and weight decay ``lam``;
then :func:`~normprop.training.project_weights_` -- reads and writes every NormProp weight
matrix about six times more than a plain net's step: the gradient's tangent term, the decay,
and the projection's norm and divide. :class:`ProjectedSGD` computes the same iterates with
two of those passes fewer per :class:`~normprop.layers.NormPropLinear` weight, because eq. 9
depends on ``W_i`` only through its direction ``w_i = V_i / n_i`` (``n_i = ||V_i||``):

* keep the stored weight ``V`` un-normalised (no divide pass; the forward reads ``n`` anyway);
* let the backward write the SGD direction in unit space straight into ``V.grad``::

      d_i = dL/dw_i + lam w_i = n_i dL/dV_i + (lam / n_i) V_i      (one fused pass)

* ``b <- mu b + d`` (as torch's SGD) and ``V_i <- V_i - lr n_i b_i``, whose direction is
  ``P(w_i - lr b_i)``, the projected step of section 4.4, exactly.

So the loss, the directions ``V_i / ||V_i||``, ``gamma``, ``beta`` and the momentum follow the
plain recipe's step for step (the tests compare them in float64), and the net computes the same
function. Other parameters get torch's SGD (decay on matrices only, as
:func:`~normprop.training.paper_optimizer`); :class:`~normprop.layers.NormPropConv2d` weights
get torch's SGD and the projection inside :meth:`ProjectedSGD.step`. ``weight.grad`` of a fused
layer holds ``d``, not the gradient, while this optimiser drives it; call :meth:`detach` to
give the layers back to the plain backward.

Two more passes go: the step takes ``||V_i||`` for the next forward right after it wrote
``V`` (still in cache; valid while ``V``'s autograd version is unchanged, see
:class:`~normprop.layers.StepLink`), and with the ``native`` and ``compile`` backends the
decay/tangent pass of the backward, the momentum and the update become one loop per weight
(:func:`_fused_update`): the memory traffic of torch's ``SGD(fused=True)``. The ``native``
backend (a C kernel, :mod:`normprop.native`; the default on the CPU) also sums each new row's
squares inside that loop, so the norm read goes too.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.sgd import sgd

from . import native, native_autograd
from .layers import NormPropConv2d, NormPropLinear, StepLink, project_rows_

__all__ = ["Backend", "ProjectedSGD"]

try:  # where torch has fused SGD kernels (CPU since torch 2.4); a private helper, so guarded
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    _FUSED_SGD_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except ImportError:  # pragma: no cover -- older torch: multi-tensor ops instead
    _FUSED_SGD_DEVICES = frozenset()

#: How :class:`ProjectedSGD` takes the step of a NormProp weight matrix (see its docstring).
Backend = Literal["auto", "eager", "native", "compile", "project"]


def _fused_update(weights: list[Tensor], raws: list[Tensor], bufs: list[Tensor],
                  norms: list[Tensor], tangents: list[Tensor], params: list[Tensor],
                  grads: list[Tensor], pbufs: list[Tensor], decays: list[float],
                  lr: Tensor, mu: Tensor, lam: Tensor) -> None:
    """The whole step in one pass per weight, written for ``torch.compile`` to fuse.

    For each NormProp weight ``V`` (row norms ``n``, backward product ``R_i = k_i (G^T x)_i``,
    tangent coefficient ``t_i``)::

        d = n R - (t - lam / n) V           # = n dL/dV + (lam / n) V, ProjectedSGD's direction
        b <- mu b + d ;  V <- V - lr n b

    and torch SGD (momentum, decay per parameter) for the rest. Read: ``R``, ``b``, ``V``;
    written: ``b``, ``V`` -- the memory traffic of torch's fused SGD. The next forward's row
    norms are read after it (:func:`_remember_norms`): with ``||V_i||`` inside this loop,
    inductor (torch 2.13, CPU) made a kernel 1.5x-1.7x slower than this one plus the separate
    read (docs/LIBRARY.md). Also correct when run eagerly (the fallback).
    """
    for v, raw, b, n, t in zip(weights, raws, bufs, norms, tangents):
        n = n.clamp_min(torch.finfo(n.dtype).tiny).unsqueeze(1)
        d = raw * n - (t.unsqueeze(1) - lam / n) * v
        b.mul_(mu).add_(d)
        v.sub_(lr * n * b)
    for p, g, b, decay in zip(params, grads, pbufs, decays):
        b.mul_(mu).add_(g + decay * p if decay else g)
        p.sub_(lr * b)


def _remember_norms(link: StepLink, weight: Tensor) -> None:
    """The next forward's ``||W_i||``, read now while the rows just written are in cache
    (about half the cost of reading them in the forward, for the MLP of the benchmark)."""
    link.next_norms = torch.linalg.vector_norm(weight, dim=1)
    link.next_key = (weight._version, weight.data_ptr())
    link.next_prepared = None


class ProjectedSGD(Optimizer):
    """SGD with momentum and weight decay, then the unit-norm projection, for a NormProp net.

    Use it in place of ``paper_optimizer(model, ...)`` plus ``project_weights_(model)`` (so
    ``train_step(..., project=False)``): the same iterates, fewer weight passes.

    Args:
        model: the network; its :class:`NormPropLinear` layers switch to the fused backward.
        lr: learning rate.
        momentum: ``mu`` (0.9 in the paper).
        weight_decay: ``lam`` on weight matrices and filters (not on gamma, beta, slopes).
        backend: how each :class:`NormPropLinear` weight takes its step:

            * ``"native"``: one pass per weight in C (:mod:`normprop.native`): reads the
              backward's product, the momentum and the weight, writes the momentum and the
              weight, and sums the new rows' squares for the next forward on the way. CPU,
              float32/float64; any other weight takes :func:`_fused_update` eagerly. Raises if
              the kernel cannot be built (no C compiler).
            * ``"compile"``: the whole step as one ``torch.compile``'d function
              (:func:`_fused_update`), for GPUs (Triton). The first step compiles (seconds;
              cached on disk by torch); a step that cannot compile warns once, finishes
              eagerly, and goes on as ``"eager"``.
            * ``"eager"``: torch ops; the backward writes the step's direction into
              ``weight.grad`` (one weight pass), the step adds momentum and updates.
            * ``"project"``: torch's SGD (its fused kernel where torch has one: one launch for
              a whole group), then the projection to unit rows -- the plain recipe of
              ``paper_optimizer`` + ``project_weights_``, and the plain backward. More weight
              passes, fewer kernel launches: the cheaper step where launches are the cost (a
              GPU in eager mode; docs/LIBRARY.md).
            * ``"auto"`` (default): ``"native"`` when every such weight is on the CPU and the
              kernel builds, ``"eager"`` on the CPU without it, ``"project"`` off the CPU.
              :attr:`backend` tells which was taken.

            All five compute the same iterates (to rounding; tested in float64).
        foreach: use torch's multi-tensor ops for the step (fewer kernel launches); ``None``
            (default) picks them when the parameters are not on the CPU, as torch's SGD does.

    Examples::

        >>> import torch, normprop
        >>> net = normprop.build_model("mlp:16", 4, 3)
        >>> opt = ProjectedSGD(net, lr=0.05)
        >>> step = normprop.train_step(net, opt, torch.randn(8, 4), torch.randint(0, 3, (8,)),
        ...                            project=False)
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4, backend: Backend = "auto",
                 foreach: bool | None = None) -> None:
        self.fused_layers = [m for m in model.modules() if isinstance(m, NormPropLinear)]
        self.projected_layers = [m for m in model.modules() if isinstance(m, NormPropConv2d)]
        fused = {id(m.weight) for m in self.fused_layers}
        groups: dict[str, list[Tensor]] = {"fused": [], "decay": [], "no_decay": []}
        for p in model.parameters():
            if not p.requires_grad:
                continue
            key = "fused" if id(p) in fused else ("decay" if p.dim() >= 2 else "no_decay")
            groups[key].append(p)
        param_groups = [{"params": ps, "kind": k} for k, ps in groups.items() if ps]
        super().__init__(param_groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        #: The backend taken: ``"native"``, ``"compile"``, ``"eager"`` or ``"project"``
        #: (never ``"auto"``).
        self.backend: Literal["eager", "native", "compile", "project"] = self._resolve(backend)
        raw = self.backend != "eager"
        for m in self.fused_layers:
            if self.backend == "project":  # the layer's own backward: weight.grad = dL/dW
                m.fused_link = None
                continue
            m.fused_link = StepLink(weight_decay, raw=raw, owner=weakref.ref(self))
            m.fused_link.native = self.backend == "native"
        self._owner = {id(m.weight): m for m in self.fused_layers}
        self.foreach = foreach
        self._update: Callable[..., None] | None = None
        self._scalars: tuple[tuple, Tensor] | None = None

    def _resolve(self, backend: str) -> Literal["eager", "native", "compile", "project"]:
        if backend not in ("auto", "eager", "native", "compile", "project"):
            raise ValueError(f"ProjectedSGD backend must be one of 'auto', 'eager', 'native', "
                             f"'compile', 'project'; got {backend!r}")
        on_cpu = all(m.weight.device.type == "cpu" for m in self.fused_layers)
        if backend == "native":
            if not native.available():
                raise RuntimeError("ProjectedSGD(backend='native'): "
                                   f"{native.unavailable_reason()}")
        elif backend == "auto":
            if not on_cpu:
                return "project"
            if not (self.fused_layers and native.available()):
                return "eager"
        else:
            return backend  # type: ignore[return-value]
        # The layers' C++ node, built here (once per machine) rather than in the first
        # forward; where it cannot be built they keep the Python node (the same numbers).
        native_autograd.available()
        return "native"

    def detach(self) -> None:
        """Give the fused layers back to the plain backward (their rows are then projected)."""
        with torch.no_grad():
            for m in self.fused_layers:
                m.fused_link = None
                norms = m.weight.norm(dim=1, keepdim=True).clamp_min_(1e-12)
                m.weight.div_(norms)
                m.mark_unit_rows_()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One step; ``closure`` is not supported (one forward/backward per step)."""
        if closure is not None:
            raise ValueError("ProjectedSGD takes no closure")
        if self.backend == "compile":
            self._compiled_step()
            return
        if self.backend == "native":
            self._native_step()
            return
        if self.backend == "project":
            self._project_step()
            return
        first = next((p for g in self.param_groups for p in g["params"]), None)
        foreach = self.foreach if self.foreach is not None else (
            first is not None and first.device.type != "cpu")
        for group in self.param_groups:
            # Per tensor for NormProp weights on the CPU: each one's norms are taken right
            # after its update, while it is in cache. Multi-tensor ops for everything else.
            if foreach or group["kind"] != "fused":
                self._foreach_group(group)
            else:
                self._loop_group(group)
        self._project_filters()

    def _loop_group(self, group: dict) -> None:
        lr, mu = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = p.grad  # the fused backward already added the decay (in unit space)
            buf = d
            if mu != 0:
                buf = self._momentum_buffer(p)
                torch.add(d, buf, alpha=mu, out=buf)  # one pass: d + mu b
            link = self._link_of(p)
            p.addcmul_(buf, link.norms.unsqueeze(1), value=-lr)
            link.norms = None
            _remember_norms(link, p)

    def _native_step(self) -> None:
        """gamma, beta and the rest first, through torch's fused SGD kernel
        (:meth:`_one_pass_group`); then each NormProp weight through the C kernel: one pass,
        which also gives the next forward its row norms and, from the new gamma and beta, its
        per-row constants of eq. 9."""
        for group in self.param_groups:
            if group["kind"] != "fused":
                self._one_pass_group(group)
        for group in self.param_groups:
            if group["kind"] != "fused":
                continue
            lr, mu, lam = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                raw = p.grad
                if raw is None:
                    continue
                link = self._link_of(p)
                norms, tangent = link.norms, link.tangent
                buf = self._momentum_buffer(p) if mu != 0 else None
                link.norms = link.tangent = link.prepared = None
                if not native.supports(p, raw, norms, tangent, *([] if buf is None else [buf])):
                    # e.g. bfloat16 or a non-contiguous weight: the same step in torch ops
                    _fused_update([p], [raw], [torch.zeros_like(p) if buf is None else buf],
                                  [norms], [tangent], [], [], [], [], lr, mu, lam)
                    _remember_norms(link, p)
                    continue
                consts = link.consts
                _, gamma, beta = self._owner[id(p)]._weight_gamma_beta()
                affine = None
                if consts is not None and native.supports(p, gamma, beta):
                    affine = (gamma, beta, *consts[:3])
                rows, nonzero = native._rows_unchecked(p, raw, buf, norms, tangent, lr, mu,
                                                       lam, affine)
                if affine is None:
                    link.next_norms, link.next_prepared = rows[0], None
                else:
                    link.next_norms, r, k, shift = rows.unbind(0)
                    link.next_prepared = (r, k, shift, nonzero)
                link.next_key = (p._version, p.data_ptr())
                link.next_prepared_key = (gamma._version, beta._version, gamma.data_ptr(),
                                          beta.data_ptr(), consts)
        self._project_filters()

    def _project_step(self) -> None:
        """torch's SGD for every group, decay on the NormProp weights too (``paper_optimizer``),
        then every NormProp weight back to unit rows (``project_weights_``).

        Rows that are not unit -- weights from another backend's checkpoint, which keeps them
        as trained, or set by hand -- are first moved to unit rows with their gradient in the
        same coordinates (``w = V / n``, ``dL/dw = n dL/dV``): the other backends keep the
        momentum for ``w``, so it means the same here and the iterates stay theirs (tested)."""
        with torch.no_grad():
            for m in self.fused_layers:
                grad = m.weight.grad
                if grad is not None and not m.rows_known_unit():
                    n = m.weight.norm(dim=1, keepdim=True).clamp_min_(1e-12)
                    m.weight.div_(n)
                    grad.mul_(n)
        for group in self.param_groups:
            self._one_pass_group(group, kind="decay" if group["kind"] == "fused" else None)
        project_rows_(self.fused_layers + self.projected_layers)

    def _one_pass_group(self, group: dict, kind: str | None = None) -> None:
        """gamma, beta, slopes, conv filters, plain layers: torch's fused SGD kernel (one pass
        for decay, momentum and update, what ``SGD(fused=True)`` runs), where torch has it for
        these tensors; else the multi-tensor ops."""
        params, grads = [], []
        for p in group["params"]:
            grad = p.grad
            if grad is not None:
                params.append(p)
                grads.append(grad)
        if not params:
            return
        # A gradient has its parameter's device and dtype (torch enforces it), so the
        # parameters alone say which kernel can take the group.
        device, dtype = params[0].device, params[0].dtype
        same = all(p.device == device and p.dtype == dtype for p in params)
        fusable = same and device.type in _FUSED_SGD_DEVICES and dtype.is_floating_point
        if not fusable and not all(p.device.type in _FUSED_SGD_DEVICES
                                   and p.is_floating_point() for p in params):
            self._foreach_group(group, kind)
            return
        mu, lr = group["momentum"], group["lr"]
        lam = group["weight_decay"] if (kind or group["kind"]) == "decay" else 0.0
        if same and mu != 0 and hasattr(torch, "_fused_sgd_"):
            # torch.optim.sgd.sgd(fused=True) would group by device and dtype first: ~50 us of
            # Python per step in the worker's batch-1 loop for the one group it would find.
            torch._fused_sgd_(params, grads, [self._momentum_buffer(p) for p in params],
                              weight_decay=lam, momentum=mu, lr=lr, dampening=0.0,
                              nesterov=False, maximize=False, is_first_step=False)
            return
        bufs = [self._momentum_buffer(p) for p in params] if mu != 0 else [None] * len(params)
        sgd(params, grads, bufs, fused=True, weight_decay=lam, momentum=mu, lr=lr,
            dampening=0.0, nesterov=False, maximize=False)

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        """``b`` of ``p``, made as zeros on first use: ``d + mu 0 = d`` is torch SGD's first
        step (it copies ``d``) exactly."""
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(p)
        return buf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's, and the tangent coefficients the ``native`` / ``compile`` backwards left
        (they are part of the gradient: a step skipped after its backward must not pass them
        on)."""
        super().zero_grad(set_to_none=set_to_none)
        for m in self.fused_layers:
            if m.fused_link is not None:
                m.fused_link.tangent = None

    def _foreach_group(self, group: dict, kind: str | None = None) -> None:
        """One group's step with torch's multi-tensor ops: a few calls per group instead of a
        few per tensor (what torch's SGD does on a GPU by default)."""
        lr, mu, lam = group["lr"], group["momentum"], group["weight_decay"]
        kind = kind or group["kind"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if kind == "decay" and lam != 0:
            grads = torch._foreach_add(grads, params, alpha=lam)
        if mu == 0:
            bufs = grads
        else:
            bufs = [self._momentum_buffer(p) for p in params]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
        if kind == "fused":
            links = [self._link_of(p) for p in params]
            torch._foreach_addcmul_(params, bufs, [link.norms.unsqueeze(1) for link in links],
                                    value=-lr)
            for link, p in zip(links, params):
                link.norms = None
                _remember_norms(link, p)
        else:
            torch._foreach_add_(params, bufs, alpha=-lr)

    def _compiled_step(self) -> None:
        """Gather the step's tensors and run :func:`_fused_update` (compiled on first use)."""
        weights, raws, bufs, norms, tangents, links = [], [], [], [], [], []
        params, grads, pbufs, decays = [], [], [], []
        lr_mu = {(g["lr"], g["momentum"]) for g in self.param_groups}
        if len(lr_mu) != 1:
            raise ValueError("ProjectedSGD(backend='compile') takes one lr and momentum for all "
                             f"parameter groups, got {sorted(lr_mu)}")
        (lr, mu), lam = lr_mu.pop(), self.defaults["weight_decay"]
        for group in self.param_groups:
            kind = group["kind"]
            if kind == "fused":
                lam = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if kind == "fused":
                    link = self._link_of(p)
                    weights.append(p)
                    raws.append(p.grad)
                    bufs.append(self._momentum_buffer(p))
                    norms.append(link.norms)
                    tangents.append(link.tangent)
                    links.append(link)
                else:
                    params.append(p)
                    grads.append(p.grad)
                    pbufs.append(self._momentum_buffer(p))
                    decays.append(group["weight_decay"] if kind == "decay" else 0.0)
        if weights or params:
            # Tensors, not Python floats: a new learning rate must not recompile the step.
            # Made again only when a value changes (no host-to-device copy per step, so the
            # step can be captured in a CUDA graph).
            first = (weights or params)[0]
            key = (lr, mu, lam, first.dtype, first.device)
            if self._scalars is None or self._scalars[0] != key:
                self._scalars = (key, torch.tensor([lr, mu, lam], dtype=first.dtype,
                                                   device=first.device))
            scalars = self._scalars[1]
            self._run_update(weights, raws, bufs, norms, tangents, params, grads, pbufs, decays,
                             scalars[0], scalars[1], scalars[2])
            for link, p in zip(links, weights):
                link.norms = link.tangent = None
                _remember_norms(link, p)
        self._project_filters()

    def _link_of(self, weight: Tensor) -> StepLink:
        link = self._owner[id(weight)].fused_link
        ready = link is not None and link.norms is not None and (
            not link.raw or link.tangent is not None)
        if not ready or link.norms.shape[0] != weight.shape[0]:
            raise RuntimeError("ProjectedSGD.step needs a training forward and backward of "
                               "the layer since the last step (and the layer attached: "
                               "detach() was called?)")
        return link

    def _run_update(self, *args: object) -> None:
        if self._update is None:
            self._update = torch.compile(_fused_update, fullgraph=True, dynamic=False)
            try:
                self._update(*args)
                return
            except Exception as exc:  # noqa: BLE001 -- any compiler failure: run it eagerly
                warnings.warn(f"ProjectedSGD(backend='compile') could not compile its step "
                              f"({type(exc).__name__}: {exc}); this step runs the same "
                              f"function eagerly, the next ones with backend='eager'",
                              RuntimeWarning, stacklevel=3)
                self._update = _fused_update
                # The backward already left this step's product; later ones leave the
                # direction itself (the same iterates, see the module docstring).
                self.backend = "eager"
                for m in self.fused_layers:
                    if m.fused_link is not None:
                        m.fused_link.raw = False
        self._update(*args)

    def _project_filters(self) -> None:
        """NormPropConv2d filters: torch SGD's update above, then the projection."""
        project_rows_(self.projected_layers)
