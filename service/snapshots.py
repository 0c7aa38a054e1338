"""The snapshot store: versioned, atomic, safetensors-only model checkpoints on a shared volume.

One version is one file, ``{data_dir}/snapshots/{model}/v{version:010d}.safetensors``, holding

* tensors ``model.<state_dict key>`` (weights, gamma, beta, the data-norm running statistics)
  and ``optim.<param name>.momentum_buffer`` (the worker's optimiser state), and
* the safetensors header's text metadata ``{"normprop": <JSON>}``: model name, version, the
  model configuration, created-at time, counters, the last stream ID the version covers, and
  the stream IDs it trained since the previous version (the exactly-once ledger).

Writing is atomic: the file is written under a temporary name, fsynced, renamed into place,
and only then is the ``LATEST`` pointer replaced (also by rename). A reader therefore sees a
whole version or none. A crash mid-write leaves a ``.tmp-*`` file that nothing reads (it does
not match the version file pattern) and that :meth:`SnapshotStore.prune` deletes after a minute.

Test hook (fault injection, off by default): ``NP_FAULT_SNAPSHOT_WRITE_DELAY_SECONDS``, read
once at import, makes :meth:`SnapshotStore.write` sleep that long twice: between the fsynced
temporary file and its rename (a crash there leaves the temporary file), and after ``LATEST``
names the new version, before ``write`` returns (a crash there leaves a checkpoint whose
entries the worker has not acked yet). A test can so SIGKILL the worker in either window
deterministically (``tests/reliability/test_faults.py``). Unset or 0 (production) it costs
one comparison per write.

An operator may pin a version: the ``PINNED`` file (the version number, written atomically by
rename) tells every API replica to serve that version instead of the newest, and retention
(:meth:`SnapshotStore.prune`) never deletes it. The file, not Redis, is the source of truth, so
a pin holds while Redis is down and is seen by the worker's pruning on the same volume. Nothing is ever unpickled: safetensors stores raw tensors, metadata is
JSON.

An operator may also roll the worker back: the ``ROLLBACK`` file (JSON ``{"version": N,
"id": ...}``, written atomically like ``PINNED``) asks the worker to resume training from
version N; the worker publishes N's state as a new version and deletes the file. Retention
never deletes a version a pending rollback names.

The same file is the worker's checkpoint (it restores model, optimiser, statistics, counters)
and the API's snapshot (it loads ``model.*`` only, after validating it against its config).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

import normprop
from normprop import NormPropNet

from .settings import ModelConfig

__all__ = ["Snapshot", "SnapshotError", "SnapshotStore", "build_network", "load_network",
           "snapshot_label_map", "snapshot_output_units"]

_FILE = re.compile(r"^v(\d{10})\.safetensors$")
_META_KEY = "normprop"


def _fault_delay(name: str) -> float:
    """A fault-injection delay from the environment (tests only; 0 when unset or bad)."""
    try:
        return max(0.0, float(os.environ.get(name, "0") or 0))
    except ValueError:
        return 0.0


#: TEST HOOK: seconds to sleep before a version's rename and again after it is published
#: (see the module docstring). 0 in production.
_WRITE_DELAY = _fault_delay("NP_FAULT_SNAPSHOT_WRITE_DELAY_SECONDS")


class SnapshotError(RuntimeError):
    """A snapshot that cannot be read or does not match the model's configuration."""


@dataclass
class Snapshot:
    """One stored version: its tensors and its JSON metadata."""

    version: int
    tensors: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def model_state(self) -> dict[str, Tensor]:
        return {k[len("model."):]: v for k, v in self.tensors.items() if k.startswith("model.")}

    def optimizer_state(self) -> dict[str, Tensor]:
        return {k[len("optim."):]: v for k, v in self.tensors.items() if k.startswith("optim.")}


def build_network(config: ModelConfig, num_outputs: int | None = None) -> NormPropNet:
    """The NormProp network a model configuration declares (fresh, deterministic from seed).

    ``num_outputs`` overrides the configured output units (an open label set's grown layer).
    """
    torch.manual_seed(config.seed)
    net = normprop.build_model(config.spec, config.input_shape, num_outputs or config.num_outputs,
                               activation=config.activation, data_norm=config.data_norm,
                               half_life=config.half_life, clip=config.clip)
    if config.data_norm == "global":
        assert config.global_mean is not None and config.global_std is not None
        net.data_norm.set_statistics(torch.tensor(config.global_mean),
                                     torch.tensor(config.global_std))
    return net


def config_fingerprint(config: ModelConfig) -> dict[str, Any]:
    """The configuration fields that decide the network's shape and function.

    An open label set's output units are not fixed (the snapshot's ``label_map`` says how many
    there are); a listed set's labels are part of the fingerprint (they name the units).
    """
    out = {k: getattr(config, k) for k in
           ("name", "input_shape", "task", "num_outputs", "spec", "activation", "data_norm",
            "half_life", "clip")}
    if config.task == "classification" and config.label_set == "listed":
        out["classes"] = list(config.classes or [])
    elif config.task == "classification" and config.label_set == "open":
        out["num_outputs"] = "open"
        out["max_classes"] = config.max_classes
    return out


def snapshot_label_map(snapshot: Snapshot, config: ModelConfig) -> list[int | str] | None:
    """The user labels of a snapshot's output units, in unit order (None: class indices)."""
    if config.task != "classification" or config.label_set == "indices":
        return None
    stored = snapshot.metadata.get("label_map")
    if not isinstance(stored, list) or any(isinstance(v, bool) or not isinstance(v, (int, str))
                                           for v in stored):
        raise SnapshotError(f"snapshot v{snapshot.version} has no valid label_map")
    return stored


def snapshot_output_units(snapshot: Snapshot, config: ModelConfig) -> int:
    """Output units of a snapshot: the configured ones, or an open label set's grown count."""
    if config.task != "classification" or config.label_set != "open":
        return config.num_outputs
    units = snapshot.metadata.get("output_units")
    labels = snapshot_label_map(snapshot, config) or []
    if not isinstance(units, int) or isinstance(units, bool) or not (
            max(config.num_outputs, len(labels)) <= units <= max(2, config.max_classes)):
        raise SnapshotError(f"snapshot v{snapshot.version}: bad output_units {units!r}")
    return units


def load_network(snapshot: Snapshot, config: ModelConfig) -> NormPropNet:
    """Build the configured network and load a snapshot into it, validating everything.

    Raises :class:`SnapshotError` if the snapshot belongs to another model or configuration,
    has missing/extra/mis-shaped tensors, or holds non-finite values.
    """
    meta = snapshot.metadata
    if meta.get("model") != config.name:
        raise SnapshotError(f"snapshot v{snapshot.version} belongs to model "
                            f"{meta.get('model')!r}, not {config.name!r}")
    stored = meta.get("fingerprint")
    expected = json.loads(json.dumps(config_fingerprint(config)))
    if stored != expected:
        raise SnapshotError(f"snapshot v{snapshot.version} was made with another configuration: "
                            f"{stored} != {expected}")
    snapshot_label_map(snapshot, config)  # validates it
    net = build_network(config, snapshot_output_units(snapshot, config))
    state = snapshot.model_state()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SnapshotError(f"snapshot v{snapshot.version} does not fit the model: {exc}") from None
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SnapshotError(f"snapshot v{snapshot.version} has non-finite values in {name}")
    normprop.project_weights_(net)
    return net.eval()


class SnapshotStore:
    """Versioned snapshots of one model in a directory (see the module docstring).

    Args:
        root: the snapshots directory (``Settings.snapshot_dir``).
        model: the model name (a subdirectory).
    """

    def __init__(self, root: Path | str, model: str) -> None:
        self.model = model
        self.dir = Path(root) / model
        self.dir.mkdir(parents=True, exist_ok=True)
        self._latest = self.dir / "LATEST"
        self._pinned = self.dir / "PINNED"
        self._rollback = self.dir / "ROLLBACK"

    def path(self, version: int) -> Path:
        return self.dir / f"v{version:010d}.safetensors"

    def versions(self) -> list[int]:
        """Every complete version on disk, ascending."""
        out = []
        for p in self.dir.iterdir():
            m = _FILE.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_version(self) -> int | None:
        """The newest published version (the ``LATEST`` pointer; a scan if it is missing)."""
        try:
            text = self._latest.read_text().strip()
            return int(text) if text else None
        except FileNotFoundError:
            versions = self.versions()
            return versions[-1] if versions else None
        except ValueError:
            versions = self.versions()
            return versions[-1] if versions else None

    def write(self, version: int, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
        """Atomically publish ``version``; returns its path."""
        meta = dict(metadata, model=self.model, version=version,
                    created_at=metadata.get("created_at", time.time()))
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        target = self.path(version)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(cpu, tmp, metadata={_META_KEY: json.dumps(meta)})
            _fsync_file(tmp)
            if _WRITE_DELAY:
                time.sleep(_WRITE_DELAY)  # test hook: a window to be killed mid-write
            os.replace(tmp, target)
            self._write_pointer(version)
            _fsync_dir(self.dir)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if _WRITE_DELAY:
            time.sleep(_WRITE_DELAY)  # test hook: published, not yet acted upon by the caller
        return target

    def _write_pointer(self, version: int) -> None:
        _atomic_write_text(self._latest, f"{version}\n")

    def read(self, version: int) -> Snapshot:
        """Read one version; :class:`SnapshotError` if it is missing, truncated or corrupt."""
        meta = self.read_header_metadata(version)
        try:
            tensors = load_file(str(self.path(version)))
        except FileNotFoundError:
            raise SnapshotError(f"snapshot v{version} of {self.model!r} does not exist") from None
        except (SafetensorError, ValueError, OSError) as exc:
            raise SnapshotError(f"snapshot v{version} of {self.model!r} is unreadable: {exc}") from None
        if meta.get("version") != version:
            raise SnapshotError(f"snapshot v{version} of {self.model!r} has inconsistent metadata")
        return Snapshot(version, tensors, meta)

    def read_metadata(self, version: int) -> dict[str, Any]:
        """Only the JSON metadata of a version (reads the header, not the tensors)."""
        return self.read(version).metadata

    def read_header_metadata(self, version: int) -> dict[str, Any]:
        """The JSON metadata from the safetensors header alone (no tensor is read or checked).

        For listings; serving always goes through :meth:`read` and ``load_network``.
        """
        path = self.path(version)
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len <= 0 or header_len > 100_000_000:
                    raise SnapshotError(f"{path.name}: bad header length")
                header = json.loads(f.read(header_len))
            meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "{}"))
        except FileNotFoundError:
            raise SnapshotError(f"snapshot v{version} of {self.model!r} does not exist") from None
        except (ValueError, OSError, UnicodeDecodeError, AttributeError) as exc:
            raise SnapshotError(f"snapshot v{version} of {self.model!r} is unreadable: {exc}") from None
        if not isinstance(meta, dict):
            raise SnapshotError(f"snapshot v{version} of {self.model!r} has inconsistent metadata")
        return meta

    # -- pins -------------------------------------------------------------------------------
    def pinned_version(self) -> int | None:
        """The version an operator pinned (the ``PINNED`` file), or None to follow the newest."""
        try:
            text = self._pinned.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return int(text) if text else None
        except ValueError:
            return None

    @contextlib.contextmanager
    def _pin_lock(self) -> Iterator[None]:
        """Excludes :meth:`pin` and :meth:`prune` (an advisory ``flock``), so a version cannot
        be pinned while retention deletes it."""
        fd = os.open(self.dir / ".pin.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def pin(self, version: int) -> None:
        """Pin ``version`` (atomically, by rename); :class:`SnapshotError` if it is not on disk."""
        with self._pin_lock():
            if not self.path(version).exists():
                raise SnapshotError(f"snapshot v{version} of {self.model!r} does not exist")
            _atomic_write_text(self._pinned, f"{version}\n")
            _fsync_dir(self.dir)

    def unpin(self) -> None:
        """Follow the newest version again (no-op if nothing is pinned)."""
        self._pinned.unlink(missing_ok=True)
        _fsync_dir(self.dir)

    # -- rollback requests -----------------------------------------------------------------
    def request_rollback(self, version: int) -> dict[str, Any]:
        """Ask the worker to resume training from ``version`` (the ``ROLLBACK`` file, written
        atomically; a newer request replaces an unhandled one). Returns the request.
        :class:`SnapshotError` if the version is not on disk."""
        request = {"version": int(version), "id": uuid.uuid4().hex, "requested_at": time.time()}
        with self._pin_lock():  # retention cannot delete the version meanwhile
            if not self.path(version).exists():
                raise SnapshotError(f"snapshot v{version} of {self.model!r} does not exist")
            _atomic_write_text(self._rollback, json.dumps(request))
            _fsync_dir(self.dir)
        return request

    def rollback_request(self) -> dict[str, Any] | None:
        """The pending rollback request, or None (an unreadable file counts as none)."""
        try:
            request = json.loads(self._rollback.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        version = request.get("version") if isinstance(request, dict) else None
        if isinstance(version, bool) or not isinstance(version, int):
            return None
        return request

    def clear_rollback_request(self, request_id: str | None) -> None:
        """Delete the ``ROLLBACK`` file if it is still request ``request_id`` (a newer request
        written meanwhile stays)."""
        with self._pin_lock():
            current = self.rollback_request()
            if current is None or current.get("id") == request_id:
                self._rollback.unlink(missing_ok=True)
                _fsync_dir(self.dir)

    def prune(self, keep: int, protect: set[int] | None = None) -> list[int]:
        """Delete all but the newest ``keep`` versions (never one in ``protect``, never the
        pinned version or one a pending rollback names, whatever ``protect`` says)."""
        with self._pin_lock():
            versions = self.versions()
            protect = set(protect or ())
            pinned = self.pinned_version()
            if pinned is not None:
                protect.add(pinned)
            rollback = self.rollback_request()
            if rollback is not None:
                protect.add(int(rollback["version"]))
            doomed = [v for v in versions[:-keep] if v not in protect] if keep > 0 else []
            for v in doomed:
                self.path(v).unlink(missing_ok=True)
        for stale in self.dir.glob(".tmp-*"):
            # Left by a crash mid-write; never referenced by LATEST.
            if time.time() - stale.stat().st_mtime > 60:
                stale.unlink(missing_ok=True)
        return doomed


def _atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` by write, fsync and rename: a reader sees old or new."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name.lower()}-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
