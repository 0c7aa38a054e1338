"""Data normalisation: the only place NormProp uses data statistics (sections 3.1, 4.1, 4.5).

NormProp's hidden layers assume a standardised input. The paper gives two ways to get it:

* *Global data normalisation*: per-feature mean/std of the whole dataset, given up front.
* *Batch data normalisation*: each training mini-batch is standardised by its own per-feature
  mean/std (a regulariser, like BN at the data layer only) while running estimates are kept for
  validation and testing (section 4.5).

For streams this module adds *running* normalisation: every batch, batch size 1 included, is
standardised by running estimates -- exact cumulative (Welford/Chan) or exponentially weighted
with a half-life (in samples) for drifting streams. A batch of one sample has no spread, so in
``batch`` mode it falls back to the running estimates as well.

First samples: until a feature has seen two values its variance is undefined; the divisor is then
1 (the sample is only centred). A feature whose variance is below ``eps`` is also only centred
(divisor 1), so a constant feature maps to 0 instead of exploding. Both cases live in
:func:`safe_std`. Training and serving read the same buffers, so they normalise identically.

Statistics are per feature for ``(N, F)`` input and per channel for ``(N, C, H, W)`` input.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["DataNorm", "DataNormMode", "safe_std", "half_life_decay"]

DataNormMode = Literal["batch", "running", "global", "none"]
_MODES: tuple[str, ...] = ("batch", "running", "global", "none")


def safe_std(var: Tensor, count: Tensor, eps: float) -> Tensor:
    """Standard deviation to divide by: ``sqrt(var)``, or 1 where it is undefined or ~0.

    ``count < 2`` (no variance yet) and ``var < eps`` (a constant feature) both give 1, so the
    output is the centred value -- finite, and 0 for a feature that never changed.
    """
    ok = (count >= 2) & (var >= eps)
    # Where ``ok``, ``var >= eps`` already: no clamp needed before the square root.
    return torch.where(ok, var, 1.0).sqrt_()


def half_life_decay(half_life: float | None) -> float:
    """Per-sample weight decay ``d`` with ``d ** half_life == 0.5`` (1.0: cumulative)."""
    if half_life is None or math.isinf(half_life):
        return 1.0
    if half_life <= 0:
        raise ValueError(f"half_life must be positive, got {half_life}")
    return 0.5 ** (1.0 / half_life)


class DataNorm(nn.Module):
    """Standardise the data layer: ``x' = (x - mean) / std``, per feature or per channel.

    Running statistics are exact weighted moments kept in float64: the count (sum of weights),
    mean and sum of squared deviations ``m2``. A batch is merged with Chan's parallel formula, so
    merging a batch equals feeding its samples one at a time (cumulative mode). With a half-life,
    old weight decays by ``d = 0.5 ** (1/half_life)`` per sample before each merge.

    Args:
        num_features: features (vectors) or channels (images).
        mode: ``"batch"`` (section 4.1 batch data normalisation; running estimates for eval and
            for batches of one), ``"running"`` (always running estimates), ``"global"`` (fixed
            statistics from :meth:`set_statistics` / :meth:`fit`), ``"none"`` (identity).
        half_life: samples after which old statistics weigh half; ``None`` = cumulative (exact).
        eps: variance floor; below it a feature is treated as constant (see :func:`safe_std`).
        clip: optional bound on ``|x'|`` (robustness against outliers); ``None`` = no clipping.

    Shape:
        Input ``(N, C)`` or ``(N, C, *)``; output the same shape.

    Examples::

        >>> norm = DataNorm(2, mode="running")
        >>> norm(torch.tensor([[1.0, 10.0]]))          # first sample: centred only
        tensor([[0., 0.]])
        >>> out = norm(torch.tensor([[3.0, 10.0]]))    # second: std exists for feature 0 only
        >>> out
        tensor([[1., 0.]])
        >>> norm.running_mean.tolist(), norm.count.item()
        ([2.0, 10.0], 2.0)
    """

    running_mean: Tensor
    running_m2: Tensor
    count: Tensor

    def __init__(self, num_features: int, mode: DataNormMode = "batch",
                 half_life: float | None = None, eps: float = 1e-8,
                 clip: float | None = None) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"unknown data normalisation mode {mode!r}; known: {', '.join(_MODES)}")
        self.num_features = num_features
        self.mode = mode
        self.half_life = half_life
        self.decay = half_life_decay(half_life)
        self.eps = eps
        self.clip = clip
        self.register_buffer("running_mean", torch.zeros(num_features, dtype=torch.float64))
        self.register_buffer("running_m2", torch.zeros(num_features, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    # -- statistics -------------------------------------------------------------------------
    @property
    def running_var(self) -> Tensor:
        """Population variance of the running estimate (``m2 / count``)."""
        return self.running_m2 / self.count.clamp_min(1.0)

    def running_std(self) -> Tensor:
        """The divisor used for running normalisation (:func:`safe_std`)."""
        return safe_std(self.running_var, self.count, self.eps)

    def _count_1d(self) -> Tensor:
        """``count`` as a 1-element view for in-place updates: torch.compile (inductor, torch
        2.13) silently drops in-place updates of 0-d float64 buffers; through a 1-d view they
        are kept. The buffer itself stays 0-d (checkpoints keep their shape)."""
        return self.count.view(1)

    def _reduce_dims(self, x: Tensor) -> tuple[int, ...]:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"DataNorm expects input of shape (N, {self.num_features}, ...), got {tuple(x.shape)}"
            )
        return (0,) + tuple(range(2, x.dim()))

    def _per_sample_elements(self, x: Tensor) -> int:
        return int(math.prod(x.shape[2:])) if x.dim() > 2 else 1

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge a batch into the running statistics (Chan et al.'s parallel update)."""
        dims = self._reduce_dims(x)
        xd = x.detach().to(torch.float64)
        n_samples = x.shape[0]
        n = float(n_samples * self._per_sample_elements(x))
        if n == 0:
            return
        if n == 1:  # one sample of a vector (the online worker's step): its own m2 is 0
            batch_mean, batch_m2 = xd.view(self.num_features), None
        else:
            batch_mean = xd.mean(dim=dims)
            batch_m2 = ((xd - _expand(batch_mean, x)) ** 2).sum(dim=dims)
        if self.decay < 1.0:
            keep = self.decay ** n_samples
            self._count_1d().mul_(keep)
            self.running_m2.mul_(keep)
        total = self.count + n
        delta = batch_mean - self.running_mean
        self.running_mean.add_(delta * (n / total))
        merged = delta * delta * (self.count * n / total)
        self.running_m2.add_(merged if batch_m2 is None else batch_m2 + merged)
        self._count_1d().add_(n)

    def set_statistics(self, mean: Tensor, std: Tensor, count: float = float("inf")) -> None:
        """Global data normalisation: fix the statistics (e.g. of a whole dataset)."""
        with torch.no_grad():
            mean = torch.as_tensor(mean, dtype=torch.float64).reshape(self.num_features)
            std = torch.as_tensor(std, dtype=torch.float64).reshape(self.num_features)
            c = 1e12 if math.isinf(count) else float(count)
            self.running_mean.copy_(mean)
            self.running_m2.copy_(std * std * c)
            self.count.fill_(c)

    def fit(self, data: Tensor) -> DataNorm:
        """Set global statistics from a whole dataset ``(N, C, ...)`` (section 4.1, item 1)."""
        self.reset_statistics()
        self.update(data)
        return self

    def reset_statistics(self) -> None:
        self.running_mean.zero_()
        self.running_m2.zero_()
        self.count.zero_()

    def mean_and_std(self) -> tuple[Tensor, Tensor]:
        """The ``(mean, std)`` that evaluation and serving use."""
        return self.running_mean, self.running_std()

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "none":
            return x
        dims = self._reduce_dims(x)
        if self.training and self.mode in ("batch", "running"):
            if self._one_sample_on_cpu(x):
                return self._one_sample_step(x)
            self.update(x)
        # A batch of one sample has no spread across samples: fall back to running estimates
        # (for images too -- one image's spatial statistics would make it instance norm).
        use_batch = self.training and self.mode == "batch" and x.shape[0] >= 2
        if use_batch:
            # Section 4.1, batch data normalisation: the batch's own statistics (biased var).
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            count = torch.full_like(var, float(x.shape[0] * self._per_sample_elements(x)))
            std = safe_std(var, count, self.eps)
            # Gradient is not needed through data statistics: the data layer has no parameters.
            mean, std = mean.detach(), std.detach()
        else:
            mean, std = self._running_in(x)
        out = (x - _expand(mean, x)) / _expand(std, x)
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out

    def _one_sample_on_cpu(self, x: Tensor) -> bool:
        """Whether :meth:`_one_sample_step` can take ``x``: one feature vector on the CPU that
        needs no gradient (the online worker's batch-1 step), eager mode."""
        return (x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and not x.requires_grad
                and self.running_mean.device.type == "cpu"
                and self.running_mean.dtype == torch.float64  # not after a .half(), say
                and not torch.compiler.is_compiling()
                and not self.running_mean.is_inference())  # those keep no version counter

    def _one_sample_step(self, x: Tensor) -> Tensor:
        """Training forward of one sample: the merge of :meth:`update`, then the running
        normalisation of :meth:`forward`, in NumPy on the buffers' own memory: the same float64
        and ``x``-dtype operations in the same order -- the statistics bit for bit, the output
        to an ulp (torch's vectorised square root and divide may round the last bit otherwise;
        tested) -- for a fraction of the host time: about 25 torch calls of ~5 us each on a few
        numbers are otherwise the largest part of the online worker's batch-1 step."""
        rm, m2 = self.running_mean.numpy(), self.running_m2.numpy()
        count = self.count.numpy()  # 0-d, shares memory
        xd = x.detach().numpy().reshape(-1).astype(np.float64)
        if self.decay < 1.0:
            count *= self.decay
            m2 *= self.decay
        total = count + 1.0
        delta = xd - rm
        rm += delta * (1.0 / total)
        m2 += delta * delta * (count * 1.0 / total)
        count += 1.0
        for buffer in (self.running_mean, self.running_m2, self.count):
            torch.autograd.graph.increment_version(buffer)  # written around autograd
        var = m2 / np.maximum(count, 1.0)
        std = np.sqrt(np.where((count >= 2) & (var >= self.eps), var, 1.0))
        dtype = np.float32 if x.dtype == torch.float32 else np.float64
        out = (x.detach().numpy() - rm.astype(dtype)) / std.astype(dtype)
        if self.clip is not None:
            np.clip(out, -self.clip, self.clip, out=out)
        return torch.from_numpy(out)

    def _running_in(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The running ``(mean, std)`` in ``x``'s dtype, kept while the statistics are unchanged
        (same storage and autograd version of each buffer, the same ``eps``): global mode, and
        evaluation, then normalise with two ops instead of eleven. Not under ``torch.compile``,
        where the key would be a guard."""
        rm, m2, count = self.running_mean, self.running_m2, self.count
        # Inference tensors (a module made under torch.inference_mode) keep no version counter.
        uncached = torch.compiler.is_compiling() or rm.is_inference()
        if not uncached:
            key = (rm._version, m2._version, count._version, rm.data_ptr(), m2.data_ptr(),
                   count.data_ptr(), x.dtype, x.device, self.eps)
            cached = self.__dict__.get("_running_cache")
            if cached is not None and cached[0] == key:
                return cached[1], cached[2]
        mean, std = rm.to(x.dtype), self.running_std().to(x.dtype)
        if not uncached:
            self.__dict__["_running_cache"] = (key, mean, std)
        return mean, std

    def extra_repr(self) -> str:
        return (f"{self.num_features}, mode={self.mode!r}, half_life={self.half_life}, "
                f"clip={self.clip}")


def _expand(stat: Tensor, like: Tensor) -> Tensor:
    return stat.view((1, -1) + (1,) * (like.dim() - 2))
