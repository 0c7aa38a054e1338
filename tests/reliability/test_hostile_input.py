"""Hostile HTTP input against a real uvicorn API and redis-server: nothing enters a stream.

What ``tests/service/test_api_http.py`` already covers (malformed JSON, wrong lengths, NaN and
Infinity in /predict instances and /ingest x, strings and booleans as features, body limit
on /ingest and /predict, ...) is not repeated. Here, for ``/ingest``, ``/predict`` and
``/label`` alike, with every key right (the attack is the body, not the key):

* bodies over the limit, declared and streamed, and a 10-million-element instance (413);
  half a million elements within the limit (422, quickly);
* nesting: 33 levels and 10,000 levels of ``[[[...]]]``, and 500 to 1,000 levels in every
  field (the depth that made Python's recursion fail before the nesting limit): 400,
  ``nested_too_deep``, and the process serves on, with no traceback in its log;
* ``NaN``, ``Infinity``, ``-Infinity``, ``1e400`` and 400-digit integers in every numeric
  field (Python's json reads them all): 422 naming the field and "finite";
* lone surrogates (``"\\ud800"``) in ids and model names: 400, not Unicode;
* wrong types and wrong dimensions, unknown model names on every route (404).

Each case asserts the status, a JSON error whose message names the problem, and that the
samples stream and the dead-letter stream of every model kept their length (XLEN).
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote
from typing import Any, Iterator

import httpx
import pytest
from _hostile_helpers import (ADMIN_KEY, INGEST_KEY, MODELS, PREDICT_KEY, LiveApi,
                              assert_json_error, live_api)

from service.routes_common import MAX_JSON_DEPTH

MAX_BODY = 1_000_000  # the default NP_MAX_BODY_BYTES
HEADERS = {"/ingest": {"X-API-Key": INGEST_KEY}, "/label": {"X-API-Key": INGEST_KEY},
           "/predict": {"X-API-Key": PREDICT_KEY}}
GOOD_X = [0.25, -1.0, 2.0, 0.5]  # the default model's 4 features


@pytest.fixture(scope="module")
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[LiveApi]:
    with live_api(request, tmp_path_factory.mktemp("hostile"),
                  max_body_bytes=str(MAX_BODY)) as live:
        # Predictions to label: ids p-0..p-7 on the default model, o-0..o-7 on the open one.
        for model, prefix in (("default", "p"), ("open", "o")):
            resp = live.http.post("/predict", headers=HEADERS["/predict"], json={
                "model": model, "instances": [GOOD_X] * 8,
                "ids": [f"{prefix}-{i}" for i in range(8)]})
            assert resp.status_code == 200, resp.text
        yield live


@pytest.fixture
def unchanged(api: LiveApi) -> Iterator[None]:
    """The test must leave every model's samples and dead-letter streams as they were."""
    before = api.lengths()
    yield
    assert api.lengths() == before


def post(api: LiveApi, path: str, body: bytes | Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return api.http.post(path, content=content, headers={
        "content-type": "application/json", **HEADERS.get(path, {}), **headers})


def assert_alive(api: LiveApi) -> None:
    """The process serves on, and never hit a recursion or an unhandled error."""
    assert api.proc.proc.poll() is None
    assert api.http.get("/healthz").status_code == 200
    resp = post(api, "/predict", {"instances": [GOOD_X]})
    assert resp.status_code == 200, resp.text
    log = api.proc.log()
    assert "Traceback" not in log and "RecursionError" not in log, log


# -- size ----------------------------------------------------------------------------------------
def _instance_body(path: str, n: int) -> bytes:
    """A body whose one instance (or x, or y) has ``n`` zeros, built as bytes."""
    row = b"[" + b"0," * (n - 1) + b"0]"
    return {"/predict": b'{"instances": [' + row + b"]}",
            "/ingest": b'{"samples": [{"x": ' + row + b', "y": 1}]}',
            "/label": b'{"labels": [{"id": "p-0", "y": ' + row + b"}]}"}[path]


@pytest.mark.parametrize("path", ["/predict", "/ingest", "/label"])
def test_ten_million_element_instance_is_413_at_once(api: LiveApi, path: str,
                                                      unchanged: None) -> None:
    body = _instance_body(path, 10_000_000)
    assert len(body) > 20_000_000
    t0 = time.perf_counter()
    err = assert_json_error(post(api, path, body), 413, "body_too_large")
    assert time.perf_counter() - t0 < 5
    assert str(MAX_BODY) in err["message"]


@pytest.mark.parametrize("path", ["/predict", "/ingest", "/label"])
def test_streamed_body_over_the_limit_is_413(api: LiveApi, path: str, unchanged: None) -> None:
    """No Content-Length (chunked): counted as it streams, cut at the limit."""
    def chunks() -> Iterator[bytes]:
        yield {"/predict": b'{"instances": [[', "/ingest": b'{"samples": [{"y": 1, "x": [',
               "/label": b'{"labels": [{"id": "p-0", "y": ['}[path]
        for _ in range(300):  # 3 MB
            yield b"0," * 5000
        yield b"0]]}"

    resp = api.http.post(path, content=chunks(), headers={"content-type": "application/json",
                                                          **HEADERS[path]})
    assert "content-length" not in resp.request.headers
    assert_json_error(resp, 413, "body_too_large")


@pytest.mark.parametrize("path", ["/predict", "/ingest", "/label"])
def test_half_a_million_elements_within_the_limit_is_422_quickly(api: LiveApi, path: str,
                                                                  unchanged: None) -> None:
    body = _instance_body(path, 490_000)
    assert len(body) < MAX_BODY
    t0 = time.perf_counter()
    resp = post(api, path, body)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5, elapsed
    if path == "/label":  # a 490,000-target label for a class index: per-item 422
        assert resp.status_code == 422, resp.text
        item = resp.json()["results"][0]
        assert item["result"] == "bad_label" and "class index" in item["message"]
    else:
        err = assert_json_error(resp, 422, "wrong_length")
        assert "expected 4 features, got 490000" in err["message"]


def test_too_many_instances_samples_and_labels(api: LiveApi, unchanged: None) -> None:
    n = 100_000  # of empty lists: 300 kB, under the body limit
    for path, body, code in (
            ("/predict", b'{"instances": [' + b"[]," * (n - 1) + b"[]]}", "too_many_instances"),
            ("/ingest", b'{"samples": [' + b"{}," * (n - 1) + b"{}]}", "too_many_samples"),
            ("/label", b'{"labels": [' + b"{}," * (n - 1) + b"{}]}", "too_many_labels")):
        err = assert_json_error(post(api, path, body), 422, code)
        assert f"{n}" in err["message"] and "at most 1024" in err["message"]


# -- nesting -------------------------------------------------------------------------------------
def _nest(depth: int, leaf: str = "0") -> str:
    return "[" * depth + leaf + "]" * depth


#: Bodies with a deep value in each field of each route ({} is where the nesting goes).
NESTED_FIELDS = {
    "/predict": ['{{"instances": {}}}', '{{"instances": [{}]}}', '{{"model": {}}}',
                 '{{"instances": [[0, 0, 0, 0]], "ids": {}}}', "{}"],
    "/ingest": ['{{"samples": {}}}', '{{"samples": [{{"x": {}, "y": 1}}]}}',
                '{{"samples": [{{"x": [0, 0, 0, 0], "y": {}}}]}}',
                '{{"samples": [{{"x": [0, 0, 0, 0], "y": 1, "id": {}}}]}}',
                '{{"model": {}, "samples": []}}'],
    "/label": ['{{"labels": {}}}', '{{"labels": [{{"id": "p-1", "y": {}}}]}}',
               '{{"labels": [{{"id": {}, "y": 1}}]}}', '{{"model": {}}}'],
}


@pytest.mark.parametrize("path", ["/predict", "/ingest", "/label"])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500, 990, 10_000])
def test_deep_nesting_is_400_without_recursion(api: LiveApi, path: str, depth: int,
                                               unchanged: None) -> None:
    for template in NESTED_FIELDS[path]:
        body = template.format(_nest(depth)).encode()
        t0 = time.perf_counter()
        err = assert_json_error(post(api, path, body), 400, "nested_too_deep")
        assert time.perf_counter() - t0 < 2
        assert f"more than {MAX_JSON_DEPTH} levels" in err["message"]
        # Objects nest too.
        deep_objects = '{"a": ' * depth + "1" + "}" * depth
        assert_json_error(post(api, path, template.format(deep_objects).encode()), 400,
                          "nested_too_deep")
    assert_alive(api)


def test_brackets_inside_strings_are_not_nesting(api: LiveApi) -> None:
    """An id made of brackets and escaped quotes is just a string: the request works."""
    pid = '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["\\' + "]" * 40
    resp = post(api, "/predict", {"instances": [GOOD_X], "ids": [pid]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["predictions"][0]["id"] == pid


def test_nesting_at_the_limit_is_read(api: LiveApi, unchanged: None) -> None:
    """32 levels parse (and are then refused for what they are, not for their depth)."""
    body = '{"instances": ' + _nest(MAX_JSON_DEPTH - 1) + "}"
    err = assert_json_error(post(api, "/predict", body.encode()), 422)
    assert err["error"] != "nested_too_deep"


# -- NaN, Infinity, overflow ---------------------------------------------------------------------
NONFINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400,
             "-" + "9" * 400]


@pytest.mark.parametrize("literal", NONFINITE)
def test_nonfinite_in_predict_instances(api: LiveApi, literal: str, unchanged: None) -> None:
    for model, row in (("default", f"[0, {literal}, 0, 0]"),
                       ("reg", f"[{literal}, 0, 0]"),
                       ("open", f"[[0, 0], [0, {literal}]]")):
        body = f'{{"model": "{model}", "instances": [[1, 2, 3, 4], {row}]}}'
        if model != "default":
            body = body.replace("[1, 2, 3, 4]", row)
        err = assert_json_error(post(api, "/predict", body.encode()), 422, "nonfinite")
        assert "finite" in err["message"] and "instance" in err["message"]


@pytest.mark.parametrize("literal", NONFINITE)
def test_nonfinite_in_ingest(api: LiveApi, literal: str, unchanged: None) -> None:
    ok = '{"x": [0, 0, 0, 0], "y": 1}'
    for model, sample in (
            ("default", f'{{"x": [0, 0, {literal}, 0], "y": 1}}'),
            ("default", f'{{"x": [0, 0, 0, 0], "y": {literal}}}'),
            ("reg", f'{{"x": [0, 0, 0], "y": [0.5, {literal}]}}'),
            ("reg", f'{{"x": [0, 0, 0], "y": {literal}}}'),
            ("open", f'{{"x": [[0, 0], [0, 0]], "y": {literal}}}'),
            ("open", f'{{"x": [[0, {literal}], [0, 0]], "y": "cat"}}')):
        first = ok if model == "default" else sample
        body = f'{{"model": "{model}", "samples": [{first}, {sample}]}}'
        index = 1 if model == "default" else 0
        err = assert_json_error(post(api, "/ingest", body.encode()), 422, "nonfinite")
        assert err["index"] == index and f"sample {index}" in err["message"]
        assert "finite" in err["message"] or "NaN and Infinity" in err["message"]


@pytest.mark.parametrize("literal", NONFINITE)
def test_nonfinite_in_label(api: LiveApi, literal: str, unchanged: None) -> None:
    for model, pid in (("default", "p-2"), ("open", "o-2")):
        body = f'{{"model": "{model}", "labels": [{{"id": "{pid}", "y": {literal}}}]}}'
        resp = post(api, "/label", body.encode())
        assert resp.status_code == 422, resp.text
        item = resp.json()["results"][0]
        assert item["status"] == 422 and item["result"] == "nonfinite", item
        assert item["id"] == pid and "labels[0]" in item["message"]


def test_a_bad_label_leaves_the_prediction_labellable(api: LiveApi) -> None:
    before = api.lengths()
    bad = post(api, "/label", b'{"labels": [{"id": "p-3", "y": NaN}]}')
    assert bad.status_code == 422 and api.lengths() == before
    good = post(api, "/label", {"labels": [{"id": "p-3", "y": 2}]})
    assert good.status_code == 202, good.text
    assert api.stream_len("default") == before["default"][0] + 1


def test_nonfinite_in_other_fields(api: LiveApi, unchanged: None) -> None:
    for path, body, code in (
            ("/predict", '{"model": NaN, "instances": [[0, 0, 0, 0]]}', "bad_request"),
            ("/predict", '{"instances": [[0, 0, 0, 0]], "ids": [Infinity]}', "bad_ids"),
            ("/ingest", '{"samples": [{"x": [0, 0, 0, 0], "y": 1, "id": NaN}]}', "bad_request"),
            ("/admin/models/default/pin", '{"version": NaN}', "bad_request"),
            ("/admin/models/default/pin", '{"version": ' + "9" * 400 + "}", "bad_request"),
            ("/admin/models/default/rollback", '{"version": -Infinity}', "bad_request"),
            ("/admin/models/default/rollback", '{"version": 1e400}', "bad_request")):
        headers = {"X-API-Key": ADMIN_KEY} if path.startswith("/admin") else {}
        err = assert_json_error(post(api, path, body.encode(), **headers), 422, code)
        assert "must be" in err["message"]


# -- text that is not Unicode --------------------------------------------------------------------
@pytest.mark.parametrize("path,body", [
    ("/predict", '{"instances": [[0, 0, 0, 0]], "ids": ["\\ud800"]}'),
    ("/predict", '{"model": "\\udfff", "instances": [[0, 0, 0, 0]]}'),
    ("/ingest", '{"samples": [{"x": [0, 0, 0, 0], "y": 1, "id": "a\\ud800b"}]}'),
    ("/ingest", '{"model": "open", "samples": [{"x": [[0, 0], [0, 0]], "y": "\\udc00"}]}'),
    ("/label", '{"labels": [{"id": "\\ud800", "y": 1}]}'),
    ("/label", '{"model": "open", "labels": [{"id": "o-4", "y": "\\udbff"}]}'),
    ("/predict", b'{"instances": [[0, 0, 0, 0]], "ids": ["\xff\xfe"]}'),
])
def test_lone_surrogates_and_bad_utf8_are_400(api: LiveApi, path: str, body: str | bytes,
                                              unchanged: None) -> None:
    raw = body if isinstance(body, bytes) else body.encode()
    err = assert_json_error(post(api, path, raw), 400, "malformed_json")
    assert "surrogate" in err["message"] or "utf-8" in err["message"]


def test_surrogate_pairs_are_fine(api: LiveApi) -> None:
    resp = post(api, "/predict", b'{"instances": [[0, 0, 0, 0]], "ids": ["\\ud83d\\ude00"]}')
    assert resp.status_code == 200 and resp.json()["predictions"][0]["id"] == "\U0001F600"


# -- wrong types and dimensions ------------------------------------------------------------------
WRONG = [
    ("/predict", {"instances": {"0": GOOD_X}}, 422, "bad_request", "list of instances"),
    ("/predict", {"instances": [GOOD_X], "ids": "p-9"}, 422, "bad_ids", "strings"),
    ("/predict", {"instances": [GOOD_X, GOOD_X], "ids": ["a", "a"]}, 422, "bad_ids", "unique"),
    ("/predict", {"instances": [[[[0, 0], [0, 0]], [[0, 0], [0, 0]]]]}, 422, "wrong_length",
     "expected 4 features, got 8"),
    ("/predict", {"model": "open", "instances": [[0, 0, 0]]}, 422, "wrong_length",
     "expected 4 features, got 3"),
    ("/predict", {"model": "reg", "instances": [[0, 0, 0, 0]]}, 422, "wrong_length",
     "expected 3 features, got 4"),
    ("/ingest", {"samples": {"x": GOOD_X, "y": 1}}, 422, "bad_request", "non-empty list"),
    ("/ingest", {"samples": [{"x": {"a": 1}, "y": 1}]}, 422, "bad_x", "list of numbers"),
    ("/ingest", {"samples": [{"x": GOOD_X, "y": {"a": 1}}]}, 422, "bad_label", "number"),
    ("/ingest", {"samples": [{"x": GOOD_X, "y": [1, 2]}]}, 422, "bad_label", "class index"),
    ("/ingest", {"model": "reg", "samples": [{"x": [0, 0, 0], "y": [1, 2, 3]}]}, 422,
     "bad_label", "expected 2 target values, got 3"),
    ("/ingest", {"model": "reg", "samples": [{"x": [0, 0, 0], "y": "1.5"}]}, 422, "bad_label",
     "number"),
    ("/ingest", {"model": "open", "samples": [{"x": [[0, 0], [0, 0]], "y": ""}]}, 422,
     "bad_label", "1 to 256 characters"),
    ("/ingest", {"model": "open", "samples": [{"x": [[0, 0], [0, 0]], "y": True}]}, 422,
     "bad_label", "number"),
    ("/ingest", {"model": "open", "samples": [{"x": [[0, 0, 0]], "y": "cat"}]}, 422,
     "wrong_length", "expected 4 features, got 3"),
    ("/label", {"labels": {"id": "p-5", "y": 1}}, 422, "bad_request", "non-empty list"),
    ("/label", {"labels": []}, 422, "bad_request", "non-empty list"),
    ("/label", {"model": "reg", "labels": [{"id": "r-1", "y": [1, 2]}]}, 400, "labels_disabled",
     "label_ttl_seconds"),
    ("/label", [{"id": "p-5", "y": 1}], 422, "bad_request", "JSON object"),
]


@pytest.mark.parametrize("case", WRONG, ids=[f"{c[0]}-{i}" for i, c in enumerate(WRONG)])
def test_wrong_types_and_dimensions(api: LiveApi, case: tuple[str, Any, int, str, str],
                                    unchanged: None) -> None:
    path, body, status, code, words = case
    err = assert_json_error(post(api, path, body), status, code)
    assert words in err["message"], err


LABEL_ITEMS_WRONG = [
    ({"id": "p-5", "y": "cat"}, "bad_label", "class index"),
    ({"id": "p-5", "y": 3}, "label_out_of_range", "outside 0..2"),
    ({"id": "p-5", "y": 1.5}, "bad_label", "integer"),
    ({"id": "p-5", "y": [1]}, "bad_label", "class index"),
    ({"id": "p-5", "y": None}, "bad_label", "class index"),
    ({"id": "p-5"}, "bad_request", '"y"'),
    ({"id": 5, "y": 1}, "bad_request", '"id"'),
    ({"id": "x" * 201, "y": 1}, "bad_request", '"id"'),
    ([1, 2], "bad_request", '"id"'),
]


@pytest.mark.parametrize("item,code,words", LABEL_ITEMS_WRONG,
                         ids=[c[1] + str(i) for i, c in enumerate(LABEL_ITEMS_WRONG)])
def test_wrong_label_items_are_per_item_422(api: LiveApi, item: Any, code: str, words: str,
                                            unchanged: None) -> None:
    resp = post(api, "/label", {"labels": [item]})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["accepted"] == 0
    result = body["results"][0]
    assert result["status"] == 422 and result["result"] == code, result
    assert words in result["message"] and "labels[0]" in result["message"], result


# -- unknown models, on every route --------------------------------------------------------------
UNKNOWN = [
    ("POST", "/predict", {"model": "nope", "instances": [GOOD_X]}, PREDICT_KEY),
    ("POST", "/ingest", {"model": "nope", "samples": [{"x": GOOD_X, "y": 1}]}, INGEST_KEY),
    ("POST", "/label", {"model": "nope", "labels": [{"id": "p-6", "y": 1}]}, INGEST_KEY),
    ("GET", "/models/nope", None, None),
    ("GET", "/admin/models/nope/versions", None, ADMIN_KEY),
    ("POST", "/admin/models/nope/pin", {"version": 1}, ADMIN_KEY),
    ("DELETE", "/admin/models/nope/pin", None, ADMIN_KEY),
    ("POST", "/admin/models/nope/rollback", {"version": 1}, ADMIN_KEY),
    ("POST", "/admin/models/nope/reload", None, ADMIN_KEY),
]


@pytest.mark.parametrize("method,path,body,key", UNKNOWN, ids=[f"{c[0]} {c[1]}" for c in UNKNOWN])
@pytest.mark.parametrize("name", ["nope", "default ", "DEFAULT", "x" * 300, "déjà-vu",
                                  "../default"])
def test_unknown_model_is_404_everywhere(api: LiveApi, method: str, path: str, body: Any,
                                         key: str | None, name: str, unchanged: None) -> None:
    if body is not None and "model" in body:
        body = {**body, "model": name}
        url = path
    else:
        url = path.replace("nope", quote(name, safe=""))
    resp = api.http.request(method, url, json=body, headers={"X-API-Key": key} if key else {})
    err = assert_json_error(resp, 404)
    assert err["error"] in ("unknown_model", "not_found"), err
    if err["error"] == "unknown_model":
        assert "declared: default, open, reg" in err["message"]
        assert len(err["message"]) < 200  # the name is cut, not echoed whole


def test_every_model_is_still_served(api: LiveApi) -> None:
    """After all of the above: the API serves every model, logged no traceback and answered
    no 5xx (its own request counts, printed with -s)."""
    for cfg in MODELS:
        x = [[0.1] * cfg.num_features]
        resp = post(api, "/predict", {"model": cfg.name, "instances": x})
        assert resp.status_code == 200, resp.text
    assert_alive(api)
    counts = api.requests_by_status()
    print(f"\nhostile input: {sum(counts.values())} requests answered, by status: {counts}")
    assert not [s for s in counts if s >= 500], counts
