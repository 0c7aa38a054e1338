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


class Producer:
    r"""Writes labelled samples on its own thread, alternating ``POST /ingest`` through the API
    and raw ``XADD``\s (one MULTI per batch) straight to Redis (``mode`` "mixed"; or "api",
    "raw" only);
    every ``bad_every``-th raw entry is malformed (``wrong_length``). Records what was accepted
    and what was not:

    * ``good`` / ``bad``: stream IDs acknowledged to the producer (``bad``: malformed ones);
    * ``refused``: samples certainly not written (a 503 before anything was sent, a refused
      connection); ``ambiguous``: samples whose write may or may not have happened (the
      connection broke or timed out after the request was sent) -- the one thing a producer
      cannot know, so the tests bound it rather than assume it;
    * ``accept_times``: ``(time.monotonic(), n)`` of each accepted batch;
    * ``api_calls``: ``(t0, t1, status)`` of each ``POST /ingest`` (status 0: no answer);
    * ``tags``: every sample carries a unique ``id`` field (``<prefix><index>``), and ``tag_state``
      says what the producer was told about it: ``accepted``, ``refused`` or ``ambiguous``
      (a Redis MONITOR can then count how often each was really written).

    ``hold()`` pauses it between batches (the test reads Redis' state in between).
    """

    def __init__(self, redis_url: str, api_url: str | None, cfg: ModelConfig, seed: int = 0,
                 batch: int = 8, pause: float = 0.02, bad_every: int = 50,
                 mode: str = "mixed", prefix: str = "s") -> None:
        from service.codec import EntryCodec
        from worker_helpers import synthetic

        self.redis_url = redis_url
        self.api_url = api_url
        self.cfg = cfg
        self.codec = EntryCodec(cfg)
        self.x, self.y = synthetic(200_000, num_features=cfg.num_features,
                                   num_classes=cfg.num_classes, seed=seed)
        self.batch = batch
        self.pause = pause
        self.bad_every = bad_every
        assert mode in ("mixed", "api", "raw") and (api_url or mode == "raw")
        self.mode = mode
        self.prefix = prefix
        self.good: list[bytes] = []
        self.bad: dict[bytes, str] = {}
        self.refused = 0
        self.ambiguous = 0
        self.errors: list[str] = []
        self.accept_times: list[tuple[float, int]] = []
        self.api_calls: list[tuple[float, float, int]] = []
        self.tag_state: dict[str, str] = {}
        self.bad_tags: set[str] = set()  # malformed samples (raw XADDs only)
        self._i = 0
        self._round = 0
        self._stop = threading.Event()
        self._hold = threading.Event()
        self._holding = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._hold.clear()
        self._thread.join(30)

    def hold(self) -> None:
        """Pause between batches; returns once the producer is paused."""
        self._holding.clear()
        self._hold.set()
        assert self._holding.wait(30), "the producer did not pause"

    def release(self) -> None:
        self._hold.clear()

    def accepted_since(self, t: float) -> int:
        return sum(n for t1, n in list(self.accept_times) if t1 >= t)

    def first_accept_after(self, t: float) -> float | None:
        return next((t1 for t1, _ in list(self.accept_times) if t1 >= t), None)

    def _raw_client(self) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: a retried MULTI after a lost reply could write the batch twice.
        return redis.Redis.from_url(self.redis_url, socket_timeout=2.0,
                                    socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))

    def _run(self) -> None:
        import redis

        from service import keys

        stream = keys.samples_stream(self.cfg.name)
        raw = self._raw_client()
        http = httpx.Client(base_url=self.api_url, timeout=10) if self.api_url else None
        try:
            while not self._stop.is_set():
                if self._hold.is_set():
                    self._holding.set()
                    while self._hold.is_set() and not self._stop.is_set():
                        time.sleep(0.005)
                    continue
                lo, hi = self._i, self._i + self.batch
                self._i = hi
                self._round += 1
                if http is not None and (self.mode == "api" or self._round % 2):
                    self._via_api(http, lo, hi)
                else:
                    self._via_redis(raw, stream, lo, hi, redis)
                self._stop.wait(self.pause)
        finally:
            raw.close()
            if http is not None:
                http.close()

    def _via_api(self, http: httpx.Client, lo: int, hi: int) -> None:
        tags = [f"{self.prefix}{j}" for j in range(lo, hi)]
        body = {"samples": [{"x": self.x[j].tolist(), "y": int(self.y[j]), "id": tag}
                            for j, tag in zip(range(lo, hi), tags)]}
        n = hi - lo
        t0 = time.monotonic()
        try:
            r = http.post("/ingest", json=body)
        except httpx.HTTPError as exc:
            self.api_calls.append((t0, time.monotonic(), 0))
            self.errors.append(f"api: {exc!r}"[:200])
            self.ambiguous += n
            self.tag_state.update(dict.fromkeys(tags, "ambiguous"))
            return
        self.api_calls.append((t0, time.monotonic(), r.status_code))
        if r.status_code == 202:
            self.good += [i.encode() for i in r.json()["ids"]]
            self.accept_times.append((time.monotonic(), n))
            self.tag_state.update(dict.fromkeys(tags, "accepted"))
        elif r.status_code == 503 and "Redis is down" in r.text:
            self.refused += n  # answered from the API's Redis health flag: nothing was sent
            self.tag_state.update(dict.fromkeys(tags, "refused"))
        else:
            # 503 after a Redis error mid-request: the MULTI may have been executed.
            self.errors.append(f"api {r.status_code}: {r.text[:160]}")
            self.ambiguous += n
            self.tag_state.update(dict.fromkeys(tags, "ambiguous"))

    def _via_redis(self, raw: Any, stream: str, lo: int, hi: int, redis: Any) -> None:
        pipe = raw.pipeline(transaction=True)
        kinds: list[bool] = []
        tags = [f"{self.prefix}{j}" for j in range(lo, hi)]
        for j, tag in zip(range(lo, hi), tags):
            if j % self.bad_every == self.bad_every - 1:
                pipe.xadd(stream, {"x": "[1, 2]", "y": "0", "id": tag})
                kinds.append(False)
                self.bad_tags.add(tag)
            else:
                pipe.xadd(stream, self.codec.encode(self.x[j], int(self.y[j]), sample_id=tag))
                kinds.append(True)
        try:
            ids = pipe.execute()
        except redis.RedisError as exc:
            text = f"{type(exc).__name__}: {exc}"
            if "refused" in text.lower() or "Error 111" in text:
                self.refused += len(kinds)
                self.tag_state.update(dict.fromkeys(tags, "refused"))
            else:
                self.errors.append(f"raw: {text}"[:200])
                self.ambiguous += len(kinds)
                self.tag_state.update(dict.fromkeys(tags, "ambiguous"))
            return
        self.tag_state.update(dict.fromkeys(tags, "accepted"))
        for ok, eid in zip(kinds, ids):
            if ok:
                self.good.append(eid)
            else:
                self.bad[eid] = "wrong_length"
        self.accept_times.append((time.monotonic(), len(kinds)))


class Monitor:
    """Counts every XADD Redis executes on a stream, by the entry's ``id`` field, from a
    ``MONITOR`` connection: the ground truth of what was written, whatever a client was told
    and whatever the worker trimmed since. (A MONITOR shows the commands inside MULTI/EXEC
    too, and those a client sent before it gave up on the connection.)"""

    def __init__(self, redis_url: str, stream: str) -> None:
        import re

        import redis

        self._client = redis.Redis.from_url(redis_url, socket_timeout=None)
        self._conn = self._client.connection_pool.get_connection()
        self._conn.send_command("MONITOR")
        assert self._conn.read_response() in (b"OK", "OK")
        key = re.escape(stream.encode())
        self._pattern = re.compile(rb'"XADD" "' + key + rb'" .*"id" "([^"]+)"')
        self.writes: dict[str, int] = {}
        self.commands: dict[str, int] = {}  # every command Redis ran, by name
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                line = self._conn.read_response(disable_decoding=True)
            except Exception:  # noqa: BLE001 -- closed by stop()
                return
            if not isinstance(line, bytes):
                continue
            head = line.split(b'] "', 1)
            if len(head) == 2:
                name = head[1].split(b'"', 1)[0].decode(errors="replace").upper()
                self.commands[name] = self.commands.get(name, 0) + 1
            if b'"XADD"' in line:
                m = self._pattern.search(line)
                if m:
                    tag = m.group(1).decode()
                    self.writes[tag] = self.writes.get(tag, 0) + 1

    def stop(self) -> None:
        try:
            self._conn.disconnect()
        finally:
            self._thread.join(10)
            self._client.close()


__all__ = ["Archiver", "LedgerProof", "Monitor", "Outcome", "Predictor", "Producer", "ROOT", "free_port", "service_env",
           "sid", "spawn_worker", "tail", "trained_ids", "worker_gauge"]
