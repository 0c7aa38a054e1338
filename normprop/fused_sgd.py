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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .layers import NormPropConv2d, NormPropLinear

__all__ = ["ProjectedSGD"]


class ProjectedSGD(Optimizer):
    """SGD with momentum and weight decay, then the unit-norm projection, for a NormProp net.

    Use it in place of ``paper_optimizer(model, ...)`` plus ``project_weights_(model)`` (so
    ``train_step(..., project=False)``): the same iterates, fewer weight passes.

    Args:
        model: the network; its :class:`NormPropLinear` layers switch to the fused backward.
        lr: learning rate.
        momentum: ``mu`` (0.9 in the paper).
        weight_decay: ``lam`` on weight matrices and filters (not on gamma, beta, slopes).

    Examples::

        >>> import torch, normprop
        >>> net = normprop.build_model("mlp:16", 4, 3)
        >>> opt = ProjectedSGD(net, lr=0.05)
        >>> step = normprop.train_step(net, opt, torch.randn(8, 4), torch.randint(0, 3, (8,)),
        ...                            project=False)
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> None:
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
        for m in self.fused_layers:
            m.fused_decay = weight_decay
        self._owner = {id(m.weight): m for m in self.fused_layers}

    def detach(self) -> None:
        """Give the fused layers back to the plain backward (their rows are then projected)."""
        with torch.no_grad():
            for m in self.fused_layers:
                m.fused_decay = None
                m.last_row_norms = None
                norms = m.weight.norm(dim=1, keepdim=True).clamp_min_(1e-12)
                m.weight.div_(norms)
                m.mark_unit_rows_()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One step; ``closure`` is not supported (one forward/backward per step)."""
        if closure is not None:
            raise ValueError("ProjectedSGD takes no closure")
        for group in self.param_groups:
            lr, mu, lam, kind = group["lr"], group["momentum"], group["weight_decay"], group["kind"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                # The fused backward already added the decay (in unit space).
                d = p.grad if kind != "decay" or lam == 0 else p.grad.add(p, alpha=lam)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None or mu == 0:
                    buf = state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    buf.mul_(mu).add_(d)
                if kind == "fused":
                    layer = self._owner[id(p)]
                    norms = layer.last_row_norms
                    if norms is None or norms.shape[0] != p.shape[0]:
                        raise RuntimeError("ProjectedSGD.step needs a training forward of "
                                           "the layer since the last step")
                    p.addcmul_(buf, norms.unsqueeze(1), value=-lr)
                    layer.last_row_norms = None
                else:
                    p.add_(buf, alpha=-lr)
        if self.projected_layers:
            weights = [m.weight for m in self.projected_layers]
            flat = [w.view(w.shape[0], -1) for w in weights]
            torch._foreach_div_(flat, [f.norm(dim=1, keepdim=True).clamp_min_(1e-12)
                                       for f in flat])
            for m in self.projected_layers:
                m.mark_unit_rows_()
