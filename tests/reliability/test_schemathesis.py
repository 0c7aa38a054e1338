"""Schemathesis against the API's own OpenAPI schema: a real uvicorn process and redis-server.

Every operation in ``/openapi.json`` gets generated requests (schema examples, the coverage
phase's boundary and invalid values, then random fuzzing, valid and invalid), twice: once with
the right API key for its route (X-API-Key or Authorization: Bearer, alternately) and once
without one or with a wrong one. Each response must

* not be a 5xx (``not_a_server_error``),
* have a status the schema declares for the operation (``status_code_conformance``),
* have the declared content type (``content_type_conformance``) and headers
  (``response_headers_conformance``),
* match the declared body schema (``response_schema_conformance``).

The API runs with a 4 kB body limit, 16 instances per request and a backlog of 8, so that
generated requests reach 413, 422 and 429 too. The last test counts what was sent: at least
:data:`MIN_REQUESTS` requests over every operation in the schema (none missing), and how many
of each status came back. Run it with ``-s`` to see the table; the ``slow`` variant sends
about six times as many (``NP_SCHEMATHESIS_EXAMPLES`` and ``NP_SCHEMATHESIS_SLOW_EXAMPLES``
change the examples per operation)::

    python3 -m pytest -q -s tests/reliability/test_schemathesis.py
    python3 -m pytest -q -s -m slow tests/reliability/test_schemathesis.py
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from typing import Any, Iterator

import pytest
import schemathesis
from _hostile_helpers import KEYS, MODELS, LiveApi, key_for, live_api
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_headers_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
#: Generated requests the default run must send, over every operation of the schema.
MIN_REQUESTS = 1000
#: Examples per operation and run (hypothesis's max_examples for the fuzzing phase; the
#: examples and coverage phases add their own).
EXAMPLES = int(os.environ.get("NP_SCHEMATHESIS_EXAMPLES", "50"))
SLOW_EXAMPLES = int(os.environ.get("NP_SCHEMATHESIS_SLOW_EXAMPLES", "1000"))

#: (run, "METHOD /path", status) -> responses.
SENT: Counter[tuple[str, str, int]] = Counter()
_alternate = itertools.count()
_slow_turn = itertools.count()


@pytest.fixture(scope="module")
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[LiveApi]:
    # A small body limit, so generated bodies can reach it (413 is declared on every route
    # with a body); a small backlog, so ingest reaches 429.
    with live_api(request, tmp_path_factory.mktemp("schemathesis"), max_body_bytes="4096",
                  max_instances="16", max_backlog="8") as live:
        # The id of the schema's /label examples awaits a label (202, then 409) on both
        # label-enabled models.
        for cfg in MODELS:
            if cfg.label_ttl_seconds is not None:
                resp = live.http.post("/predict", headers={"X-API-Key": KEYS["predict"]}, json={
                    "model": cfg.name, "instances": [[0.0] * cfg.num_features],
                    "ids": ["an id /predict returned"]})
                assert resp.status_code == 200, resp.text
        yield live


@pytest.fixture(scope="module")
def openapi(api: LiveApi) -> Any:
    return schemathesis.openapi.from_url(f"{api.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("openapi")


def _headers(case: Any, keyed: bool) -> dict[str, str]:
    """The route's key (keyed), or none or a wrong one, as X-API-Key or a bearer token."""
    role = key_for(case.operation.path)
    turn = next(_alternate)
    if role is None:
        return {}
    if keyed:
        key = KEYS[role]
    elif turn % 3 == 0:
        return {}
    else:
        # Another role's key is a wrong key too.
        key = KEYS["admin" if role != "admin" else "ingest"] if turn % 3 == 1 else "wrong-key"
    return {"X-API-Key": key} if turn % 2 else {"Authorization": f"Bearer {key}"}


def _run(run: str, case: Any, api: LiveApi, keyed: bool) -> None:
    headers = _headers(case, keyed)
    if headers and case.headers:
        # The schema declares the key headers: what schemathesis generated gives way to ours.
        for name in [h for h in case.headers if h.lower() in ("x-api-key", "authorization")]:
            del case.headers[name]
    response = case.call(base_url=api.url, headers=headers, timeout=30)
    SENT[(run, case.operation.label, response.status_code)] += 1
    if keyed and key_for(case.operation.path) is not None:
        assert response.status_code not in (401, 403), (response.status_code, response.text)
    case.validate_response(response, checks=CHECKS, headers=headers)
    if case.method.upper() != case.operation.method.upper():
        # The coverage phase also sends methods the path does not have.
        assert response.status_code == 405 and response.headers.get("allow"), response
    elif not keyed and key_for(case.operation.path) is not None:
        # Without the right key nothing gets past the key check (but an unknown path).
        assert response.status_code in (401, 403, 404, 413), (response.status_code,
                                                              response.text[:300])


def _settings(n: int, derandomize: bool = True) -> settings:
    # Derandomized: the default run sends the same requests every time (CI is reproducible);
    # the slow run draws new ones each time.
    return settings(max_examples=n, deadline=None, database=None, derandomize=derandomize,
                    suppress_health_check=list(HealthCheck))


@schema.parametrize()
@_settings(EXAMPLES)
def test_schema_with_keys(case: Any, api: LiveApi) -> None:
    _run("keyed", case, api, keyed=True)


@schema.parametrize()
@_settings(EXAMPLES // 2)
def test_schema_without_keys(case: Any, api: LiveApi) -> None:
    _run("unkeyed", case, api, keyed=False)


def _report(openapi: Any, runs: tuple[str, ...], examples: int) -> int:
    """Print the requests per operation, run and status; check every operation got some in
    every run and nothing answered 5xx. Returns the total."""
    operations = sorted(r.ok().label for r in openapi.get_all_operations())
    assert len(operations) == 14, operations
    per: dict[tuple[str, str], Counter[int]] = {}
    for (run, op, status), n in SENT.items():
        if run in runs:
            per.setdefault((run, op), Counter())[status] += n
    print(f"\nschemathesis {schemathesis.__version__}, {len(operations)} operations, "
          f"{examples} examples per operation and run; requests (by status):")
    for op in operations:
        for run in runs:
            counts = per.get((run, op), Counter())
            print(f"  {op:36s} {run:8s} {sum(counts.values()):5d} "
                  f"{dict(sorted(counts.items()))}")
    total = sum(n for (run, _, _), n in SENT.items() if run in runs)
    errors = sum(n for (run, _, status), n in SENT.items() if run in runs and status >= 500)
    print(f"  total {total} requests, {errors} 5xx")
    for run in runs:
        missing = [op for op in operations if not per.get((run, op))]
        assert not missing, f"{run}: no requests for {missing}"
    assert errors == 0
    return total


def test_schema_request_counts(openapi: Any) -> None:
    """Every operation got requests in both runs, at least MIN_REQUESTS in all; the table."""
    if {run for run, _, _ in SENT} != {"keyed", "unkeyed"}:
        pytest.skip("counts the two tests above: run the whole module")
    assert _report(openapi, ("keyed", "unkeyed"), EXAMPLES) >= MIN_REQUESTS


@pytest.mark.slow
@schema.parametrize()
@_settings(SLOW_EXAMPLES, derandomize=False)
def test_schema_slow(case: Any, api: LiveApi) -> None:
    """One run, every other request with the right key."""
    _run("slow", case, api, keyed=next(_slow_turn) % 2 == 0)


@pytest.mark.slow
def test_schema_slow_counts(openapi: Any) -> None:
    if not any(run == "slow" for run, _, _ in SENT):
        pytest.skip("counts test_schema_slow: run the whole module with -m slow")
    assert _report(openapi, ("slow",), SLOW_EXAMPLES) >= 8 * MIN_REQUESTS
