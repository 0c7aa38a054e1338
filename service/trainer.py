"""One model's training state, without Redis: network, optimiser, counters, prequential metrics.

The worker (:mod:`service.worker`) owns the stream; this module owns what a checkpoint must
carry so that a restart continues exactly where the last checkpoint left off:

* the network's ``state_dict`` -- weights, ``gamma``/``beta`` and the data layer's running
  statistics (``data_norm.running_mean``, ``running_m2``, ``count``: batch data normalisation
  at batch size 1 falls back to them, section 4.1 of the paper, so they are training state);
* the optimiser's momentum buffers (SGD with momentum 0.9, section 4.4);
* the counters and the prequential (test-then-train) metrics, sliding window included.
* for models with ``classes``/``open_classes``, the label map: the user label of each output
  unit. An open set's unseen label takes the next unit, growing the output layer
  (:meth:`ModelTrainer.grow_outputs`); the map and the unit count go in the metadata.

Prequential scoring uses the output :func:`normprop.train_step` computed *before* its update,
so every sample is scored on a model that had not seen it, at no extra forward pass.

The learning rate follows the batch the worker actually takes:
``scaled_lr(cfg.lr, len(batch), cfg.lr_scaling)`` -- a trickle steps at batch size 1 with
``cfg.lr``, a backlog steps at ``max_batch`` with a proportionally larger rate.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import normprop
from normprop import NormPropNet

from .codec import REASONS, DecodeError, Sample
from .settings import ModelConfig, label_key
from .snapshots import (Snapshot, SnapshotError, build_network, config_fingerprint, load_network,
                        snapshot_label_map, snapshot_output_units)

__all__ = ["ModelTrainer", "resolve_device", "MONITOR_ROWS", "PREQUENTIAL_WINDOW"]

#: Samples in the prequential sliding window.
PREQUENTIAL_WINDOW = 1000
#: Recent training inputs kept for the per-layer input statistics (covariate-shift monitor).
MONITOR_ROWS = 256
#: Skip reasons reported by :func:`normprop.train_step`.
SKIP_REASONS: tuple[str, ...] = ("nonfinite_loss", "nonfinite_grad")


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("NP_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(device)


class ModelTrainer:
    """The training state of one configured model (see the module docstring).

    Args:
        config: the model's configuration.
        device: where the network trains.
        window: samples in the prequential sliding window.
        optimizer_backend: ``ProjectedSGD``'s backend (``Settings.optimizer_backend``).

    Examples::

        >>> from service.settings import ModelConfig
        >>> from service.codec import Sample
        >>> import numpy as np
        >>> t = ModelTrainer(ModelConfig(input_shape=[4], num_classes=3, spec="mlp:8"),
        ...                  torch.device("cpu"))
        >>> result = t.train_batch([Sample(np.ones(4, np.float32), 1)])
        >>> t.samples_trained, t.steps, result.skipped is None
        (1, 1, True)
    """

    def __init__(self, config: ModelConfig, device: torch.device,
                 window: int = PREQUENTIAL_WINDOW,
                 optimizer_backend: normprop.fused_sgd.Backend = "auto") -> None:
        self.config = config
        self.device = device
        self.optimizer_backend = optimizer_backend
        self.classification = config.task == "classification"
        self.model: NormPropNet = build_network(config).to(device)
        self.model.train()
        self._new_optimizer()
        #: Models with ``classes``/``open_classes``: the user label of each output unit, in
        #: unit order (an open set's later units are unlabelled until a new label takes them).
        #: None: labels are the class indices.
        self.label_map: list[int | str] | None = config.initial_label_map
        self._label_index = {label_key(v): i for i, v in enumerate(self.label_map or [])}
        self._pin = device.type == "cuda"
        self._lr_by_batch: dict[int, float] = {}
        self._current_lr: float | None = None
        # Counters (restored from checkpoints).
        self.samples_trained = 0
        self.steps = 0
        self.skipped_steps: dict[str, int] = {r: 0 for r in SKIP_REASONS}
        self.dead_letters: dict[str, int] = {r: 0 for r in REASONS}
        # Prequential metrics: correct predictions (classification) or absolute error (mean
        # over targets, regression) of every trained sample, scored before the update.
        self.score_total = 0.0
        self.loss_total = 0.0
        self.window: collections.deque[float] = collections.deque(maxlen=window)
        self.loss_window: collections.deque[float] = collections.deque(maxlen=max(1, window // 10))
        self.last_loss = math.nan
        # Recent inputs for the layer-input statistics; recomputed at checkpoint time.
        self._recent: collections.deque[Tensor] = collections.deque()
        self._recent_rows = 0
        self.layer_stats: list[dict[str, Any]] = []
        # Throughput over the current run (not restored: it describes this process).
        self._rate_started = time.monotonic()
        self._rate_samples = 0

    def _new_optimizer(self) -> None:
        # The paper's SGD + unit-norm projection, as ProjectedSGD takes it: the same iterates
        # with fewer passes over the weights (their rows stay un-normalised between steps;
        # every reader -- serving's load_network, fold, the diagnostics -- normalises).
        self.optimizer = normprop.ProjectedSGD(self.model, lr=self.config.lr,
                                               momentum=self.config.momentum,
                                               weight_decay=self.config.weight_decay,
                                               backend=self.optimizer_backend)
        self._param_names = {p: n for n, p in self.model.named_parameters()}
        self._current_lr = None  # the next step sets its rate on the new groups

    # -- labels -----------------------------------------------------------------------------
    @property
    def output_units(self) -> int:
        return self.model.num_outputs

    def index_of(self, label: int | str) -> int:
        """The output unit of a decoded label; an open set gives a new label the next unit,
        growing the output layer when every unit has a label.

        Raises :class:`~service.codec.DecodeError` (``too_many_classes``) when an open set is
        at ``max_classes``, ``unknown_label`` for a label a fixed set does not list.
        """
        if self.label_map is None:
            return int(label)
        key = label_key(label)
        index = self._label_index.get(key)
        if index is not None:
            return index
        if self.config.label_set != "open":
            raise DecodeError("unknown_label", f"label {label!r:.80} is not one of the "
                                               "model's classes")
        if len(self.label_map) >= self.config.max_classes:
            raise DecodeError("too_many_classes", f"label {label!r:.80} would be class "
                              f"{len(self.label_map) + 1}; max_classes is "
                              f"{self.config.max_classes}")
        if len(self.label_map) >= self.output_units:
            self.grow_outputs(1)
        self.label_map.append(label)
        self._label_index[key] = index = len(self.label_map) - 1
        return index

    def grow_outputs(self, n_new: int) -> None:
        """Add ``n_new`` output units: the old rows, ``gamma``, ``beta`` and their momentum
        stay; a new row is Gaussian then unit norm (Glorot normal's direction, projected as
        every row is, section 4.4), its ``gamma`` the layer's ``gamma_init``, ``beta`` 0, its
        momentum 0. Deterministic (seeded by the model's seed and the unit's index), so a
        restart that replays the same labels grows the same layer."""
        old = self.model.layers[-1]
        if not isinstance(old, normprop.NormPropLinear) or old.activation is not None:
            raise RuntimeError("only an MLP's NormPropLinear output layer can grow")
        units = old.out_features
        new = normprop.NormPropLinear(old.in_features, units + n_new, activation=None,
                                      gamma_init=old.gamma_init).to(self.device)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + units)
        rows = torch.randn(n_new, old.in_features, generator=g, dtype=torch.float64)
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            new.weight[:units] = old.weight
            new.weight[units:] = rows.to(new.weight)
            new.gamma[:units] = old.gamma
            new.gamma[units:] = old.gamma_init
            new.beta[:units] = old.beta
            new.beta[units:] = 0.0
        new.mark_unit_rows_()
        old_names = {n: p for n, p in self.model.named_parameters()}
        momentum = {n: self.optimizer.state[p]["momentum_buffer"] for n, p in old_names.items()
                    if "momentum_buffer" in self.optimizer.state.get(p, {})}
        self.model.layers[-1] = new
        self.model.config["num_outputs"] = units + n_new
        self._new_optimizer()
        for name, p in self.model.named_parameters():
            buf = momentum.get(name)
            if buf is None:
                continue
            if buf.shape != p.shape:  # the grown layer: zero momentum for the new units
                grown = torch.zeros_like(p)
                grown[:buf.shape[0]] = buf
                buf = grown
            self.optimizer.state[p]["momentum_buffer"] = buf

    # -- training ---------------------------------------------------------------------------
    def _lr_for(self, batch: int) -> float:
        lr = self._lr_by_batch.get(batch)
        if lr is None:
            lr = normprop.scaled_lr(self.config.lr, batch, self.config.lr_scaling)
            self._lr_by_batch[batch] = lr
        return lr

    def _to_device(self, t: Tensor) -> Tensor:
        if self._pin:
            # Pinned host memory makes the copy asynchronous; the step queues behind it.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def collate(self, samples: Sequence[Sample]) -> tuple[Tensor, Tensor]:
        """Stack decoded samples into ``(x, y)`` on the training device."""
        if len(samples) == 1:
            x = torch.from_numpy(samples[0].x).reshape(1, *self.config.input_shape)
        else:
            x = torch.from_numpy(np.stack([s.x for s in samples])).reshape(
                len(samples), *self.config.input_shape)
        if self.classification:
            y = torch.tensor([s.y for s in samples], dtype=torch.long)
        else:
            y = torch.from_numpy(np.stack([s.y for s in samples]))  # type: ignore[arg-type]
        return self._to_device(x), self._to_device(y)

    def loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy for classes, mean squared error for regression targets."""
        if self.classification:
            return F.cross_entropy(output, target)
        return F.mse_loss(output, target)

    def train_batch(self, samples: Sequence[Sample]) -> normprop.StepResult:
        """One SGD step on ``samples`` (test-then-train: score first, from the same forward)."""
        x, y = self.collate(samples)
        return self.train_tensors(x, y)

    def train_arrays(self, x: np.ndarray, y: np.ndarray) -> normprop.StepResult:
        """One SGD step on already validated arrays: ``x`` float32 ``(n, features)``, ``y``
        int64 class indices ``(n,)`` (the worker's batch-decoded fast lane)."""
        xt = torch.from_numpy(x).reshape(len(x), *self.config.input_shape)
        return self.train_tensors(self._to_device(xt), self._to_device(torch.from_numpy(y)))

    def train_tensors(self, x: Tensor, y: Tensor) -> normprop.StepResult:
        """One SGD step at ``scaled_lr`` for this batch size; scores and counts it."""
        n = x.shape[0]
        lr = self._lr_for(n)
        if lr != self._current_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._current_lr = lr
        result = normprop.train_step(self.model, self.optimizer, x, y, loss_fn=self.loss_fn,
                                     project=False)  # ProjectedSGD projects in its step
        if result.skipped is not None:
            self.skipped_steps[result.skipped] = self.skipped_steps.get(result.skipped, 0) + 1
            return result
        # Scored from the pre-update output; one device->host transfer per step.
        if self.classification:
            scores = (result.output.argmax(1) == y).to(torch.float64).cpu().tolist()
        else:
            err = (result.output.detach() - y).abs().reshape(n, -1).mean(1)
            scores = err.to(torch.float64).cpu().tolist()
        self.score_total += sum(scores)
        self.window.extend(scores)
        self.loss_total += result.loss * n
        self.loss_window.append(result.loss)
        self.last_loss = result.loss
        self.samples_trained += n
        self.steps += 1
        self._rate_samples += n
        self._recent.append(x.detach())
        self._recent_rows += n
        while self._recent_rows - self._recent[0].shape[0] >= MONITOR_ROWS:
            self._recent_rows -= self._recent.popleft().shape[0]  # keep ~MONITOR_ROWS rows
        return result

    # -- metrics ----------------------------------------------------------------------------
    def prequential(self) -> dict[str, float | None]:
        """Prequential metrics: total, sliding window, and the recent mean loss."""
        total = self.score_total / self.samples_trained if self.samples_trained else None
        window = sum(self.window) / len(self.window) if self.window else None
        loss = sum(self.loss_window) / len(self.loss_window) if self.loss_window else None
        key = "accuracy" if self.classification else "mae"
        return {key: total, f"window_{key}": window, "loss": loss}

    def samples_per_second(self) -> float:
        """Trained samples per second since this process started (or last restored)."""
        elapsed = time.monotonic() - self._rate_started
        return self._rate_samples / elapsed if elapsed > 0 else 0.0

    @torch.no_grad()
    def refresh_layer_stats(self) -> list[dict[str, Any]]:
        """Per-layer input mean/std over the recent training inputs (the covariate-shift monitor).

        Each hidden layer's standardised input should stay near mean 0, std 1 (the paper's
        fig. 2); the per-unit statistics are averaged over the layer's units. Evaluated in eval
        mode so the data layer's running statistics are read, not updated.
        """
        if self._recent_rows < 2:
            return self.layer_stats
        rows = list(self._recent)
        x = torch.cat(rows)[-MONITOR_ROWS:]
        self.model.eval()
        try:
            stats = normprop.layer_input_stats(self.model, x)
        finally:
            self.model.train()
        self.layer_stats = [{"name": s.name, "mean": float(s.mean.mean()),
                             "std": float(s.std.mean())} for s in stats]
        return self.layer_stats

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """``model.*`` (state_dict, data-norm statistics included) and momentum buffers."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for p, state in self.optimizer.state.items():
            buf = state.get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.{self._param_names[p]}.momentum_buffer"] = buf
        tensors["metrics.window"] = torch.tensor(list(self.window), dtype=torch.float64)
        tensors["metrics.loss_window"] = torch.tensor(list(self.loss_window), dtype=torch.float64)
        return tensors

    def metadata(self) -> dict[str, Any]:
        """Counters and monitors for the snapshot's JSON metadata (the worker adds stream IDs)."""
        return {
            "fingerprint": config_fingerprint(self.config),
            "config": self.config.model_dump(mode="json"),
            "samples_trained": self.samples_trained,
            "steps": self.steps,
            "skipped_steps": dict(self.skipped_steps),
            "dead_letters": dict(self.dead_letters),
            "prequential": self.prequential(),
            "prequential_totals": {"score": self.score_total, "loss": self.loss_total},
            "layer_stats": self.refresh_layer_stats(),
            "device": str(self.device),
            "samples_per_second": self.samples_per_second(),
            "last_loss": None if math.isnan(self.last_loss) else self.last_loss,
        } | ({} if self.label_map is None else {"label_map": list(self.label_map),
                                                "output_units": self.output_units})

    def restore(self, snapshot: Snapshot) -> None:
        """Load a checkpoint exactly: weights, data-norm statistics, momentum, counters.

        Raises :class:`~service.snapshots.SnapshotError` if it does not fit this model.
        """
        load_network(snapshot, self.config)  # validates fingerprint, shapes, finiteness
        units = snapshot_output_units(snapshot, self.config)
        if units != self.output_units:  # an open label set grew: rebuild at the stored size
            self.model = build_network(self.config, units).to(self.device)
            self._new_optimizer()
        labels = snapshot_label_map(snapshot, self.config)
        self.label_map = None if labels is None else list(labels)
        self._label_index = {label_key(v): i for i, v in enumerate(self.label_map or [])}
        # The stored tensors themselves, not load_network's re-projected copy: training goes
        # on from exactly these (ProjectedSGD keeps rows un-normalised; re-projecting would
        # change the last bits, and restore must be exact).
        self.model.load_state_dict(snapshot.model_state(), strict=True)
        self.model.train()
        params = dict(self.model.named_parameters())
        momentum = snapshot.optimizer_state()
        self.optimizer.state.clear()
        for key, buf in momentum.items():
            name = key.removesuffix(".momentum_buffer")
            if name not in params or buf.shape != params[name].shape:
                raise SnapshotError(f"snapshot v{snapshot.version}: bad optimiser tensor {key}")
            if not bool(torch.isfinite(buf).all()):
                raise SnapshotError(f"snapshot v{snapshot.version}: non-finite momentum {key}")
            self.optimizer.state[params[name]]["momentum_buffer"] = buf.to(
                self.device, dtype=params[name].dtype).clone()
        meta = snapshot.metadata
        self.samples_trained = int(meta.get("samples_trained", 0))
        self.steps = int(meta.get("steps", 0))
        self.skipped_steps = {r: 0 for r in SKIP_REASONS} | {
            k: int(v) for k, v in meta.get("skipped_steps", {}).items()}
        self.dead_letters = {r: 0 for r in REASONS} | {
            k: int(v) for k, v in meta.get("dead_letters", {}).items()}
        totals = meta.get("prequential_totals", {})
        self.score_total = float(totals.get("score", 0.0))
        self.loss_total = float(totals.get("loss", 0.0))
        self.window.clear()
        self.window.extend(snapshot.tensors.get("metrics.window", torch.zeros(0)).tolist())
        self.loss_window.clear()
        self.loss_window.extend(snapshot.tensors.get("metrics.loss_window", torch.zeros(0)).tolist())
        last = meta.get("last_loss")
        self.last_loss = math.nan if last is None else float(last)
        self.layer_stats = list(meta.get("layer_stats", []))
        self._recent.clear()
        self._recent_rows = 0
        self._rate_started = time.monotonic()
        self._rate_samples = 0
