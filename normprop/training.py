"""Training helpers of the paper's recipe (section 4.4): SGD with momentum 0.9, weight decay,
learning rate halved on a plateau or on a schedule, and the unit-norm constraint on every hidden
weight row/filter after every step.

The projection matters beyond tidiness: NormProp's output does not depend on ``||W_i||``, so the
gradient is orthogonal to ``W_i`` and, with weight decay, the norm would drift and change the
effective learning rate. Re-projecting keeps ``||W_i|| = 1`` as an invariant ("this reduces the
parameter search space") -- and lets serving code skip the norm.

These are conveniences, not a framework: use them inside your own loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

from .fused_sgd import ProjectedSGD
from .layers import NormPropConv2d, NormPropLinear, project_rows_

__all__ = [
    "project_weights_",
    "normprop_layers",
    "paper_optimizer",
    "halve_lr_on_plateau",
    "halve_lr_every",
    "scaled_lr",
    "StepResult",
    "train_step",
]


def normprop_layers(model: nn.Module) -> list[NormPropLinear | NormPropConv2d]:
    """Every NormProp layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, (NormPropLinear, NormPropConv2d))]


@torch.no_grad()
def project_weights_(model: nn.Module, eps: float = 1e-12) -> nn.Module:
    """Rescale every NormProp weight row (Linear) / filter (conv) to unit L2 norm, in place.

    Section 4.4, "Constraints": run after every optimiser step. Returns ``model``.
    """
    project_rows_(normprop_layers(model), eps)
    return model


def paper_optimizer(model: nn.Module, lr: float, momentum: float = 0.9,
                    weight_decay: float = 5e-4, nesterov: bool = False,
                    fused: bool | None = None) -> SGD:
    """SGD with momentum 0.9 and weight decay 5e-4..5e-3 (section 4.4).

    Weight decay applies to weight matrices only: ``gamma``, ``beta``, PReLU slopes and plain
    biases are scale/shift parameters that decay would pull towards zero for no benefit (the
    projection already fixes the weights' scale). ``fused`` is torch SGD's: one kernel per
    step for decay, momentum and update (same iterates).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, nesterov=nesterov,
               fused=fused)


def halve_lr_on_plateau(optimizer: Optimizer, patience: int = 3,
                        min_lr: float = 0.0) -> ReduceLROnPlateau:
    """Halve the learning rate "whenever the training error starts saturating" (section 4.4)."""
    return ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=patience, min_lr=min_lr)


def halve_lr_every(optimizer: Optimizer, epochs: int = 10) -> StepLR:
    """The schedule of section 5: halve the learning rate every ``epochs`` epochs."""
    return StepLR(optimizer, step_size=epochs, gamma=0.5)


def scaled_lr(base_lr: float, batch_size: int, rule: str = "sqrt", base_batch: int = 1) -> float:
    """Learning rate for ``batch_size`` given one tuned at ``base_batch``.

    The paper found "larger initial learning rate for larger batch size improves performance"
    (section 4.4; 0.05 at batch 50, 0.08 at 100). ``"sqrt"`` scales by ``sqrt(b / b0)`` (keeps
    the gradient noise per step similar), ``"linear"`` by ``b / b0``, ``"none"`` not at all.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ratio = batch_size / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "linear":
        return base_lr * ratio
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown learning-rate scaling rule {rule!r}; known: sqrt, linear, none")


@dataclass
class StepResult:
    """Outcome of :func:`train_step`.

    Attributes:
        loss: the batch loss (``nan`` when skipped before it was computed).
        output: the model's output for the batch, computed *before* the update (so a caller
            can score test-then-train predictions without a second forward).
        skipped: ``None``, ``"nonfinite_loss"`` or ``"nonfinite_grad"``.
    """

    loss: float
    output: Tensor
    skipped: str | None = None


def _stepped_grads(optimizer: Optimizer) -> list[Tensor]:
    """The gradients the step will use: those of the optimiser's parameters (a walk over the
    model's modules costs more host time than the rest of the check at batch size 1)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"]
            if p.grad is not None]


def train_step(model: nn.Module, optimizer: Optimizer, x: Tensor, y: Tensor,
               loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
               project: bool = True) -> StepResult:
    """One SGD step with the paper's constraint; skips (and reports) non-finite steps.

    A step whose loss or gradient is not finite leaves every parameter untouched, so one bad
    batch cannot poison the weights.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    output = model(x)
    loss = loss_fn(output, y)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        return StepResult(loss_value, output.detach(), "nonfinite_loss")
    loss.backward()
    grads = _stepped_grads(optimizer)
    if grads:
        # A non-finite element makes its tensor's norm non-finite (one multi-tensor call).
        if not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, output.detach(), "nonfinite_grad")
    optimizer.step()
    if project and not isinstance(optimizer, ProjectedSGD):  # that one projects in its step
        project_weights_(model)
    return StepResult(loss_value, output.detach(), None)
