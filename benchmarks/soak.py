"""Bounded soak: the whole service under a fixed mixed load for a fixed time.

    python benchmarks/soak.py --minutes 5 [--json soak.json]

Starts a private ``redis-server`` (AOF on, ``appendfsync everysec``) on a free loopback port,
the worker (``python -m service.worker``) and the API (``python -m uvicorn --factory
service.api:create_app``) as real processes configured only through ``NP_*`` variables, as
deployed. Then it drives ``POST /ingest`` (``--ingest-rate`` requests/s of ``--batch`` samples
each) and ``POST /predict`` (``--predict-rate`` requests/s, one instance) on an open-loop
schedule: each request is sent at its planned time whatever the previous ones did, with at
most ``--max-inflight`` outstanding per kind (a slot that finds the bound reached is counted as
*skipped*, not sent). Every ``--sample-seconds`` it samples the resident memory (VmRSS) of the
worker, the API and redis-server, the stream (XLEN, the consumer group's undelivered and
pending entries) and the worker's own ``normprop_worker_stream_lag`` gauge.

After the load it waits for the worker to drain (the newest checkpoint covers every accepted
sample, nothing pending, the stream trimmed), stops everything (API, worker, Redis) and
reports. The targets, each PASS or FAIL (the exit code is 1 if any fails):

- errors: every request answered 2xx (no 4xx/5xx, no transport error);
- memory: resident memory of each process grows < ``--max-rss-growth`` % (10) from the end of
  the warm-up (the first 20 % of the run) to the end, each end the median of its last
  ``--rss-window`` fraction; only judged on runs of at least 2 minutes (shorter: reported);
- lag: the worker's stream lag never exceeds ``--max-lag`` samples (default: 10 seconds of
  ingest) and is 0 after draining, the stream is empty (trimmed) and nothing is pending;
- trained == accepted: the newest checkpoint's ``samples_trained`` equals the samples the API
  accepted (202), with no dead letter.
- clean exit: worker and API stop gracefully on SIGTERM (uvicorn re-raises the signal it
  handled, so the API's -15 is clean), no traceback in their logs.

Only loopback traffic; the run is bounded by ``--minutes`` plus the drain timeout. Numbers on
the 2-core CPU machine are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service import keys  # noqa: E402
from service.snapshots import SnapshotError, SnapshotStore  # noqa: E402

MODEL = "soak"
PROCESSES = ("worker", "api", "redis")
#: Runs shorter than this only report memory growth (the warm-up dominates a short run).
MIN_SECONDS_FOR_MEMORY = 120.0


@dataclass
class SoakOptions:
    minutes: float = 5.0
    ingest_rate: float = 50.0        # POST /ingest requests per second
    batch: int = 8                   # samples per ingest request
    predict_rate: float = 100.0      # POST /predict requests per second
    max_inflight: int = 32           # outstanding requests per kind
    features: int = 16
    classes: int = 4
    spec: str = "mlp:64,64"
    sample_seconds: float = 2.0
    warmup_fraction: float = 0.2
    rss_window: float = 0.05         # each end of the RSS comparison: median of this fraction
    max_rss_growth: float = 10.0     # %
    max_lag: int | None = None       # samples; None: 10 s of ingest
    drain_seconds: float = 90.0
    timeout: float = 10.0            # per request
    workdir: Path | None = None      # None: a temporary directory, removed afterwards
    seed: int = 0

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0

    @property
    def lag_bound(self) -> int:
        if self.max_lag is not None:
            return self.max_lag
        return max(1000, int(10 * self.ingest_rate * self.batch))


# -- processes ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (VmRSS from /proc; psutil where /proc has no such file)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    try:
        import psutil
        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # noqa: BLE001 - no psutil, or the process is gone
        return None


class Stack:
    """redis-server (AOF), the worker and the API as child processes in ``workdir``."""

    def __init__(self, opts: SoakOptions, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on the PATH (apt-get install redis-server)")
        self.opts = opts
        self.workdir = workdir
        self.redis_port = free_port()
        self.api_port = free_port()
        self.worker_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.worker_metrics_url = f"http://127.0.0.1:{self.worker_port}/metrics"
        self.data_dir = workdir / "data"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    def model_config(self) -> dict[str, Any]:
        o = self.opts
        return {"name": MODEL, "input_shape": [o.features], "num_classes": o.classes,
                "spec": o.spec, "max_batch": 64, "seed": o.seed}

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NP_")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(NP_REDIS_URL=self.redis_url, NP_DATA_DIR=str(self.data_dir),
                   NP_MODELS=json.dumps([self.model_config()]), NP_DEVICE="cpu",
                   NP_TORCH_THREADS="1", NP_WORKER_METRICS_PORT=str(self.worker_port),
                   NP_CONSUMER_NAME="soak-worker", NP_LOG_LEVEL="WARNING")
        return env

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None) -> None:
        log = open(self.log_path(name), "wb")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def start(self) -> None:
        redis_dir = self.workdir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("redis", ["redis-server", "--port", str(self.redis_port), "--bind",
                              "127.0.0.1", "--dir", str(redis_dir), "--save", "",
                              "--appendonly", "yes", "--appendfsync", "everysec",
                              "--daemonize", "no", "--loglevel", "warning"], None)
        wait_for_port(self.redis_port, self.procs["redis"])
        env = self.env()
        self._spawn("worker", [sys.executable, "-m", "service.worker"], env)
        self._spawn("api", [sys.executable, "-m", "uvicorn", "--factory",
                            "service.api:create_app", "--host", "127.0.0.1", "--port",
                            str(self.api_port), "--no-access-log", "--log-level", "warning"],
                    env)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the API answers /readyz 200 (the worker has published version 1)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(self.api_url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the API was not ready in {timeout}s:\n{self.tail('api')}\n"
                           f"{self.tail('worker')}")

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 3000) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def stop(self) -> dict[str, int | None]:
        """API first, then the worker (it checkpoints), Redis last; the exit codes."""
        codes: dict[str, int | None] = {}
        for name in ("api", "worker", "redis"):
            p = self.procs.get(name)
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            codes[name] = p.returncode
        for log in self._logs:
            log.close()
        return codes


# -- load -----------------------------------------------------------------------------------

@dataclass
class KindStats:
    sent: int = 0
    skipped: int = 0                 # slots that found max_inflight outstanding requests
    status: dict[str, int] = field(default_factory=dict)   # "202", "503", "transport"...
    latencies: list[float] = field(default_factory=list)   # seconds, 2xx answers only
    errors: list[str] = field(default_factory=list)        # the first few, for the report
    error_count: int = 0
    accepted: int = 0                # ingest: samples the API accepted

    def record_error(self, what: str) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(what)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def make_bodies(opts: SoakOptions) -> tuple[list[bytes], list[bytes]]:
    """Pre-encoded request bodies (the load generator should cost little): Gaussian blobs."""
    rng = np.random.default_rng(opts.seed)
    centres = rng.normal(0, 3, size=(opts.classes, opts.features))
    ingest, predict = [], []
    for _ in range(512):
        y = rng.integers(0, opts.classes, size=opts.batch)
        x = centres[y] + rng.normal(0, 1, size=(opts.batch, opts.features))
        samples = [{"x": [round(float(v), 4) for v in xi], "y": int(yi)} for xi, yi in zip(x, y)]
        ingest.append(json.dumps({"model": MODEL, "samples": samples}).encode())
        xp = centres[rng.integers(0, opts.classes)] + rng.normal(0, 1, size=opts.features)
        predict.append(json.dumps({"model": MODEL,
                                   "instances": [[round(float(v), 4) for v in xp]]}).encode())
    return ingest, predict


async def _one(client: httpx.AsyncClient, kind: str, body: bytes, stats: KindStats,
               inflight: dict[str, int]) -> None:
    inflight[kind] += 1
    t0 = time.perf_counter()
    try:
        r = await client.post("/" + kind, content=body,
                              headers={"content-type": "application/json"})
        dt = time.perf_counter() - t0
        key = str(r.status_code)
        stats.status[key] = stats.status.get(key, 0) + 1
        if 200 <= r.status_code < 300:
            stats.latencies.append(dt)
            if kind == "ingest":
                stats.accepted += int(r.json()["accepted"])
            elif not isinstance(r.json().get("version"), int):
                stats.record_error(f"predict answered without a version: {r.text[:200]}")
        else:
            stats.record_error(f"{kind} {r.status_code}: {r.text[:200]}")
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        stats.status["transport"] = stats.status.get("transport", 0) + 1
        stats.record_error(f"{kind} {type(exc).__name__}: {exc}"[:300])
    finally:
        inflight[kind] -= 1


async def _drive(client: httpx.AsyncClient, kind: str, rate: float, bodies: list[bytes],
                 stats: KindStats, inflight: dict[str, int], start: float, end: float,
                 max_inflight: int, tasks: set[asyncio.Task[None]]) -> None:
    """Open loop: request i is due at ``start + i / rate``; late slots are sent at once."""
    loop = asyncio.get_running_loop()
    i = 0
    while True:
        due = start + i / rate
        if due >= end:
            return
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if inflight[kind] >= max_inflight:
            stats.skipped += 1
        else:
            stats.sent += 1
            t = asyncio.create_task(_one(client, kind, bodies[i % len(bodies)], stats,
                                         inflight))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        i += 1


def _worker_gauges(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model") == MODEL and s.name in (
                    "normprop_worker_stream_lag", "normprop_worker_samples_trained_total",
                    "normprop_worker_snapshot_version"):
                out[s.name] = float(s.value)
    return out


def stream_state(r: redis.Redis) -> dict[str, int | None]:
    """XLEN of the model's stream and its consumer group's undelivered and pending counts."""
    stream = keys.samples_stream(MODEL)
    pipe = r.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)
    pipe.xlen(keys.dead_letter_stream(MODEL))
    pipe.info("memory")
    try:
        xlen, groups, dead, mem = pipe.execute()
    except redis.ResponseError:  # no stream or group yet
        return {"xlen": 0, "undelivered": None, "pending": None, "dead": 0}
    group = next((g for g in groups if g.get("name") in (keys.CONSUMER_GROUP,
                                                         keys.CONSUMER_GROUP.encode())), None)
    undelivered = group.get("lag") if group else None
    return {"xlen": int(xlen), "undelivered": None if undelivered is None else int(undelivered),
            "pending": int(group["pending"]) if group else None, "dead": int(dead),
            "redis_used_memory": int(mem.get("used_memory", 0))}


async def _sample(stack: Stack, r: redis.Redis, client: httpx.AsyncClient, t0: float,
                  samples: list[dict[str, Any]]) -> None:
    point: dict[str, Any] = {"t": round(time.monotonic() - t0, 2)}
    for name in PROCESSES:
        p = stack.procs.get(name)
        point[f"rss_{name}"] = rss_bytes(p.pid) if p is not None else None
    try:
        point.update(await asyncio.to_thread(stream_state, r))
    except redis.RedisError as exc:
        point["redis_error"] = str(exc)
    try:
        text = (await client.get(stack.worker_metrics_url, timeout=2.0)).text
        gauges = _worker_gauges(text)
        point["worker_lag"] = gauges.get("normprop_worker_stream_lag")
        point["worker_trained"] = gauges.get("normprop_worker_samples_trained_total")
    except httpx.HTTPError:
        point["worker_lag"] = None
    samples.append(point)


async def _monitor(stack: Stack, r: redis.Redis, every: float, stop: asyncio.Event,
                   samples: list[dict[str, Any]], progress: bool, total: float) -> None:
    t0 = time.monotonic()
    async with httpx.AsyncClient() as client:
        while not stop.is_set():
            await _sample(stack, r, client, t0, samples)
            if progress:
                s = samples[-1]
                mb = "  ".join(f"{n} {s[f'rss_{n}'] / 2**20:.0f}MiB" for n in PROCESSES
                               if s.get(f"rss_{n}"))
                print(f"[soak] {s['t']:6.0f}/{total:.0f}s  lag {s.get('worker_lag')}  "
                      f"xlen {s.get('xlen')}  {mb}", file=sys.stderr, flush=True)
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass


async def _load(stack: Stack, opts: SoakOptions, r: redis.Redis, progress: bool
                ) -> tuple[dict[str, KindStats], list[dict[str, Any]], float]:
    ingest_bodies, predict_bodies = make_bodies(opts)
    stats = {"ingest": KindStats(), "predict": KindStats()}
    inflight = {"ingest": 0, "predict": 0}
    samples: list[dict[str, Any]] = []
    tasks: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=2 * opts.max_inflight + 4,
                          max_keepalive_connections=2 * opts.max_inflight + 4)
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=opts.timeout,
                                 limits=limits) as client:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.1
        end = start + opts.seconds
        monitor = asyncio.create_task(_monitor(stack, r, opts.sample_seconds, stop, samples,
                                               progress, opts.seconds))
        t_start = time.monotonic()
        await asyncio.gather(
            _drive(client, "ingest", opts.ingest_rate, ingest_bodies, stats["ingest"], inflight,
                   start, end, opts.max_inflight, tasks),
            _drive(client, "predict", opts.predict_rate, predict_bodies, stats["predict"],
                   inflight, start, end, opts.max_inflight, tasks))
        if tasks:
            await asyncio.wait(set(tasks), timeout=opts.timeout + 5)
        elapsed = time.monotonic() - t_start
        stop.set()
        await monitor
    return stats, samples, elapsed


# -- draining and the verdict ---------------------------------------------------------------

def newest_checkpoint(store: SnapshotStore) -> dict[str, Any]:
    """The newest version's metadata (retried: retention may prune what was just listed)."""
    for _ in range(20):
        v = store.latest_version()
        if v is None:
            return {}
        try:
            return store.read_header_metadata(v)
        except (SnapshotError, FileNotFoundError, OSError, ValueError):
            time.sleep(0.05)
    return {}


def worker_gauges(stack: Stack) -> dict[str, float]:
    try:
        return _worker_gauges(httpx.get(stack.worker_metrics_url, timeout=2.0).text)
    except httpx.HTTPError:
        return {}


def drain(stack: Stack, r: redis.Redis, accepted: int, timeout: float) -> dict[str, Any]:
    """Wait until the newest checkpoint covers every accepted sample, the stream is empty and
    the worker's own lag gauge (refreshed twice a second) reads 0."""
    store = SnapshotStore(stack.data_dir / "snapshots", MODEL)
    t0 = time.monotonic()
    state: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    gauges: dict[str, float] = {}
    while True:
        meta = newest_checkpoint(store)
        state = stream_state(r)
        gauges = worker_gauges(stack)
        done = (meta.get("samples_trained") == accepted and state["pending"] == 0
                and state["undelivered"] == 0 and state["xlen"] == 0
                and gauges.get("normprop_worker_stream_lag") == 0)
        if done or time.monotonic() - t0 > timeout:
            break
        time.sleep(0.2)
    return {"drained": done, "drain_seconds": round(time.monotonic() - t0, 2),
            "samples_trained": meta.get("samples_trained"), "version": meta.get("version"),
            "dead_letters": meta.get("dead_letters") or {}, "skipped_steps":
            meta.get("skipped_steps") or {},
            "worker_lag": gauges.get("normprop_worker_stream_lag"),
            "worker_samples_trained": _int(gauges.get("normprop_worker_samples_trained_total")),
            **{f"final_{k}": v for k, v in state.items()}}


def _window_median(samples: list[dict[str, Any]], key: str, lo: float, hi: float) -> float | None:
    vals = [s[key] for s in samples if lo <= s["t"] <= hi and s.get(key)]
    if not vals:  # a short run: the sample nearest the window's end
        near = [s for s in samples if s.get(key)]
        if not near:
            return None
        return float(min(near, key=lambda s: abs(s["t"] - hi))[key])
    return float(statistics.median(vals))


def summarise(opts: SoakOptions, stats: dict[str, KindStats], samples: list[dict[str, Any]],
              elapsed: float, drained: dict[str, Any], exit_codes: dict[str, int | None],
              tracebacks: dict[str, str] | None = None) -> dict[str, Any]:
    T = opts.seconds
    warm = opts.warmup_fraction * T
    requests: dict[str, Any] = {}
    for kind, s in stats.items():
        lat = s.latencies
        requests[kind] = {
            "scheduled": s.sent + s.skipped, "sent": s.sent, "skipped": s.skipped,
            "status": dict(sorted(s.status.items())), "errors": s.error_count,
            "first_errors": s.errors,
            "rate_per_s": round(s.sent / elapsed, 2) if elapsed else None,
            "p50_ms": _ms(percentile(lat, 50)), "p99_ms": _ms(percentile(lat, 99)),
            "max_ms": _ms(max(lat) if lat else None),
        }
    requests["ingest"]["samples_accepted"] = stats["ingest"].accepted
    memory: dict[str, Any] = {}
    for name in PROCESSES:
        key = f"rss_{name}"
        series = [s[key] for s in samples if s.get(key)]
        base = _window_median(samples, key, warm - opts.rss_window * T, warm)
        final = _window_median(samples, key, T - opts.rss_window * T, T + 60)
        growth = (100.0 * (final - base) / base) if base and final else None
        memory[name] = {"start_mib": _mib(series[0] if series else None),
                        "after_warmup_mib": _mib(base), "end_mib": _mib(final),
                        "peak_mib": _mib(max(series) if series else None),
                        "growth_pct": None if growth is None else round(growth, 2)}
    used = "redis_used_memory"
    memory["redis"]["used_memory_after_warmup_mib"] = _mib(
        _window_median(samples, used, warm - opts.rss_window * T, warm))
    memory["redis"]["used_memory_end_mib"] = _mib(
        _window_median(samples, used, T - opts.rss_window * T, T + 60))
    lags = [s["worker_lag"] for s in samples if s.get("worker_lag") is not None]
    xlens = [s["xlen"] for s in samples if s.get("xlen") is not None]
    unacked = [s["undelivered"] + s["pending"] for s in samples
               if s.get("undelivered") is not None and s.get("pending") is not None]
    lag = {"worker_lag_max": max(lags) if lags else None,
           "worker_lag_end_of_load": lags[-1] if lags else None,
           "xlen_max": max(xlens) if xlens else None,
           "unacked_max": max(unacked) if unacked else None,
           "final_worker_lag": drained.get("worker_lag"),
           "final_xlen": drained.get("final_xlen"), "final_pending": drained.get("final_pending"),
           "final_undelivered": drained.get("final_undelivered"), "bound": opts.lag_bound}
    accepted = stats["ingest"].accepted
    dead = sum(int(v) for v in drained["dead_letters"].values())
    result: dict[str, Any] = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "elapsed_seconds": round(elapsed, 2),
        "requests": requests, "memory": memory, "lag": lag,
        "training": {"accepted": accepted, "trained": drained["samples_trained"],
                     "worker_counter": drained.get("worker_samples_trained"),
                     "drained": drained["drained"], "drain_seconds": drained["drain_seconds"],
                     "dead_letters": dead, "skipped_steps": drained["skipped_steps"],
                     "final_version": drained["version"]},
        "exit_codes": exit_codes, "tracebacks": tracebacks or {},
        "samples": samples,
    }
    result["targets"] = evaluate(result, opts)
    result["passed"] = all(t["passed"] is not False for t in result["targets"].values())
    return result


def evaluate(result: dict[str, Any], opts: SoakOptions) -> dict[str, dict[str, Any]]:
    """Each target: ``passed`` True/False (None: not judged on this run) and what was seen."""
    req, mem, lag, tr = result["requests"], result["memory"], result["lag"], result["training"]
    errors = sum(req[k]["errors"] for k in ("ingest", "predict"))
    targets: dict[str, dict[str, Any]] = {
        "zero_errors": {"passed": errors == 0, "seen": errors},
    }
    judged = opts.seconds >= MIN_SECONDS_FOR_MEMORY
    for name in PROCESSES:
        g = mem[name]["growth_pct"]
        targets[f"rss_growth_{name}"] = {
            "passed": (g is not None and g < opts.max_rss_growth) if judged else None,
            "seen": g, "limit_pct": opts.max_rss_growth}
    targets["lag_bounded"] = {
        "passed": (lag["worker_lag_max"] is not None and lag["worker_lag_max"] <= opts.lag_bound
                   and tr["drained"]),
        "seen": {"max": lag["worker_lag_max"], "final": lag["final_worker_lag"],
                 "final_xlen": lag["final_xlen"], "final_pending": lag["final_pending"]},
        "bound": opts.lag_bound}
    targets["trained_equals_accepted"] = {
        "passed": tr["trained"] == tr["accepted"] == tr["worker_counter"]
        and tr["accepted"] > 0 and tr["dead_letters"] == 0,
        "seen": {"accepted": tr["accepted"], "trained": tr["trained"],
                 "worker_counter": tr["worker_counter"], "dead_letters": tr["dead_letters"]}}
    # uvicorn re-raises the SIGTERM it handled after its graceful shutdown: -15 is clean.
    codes = result["exit_codes"]
    targets["clean_exit"] = {
        "passed": codes.get("worker") == 0 and codes.get("api") in (0, -signal.SIGTERM)
        and not result.get("tracebacks"),
        "seen": {**codes, "tracebacks_in": sorted(result.get("tracebacks", {}))}}
    return targets


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000.0 * v, 2)


def _mib(v: float | None) -> float | None:
    return None if v is None else round(v / 2**20, 1)


def run_soak(opts: SoakOptions, progress: bool = False) -> dict[str, Any]:
    """Start the stack, run the load, drain, stop; the result (see :func:`summarise`)."""
    tmp = None
    workdir = opts.workdir
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="np-soak-")
        workdir = Path(tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):  # an old AOF and snapshots would be restored and miscounted
        raise ValueError(f"the soak's workdir {workdir} is not empty")
    stack = Stack(opts, workdir)
    exit_codes: dict[str, int | None] = {}
    try:
        stack.start()
        stack.wait_ready()
        r = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
        try:
            if progress:
                print(f"[soak] {opts.minutes:g} min: {opts.ingest_rate:g} ingest/s x "
                      f"{opts.batch} samples + {opts.predict_rate:g} predict/s "
                      f"(API {stack.api_url}, logs in {workdir})", file=sys.stderr, flush=True)
            stats, samples, elapsed = asyncio.run(_load(stack, opts, r, progress))
            stack.check_alive()
            drained = drain(stack, r, stats["ingest"].accepted, opts.drain_seconds)
        finally:
            r.close()
    except BaseException:
        stack.stop()
        for name in ("api", "worker"):
            print(f"--- {name} log ---\n{stack.tail(name)}", file=sys.stderr)
        raise
    exit_codes = stack.stop()
    tracebacks = {n: stack.tail(n, 2000) for n in ("api", "worker")
                  if "Traceback" in stack.tail(n, 10_000_000)}
    result = summarise(opts, stats, samples, elapsed, drained, exit_codes, tracebacks)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def format_report(result: dict[str, Any]) -> str:
    req, mem, lag, tr = result["requests"], result["memory"], result["lag"], result["training"]
    o = result["options"]
    lines = [f"soak: {o['minutes']:g} min, {o['ingest_rate']:g} ingest/s x {o['batch']} samples "
             f"+ {o['predict_rate']:g} predict/s, max {o['max_inflight']} in flight per kind "
             f"({result['elapsed_seconds']} s of load)", ""]
    lines.append(f"{'kind':8} {'sent':>7} {'skipped':>7} {'rate/s':>7} {'errors':>6} "
                 f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  status")
    for kind in ("ingest", "predict"):
        q = req[kind]
        lines.append(f"{kind:8} {q['sent']:>7} {q['skipped']:>7} {q['rate_per_s']:>7} "
                     f"{q['errors']:>6} {q['p50_ms']!s:>8} {q['p99_ms']!s:>8} "
                     f"{q['max_ms']!s:>8}  {q['status']}")
    lines += ["", f"{'process':8} {'start MiB':>9} {'warm MiB':>9} {'end MiB':>9} "
                  f"{'peak MiB':>9} {'growth %':>9}"]
    for name in PROCESSES:
        m = mem[name]
        lines.append(f"{name:8} {m['start_mib']!s:>9} {m['after_warmup_mib']!s:>9} "
                     f"{m['end_mib']!s:>9} {m['peak_mib']!s:>9} {m['growth_pct']!s:>9}")
    lines += ["", f"stream lag (worker gauge): max {lag['worker_lag_max']}, at the end of the "
                  f"load {lag['worker_lag_end_of_load']}, after draining "
                  f"{lag['final_worker_lag']} (bound {lag['bound']}); XLEN max "
                  f"{lag['xlen_max']}, final {lag['final_xlen']}; undelivered+pending max "
                  f"{lag['unacked_max']}, final pending {lag['final_pending']}",
              f"redis used_memory: {mem['redis']['used_memory_after_warmup_mib']} MiB after "
              f"warm-up, {mem['redis']['used_memory_end_mib']} MiB at the end",
              f"training: accepted {tr['accepted']}, trained {tr['trained']} (newest "
              f"checkpoint; worker counter {tr['worker_counter']}, drained in "
              f"{tr['drain_seconds']} s, final version v{tr['final_version']}), dead letters "
              f"{tr['dead_letters']}", "", "targets:"]
    for name, t in result["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        lines.append(f"  {verdict}  {name}: {t['seen']}")
    for kind in ("ingest", "predict"):
        for e in req[kind]["first_errors"][:5]:
            lines.append(f"  error: {e}")
    lines.append("PASSED" if result["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SoakOptions()
    ap.add_argument("--minutes", type=float, default=d.minutes, help="load duration")
    ap.add_argument("--ingest-rate", type=float, default=d.ingest_rate,
                    help="POST /ingest requests per second")
    ap.add_argument("--batch", type=int, default=d.batch, help="samples per ingest request")
    ap.add_argument("--predict-rate", type=float, default=d.predict_rate,
                    help="POST /predict requests per second (one instance each)")
    ap.add_argument("--max-inflight", type=int, default=d.max_inflight,
                    help="outstanding requests per kind (a slot past it is skipped)")
    ap.add_argument("--sample-seconds", type=float, default=d.sample_seconds,
                    help="how often RSS and lag are sampled")
    ap.add_argument("--max-rss-growth", type=float, default=d.max_rss_growth,
                    help="target: RSS growth after warm-up, %%")
    ap.add_argument("--max-lag", type=int, default=None,
                    help="target: worker stream lag bound in samples (default 10 s of ingest)")
    ap.add_argument("--drain-seconds", type=float, default=d.drain_seconds)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep logs, Redis AOF and snapshots here (default: a temporary dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the full result here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = ap.parse_args(argv)
    opts = SoakOptions(minutes=a.minutes, ingest_rate=a.ingest_rate, batch=a.batch,
                       predict_rate=a.predict_rate, max_inflight=a.max_inflight,
                       sample_seconds=a.sample_seconds, max_rss_growth=a.max_rss_growth,
                       max_lag=a.max_lag, drain_seconds=a.drain_seconds, workdir=a.workdir)
    result = run_soak(opts, progress=not a.quiet)
    print(format_report(result))
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
