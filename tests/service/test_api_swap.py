"""Hot swap under load: 20+ swaps while clients predict concurrently over HTTP.

Checks the swap invariants (DESIGN section 3): no request fails; within the API process
versions never go backwards (per client, and across clients in real time); every response names
a version that was published (never the corrupt one) and its probabilities are exactly that
version's, so a request is answered wholly by one version; a corrupt snapshot is counted and
skipped while the old one keeps serving; the swap latency from publication to the first
response from the new version stays under a second.
"""

from __future__ import annotations

import bisect
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch
from test_api_support import (ApiProcess, expected_outputs, metric_samples, metric_value,
                              np_env, publish)

from service.settings import ModelConfig
from service.snapshots import SnapshotStore

CFG = ModelConfig(name="default", input_shape=[64], num_classes=10, spec="mlp:64,64")
VERSIONS = 30          # v1 at start, then v2..v30 published under load
CORRUPT = 12           # this one has a NaN weight: must be refused, never served
CLIENTS = 6
PUBLISH_EVERY = 0.15


def test_swaps_under_concurrent_load(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = SnapshotStore(tmp_path / "data" / "snapshots", CFG.name)
    publish(store, CFG, 1)
    env = np_env(redis_server.url, tmp_path / "data", models=[CFG.model_dump(mode="json")],
                 snapshot_poll_seconds="0.05")
    api = ApiProcess(env, tmp_path / "api.log")
    try:
        api.wait_ready(path="/readyz")
        x = torch.randn(2, 64) * 3
        published: dict[int, float] = {1: 0.0}
        results: list[list[tuple[float, float, int, list[list[float]]]]] = [[] for _ in range(CLIENTS)]
        failures: list[str] = []
        done = threading.Event()

        def client(i: int) -> None:
            with httpx.Client(base_url=api.url, timeout=10) as http:
                while not done.is_set():
                    t0 = time.monotonic()
                    try:
                        r = http.post("/predict", json={"instances": x.tolist()})
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    t1 = time.monotonic()
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    body = r.json()
                    results[i].append((t0, t1, body["version"],
                                       [p["probabilities"] for p in body["predictions"]]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            for v in range(2, VERSIONS + 1):
                time.sleep(PUBLISH_EVERY)
                publish(store, CFG, v, corrupt=(v == CORRUPT))
                published[v] = time.monotonic()
            time.sleep(1.0)
        finally:
            done.set()
            for t in threads:
                t.join(30)

        assert not failures, failures[:5]
        everything = sorted((r for rs in results for r in rs), key=lambda r: r[0])
        assert len(everything) > 200, len(everything)

        # Per client: versions never go backwards.
        for rs in results:
            versions = [r[2] for r in rs]
            assert versions == sorted(versions)
        # Across clients: a request that started after another ended never sees an older one.
        by_end = sorted(everything, key=lambda r: r[1])
        ends = [r[1] for r in by_end]
        best_so_far = []
        top = 0
        for r in by_end:
            top = max(top, r[2])
            best_so_far.append(top)
        for t0, _, version, _ in everything:
            k = bisect.bisect_left(ends, t0)
            if k:
                assert version >= best_so_far[k - 1]

        seen = sorted({r[2] for r in everything})
        assert CORRUPT not in seen
        assert set(seen) <= set(published)
        assert seen[-1] == VERSIONS
        assert len(seen) >= 20, seen

        # Every response is exactly its version's function.
        expected = {v: expected_outputs(store, CFG, v, x) for v in seen}
        for _, _, version, probs in everything:
            assert torch.allclose(torch.tensor(probs), expected[version], atol=1e-4)

        # Publication -> first response from that version (or a later one).
        latencies = []
        for v in range(2, VERSIONS + 1):
            if v == CORRUPT:
                continue
            first = next(r[1] for r in by_end if r[2] >= v)
            latencies.append(first - published[v])
        median, worst = statistics.median(latencies), max(latencies)
        print(f"\nswap latency publication->first response: median {median * 1000:.0f} ms, "
              f"max {worst * 1000:.0f} ms over {len(latencies)} swaps; "
              f"{len(everything)} requests, 0 failed")
        assert median <= 1.0 and worst <= 3.0

        m = metric_samples(httpx.get(api.url + "/metrics").text)
        assert metric_value(m, "normprop_api_snapshot_load_failures_total", model="default") == 1
        swaps = metric_value(m, "normprop_api_snapshot_swaps_total", model="default")
        assert swaps is not None and swaps >= 20
        assert metric_value(m, "normprop_api_snapshot_version", model="default") == VERSIONS
        info = httpx.get(api.url + "/models/default").json()
        assert info["version"] == VERSIONS
    finally:
        api.stop()


def test_corrupt_latest_at_startup_falls_back(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Starting on a corrupt newest snapshot serves the newest valid one instead."""
    store = SnapshotStore(tmp_path / "data" / "snapshots", CFG.name)
    publish(store, CFG, 3)
    publish(store, CFG, 4, corrupt=True)
    env = np_env(redis_server.url, tmp_path / "data", models=[CFG.model_dump(mode="json")])
    api = ApiProcess(env, tmp_path / "api.log")
    try:
        api.wait_ready(path="/readyz")
        r = httpx.post(api.url + "/predict", json={"instances": [[0.0] * 64]})
        assert r.json()["version"] == 3
        m = metric_samples(httpx.get(api.url + "/metrics").text)
        assert metric_value(m, "normprop_api_snapshot_load_failures_total", model="default") == 1
        info = httpx.get(api.url + "/models/default").json()
        assert info["version"] == 3 and "v4" in info["last_error"]
    finally:
        api.stop()
