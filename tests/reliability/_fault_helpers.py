"""Helpers for the fault-injection tests (no tests here): real worker processes, a snapshot
archiver that keeps every version's ledger although retention deletes old versions, the
exactly-once ledger proof, and a client that predicts in a loop and records every outcome.

The service helpers live in ``tests/service`` (``test_api_support``, ``worker_helpers``); this
directory has no ``__init__.py`` either, so they are imported by putting that directory on
``sys.path`` here, once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

_SERVICE_TESTS = str(Path(__file__).resolve().parents[1] / "service")
if _SERVICE_TESTS not in sys.path:
    sys.path.insert(0, _SERVICE_TESTS)

from test_api_support import ROOT, free_port, metric_samples, metric_value, np_env  # noqa: E402

from service.settings import ModelConfig  # noqa: E402
from service.snapshots import SnapshotStore  # noqa: E402

StreamId = tuple[int, int]


def sid(eid: bytes | str) -> StreamId:
    """``b"1700000000000-3"`` -> ``(1700000000000, 3)``."""
    if isinstance(eid, bytes):
        eid = eid.decode()
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


def service_env(redis_url: str, data_dir: Path, cfg: ModelConfig, **extra: Any) -> dict[str, str]:
    """``NP_*`` environment of a worker or API process for one model, with short Redis
    timeouts (faults are detected in about a second) and one torch thread."""
    base: dict[str, Any] = dict(device="cpu", torch_threads="1", worker_block_ms="50",
                                lease_ttl_seconds="1", redis_retries="2",
                                redis_socket_timeout="1", redis_connect_timeout="0.5",
                                worker_metrics_port="0", log_level="INFO")
    base.update(extra)
    return np_env(redis_url, data_dir, models=[cfg.model_dump(mode="json")], **base)


def spawn_worker(env: dict[str, str], name: str, log: Path,
                 **extra_env: str) -> subprocess.Popen[bytes]:
    """``python -m service.worker`` with consumer name ``name``; stderr appended to ``log``."""
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "service.worker"], cwd=ROOT,
                                env=env | {"NP_CONSUMER_NAME": name} | extra_env,
                                stdout=subprocess.DEVNULL, stderr=err)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return ""


def worker_gauge(port: int, name: str) -> float | None:
    """One gauge of the worker's own /metrics (None if unreachable)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1.0).text
    except httpx.HTTPError:
        return None
    return metric_value(metric_samples(text), name)


class Archiver:
    """Hard-links every published version into ``archive`` as soon as it appears.

    Retention (``keep_snapshots``) deletes old versions, and with them their ledgers; a hard
    link keeps the file's data without touching the store (prune only unlinks its own name).
    Polls every few milliseconds on a thread. A version pruned before it was seen would be
    missing from the archive: :func:`trained_ids` then fails loudly on the broken chain.
    """

    def __init__(self, store: SnapshotStore, archive: Path, every: float = 0.003) -> None:
        self.store = store
        self.archive = archive
        self.every = every
        archive.mkdir(parents=True, exist_ok=True)
        self.seen: set[str] = set()
        self.max_on_disk = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="archiver", daemon=True)

    def __enter__(self) -> Archiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sweep()

    def sweep(self) -> None:
        try:
            names = [e.name for e in os.scandir(self.store.dir)
                     if e.name.startswith("v") and e.name.endswith(".safetensors")]
        except FileNotFoundError:
            return
        self.max_on_disk = max(self.max_on_disk, len(names))
        for name in names:
            if name in self.seen:
                continue
            try:
                os.link(self.store.dir / name, self.archive / name)
            except FileExistsError:
                pass
            except FileNotFoundError:
                continue  # pruned between the scan and the link: the chain check will say so
            self.seen.add(name)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sweep()
            time.sleep(self.every)


@dataclass
class LedgerProof:
    """What the checkpoints along the version chain say was trained."""

    chain: list[int]                       # newest first
    trained: list[StreamId]                # every ledger entry, duplicates kept
    newest_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def trained_set(self) -> set[StreamId]:
        return set(self.trained)

    @property
    def duplicates(self) -> int:
        return len(self.trained) - len(set(self.trained))


def trained_ids(archive: Path, model: str, newest: int) -> LedgerProof:
    """Follow ``parent_version`` from ``newest`` through the archived versions and collect
    their ledgers. Every archived version must lie on the chain (no orphan branch whose ledger
    would be lost), and every parent must be archived."""
    assert archive.name == model, "the archive directory is named after the model"
    store = SnapshotStore(archive.parent, model)
    on_disk = set(store.versions())
    chain: list[int] = []
    trained: list[StreamId] = []
    v: int | None = newest
    newest_meta: dict[str, Any] = {}
    while v is not None:
        assert v in on_disk, f"v{v} is on the chain but was never archived (pruned too fast?)"
        snap = store.read(v)
        if not chain:
            newest_meta = snap.metadata
        chain.append(v)
        trained += [(int(a), int(b)) for a, b in snap.tensors["ledger.ids"].tolist()]
        v = snap.metadata.get("parent_version")
    assert sorted(chain) == sorted(on_disk), ("versions off the chain", sorted(on_disk - set(chain)))
    return LedgerProof(chain, trained, newest_meta)


@dataclass
class Outcome:
    t0: float
    t1: float
    status: int          # HTTP status, or 0 for a transport error
    version: int | None
    error: str | None = None


class Predictor:
    """Predicts one instance in a loop on its own thread; records every request's outcome."""

    def __init__(self, url: str, features: int, pause: float = 0.01, timeout: float = 10.0) -> None:
        self.url = url
        self.body = {"instances": [[0.25] * features]}
        self.pause = pause
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predictor", daemon=True)

    def start(self) -> Predictor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        http = httpx.Client(base_url=self.url, timeout=self.timeout)
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post("/predict", json=self.body)
                    version = r.json().get("version") if r.status_code == 200 else None
                    self.outcomes.append(Outcome(t0, time.monotonic(), r.status_code, version,
                                                 None if r.status_code == 200 else r.text[:200]))
                except (httpx.HTTPError, ValueError) as exc:
                    self.outcomes.append(Outcome(t0, time.monotonic(), 0, None, repr(exc)[:200]))
                    # A fresh connection pool after a transport error (the server may be new).
                    http.close()
                    http = httpx.Client(base_url=self.url, timeout=self.timeout)
                self._stop.wait(self.pause)
        finally:
            http.close()

    def between(self, t0: float, t1: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if t0 <= o.t0 < t1]


__all__ = ["Archiver", "LedgerProof", "Outcome", "Predictor", "ROOT", "free_port", "service_env",
           "sid", "spawn_worker", "tail", "trained_ids", "worker_gauge"]
