"""``Idempotency-Key`` on ``POST /ingest``: a retried request enters the stream once.

The API never retries its own write (a retry after a timeout could run twice), so a client
that hears 503 ``write_unconfirmed`` -- or loses the connection -- does not know whether its
samples were written. With a key, retrying is safe: the write and its record are one Lua
script, and a second request with the key gets the first one's IDs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.exceptions

from service import keys
from service.api import _redis_client
from service.codec import EntryCodec
from service.routes_ingest import IdempotencyConflict, write_idempotent
from service.settings import ModelConfig, Settings

from test_api_support import ApiProcess, metric_samples, metric_value, np_env

CFG = ModelConfig(name="default", input_shape=[4], num_classes=3, spec="mlp:8")
TTL = 2.0


@pytest.fixture
def api(redis_server, tmp_path: Path) -> Iterator[tuple[httpx.Client, redis.Redis, ApiProcess]]:  # type: ignore[no-untyped-def]
    env = np_env(redis_server.url, tmp_path / "data", models=[CFG.model_dump(mode="json")],
                 ingest_idempotency_ttl_seconds=str(TTL))
    proc = ApiProcess(env, tmp_path / "api.log")
    client = redis.Redis.from_url(redis_server.url)
    http = httpx.Client(base_url=proc.url, timeout=10)
    try:
        proc.wait_ready()
        yield http, client, proc
    finally:
        http.close()
        proc.stop()
        client.close()


def _body(*labels: int) -> dict:
    return {"model": "default", "samples": [{"x": [0.5, 1.0, -1.0, float(y)], "y": y}
                                            for y in labels]}


def _xlen(client: redis.Redis) -> int:
    return int(client.xlen(keys.samples_stream("default")))


def test_a_retry_with_the_same_key_writes_once(api) -> None:  # type: ignore[no-untyped-def]
    http, client, _ = api
    first = http.post("/ingest", json=_body(0, 1, 2), headers={"Idempotency-Key": "batch-17"})
    again = http.post("/ingest", json=_body(0, 1, 2), headers={"Idempotency-Key": "batch-17"})
    assert first.status_code == again.status_code == 202
    assert first.json()["replayed"] is False and again.json()["replayed"] is True
    assert again.json()["ids"] == first.json()["ids"] and len(first.json()["ids"]) == 3
    assert _xlen(client) == 3
    entries = client.xrange(keys.samples_stream("default"))
    assert [e[0].decode() for e in entries] == first.json()["ids"]
    # Counted once as accepted.
    accepted = metric_value(metric_samples(http.get("/metrics").text),
                            "normprop_api_ingest_accepted_total", model="default")
    assert accepted == 3
    # Another key, or none, writes again.
    assert http.post("/ingest", json=_body(0, 1, 2),
                     headers={"Idempotency-Key": "batch-18"}).json()["replayed"] is False
    assert http.post("/ingest", json=_body(0, 1, 2)).json()["replayed"] is False
    assert _xlen(client) == 9


def test_a_key_reused_for_other_samples_is_refused(api) -> None:  # type: ignore[no-untyped-def]
    http, client, _ = api
    assert http.post("/ingest", json=_body(1), headers={"Idempotency-Key": "k"}).status_code == 202
    resp = http.post("/ingest", json=_body(2), headers={"Idempotency-Key": "k"})
    assert resp.status_code == 422 and resp.json()["error"] == "idempotency_key_reused"
    assert "nothing was written" in resp.json()["message"]
    assert _xlen(client) == 1


def test_bad_keys_are_400_and_write_nothing(api) -> None:  # type: ignore[no-untyped-def]
    http, client, proc = api
    for key in ("x" * 201, ""):
        resp = http.post("/ingest", json=_body(1), headers={"Idempotency-Key": key})
        assert resp.status_code == 400, (key, resp.text)
        assert resp.json()["error"] == "bad_idempotency_key"
    assert _xlen(client) == 0


def test_the_key_is_forgotten_after_its_ttl(api) -> None:  # type: ignore[no-untyped-def]
    http, client, _ = api
    headers = {"Idempotency-Key": "short-lived"}
    assert http.post("/ingest", json=_body(1), headers=headers).json()["replayed"] is False
    assert client.pttl(keys.ingest_request("default", _digest("short-lived"))) <= TTL * 1000
    threading.Event().wait(TTL + 0.3)
    assert http.post("/ingest", json=_body(1), headers=headers).json()["replayed"] is False
    assert _xlen(client) == 2


def _digest(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def test_a_write_whose_reply_was_lost_is_retried_safely(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Redis stalls longer than the socket timeout while the write is in flight: the client
    hears a timeout (the API answers 503 write_unconfirmed), Redis runs the script when it
    wakes, and the retry with the same key writes nothing and returns the IDs it wrote."""
    timeout = 0.5
    settings = Settings(redis_url=redis_server.url, redis_socket_timeout=timeout,
                        redis_connect_timeout=timeout, data_dir=tmp_path, models=[CFG])
    codec = EntryCodec(CFG)
    entries = [codec.encode([0.1, 0.2, 0.3, float(y)], y, binary=True) for y in (0, 1, 2, 1)]
    stream = keys.samples_stream("default")
    record = keys.ingest_request("default", _digest("order-1"))
    check = redis.Redis.from_url(redis_server.url)

    async def scenario() -> tuple[str, tuple[bool, list[str]], tuple[bool, list[str]]]:
        writer = _redis_client(settings, retries=0)  # what ApiState.redis_writes is
        try:
            # Loads the script (a first EVALSHA answers NOSCRIPT) on a live connection.
            await write_idempotent(writer, stream, keys.ingest_request("default", "warm"),
                                   entries[:1], 60)
            redis_server.pause()
            wake = threading.Timer(1.5 * timeout, redis_server.resume)
            wake.start()
            try:
                await write_idempotent(writer, stream, record, entries, 60)
                outcome = "ok"
            except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError) as exc:
                outcome = type(exc).__name__
            finally:
                wake.join()
            await asyncio.sleep(0.3)  # Redis runs what the timed-out connection had sent
            retry = await write_idempotent(writer, stream, record, entries, 60)
            third = await write_idempotent(writer, stream, record, entries, 60)
            with pytest.raises(IdempotencyConflict):
                await write_idempotent(writer, stream, record, entries[:2], 60)
            return outcome, retry, third
        finally:
            await writer.aclose()

    outcome, retry, third = asyncio.run(scenario())
    assert outcome == "TimeoutError"  # the caller could not know the write had happened
    written = [e[0].decode() for e in check.xrange(stream)][1:]  # after the warm-up entry
    assert len(written) == 4  # once, not twice
    assert retry == (True, written) and third == (True, written)
    check.close()
