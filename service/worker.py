"""The training worker: Redis stream in, NormProp SGD steps, checkpoints out.

One :class:`ModelWorker` per configured model, each in its own thread of one process
(:func:`run_worker`); a model's thread does everything for that model in order -- read, decode,
train, checkpoint, ack -- so no state is shared between threads except the metrics registry.
Torch releases the GIL inside its kernels, so two models' steps overlap; for many busy models run
one worker process per model (the lease below makes any mix of processes safe).

The loop, per model::

    XREADGROUP GROUP trainer <consumer> COUNT n BLOCK worker_block_ms  np:{m}:samples >
      -> decode each entry (EntryCodec); malformed -> one script: XACK, and if that acked
         it, XADD np:{m}:dead ... and HINCRBY np:{m}:dead:counts (atomic and idempotent)
      -> SGD steps of up to max_batch valid entries at lr = scaled_lr(cfg.lr, batch, ...)
         (a trickle gives batch size 1, a backlog max_batch), prequential scoring, ledger += IDs
      -> every snapshot_every_steps steps or snapshot_every_seconds seconds, if anything new:
         checkpoint = SnapshotStore.write(v+1, model + momentum + ledger, metadata)
         then XACK exactly the ledger's IDs (pipelined), then XTRIM MINID below what is covered

Exactly once (DESIGN section 3): an entry is acked only after a checkpoint that contains its
effect is on disk, so after a crash every trained-but-uncheckpointed entry is still pending and
is trained again from the restored state, while an entry the restored checkpoint already covers
(crash between the write and the XACK) is recognised by the checkpoint's ledger, acked and
skipped. Acks of a written checkpoint are flushed before anything new is read, so only the
newest checkpoint's ledger can hold unacked IDs -- unless Redis restarts from an AOF that lost
its last second or two (``appendfsync everysec`` when the host dies): then the acks of every
checkpoint of those seconds, and the group's deliveries, are rolled back and those entries come
back, pending or delivered again. So the worker remembers the ledgers of every checkpoint of
the last :data:`COVERED_SECONDS` (by count that may be far more than ``keep_snapshots``), and
each checkpoint also stores them (``ledger.recent``), so a restart knows them whatever
retention deleted. An entry that comes back is skipped exactly when one of those ledgers (or
the in-memory one) lists it; anything else -- a dead letter rolled back with its ack, or an
entry a timed-out read delivered that the worker never saw, whatever its ID -- is processed
like a new entry. Each checkpoint names its parent version; the ledgers along that chain list
every ID trained, once.

Restart: restore the newest readable snapshot (a corrupt newest one falls back to the previous),
claim other consumers' pending entries (XAUTOCLAIM, the previous lease holder's), re-read our
own pending entries from ID 0, then read new ones. The same recovery runs after a Redis outage
(a lost reply could have delivered entries we never saw) and whenever a checkpoint finds more
pending entries than the in-memory ledger explains.

Lease: ``np:{m}:lease`` holds the consumer name of the worker that trains the model
(``SET NX PX``, renewed every third of its TTL by a compare-and-pexpire script). A worker that
cannot get it waits; one that loses it drops its in-memory state and, when it gets the lease
again, restores from the newest snapshot (another worker may have trained meanwhile). A worker
restarted under the same consumer name takes its own lease over at once.

Run it with ``python -m service.worker`` (settings from ``NP_`` environment variables).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
import signal
import socket
import threading
import time
from typing import Any, Iterable, Sequence

import numpy as np
import redis
import torch
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from . import keys
from .codec import DecodeError, EntryCodec, Sample
from .redis_options import tls_options
from .settings import ModelConfig, Settings
from .snapshots import Snapshot, SnapshotError, SnapshotStore
from .trainer import ModelTrainer, resolve_device
from .worker_metrics import ModelMetrics, WorkerMetrics

__all__ = ["ModelWorker", "Worker", "run_worker", "connect", "parse_id", "format_id", "main"]

log = logging.getLogger("normprop.worker")

StreamId = tuple[int, int]
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
#: Bounds on what a dead letter copies from the original entry.
DEAD_FIELD_BYTES = 4096
DEAD_MAX_FIELDS = 16
#: The dead-letter stream is a diagnostic, not data: keep about this many (approximate MAXLEN).
DEAD_STREAM_MAXLEN = 100_000
_ACK_CHUNK = 10_000
#: A read asks for at least this many entries (then trains them max_batch at a time).
READ_AT_LEAST = 256
#: How often the loop looks for an operator's rollback request (the store's ROLLBACK file).
ROLLBACK_CHECK_SECONDS = 0.1
#: Redelivered entries are recognised by the ledgers of the checkpoints of this many seconds
#: before the newest (and of at least COVERED_MIN_CHECKPOINTS of them): longer than the writes
#: an AOF with ``appendfsync everysec`` can lose (about 1 s, 2 s when fsync stalls).
COVERED_SECONDS = 5.0
COVERED_MIN_CHECKPOINTS = 2
#: ...but never more than this many checkpoints (memory stays bounded at any checkpoint rate).
COVERED_MAX_CHECKPOINTS = 2000
#: Restoring a checkpoint written before ``ledger.recent`` existed: read this many older ones.
LEGACY_COVERED_CHECKPOINTS = 16
_METRICS_EVERY = 0.5
_MAX_BACKOFF = 5.0

# Renew (or take over, for the same consumer name) only if the lease is ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# A backlog read in one round trip with a compact reply. Entries in the documented binary form
# (exactly the fields ``xb`` of the model's byte length and ``y`` a canonical class index)
# come back as three blobs -- IDs, concatenated features, labels -- that numpy decodes as a
# batch; any other entry comes back as is, for EntryCodec. Validation stays in Python (finite
# values, label range); the script only sorts entries by shape. No BLOCK: scripts cannot block,
# so it is used only while a backlog lasts.
_READ_PACKED = """
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                     'STREAMS', KEYS[1], '>')
if not r then return {} end
local xlen = tonumber(ARGV[4])
local ids, xs, ys, other = {}, {}, {}, {}
for _, e in ipairs(r[1][2]) do
  local f = e[2]
  local xb, y
  if #f == 4 then
    if f[1] == 'xb' and f[3] == 'y' then xb, y = f[2], f[4]
    elseif f[1] == 'y' and f[3] == 'xb' then xb, y = f[4], f[2] end
  end
  if xb and #xb == xlen and #y <= 9 and (y == '0' or string.find(y, '^[1-9]%d*$')) then
    ids[#ids + 1] = e[1]; xs[#xs + 1] = xb; ys[#ys + 1] = y
  else
    other[#other + 1] = e
  end
end
return {table.concat(ids, ' '), table.concat(xs), table.concat(ys, ' '), other}
"""
# Dead letters, idempotent: each entry is copied to the dead-letter stream and counted only if
# this XACK acks it. redis-py retries a command that timed out, and Redis may run both the
# first try (sent before it froze) and the retry: the second finds the entry acked already.
# KEYS: stream, dead stream, counts. ARGV: group, maxlen, then per entry: ID, reason, n, and
# n field/value pairs.
_DEAD_LETTER = """
local i, written = 3, 0
while i <= #ARGV do
  local id, reason, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local fields = {}
  for j = 1, 2 * n do fields[j] = ARGV[i + 2 + j] end
  i = i + 3 + 2 * n
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
    redis.call('HINCRBY', KEYS[3], reason, 1)
    written = written + 1
  end
end
return written
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLost(RuntimeError):
    """Another worker holds this model's lease now."""


def parse_id(stream_id: bytes | str) -> StreamId:
    """``b"1700000000000-3"`` -> ``(1700000000000, 3)``."""
    if isinstance(stream_id, str):
        stream_id = stream_id.encode()
    ms, _, seq = stream_id.partition(b"-")
    return int(ms), int(seq or 0)


def _ledger_tensor(ids: Sequence[bytes]) -> torch.Tensor:
    """The ledger's IDs as an int64 ``(n, 2)`` tensor of ``(ms, seq)``, like
    :func:`parse_id` on each. Parsed as one blob (a 32,000-ID ledger: ~8 ms instead of
    ~100 ms for a tensor built from a list of tuples); anything but plain ``b"ms-seq"``
    bytes takes the per-ID path."""
    try:
        parts = b" ".join(ids).replace(b"-", b" ").split()
        if len(parts) == 2 * len(ids):
            return torch.from_numpy(
                np.array(list(map(int, parts)), dtype=np.int64).reshape(-1, 2))
    except (TypeError, ValueError, OverflowError):
        pass
    return torch.tensor([parse_id(i) for i in ids], dtype=torch.int64).reshape(-1, 2)


def format_id(stream_id: StreamId) -> str:
    """``(ms, seq)`` -> ``"ms-seq"``, the form Redis returns."""
    return f"{stream_id[0]}-{stream_id[1]}"


def connect(settings: Settings) -> redis.Redis:
    """A Redis client with bounded timeouts and redis-py's retry with exponential backoff.

    Every call gives up after ``redis_retries`` retries (each bounded by the socket timeouts),
    so the worker never hangs on a dead server; its own loop then backs off and reconnects.
    """
    if not settings.redis_url:
        raise ValueError("NP_REDIS_URL is not set; the worker needs a Redis server")
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), settings.redis_retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
        **tls_options(settings),
    )


def _bounded_fields(fields: dict[Any, Any]) -> dict[bytes, bytes]:
    """The original entry's fields, each cut to ``DEAD_FIELD_BYTES`` (dead letters stay small)."""
    out: dict[bytes, bytes] = {}
    for i, (k, v) in enumerate(fields.items()):
        if i >= DEAD_MAX_FIELDS:
            out[b"truncated_fields"] = str(len(fields) - DEAD_MAX_FIELDS).encode()
            break
        kb = k if isinstance(k, bytes) else str(k).encode()
        vb = v if isinstance(v, bytes) else str(v).encode()
        out[kb[:256]] = vb[:DEAD_FIELD_BYTES]
    return out


class ModelWorker:
    """Trains one model from its stream (see the module docstring for the protocol).

    Args:
        settings: service settings (Redis, device, block time, lease TTL, snapshot dir).
        config: the model to train.
        metrics: the process's metrics; this worker updates its ``model`` children.
        stop: set it to make :meth:`run` checkpoint, ack, release the lease and return.
        consumer: this worker's consumer name in the group and lease value.
    """

    def __init__(self, settings: Settings, config: ModelConfig, metrics: WorkerMetrics,
                 stop: threading.Event, consumer: str) -> None:
        self.settings = settings
        self.config = config
        self.stop = stop
        self.consumer = consumer
        self.redis = connect(settings)
        self.store = SnapshotStore(settings.snapshot_dir, config.name)
        self.codec = EntryCodec(config)
        self.device = resolve_device(settings.device)
        self.stream = keys.samples_stream(config.name)
        self.dead_stream = keys.dead_letter_stream(config.name)
        self.dead_counts = keys.dead_letter_counts(config.name)
        self.lease = keys.lease_key(config.name)
        self.group = keys.CONSUMER_GROUP
        self.metrics: ModelMetrics = metrics.for_model(config.name)
        # Longer than the socket timeout, a BLOCK would read as a dead connection.
        self.block_ms = max(1, min(settings.worker_block_ms,
                                   int(settings.redis_socket_timeout * 500)))
        self.lease_ttl_ms = int(settings.lease_ttl_seconds * 1000)
        # Entries per read: at least READ_AT_LEAST, a whole number of batches. A small
        # max_batch still reads a backlog in bulk (one round trip, then several steps of
        # max_batch each): at batch size 1 a round trip per step would cost as much as the step.
        self.read_count = config.max_batch * max(1, -(-READ_AT_LEAST // config.max_batch))
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._dead_script = self.redis.register_script(_DEAD_LETTER)
        # The packed lane validates class indices in bulk; user labels take EntryCodec's path.
        self._packed = config.task == "classification" and config.label_set == "indices"
        self._backlog = False  # the last read filled a batch: read the next one packed
        self._read_conn: Any = None  # a dedicated connection for prefetched backlog reads
        self._inflight = False       # a packed read was sent; its reply is not read yet
        self._future: concurrent.futures.Future[Any] | None = None
        self._fetcher: concurrent.futures.ThreadPoolExecutor | None = None

        self.trainer: ModelTrainer | None = None
        self.version = 0                    # newest version this worker wrote or restored
        self.restored_version: int | None = None
        self.high_water: StreamId = (0, 0)  # highest ID processed (trained, skipped, dead)
        self.ledger: list[bytes] = []       # IDs consumed since the newest checkpoint
        # Ledgers of the newest checkpoints, (created_at, IDs, their (n, 2) tensor), the last
        # COVERED_SECONDS: a pending entry in one of them is trained already (crash between
        # write and XACK, or acks lost when Redis restarted from an older AOF).
        self.covered: collections.deque[tuple[float, set[bytes], torch.Tensor]] = \
            collections.deque()
        self.unacked: list[bytes] = []      # covered by a written checkpoint, ack not confirmed
        self.needs_recovery = True
        self.dirty = False                  # anything to checkpoint?
        self.steps_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.last_checkpoint_wall = 0.0
        self.redis_ok: bool | None = None
        self._lease_renewed = 0.0
        self._next_metrics = 0.0
        self._group_ready = False
        self._spare: ModelTrainer | None = None
        self._next_rollback_check = 0.0
        self._last_rollback_id: str | None = None  # the request the newest version carried out

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Train until ``stop`` is set; survives Redis outages and lease changes."""
        backoff = 0.05
        self.metrics.lease_held.set(0)
        # Build the network before competing for the lease: it validates the configuration
        # early, and the first torch.optim construction imports torch._dynamo (seconds on a
        # busy CPU) -- a standby worker should take over warm.
        self._spare = self._build_trainer()
        try:
            while not self.stop.is_set():
                try:
                    self.run_once()
                    self._set_redis(True)
                    backoff = 0.05
                except _REDIS_DOWN as exc:
                    self._set_redis(False)
                    log.warning("%s: Redis unavailable (%s); retrying in %.2fs",
                                self.config.name, exc, backoff)
                    # A reply lost in the outage may have delivered entries we never saw.
                    self.needs_recovery = True
                    self._close_read_conn()
                    self._backlog = False
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                except LeaseLost:
                    log.warning("%s: lost the lease; dropping state until it is ours again",
                                self.config.name)
                    self._drop_state()
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        backoff = self._reset_after_error(backoff)
                        continue
                    # The stream or group vanished (Redis lost its data): recreate, re-read.
                    log.warning("%s: consumer group missing; recreating it", self.config.name)
                    self._group_ready = False
                    self.needs_recovery = True
                except Exception:  # noqa: BLE001
                    backoff = self._reset_after_error(backoff)
        finally:
            self._shutdown()

    def _reset_after_error(self, backoff: float) -> float:
        # Crash-only recovery without dying: back to the newest checkpoint; what it does not
        # cover is still pending and will be read again.
        log.exception("%s: unexpected error; restoring the newest checkpoint", self.config.name)
        self._drop_state()
        self.stop.wait(backoff)
        return min(backoff * 2, _MAX_BACKOFF)


    def run_once(self) -> None:
        """One turn of the loop: lease, pending acks, recovery, one read, train, checkpoint."""
        if self.trainer is None:
            if not self._acquire_lease():
                self.stop.wait(min(0.5, self.settings.lease_ttl_seconds / 4))
                return
            self._ensure_group()
            self._load_state()
        self._renew_lease_if_due()
        if not self._group_ready:
            self._ensure_group()
        self.flush_acks()
        if self.needs_recovery:
            self._drain_prefetch()
            self.recover()
        now = time.monotonic()
        if now >= self._next_rollback_check:
            self._next_rollback_check = now + ROLLBACK_CHECK_SECONDS
            request = self.store.rollback_request()
            if request is not None:
                self.rollback(request)
        if self._inflight or (self._backlog and self._packed):
            got = self.read_packed()
        else:
            resp = self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                         count=self.read_count, block=self.block_ms)
            entries = resp[0][1] if resp else []
            if entries:
                self.process(entries, recovering=False)
            got = len(entries)
        self._backlog = got >= self.read_count
        self._maybe_checkpoint()
        now = time.monotonic()
        if now >= self._next_metrics:
            self._next_metrics = now + _METRICS_EVERY
            self.update_metrics()

    # -- lease ------------------------------------------------------------------------------
    def _acquire_lease(self) -> bool:
        token = self.consumer.encode()
        got = self.redis.set(self.lease, token, nx=True, px=self.lease_ttl_ms)
        if not got:
            got = bool(self._renew(keys=[self.lease], args=[token, self.lease_ttl_ms]))
        if got:
            self._lease_renewed = time.monotonic()
            self.metrics.lease_held.set(1)
            log.info("%s: lease acquired by %s", self.config.name, self.consumer)
        return bool(got)

    def _renew_lease_if_due(self) -> None:
        now = time.monotonic()
        if now - self._lease_renewed < self.settings.lease_ttl_seconds / 3:
            return
        if not self._renew(keys=[self.lease], args=[self.consumer.encode(), self.lease_ttl_ms]):
            # Expired (e.g. a long outage) and maybe taken: only continue if we can retake it.
            if not self.redis.set(self.lease, self.consumer.encode(), nx=True,
                                  px=self.lease_ttl_ms):
                self.metrics.lease_held.set(0)
                raise LeaseLost(self.config.name)
        self._lease_renewed = now

    def _drop_state(self) -> None:
        self._close_read_conn()
        self._backlog = False
        self.trainer = None
        self.ledger = []
        self.unacked = []
        self.covered.clear()
        self.dirty = False
        self.needs_recovery = True

    # -- state ------------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _load_state(self) -> None:
        """Restore the newest readable checkpoint, or start fresh and publish version 1."""
        versions = self.store.versions()
        for v in reversed(versions):
            trainer = self._new_trainer()
            try:
                snap = self.store.read(v)
                trainer.restore(snap)
            except SnapshotError as exc:
                log.error("%s: cannot restore v%d (%s); trying the previous version",
                          self.config.name, v, exc)
                continue
            self.trainer = trainer
            self.restored_version = v
            self.version = versions[-1]  # new versions go above any existing one
            last = snap.metadata.get("last_stream_id") or "0-0"
            self.high_water = parse_id(last)
            self.covered.clear()
            created = float(snap.metadata.get("created_at", time.time()))
            if "ledger.recent" in snap.tensors:
                self._remember(created - 1e-3, _ledger_ids(snap, "ledger.recent"),
                               snap.tensors["ledger.recent"])
            else:  # a checkpoint from before ledger.recent: the older versions' own ledgers
                for older in versions[-LEGACY_COVERED_CHECKPOINTS:]:
                    if older < v:
                        try:
                            old = self.store.read(older)
                        except SnapshotError:
                            continue
                        self._remember(float(old.metadata.get("created_at", 0.0)),
                                       _ledger_ids(old), _ledger_of(old))
            self._remember(created, _ledger_ids(snap), _ledger_of(snap))
            self.last_checkpoint_wall = float(snap.metadata.get("created_at", time.time()))
            self._last_rollback_id = snap.metadata.get("rollback_request")
            log.info("%s: restored v%d (%d samples trained, last ID %s)", self.config.name, v,
                     trainer.samples_trained, last)
            break
        else:
            self.trainer = self._new_trainer()
            self.version = versions[-1] if versions else 0
            self.high_water = (0, 0)
            self.covered.clear()
            # Publish at once so the API has a model to serve before any sample arrives.
            self.checkpoint()
        # Retention at start too: a predecessor killed between a checkpoint and its prune left
        # one version too many, and there may be nothing new to checkpoint (and prune) for long.
        try:
            self.store.prune(self.config.keep_snapshots,
                             protect={v for v in (self.restored_version, self.version) if v})
        except OSError as exc:
            log.warning("%s: pruning snapshots failed: %s", self.config.name, exc)
        counts = self.redis.hgetall(self.dead_counts)
        if counts:  # exact even when dead letters came after the restored checkpoint
            self.trainer.dead_letters.update({k.decode(): int(v) for k, v in counts.items()})
        self.ledger = []
        self.unacked = []
        self.dirty = False
        self.needs_recovery = True
        self.steps_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.metrics.snapshot_version.set(self.version)
        self.update_metrics()

    def _new_trainer(self) -> ModelTrainer:
        spare, self._spare = self._spare, None
        return spare if spare is not None else self._build_trainer()

    def _build_trainer(self) -> ModelTrainer:
        return ModelTrainer(self.config, self.device,
                            optimizer_backend=self.settings.optimizer_backend)

    # -- reading ----------------------------------------------------------------------------
    def recover(self) -> None:
        """Take over every pending entry of the group and process it once.

        Other consumers' entries (a dead previous lease holder's) are claimed first; then our
        own pending list is read from ID 0. An entry the newest checkpoint covers is acked and
        skipped; one already in the in-memory ledger is left for the next checkpoint to ack.
        """
        start: bytes | str = "0-0"
        while True:
            # (redis-py drops the cursor of a JUSTID reply, so the entries come along.)
            nxt = self.redis.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                        start_id=start, count=max(self.config.max_batch, 100))[0]
            if nxt in (b"0-0", "0-0"):
                break
            start = nxt
        in_ledger = set(self.ledger)
        cursor: bytes | str = "0"
        while True:
            resp = self.redis.xreadgroup(self.group, self.consumer, {self.stream: cursor},
                                         count=self.read_count)
            entries = resp[0][1] if resp else []
            if not entries:
                break
            cursor = entries[-1][0]
            self.process(entries, recovering=True, in_ledger=in_ledger)
            # A long pending list is ordinary training: keep the lease, checkpoint as usual.
            self._renew_lease_if_due()
            self._maybe_checkpoint()
        self._forget_idle_consumers()
        self.flush_acks(trim=True)
        counts = self.redis.hgetall(self.dead_counts)
        if counts and self.trainer is not None:
            # Redis' count is the truth (a dead letter lost with an older AOF was counted here,
            # then again when it was redelivered).
            self.trainer.dead_letters.update({k.decode(): int(v) for k, v in counts.items()})
        self.needs_recovery = False

    def _is_covered(self, eid: bytes) -> bool:
        return any(eid in ledger for _, ledger, _ in self.covered)

    def _remember(self, created_at: float, ids: set[bytes], tensor: torch.Tensor) -> None:
        """Add a checkpoint's ledger to ``covered``; forget those older than the window."""
        self.covered.append((created_at, ids, tensor))
        newest = created_at
        while len(self.covered) > COVERED_MIN_CHECKPOINTS and (
                newest - self.covered[0][0] > COVERED_SECONDS
                or len(self.covered) > COVERED_MAX_CHECKPOINTS):
            self.covered.popleft()

    def _forget_idle_consumers(self) -> None:
        """Delete other consumers with nothing pending (dead predecessors), keeping XINFO tidy."""
        for c in self.redis.xinfo_consumers(self.stream, self.group):
            name = c.get("name")
            if name in (self.consumer, self.consumer.encode()) or c.get("pending", 0):
                continue
            self.redis.xgroup_delconsumer(self.stream, self.group, name)

    def process(self, entries: Sequence[tuple[bytes, dict[bytes, bytes] | None]],
                recovering: bool, in_ledger: set[bytes] | None = None) -> None:
        """Decode, dead-letter, skip what is covered, and train the rest as one step."""
        samples: list[Sample] = []
        ids: list[bytes] = []
        dead: list[tuple[bytes, dict[bytes, bytes], DecodeError]] = []
        ack_now: list[bytes] = []
        fresh = entries
        if recovering:
            fresh = []
            for eid, fields in entries:
                if fields is None or self._is_covered(eid):
                    ack_now.append(eid)  # trimmed away, or in a checkpoint already
                elif in_ledger is None or eid not in in_ledger:
                    # Not trained (its ack was not lost: it was never acked). Its ID may be
                    # below the high-water mark: a read that timed out delivered it unseen.
                    fresh.append((eid, fields))
                    self.high_water = max(self.high_water, parse_id(eid))
        elif entries:
            # New entries arrive in ID order; one at or below the high-water mark means Redis
            # lost its group state (restart from an older AOF) and redelivered what we did --
            # or what a read that timed out was given and we never saw. The ledgers tell which.
            first = parse_id(entries[0][0])
            if first <= self.high_water:
                fresh = []
                in_ledger = set(self.ledger)
                for eid, fields in entries:
                    if parse_id(eid) > self.high_water:
                        fresh.append((eid, fields))
                    elif self._is_covered(eid):
                        ack_now.append(eid)
                    elif eid not in in_ledger:
                        fresh.append((eid, fields))
                    # else: trained since the last checkpoint, which will ack it
            if fresh:
                self.high_water = max(self.high_water, *(parse_id(e) for e, _ in fresh))
        decode = self.codec.decode
        assert self.trainer is not None
        # User labels (classes/open_classes) -> output units; an open set grows here, in
        # stream order, so a restart that replays the same entries builds the same map.
        index_of = self.trainer.index_of if self.trainer.label_map is not None else None
        for eid, fields in fresh:
            try:
                sample = decode(fields)  # type: ignore[arg-type]
                if index_of is not None:
                    sample = Sample(sample.x, index_of(sample.y))  # type: ignore[arg-type]
                samples.append(sample)
                ids.append(eid)
            except DecodeError as err:
                dead.append((eid, fields, err))  # type: ignore[arg-type]
        if ack_now:
            self.redis.xack(self.stream, self.group, *ack_now)
        if dead:
            self._dead_letter(dead)
        step = self.config.max_batch
        for i in range(0, len(samples), step):
            self._train(samples[i:i + step], ids[i:i + step])

    # -- backlog reads: packed, prefetched --------------------------------------------------
    def _send_packed(self) -> None:
        """Start the next backlog read now; its reply is taken after the current step.

        A helper thread sends it and waits for the reply while this thread trains, so the
        round trip and Redis' work hide behind the step (DESIGN section 7). The entries it
        delivers are pending like any others, so a crash before they are trained loses nothing.
        """
        if self._read_conn is None:
            self._read_conn = self.redis.connection_pool.get_connection()
        if self._fetcher is None:
            self._fetcher = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"prefetch-{self.config.name}")
        conn = self._read_conn
        args = ("EVAL", _READ_PACKED, 1, self.stream, self.group, self.consumer,
                self.read_count, 4 * self.config.num_features)

        def fetch() -> Any:
            conn.send_command(*args)
            return conn.read_response()

        self._future = self._fetcher.submit(fetch)
        self._inflight = True

    def _recv_packed(self) -> Any:
        fut, self._future, self._inflight = self._future, None, False
        try:
            return fut.result()  # type: ignore[union-attr]
        except BaseException:
            self._close_read_conn()
            raise

    def _close_read_conn(self) -> None:
        """Drop the prefetch connection (an unread reply's entries stay pending)."""
        fut, self._future, self._inflight = self._future, None, False
        if fut is not None:
            try:
                fut.result(timeout=self.settings.redis_socket_timeout + 1)
            except BaseException:  # noqa: BLE001 -- the reply is being discarded anyway
                pass
        conn, self._read_conn = self._read_conn, None
        if conn is not None:
            try:
                conn.disconnect()
            finally:
                self.redis.connection_pool.release(conn)

    def _drain_prefetch(self) -> None:
        if self._inflight:
            self._process_packed(self._recv_packed())

    def read_packed(self) -> int:
        """Read up to ``read_count`` new entries with :data:`_READ_PACKED`; returns how many.

        If the batch is full (the backlog goes on), the next read is sent before this batch
        is trained.
        """
        if not self._inflight:
            self._send_packed()
        reply = self._recv_packed()
        n = (reply[0].count(b" ") + 1 if reply[0] else 0) + len(reply[3]) if reply else 0
        if n >= self.read_count:
            self._send_packed()
        self._process_packed(reply)
        return n

    def _process_packed(self, res: Any) -> None:
        """Decode a packed reply and train on it.

        The binary-form entries are validated as a batch (finite features, label in range);
        one that fails is decoded again by EntryCodec, which raises the same error it would
        have on the slow path, and is dead-lettered like any other.
        """
        if not res:
            return
        ids_blob, xs_blob, ys_blob, other_raw = res
        fast_ids = ids_blob.split(b" ") if ids_blob else []
        other = [(e[0], dict(zip(e[1][::2], e[1][1::2]))) for e in other_raw]
        n = len(fast_ids) + len(other)
        if not n:
            return
        firsts = [parse_id(i[0]) for i in (fast_ids[:1], [e[0] for e in other[:1]]) if i]
        lasts = [parse_id(i[-1]) for i in (fast_ids, [e[0] for e in other]) if i]
        labels_raw = ys_blob.split(b" ") if ys_blob else []
        if min(firsts) <= self.high_water:
            # Redis redelivered old entries (group state rolled back): the careful path.
            size = 4 * self.config.num_features
            entries = [(eid, {b"xb": xs_blob[i * size:(i + 1) * size], b"y": labels_raw[i]})
                       for i, eid in enumerate(fast_ids)] + other
            entries.sort(key=lambda e: parse_id(e[0]))
            self.process(entries, recovering=False)
            return
        self.high_water = max(self.high_water, *lasts)
        x = np.frombuffer(xs_blob, dtype="<f4").reshape(len(fast_ids), self.config.num_features)
        y = np.array([int(v) for v in labels_raw], dtype=np.int64)
        ok = np.isfinite(x).all(axis=1) & (y < self.config.num_classes)
        dead: list[tuple[bytes, dict[bytes, bytes], DecodeError]] = []
        if not ok.all():
            for i in np.flatnonzero(~ok).tolist():
                fields = {b"xb": x[i].tobytes(), b"y": labels_raw[i]}
                try:
                    self.codec.decode(fields)
                    raise AssertionError("fast-lane validation disagrees with EntryCodec")
                except DecodeError as err:
                    dead.append((fast_ids[i], fields, err))
            ids = [eid for eid, good in zip(fast_ids, ok.tolist()) if good]
        else:
            ids = fast_ids
        xs, ys = x[ok], y[ok]  # boolean indexing copies: writable, owned arrays for torch
        if other:
            extra: list[Sample] = []
            for eid, fields in other:
                try:
                    extra.append(self.codec.decode(fields))
                    ids.append(eid)
                except DecodeError as err:
                    dead.append((eid, fields, err))
            if extra:
                xs = np.concatenate([xs, np.stack([s.x for s in extra])])
                ys = np.concatenate([ys, np.array([s.y for s in extra], dtype=np.int64)])
        if dead:
            self._dead_letter(dead)
        step = self.config.max_batch
        train = self.trainer.train_arrays  # type: ignore[union-attr]
        for i in range(0, len(ids), step):
            self._account(train(xs[i:i + step], ys[i:i + step]), ids[i:i + step])

    def _dead_letter(self, dead: list[tuple[bytes, dict[bytes, bytes], DecodeError]]) -> None:
        """Move malformed entries to the dead-letter stream, count and ack them, atomically
        and idempotently (one script, :data:`_DEAD_LETTER`)."""
        args: list[Any] = [self.group, DEAD_STREAM_MAXLEN]
        for eid, fields, err in dead:
            letter = _bounded_fields(fields)
            letter.update({b"reason": err.reason.encode(), b"detail": err.detail.encode()[:1024],
                           b"source_id": eid})
            args += [eid, err.reason, len(letter)]
            for k, v in letter.items():
                args += [k, v]
        by_reason = collections.Counter(err.reason for _, _, err in dead)
        # The count lives in Redis too, in the same script: a crash before the next
        # checkpoint cannot lose it (the acked entry will not come back to be counted again).
        # Each entry was pending and delivered to us, so one run of the script (the first try or
        # a retry) writes its dead letter: counted here whatever this reply says.
        self._dead_script(keys=[self.stream, self.dead_stream, self.dead_counts], args=args)
        assert self.trainer is not None
        for reason, n in by_reason.items():
            self.trainer.dead_letters[reason] = self.trainer.dead_letters.get(reason, 0) + n
            self.metrics.dead_letter(reason, n)
        self.dirty = True

    def _train(self, samples: list[Sample], ids: list[bytes]) -> None:
        assert self.trainer is not None
        self._account(self.trainer.train_batch(samples), ids)

    def _account(self, result: Any, ids: list[bytes]) -> None:
        self.ledger.extend(ids)
        self.dirty = True
        self.steps_since_checkpoint += 1
        if result.skipped is not None:
            self.metrics.skipped(result.skipped)
            return
        n = len(ids)
        self.metrics.samples.inc(n)
        self.metrics.steps.inc()
        self.metrics.batch_size.observe(n)
        self.metrics.loss.set(result.loss)

    # -- checkpoints ------------------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        if not self.dirty:
            return
        if (self.steps_since_checkpoint >= self.config.snapshot_every_steps
                or time.monotonic() - self.last_checkpoint >= self.config.snapshot_every_seconds):
            self.checkpoint()

    def checkpoint(self, extra: dict[str, Any] | None = None) -> int:
        """Write the next version, then ack exactly the IDs it covers and trim below them.

        ``extra`` is added to the metadata (a rollback names its parent and source)."""
        assert self.trainer is not None
        started = time.perf_counter()
        ids = self.ledger
        ledger = _ledger_tensor(ids)
        version = max(self.version, self.store.latest_version() or 0) + 1
        metadata = self.trainer.metadata()
        metadata.update({
            "last_stream_id": format_id(self.high_water),
            "parent_version": self.version or None,
            "ledger_size": len(ids),
            "consumer": self.consumer,
            "stream": self.stream,
        })
        metadata.update(extra or {})
        tensors = self.trainer.checkpoint_tensors()
        tensors["ledger.ids"] = ledger
        # The ledgers remembered (the last COVERED_SECONDS), for a restart (see the module doc).
        tensors["ledger.recent"] = torch.cat(
            [torch.zeros(0, 2, dtype=torch.int64)] + [t for _, _, t in self.covered])
        created = time.time()
        metadata["created_at"] = created
        self.store.write(version, tensors, metadata)
        self.version = version
        self._remember(created, set(ids), ledger)
        self.unacked.extend(ids)
        self.ledger = []
        self.dirty = False
        self.steps_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.last_checkpoint_wall = time.time()
        self.metrics.snapshot_version.set(version)
        for s in metadata["layer_stats"]:
            self.metrics.layer(s["name"], s["mean"], s["std"])
        try:
            self.store.prune(self.config.keep_snapshots, protect={version})
        except OSError as exc:  # a reader may hold a file on some filesystems; try next time
            log.warning("%s: pruning snapshots failed: %s", self.config.name, exc)
        try:
            self.flush_acks(trim=True)
        finally:
            self.metrics.checkpoint_duration.observe(time.perf_counter() - started)
        return version

    def rollback(self, request: dict[str, Any]) -> int | None:
        """Resume training from the requested version N (an operator's ``ROLLBACK`` file).

        What this worker has read is checkpointed and acked first, so every entry it trained
        stays covered by exactly one ledger (the abandoned versions'). Then N's checkpoint is
        restored -- weights, momentum, data-norm statistics, counters, label map -- and
        published as a new version above the latest, with ``rolled_back_from: N`` and
        ``parent_version: N``: following parents from the newest version lists the entries
        the live weights learned from, once each. Training continues from the stream position
        reached (``last_stream_id`` is ours, not N's): what came after N is not retrained.
        Returns the new version, or None if N cannot be restored (the request is dropped and
        training goes on unchanged).
        """
        target = int(request["version"])
        request_id = request.get("id")
        if request_id is not None and request_id == self._last_rollback_id:
            self.store.clear_rollback_request(request_id)  # done before a crash or restart
            return None
        self._drain_prefetch()
        if self.dirty:
            self.checkpoint()
        self.flush_acks()
        trainer = self._build_trainer()
        try:
            trainer.restore(self.store.read(target))
        except SnapshotError as exc:
            log.error("%s: rollback to v%d refused: %s", self.config.name, target, exc)
            self.store.clear_rollback_request(request_id)
            return None
        counts = self.redis.hgetall(self.dead_counts)
        if counts:  # dead letters are counted model-wide, across rollbacks
            trainer.dead_letters.update({k.decode(): int(v) for k, v in counts.items()})
        previous = self.version
        self.trainer = trainer
        self.dirty = True
        version = self.checkpoint(extra={"parent_version": target, "rolled_back_from": target,
                                         "rolled_back_version": previous,
                                         "rollback_request": request_id})
        self._last_rollback_id = request_id
        self.store.clear_rollback_request(request_id)
        log.warning("%s: rolled back to v%d (was v%d), published as v%d", self.config.name,
                    target, previous, version)
        return version

    def flush_acks(self, trim: bool = False) -> None:
        """XACK what written checkpoints cover, then XTRIM MINID below everything unfinished.

        ``trim`` trims even with nothing to ack (a checkpoint after dead letters only).
        """
        if not self.unacked and not trim:
            return
        pipe = self.redis.pipeline(transaction=False)
        for i in range(0, len(self.unacked), _ACK_CHUNK):
            pipe.xack(self.stream, self.group, *self.unacked[i:i + _ACK_CHUNK])
        pipe.xpending(self.stream, self.group)
        pipe.xinfo_groups(self.stream)
        *_, summary, groups = pipe.execute()
        self.unacked = []
        # An entry the group delivered and that is no longer pending was acked, and acked means
        # covered by a written checkpoint or dead-lettered (or a redelivery of either). So
        # everything below min(smallest pending ID, last delivered ID + 1) is finished -- also
        # a dead letter a crashed predecessor acked after its last checkpoint.
        group = next((g for g in groups if g.get("name") in (self.group, self.group.encode())),
                     None)
        delivered = parse_id(group["last-delivered-id"]) if group else self.high_water
        threshold = (delivered[0], delivered[1] + 1)
        pending = int(summary.get("pending", 0) or 0)
        if pending:
            threshold = min(threshold, parse_id(summary["min"]))
        if threshold > (0, 1):
            self.redis.xtrim(self.stream, minid=format_id(threshold), approximate=False)
        if pending > len(self.ledger) + (self.read_count if self._inflight else 0):
            # Delivered to us but never seen (a reply lost in an outage): read them again.
            self.needs_recovery = True

    # -- metrics ----------------------------------------------------------------------------
    def update_metrics(self) -> None:
        """Refresh the gauges that are not updated per step (cheap; twice a second)."""
        t = self.trainer
        if t is None:
            return
        pre = t.prequential()
        if t.classification:
            self.metrics.accuracy.set(_nan(pre.get("accuracy")))
            self.metrics.window_accuracy.set(_nan(pre.get("window_accuracy")))
        else:
            self.metrics.mae.set(_nan(pre.get("mae")))
            self.metrics.window_mae.set(_nan(pre.get("window_mae")))
        self.metrics.samples_per_second.set(t.samples_per_second())
        if self.last_checkpoint_wall:
            self.metrics.snapshot_age.set(max(0.0, time.time() - self.last_checkpoint_wall))
        try:
            self.metrics.lag.set(self.stream_lag())
        except _REDIS_DOWN:
            raise
        except (ResponseError, KeyError, TypeError, ValueError):
            pass

    def stream_lag(self) -> int:
        """Entries not yet trained: undelivered (the group's lag) plus pending-but-untrained."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xinfo_groups(self.stream)
        pipe.xpending(self.stream, self.group)
        pipe.xlen(self.stream)
        groups, summary, length = pipe.execute()
        group = next(g for g in groups if g.get("name") in (self.group, self.group.encode()))
        pending = int(summary.get("pending", 0) or 0)
        undelivered = group.get("lag")
        if undelivered is None:  # unknown after deletions: everything not pending or trained
            undelivered = max(0, int(length) - pending)
        return max(0, int(undelivered) + pending - len(self.ledger) - len(self.unacked))

    def _set_redis(self, ok: bool) -> None:
        if ok != self.redis_ok:
            self.redis_ok = ok
            self.metrics.redis_up.set(1 if ok else 0)
            if ok:
                log.info("%s: Redis connection is up", self.config.name)

    # -- shutdown ---------------------------------------------------------------------------
    def _shutdown(self) -> None:
        """On stop: checkpoint what is new, ack it, and hand the lease back."""
        if self.trainer is None:
            return
        try:
            self._drain_prefetch()
            if self.dirty:
                self.checkpoint()
            self.flush_acks()
            self._release(keys=[self.lease], args=[self.consumer.encode()])
            self.metrics.lease_held.set(0)
        except _REDIS_DOWN as exc:
            log.warning("%s: Redis unavailable at shutdown (%s); pending entries stay pending "
                        "and the next worker skips what the checkpoint covers", self.config.name,
                        exc)
        except Exception:  # noqa: BLE001 -- shutting down; the checkpoint protocol stays safe
            log.exception("%s: error during shutdown", self.config.name)
        finally:
            try:
                self._close_read_conn()
                if self._fetcher is not None:
                    self._fetcher.shutdown(wait=True)
                self.redis.close()
            except Exception:  # noqa: BLE001
                pass


def _ledger_of(snapshot: Snapshot, key: str = "ledger.ids") -> torch.Tensor:
    """A checkpoint's ledger: an int64 ``(n, 2)`` tensor of ``(ms, seq)``."""
    return snapshot.tensors.get(key, torch.zeros(0, 2, dtype=torch.int64)).reshape(-1, 2)


def _ledger_ids(snapshot: Snapshot, key: str = "ledger.ids") -> set[bytes]:
    """The stream IDs a checkpoint's ledger lists, in Redis' ``b"ms-seq"`` form."""
    return {f"{ms}-{seq}".encode() for ms, seq in _ledger_of(snapshot, key).tolist()}


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


class Worker:
    """Every configured model's :class:`ModelWorker`, one thread each, and the metrics server.

    Args:
        settings: service settings.
        stop: set it to stop every model's loop (each checkpoints and acks first).
    """

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.metrics = WorkerMetrics()
        self.consumer = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.models = {cfg.name: ModelWorker(settings, cfg, self.metrics, self.stop, self.consumer)
                       for cfg in settings.models}
        self.metrics_port: int | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the metrics server and one thread per model; returns at once."""
        if self.settings.worker_metrics_port:
            self.metrics_port = self.metrics.serve(self.settings.worker_metrics_port)
        for name, mw in self.models.items():
            t = threading.Thread(target=mw.run, name=f"train-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float | None = None) -> None:
        """Wait for every model thread to finish (after ``stop`` is set)."""
        for t in self._threads:
            t.join(timeout)
        self.metrics.shutdown()

    def run(self) -> None:
        """Start and block until ``stop`` is set and every model has shut down."""
        self.start()
        while any(t.is_alive() for t in self._threads) and not self.stop.is_set():
            self.stop.wait(0.5)
        self.join()


def run_worker(settings: Settings, stop: threading.Event | None = None) -> None:
    """Train every configured model until ``stop`` is set (the CLI's entry point)."""
    Worker(settings, stop).run()


def main(argv: Iterable[str] | None = None) -> None:
    """``python -m service.worker``: settings from the environment; SIGTERM/SIGINT stop it."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run_worker(settings, stop)


if __name__ == "__main__":
    main()
