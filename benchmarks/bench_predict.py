"""Serving speed: ``POST /predict`` latency and throughput against the app's trivial endpoint.

Starts the real API (``python -m uvicorn --factory service.api:create_app``, one process, as
deployed) on a loopback port with a digits-sized NormProp MLP (64 inputs, ``mlp:256,256``, 10
classes) and drives it with a lean keep-alive HTTP/1.1 load generator (asyncio streams: the
client must cost less than the server, or it measures itself). For each concurrency (1, 16, 64)
it reports p50/p99 latency and requests/s of ``/predict`` (one instance) beside ``GET /healthz``
(no work: the framework's ceiling on this machine). Bounded: at most ``--requests`` requests
and ``--seconds`` seconds per row, after a short warm-up.

It runs the comparison twice: inline compute on the event loop (the default for small models)
and a thread hop for every request (``NP_PREDICT_INLINE_BUDGET_SECONDS=0``). Last, the swap
latency: snapshots are published while one client predicts; from each publication to the first
response that names the new version.

    python -m benchmarks.bench_predict            # ~1.5 minutes on the 2-core CPU machine
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.settings import ModelConfig  # noqa: E402
from service.snapshots import SnapshotStore, build_network, config_fingerprint  # noqa: E402

CFG = ModelConfig(name="default", input_shape=[64], num_classes=10, spec="mlp:256,256")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def publish(store: SnapshotStore, version: int) -> None:
    net = build_network(CFG.model_copy(update={"seed": version}))
    store.write(version, {f"model.{k}": v for k, v in net.state_dict().items()},
                {"fingerprint": config_fingerprint(CFG), "samples_trained": version})


def start_api(data_dir: Path, port: int, inline_budget: float) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NP_")}
    env.update(PYTHONPATH=str(ROOT), NP_DATA_DIR=str(data_dir),
               NP_MODELS=json.dumps([CFG.model_dump(mode="json")]),
               # Predictions never touch Redis; a closed port keeps the benchmark self-contained.
               NP_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
               NP_SNAPSHOT_POLL_SECONDS="0.05",
               NP_PREDICT_INLINE_BUDGET_SECONDS=str(inline_budget))
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory",
                             "service.api:create_app", "--host", "127.0.0.1", "--port",
                             str(port), "--no-access-log", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the API did not start")


def request_bytes(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               req: bytes) -> tuple[int, bytes]:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


def summary(rounds: list[tuple[list[float], int, float]]) -> dict[str, float]:
    """Pool rounds of ``(latencies, errors, elapsed)``: requests/s and latency percentiles."""
    latencies = sorted(v for r in rounds for v in r[0])
    n = len(latencies)
    elapsed = sum(r[2] for r in rounds)
    return {"requests": n, "errors": sum(r[1] for r in rounds),
            "rps": n / elapsed if elapsed > 0 else 0.0,
            "p50_ms": 1000 * latencies[n // 2] if n else float("nan"),
            "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if n else float("nan")}


def compare(port: int, requests: dict[str, bytes], concurrency: int, max_requests: int,
            seconds: float, rounds: int = 4) -> dict[str, dict[str, float]]:
    """Alternate short rounds of each request kind so that both see the same machine: on a
    shared 2-core box a neighbour's burst otherwise lands on one row and not the other."""
    got: dict[str, list[tuple[list[float], int, float]]] = {k: [] for k in requests}
    for _ in range(rounds):
        for name, req in requests.items():
            got[name].append(asyncio.run(load(port, req, concurrency, max_requests // rounds,
                                              seconds / rounds, warmup=0.2)))
    return {name: summary(r) for name, r in got.items()}


async def load(port: int, req: bytes, concurrency: int, max_requests: int, seconds: float,
               warmup: float = 0.5) -> tuple[list[float], int, float]:
    """Closed-loop load: ``concurrency`` connections, each sending back to back; returns
    ``(latencies, errors, measured seconds)``."""
    latencies: list[float] = []
    errors = 0
    state = {"left": max_requests, "measure_from": 0.0, "deadline": 0.0}

    async def conn() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                now = time.perf_counter()
                if now >= state["deadline"] or state["left"] <= 0:
                    return
                status, _ = await _one(reader, writer, req)
                t1 = time.perf_counter()
                if now >= state["measure_from"]:
                    state["left"] -= 1
                    latencies.append(t1 - now)
                    errors += status != 200
        finally:
            writer.close()

    start = time.perf_counter()
    state["measure_from"] = start + warmup
    state["deadline"] = start + warmup + seconds
    await asyncio.gather(*(conn() for _ in range(concurrency)))
    elapsed = min(time.perf_counter(), state["deadline"]) - state["measure_from"]
    return latencies, errors, elapsed


async def swap_latency(port: int, store: SnapshotStore, first: int, swaps: int,
                       body: bytes) -> list[float]:
    """Publication -> first response naming that version, one client predicting throughout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = request_bytes("POST", "/predict", body)
    out = []
    for v in range(first, first + swaps):
        await asyncio.sleep(0.3)
        await asyncio.to_thread(publish, store, v)
        published = time.perf_counter()
        while True:
            _, resp = await _one(reader, writer, req)
            if json.loads(resp)["version"] >= v:
                out.append(time.perf_counter() - published)
                break
    writer.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20_000, help="max requests per row")
    ap.add_argument("--seconds", type=float, default=4.0, help="max seconds per row (in 4 "
                    "alternating rounds)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--swaps", type=int, default=10)
    args = ap.parse_args()

    x = (torch.rand(1, 64) * 16).tolist()
    predict = request_bytes("POST", "/predict", json.dumps({"model": "default",
                                                            "instances": x}).encode())
    trivial = request_bytes("GET", "/healthz")
    print(f"# /predict, digits MLP (64 -> 256 -> 256 -> 10, folded), one instance per request; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python "
          f"{sys.version.split()[0]}")
    print(f"# bounded: <= {args.requests} requests and <= {args.seconds:.0f} s per row in 4 "
          "rounds alternating with the trivial endpoint; loopback, keep-alive, closed loop")
    print(f"# load average before: {os.getloadavg()[0]:.2f} (other tenants share the CPUs)\n")
    print("| compute | concurrency | endpoint | requests/s | p50 ms | p99 ms | errors | "
          "predict/trivial |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        store = SnapshotStore(data_dir / "snapshots", CFG.name)
        publish(store, 1)
        version = 1
        for mode, budget in (("inline", 0.002), ("thread hop", 0.0)):
            port = free_port()
            proc = start_api(data_dir, port, budget)
            try:
                for c in args.concurrency:
                    res = compare(port, {"t": trivial, "p": predict}, c, args.requests,
                                  args.seconds)
                    t, p = res["t"], res["p"]
                    for name, r in (("GET /healthz", t), ("POST /predict", p)):
                        ratio = f"{p['rps'] / t['rps']:.2f}x" if name == "POST /predict" else ""
                        print(f"| {mode} | {c} | {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                              f"{r['p99_ms']:.2f} | {r['errors']} | {ratio} |", flush=True)
                if mode == "inline":
                    body = json.dumps({"instances": x}).encode()
                    lat = asyncio.run(swap_latency(port, store, version + 1, args.swaps, body))
                    version += args.swaps
            finally:
                proc.terminate()
                proc.wait(10)
        print(f"\nswap latency, publication -> first response from the new version "
              f"(poll every 50 ms, {len(lat)} swaps): median {1000 * statistics.median(lat):.0f} "
              f"ms, max {1000 * max(lat):.0f} ms")


if __name__ == "__main__":
    main()
