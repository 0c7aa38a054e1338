"""API keys: 401 without one, 403 with a wrong one, per role, and never a key in a log, a
response body or a response header.

A real uvicorn process serves with NP_INGEST_API_KEY, NP_ADMIN_API_KEY and NP_PREDICT_API_KEY
set, at uvicorn's most verbose level (``trace``, below ``debug``) with its access log on and
every Python logger (the service's, redis-py's, asyncio's, ...) at DEBUG, all into one log
file. Every protected route is called with no key, wrong keys of several shapes, another
role's key, and its own key both as ``X-API-Key`` and as ``Authorization: Bearer``. Then the
log and every response are searched for the three key strings.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from _hostile_helpers import (ADMIN_KEY, INGEST_KEY, KEYS, PREDICT_KEY, ROOT, LiveApi, live_api,
                              np_env)

#: Every route that needs a key: (method, path, body, role, success status).
PROTECTED = [
    ("POST", "/predict", {"instances": [[0.1, 0.2, 0.3, 0.4]]}, "predict", 200),
    ("POST", "/ingest", {"samples": [{"x": [0.1, 0.2, 0.3, 0.4], "y": 1}]}, "ingest", 202),
    ("POST", "/label", {"labels": [{"id": "never-predicted", "y": 1}]}, "ingest", 404),
    ("GET", "/admin/models/default/versions", None, "admin", 200),
    ("POST", "/admin/models/default/reload", None, "admin", 200),
    ("POST", "/admin/models/default/pin", {"version": 1}, "admin", 200),
    ("DELETE", "/admin/models/default/pin", None, "admin", 200),
    ("POST", "/admin/models/default/rollback", {"version": 1}, "admin", 202),
]


def _wrong_keys(role: str) -> list[tuple[dict[str, str], int]]:
    """Headers that must not pass, and the status each must get."""
    key = KEYS[role]
    other = next(k for r, k in KEYS.items() if r != role)
    return [
        ({}, 401),
        ({"X-API-Key": ""}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": f"Basic {key}"}, 401),  # not a scheme the API reads
        ({"Authorization": key}, 401),  # no scheme at all
        ({"X-API-Key": "wrong"}, 403),
        ({"X-API-Key": other}, 403),  # another role's key
        ({"X-API-Key": key.upper()}, 403),
        ({"X-API-Key": key[:-1]}, 403),
        ({"X-API-Key": key + "x"}, 403),
        ({"X-API-Key": key + "\u00e9"}, 403),  # not ASCII (latin-1 on the wire)
        ({"Authorization": f"Bearer {other}"}, 403),
        ({"Authorization": f"Bearer {key[1:]}"}, 403),
        # X-API-Key wins over a right bearer token: one key is read, never both.
        ({"X-API-Key": "wrong", "Authorization": f"Bearer {key}"}, 403),
    ]


LOG_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                            "stream": "ext://sys.stderr"}},
    "root": {"level": "DEBUG", "handlers": ["stderr"]},
}


@pytest.fixture(scope="module")
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[LiveApi]:
    tmp = tmp_path_factory.mktemp("security")
    log_config = tmp / "logging.json"
    log_config.write_text(json.dumps(LOG_CONFIG))
    # No --no-access-log: every request line is logged too.
    with live_api(request, tmp, log_level="trace",
                  uvicorn_args=["--log-config", str(log_config)]) as live:
        yield live


class Seen:
    """Every response of the module, to search for keys at the end."""

    responses: list[httpx.Response] = []


def call(api: LiveApi, method: str, path: str, body: Any, headers: dict[str, str]
         ) -> httpx.Response:
    # Header values as bytes (latin-1), so a non-ASCII key reaches the server as sent.
    raw = {k: v.encode("latin-1") for k, v in headers.items()}
    resp = api.http.request(method, path, json=body, headers=raw)
    Seen.responses.append(resp)
    return resp


@pytest.mark.parametrize("method,path,body,role,ok", PROTECTED,
                         ids=[f"{m} {p}" for m, p, *_ in PROTECTED])
def test_missing_and_wrong_keys_are_401_and_403(api: LiveApi, method: str, path: str,
                                                body: Any, role: str, ok: int) -> None:
    before = api.lengths()
    for headers, status in _wrong_keys(role):
        resp = call(api, method, path, body, headers)
        assert resp.status_code == status, (headers, resp.status_code, resp.text)
        err = resp.json()
        if status == 401:
            assert err["error"] == "unauthorized"
            assert err["message"] == (f"this route needs the {role} API key (header "
                                      "X-API-Key or Authorization: Bearer)")
            assert resp.headers["www-authenticate"] == "Bearer"
        else:
            assert err["error"] == "forbidden"
            assert err["message"] == f"the {role} API key is wrong"
            assert "www-authenticate" not in resp.headers
    assert api.lengths() == before  # nothing got through to the stream


@pytest.mark.parametrize("method,path,body,role,ok", PROTECTED,
                         ids=[f"{m} {p}" for m, p, *_ in PROTECTED])
def test_the_right_key_passes_both_ways(api: LiveApi, method: str, path: str, body: Any,
                                       role: str, ok: int) -> None:
    key = KEYS[role]
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"},
                    {"authorization": f"bearer  {key}"}):
        resp = call(api, method, path, body, headers)
        assert resp.status_code == ok, (headers, resp.status_code, resp.text)


def test_open_routes_need_no_key(api: LiveApi) -> None:
    for path in ("/healthz", "/readyz", "/models", "/models/default", "/metrics",
                 "/openapi.json", "/docs", "/dashboard", "/dashboard/data"):
        resp = call(api, "GET", path, None, {})
        assert resp.status_code == 200, (path, resp.status_code)


def test_the_schema_declares_who_needs_which_key(api: LiveApi) -> None:
    spec = call(api, "GET", "/openapi.json", None, {}).json()
    assert spec["components"]["securitySchemes"] == {
        "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "BearerToken": {"type": "http", "scheme": "bearer"}}
    for method, path, _, _, _ in PROTECTED:
        template = path.replace("/default/", "/{name}/")
        operation = spec["paths"][template][method.lower()]
        assert operation["security"] == [{"ApiKeyHeader": []}, {"BearerToken": []}], path
        assert {"401", "403"} <= set(operation["responses"]), path
    assert "security" not in spec["paths"]["/models"]["get"]


def test_keys_never_appear_in_logs_or_responses(api: LiveApi) -> None:
    """Last in the module: searches everything the tests above produced."""
    # A few requests whose failures log (500s never happen; Redis errors and 404s do).
    for path in ("/no/such/route", "/admin/models/default/versions?api_key=x"):
        call(api, "GET", path, None, {"X-API-Key": ADMIN_KEY})
    assert len(Seen.responses) >= 140, len(Seen.responses)
    api.proc._log.flush()
    log = api.proc.log_path.read_text(errors="replace")
    assert "DEBUG" in log and "TRACE" in log, log[-2000:]  # it really logged at that level
    assert '"POST /ingest HTTP/1.1" 202' in log  # the access log was on
    for key in (INGEST_KEY, ADMIN_KEY, PREDICT_KEY):
        assert key not in log, f"a key is in the API log: {key[:7]}..."
        for resp in Seen.responses:
            assert key not in resp.text, resp.request.url
            for name, value in resp.headers.items():
                assert key not in value and key not in name, name
    assert "Traceback" not in log
    counts = api.requests_by_status()
    print(f"\nsecurity: {sum(counts.values())} requests answered, by status: {counts}; "
          f"{len(log.splitlines())} log lines searched")
    assert not [s for s in counts if s >= 500], counts


def test_settings_errors_do_not_print_keys(tmp_path: Path) -> None:
    """A process that fails on bad settings prints why, without the keys beside them."""
    env = np_env("redis://127.0.0.1:9/0", tmp_path, ingest_api_key=INGEST_KEY,
                 admin_api_key=ADMIN_KEY, predict_api_key=PREDICT_KEY,
                 max_body_bytes="not-a-number", models="[{\"name\": \"bad name\"}]")
    proc = subprocess.run(
        [sys.executable, "-m", "uvicorn", "--factory", "service.api:create_app", "--port", "9",
         "--log-level", "debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "max_body_bytes" in out, out[-3000:]
    for key in (INGEST_KEY, ADMIN_KEY, PREDICT_KEY):
        assert key not in out


def test_keys_are_compared_in_constant_time_only() -> None:
    """No ``==``/``!=``/``in`` on a configured key anywhere in service/: only
    ``hmac.compare_digest`` (which ``require_key`` uses)."""
    offenders = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                if ("api_key" in text or "get_secret_value" in text or "presented" in text) \
                        and not text.endswith(" is None") and " is None" not in text \
                        and " is not None" not in text:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    assert not offenders, offenders
    common = (ROOT / "service" / "routes_common.py").read_text()
    assert "hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())" \
        in common
