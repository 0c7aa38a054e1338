"""The served models: one immutable :class:`ServedVersion` per model name, swapped atomically.

A request reads ``slot.current`` once and uses only that object, so it is answered wholly by
one version (DESIGN section 3). A newer snapshot is read, validated (``load_network``) and
folded (``normprop.fold``) in a worker thread, never on the event loop; only then is the one
reference replaced. The reference only ever moves to a higher version, so versions never go
backwards within a process, except across an explicit pin: while the store's ``PINNED`` file
names a version, every replica serves exactly that one (older or not), and after an unpin it
follows the newest again. A snapshot that fails validation is remembered, counted and
skipped; the old version keeps serving.

Snapshots come from the shared ``data_dir``, not from Redis, so serving survives a Redis outage.

Inline compute or a thread hop? For small models the forward pass (tens of microseconds for the
digits MLP) is cheaper than handing it to a thread pool (a hop plus GIL hand-offs), so each
version is timed once at load and a request computes inline when its estimated cost is under
``NP_PREDICT_INLINE_BUDGET_SECONDS`` (default :data:`INLINE_BUDGET_SECONDS`), in a thread
otherwise (large batches, conv nets), so that one big request cannot stall the event loop for
everyone else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio.to_thread
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import normprop
from normprop.fold import Affine, FixedActivation

from .api_metrics import ApiMetrics
from .codec import DecodeError, EntryCodec
from .settings import ModelConfig, Settings
from .snapshots import (SnapshotError, SnapshotStore, load_network, snapshot_label_map,
                        snapshot_output_units)

__all__ = ["INLINE_BUDGET_SECONDS", "ModelSlot", "ModelServer", "ServedVersion",
           "InstanceError", "parse_instances", "fold_snapshot"]

log = logging.getLogger("normprop.api")

#: Default of ``Settings.predict_inline_budget_seconds``: a request whose estimated compute is
#: below this runs on the event loop (see the module doc).
INLINE_BUDGET_SECONDS = 0.002


class InstanceError(ValueError):
    """A bad prediction instance: ``index`` (None for the request as a whole) and a reason."""

    def __init__(self, index: int | None, reason: str, detail: str) -> None:
        where = f"instance {index}: " if index is not None else ""
        super().__init__(f"{where}{detail}")
        self.index = index
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ServedVersion:
    """One loaded snapshot: the folded net and what the API reports about it. Immutable."""

    model: str
    version: int
    #: The folded net (or its flat op list, same function): inputs ``(n, *input_shape)``.
    net: Callable[[torch.Tensor], torch.Tensor]
    metadata: dict[str, Any]
    loaded_at: float
    #: Measured forward cost: ``seconds(n) ~= fixed + per_instance * n``.
    fixed_seconds: float = 0.0
    per_instance_seconds: float = 0.0
    #: Served because an operator pinned it (``SnapshotStore.pin``), not because it is newest.
    pinned: bool = False
    #: Models with ``classes``/``open_classes``: the user label of each answered output unit,
    #: in unit order (an open set's units not yet given a label are not answered). None:
    #: the labels are the class indices.
    label_map: tuple[int | str, ...] | None = None

    def runs_inline(self, n: int, budget: float = INLINE_BUDGET_SECONDS) -> bool:
        """Whether ``n`` instances are cheap enough (under ``budget`` seconds) for the loop."""
        return self.fixed_seconds + self.per_instance_seconds * n < budget


@dataclass
class ModelSlot:
    """A declared model: its configuration, store, codec and the version it serves."""

    config: ModelConfig
    store: SnapshotStore
    codec: EntryCodec
    current: ServedVersion | None = None
    failed: set[int] = field(default_factory=set)
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name


def _time_forward(net: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], n: int, repeats: int) -> float:
    x = torch.zeros((n, *shape))
    with torch.inference_mode():
        net(x)  # warm-up: first-call allocations
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - t0)
    return best


def flat_forward(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The folded MLP as a list of tensor ops, without ``nn.Module.__call__`` per layer.

    At one instance per request the digits MLP's six module calls cost more in Python dispatch
    than in arithmetic (DESIGN section 7); calling the ops directly halves its forward. Returns
    None for anything but ``Affine``/``Linear``/activation chains (conv nets use the modules).
    """
    if not isinstance(net, nn.Sequential):
        return None
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for m in net:
        if type(m) is nn.Linear:
            ops.append(functools.partial(F.linear, weight=m.weight, bias=m.bias))
        elif type(m) is nn.ReLU:
            ops.append(torch.relu)
        elif type(m) is FixedActivation:
            ops.append(m.fn)
        elif type(m) is Affine:
            scale, shift, clip = m.scale.view(1, -1), m.shift.view(1, -1), m.clip
            if clip is None:
                ops.append(lambda t, a=scale, b=shift: torch.addcmul(b, t, a))
            else:
                ops.append(lambda t, a=scale, b=shift, c=float(clip):
                           torch.addcmul(b, t, a).clamp_(-c, c))
        else:
            return None

    def forward(t: torch.Tensor) -> torch.Tensor:
        for op in ops:
            t = op(t)
        return t

    return forward


def fold_snapshot(store: SnapshotStore, config: ModelConfig, version: int) -> ServedVersion:
    """Read, validate and fold one version; blocking (run it in a thread).

    Raises :class:`SnapshotError` when the snapshot is unreadable, belongs to another
    configuration, holds non-finite values, or folds into a net whose output is not finite.
    """
    snapshot = store.read(version)
    net = load_network(snapshot, config)
    labels = snapshot_label_map(snapshot, config)
    units = snapshot_output_units(snapshot, config)
    folded = normprop.fold(net).eval()
    folded.requires_grad_(False)
    shape = tuple(config.input_shape)
    with torch.inference_mode():
        probe = folded(torch.zeros((1, *shape)))
    if probe.shape != (1, units) or not bool(torch.isfinite(probe).all()):
        raise SnapshotError(f"snapshot v{version} folds into a net with bad output "
                            f"{tuple(probe.shape)}")
    forward: Callable[[torch.Tensor], torch.Tensor] = folded
    if len(shape) == 1:
        fast = flat_forward(folded)
        if fast is not None:
            x = torch.randn(4, *shape) * 3
            with torch.inference_mode():
                if torch.allclose(fast(x), folded(x), atol=1e-6, rtol=1e-5):
                    forward = fast
    t1 = _time_forward(forward, shape, 1, 3)
    t16 = _time_forward(forward, shape, 16, 2)
    per = max(0.0, (t16 - t1) / 15)
    return ServedVersion(config.name, version, forward, dict(snapshot.metadata), time.time(),
                         fixed_seconds=max(0.0, t1 - per), per_instance_seconds=per,
                         label_map=tuple(labels) if labels is not None else None)


def parse_instances(codec: EntryCodec, instances: Any, raw_has_bool: bool) -> np.ndarray:
    """Validate a request's instances; returns float32 ``(n, num_features)``.

    A fast path converts the whole list with numpy; only when that fails (or the body held a
    JSON boolean, which numpy would silently take as 0/1) does a per-instance pass run, to name
    the first bad instance and why.
    """
    if not isinstance(instances, list):
        raise InstanceError(None, "bad_request", "'instances' must be a list of instances")
    n = len(instances)
    if n == 0:
        raise InstanceError(None, "bad_request", "'instances' is empty")
    f = codec.num_features
    if not raw_has_bool:
        try:
            arr = np.asarray(instances)
        except (ValueError, TypeError, OverflowError):
            arr = None
        if (arr is not None and arr.dtype.kind in "iuf" and arr.ndim >= 2
                and arr.shape[0] == n and arr.size == n * f):
            # Values beyond float32 become inf here and are refused just below (slow path).
            with np.errstate(over="ignore"):
                out = arr.reshape(n, f).astype(np.float32, copy=False)
            if np.isfinite(out).all():
                return out
    # Slow path: say which instance is wrong.
    if n and not isinstance(instances[0], list):
        raise InstanceError(None, "bad_request",
                            "'instances' must be a list of instances (lists of numbers); "
                            "for one instance send [[...]]")
    rows = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, list):
            raise InstanceError(i, "bad_x", "an instance must be a list of numbers")
        if any(isinstance(v, bool) or not isinstance(v, (int, float, list)) for v in _flat(inst)):
            raise InstanceError(i, "bad_x", "features must be numbers (no strings, booleans "
                                            "or nulls)")
        try:
            arr_i = np.asarray(inst, dtype=np.float64)
        except OverflowError:  # an integer beyond float64
            raise InstanceError(i, "nonfinite", "a feature is beyond the float range") from None
        except (ValueError, TypeError):
            raise InstanceError(i, "bad_x", "features must be a (nested) rectangular list "
                                            "of numbers") from None
        try:
            rows.append(codec.validate_x(arr_i))
        except DecodeError as exc:
            raise InstanceError(i, exc.reason, exc.detail) from None
    return np.stack(rows)


def _flat(value: Any) -> Any:
    if isinstance(value, list):
        for v in value:
            yield from _flat(v)
    else:
        yield value


class ModelServer:
    """Every declared model's slot, and the background task that swaps in new snapshots."""

    def __init__(self, settings: Settings, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.slots: dict[str, ModelSlot] = {}
        for cfg in settings.models:
            self.slots[cfg.name] = ModelSlot(cfg, SnapshotStore(settings.snapshot_dir, cfg.name),
                                             EntryCodec(cfg))
        for name in self.slots:
            # Series exist at 0 from the first scrape (Prometheus convention for counters).
            for counter in (metrics.predictions, metrics.ingest_accepted,
                            metrics.snapshot_load_failures, metrics.snapshot_loads):
                counter.labels(name)
        self._poll_lock = asyncio.Lock()
        metrics.watch_models(self.served)

    def served(self) -> dict[str, ServedVersion | None]:
        """The version each model serves right now (None before its first snapshot)."""
        return {name: slot.current for name, slot in self.slots.items()}

    def ready(self) -> bool:
        """Every declared model has a served version."""
        return all(slot.current is not None for slot in self.slots.values())

    async def refresh(self, name: str | None = None) -> None:
        """Poll the snapshot store once (one model or all) and swap in newer versions."""
        async with self._poll_lock:  # the poller and an admin reload must not race
            for slot in ([self.slots[name]] if name else list(self.slots.values())):
                try:
                    await self._refresh_slot(slot)
                except OSError as exc:  # the volume went away: keep serving, say so once
                    if slot.last_error != str(exc):
                        slot.last_error = str(exc)
                        log.warning("model %r: cannot poll snapshots: %s", slot.name, exc)
                except Exception:  # noqa: BLE001 - a poll failure must not end serving
                    log.exception("snapshot poll of model %r failed", slot.name)

    async def _load(self, slot: ModelSlot, version: int) -> ServedVersion | None:
        """Read, validate and fold ``version`` in a thread; None (counted, remembered) if bad."""
        t0 = time.perf_counter()
        try:
            served = await anyio.to_thread.run_sync(fold_snapshot, slot.store, slot.config,
                                                    version)
        except (SnapshotError, ValueError, RuntimeError, OSError) as exc:
            slot.failed.add(version)
            slot.last_error = str(exc)
            self.metrics.snapshot_load_failures.labels(slot.name).inc()
            log.warning("model %r: snapshot v%d not served: %s", slot.name, version, exc)
            return None
        self.metrics.load_seconds.labels(slot.name).observe(time.perf_counter() - t0)
        return served

    def _swap(self, slot: ModelSlot, served: ServedVersion) -> None:
        """Replace the slot's one reference (call under the poll lock)."""
        slot.current = served
        self.metrics.snapshot_loads.labels(slot.name).inc()
        log.info("model %r now serves snapshot v%d%s", slot.name, served.version,
                 " (pinned)" if served.pinned else "")

    async def pin(self, name: str, version: int) -> ServedVersion:
        """Validate ``version``, write the store's ``PINNED`` file and serve it at once.

        Raises :class:`SnapshotError` (nothing pinned, the current version keeps serving) if
        the version is not on disk or fails validation.
        """
        slot = self.slots[name]
        exists = await anyio.to_thread.run_sync(slot.store.path(version).exists)
        if not exists:
            raise SnapshotError(f"snapshot v{version} of {name!r} does not exist")
        async with self._poll_lock:
            current = slot.current
            if current is not None and current.version == version:
                served = current
            else:
                slot.failed.discard(version)  # an explicit request deserves a fresh try
                loaded = await self._load(slot, version)
                if loaded is None:
                    raise SnapshotError(slot.last_error or f"snapshot v{version} is invalid")
                served = loaded
            await anyio.to_thread.run_sync(slot.store.pin, version)
            self._swap(slot, dataclasses.replace(served, pinned=True))
            return slot.current  # type: ignore[return-value]

    async def unpin(self, name: str) -> None:
        """Remove the pin and follow the newest valid version again."""
        slot = self.slots[name]
        async with self._poll_lock:
            await anyio.to_thread.run_sync(slot.store.unpin)
            await self._refresh_slot(slot)

    async def _refresh_pinned(self, slot: ModelSlot, pinned: int) -> None:
        current = slot.current
        if current is not None and current.version == pinned:
            if not current.pinned:
                slot.current = dataclasses.replace(current, pinned=True)
            return
        if pinned in slot.failed:
            return  # a pin another replica wrote that fails here: keep serving, error shown
        served = await self._load(slot, pinned)
        if served is not None:
            self._swap(slot, dataclasses.replace(served, pinned=True))

    async def _follow_newest_again(self, slot: ModelSlot) -> None:
        """After an unpin: the newest valid version, even if it is below the one pinned."""
        assert slot.current is not None
        for version in reversed(await anyio.to_thread.run_sync(slot.store.versions)):
            if version == slot.current.version:
                break
            if version in slot.failed:
                continue
            served = await self._load(slot, version)
            if served is not None:
                self._swap(slot, served)
                return
        slot.current = dataclasses.replace(slot.current, pinned=False)

    async def _refresh_slot(self, slot: ModelSlot) -> None:
        pinned = await anyio.to_thread.run_sync(slot.store.pinned_version)
        if pinned is not None:
            await self._refresh_pinned(slot, pinned)
            if slot.current is not None:
                return
            # The pinned version does not load here and nothing serves yet: the newest valid
            # one is better than no answer (the error is in GET /models/{name}).
        if slot.current is not None and slot.current.pinned:
            await self._follow_newest_again(slot)
            return
        latest = await anyio.to_thread.run_sync(slot.store.latest_version)
        current = slot.current.version if slot.current else 0
        if latest is None or latest <= current or latest in slot.failed:
            return
        candidates = [latest]
        if slot.current is None:
            # Not serving yet: fall back to the newest older version that validates.
            older = await anyio.to_thread.run_sync(slot.store.versions)
            candidates += [v for v in reversed(older) if v < latest]
        for version in candidates:
            if version in slot.failed or version <= current:
                continue
            served = await self._load(slot, version)
            if served is None:
                continue
            # Assigned only under the poll lock: the check and the swap cannot interleave.
            if slot.current is None or served.version > current:
                self._swap(slot, served)
                if not any(v > served.version for v in slot.failed):
                    slot.last_error = None
                created = served.metadata.get("created_at")
                if isinstance(created, (int, float)):
                    self.metrics.swap_seconds.labels(slot.name).observe(
                        max(0.0, time.time() - float(created)))
            return

    async def run(self) -> None:
        """Poll every ``snapshot_poll_seconds`` until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.settings.snapshot_poll_seconds)

    @staticmethod
    def infer(served: ServedVersion, x: np.ndarray, config: ModelConfig) -> np.ndarray:
        """Outputs for ``x`` (float32 ``(n, features)``): class probabilities or values.

        With a label map, probabilities over the labelled units only, in ``label_map`` order.
        """
        with torch.inference_mode():
            out = served.net(torch.from_numpy(x).view(-1, *config.input_shape))
            if config.task == "classification":
                if served.label_map is not None:
                    out = out[:, :len(served.label_map)]
                out = torch.softmax(out, dim=1)
        return out.numpy()
