"""Property-based fuzzing (hypothesis) of what reads untrusted input, in-process.

* ``EntryCodec.decode``, the worker's reader of stream entries (anything a producer can XADD):
  whatever the fields (names, bytes, JSON, float32 bytes, labels), decode returns a valid
  sample (finite float32 features of the right length, a label the model accepts) or raises
  ``DecodeError`` with one of ``codec.REASONS``, the dead-letter path. Nothing else escapes.
* ``encode`` then ``decode`` gives back what was encoded, for every valid sample.
* The API's request readers: ``routes_common.loads`` and ``nesting_exceeds`` (any bytes),
  ``routes_ingest.encode_sample`` (any JSON sample), ``serving.parse_instances`` (any JSON
  instances) and the label check of ``/label`` (``codec.validate_y``, any JSON label).

Run with ``-s`` to see how many examples each property ran::

    python3 -m pytest -q -s tests/reliability/test_codec_fuzz.py
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _hostile_helpers  # noqa: F401  (puts tests/service on sys.path)
from service.codec import REASONS, DecodeError, EntryCodec, Sample
from service.routes_common import MAX_JSON_DEPTH, ApiError, loads, nesting_exceeds
from service.routes_ingest import encode_sample
from service.serving import InstanceError, parse_instances
from service.settings import MAX_LABEL_LENGTH, ModelConfig, label_key

EXAMPLES = 400
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CONFIGS = {
    "indices": ModelConfig(name="indices", input_shape=[4], num_classes=3, spec="mlp:8"),
    "regression": ModelConfig(name="reg", input_shape=[3], task="regression", num_targets=2,
                              spec="mlp:8"),
    "listed": ModelConfig(name="listed", input_shape=[2, 2], classes=[7, "seven", "cat"],
                          spec="mlp:8"),
    "open": ModelConfig(name="open", input_shape=[4], classes=["a"], open_classes=True,
                        max_classes=5, spec="mlp:8"),
}
CODECS = {name: EntryCodec(cfg) for name, cfg in CONFIGS.items()}
#: Outcomes per property: "ok" or the dead-letter reason (printed at the end with -s).
OUTCOMES: dict[str, Counter[str]] = {}


def _count(prop: str, outcome: str) -> None:
    OUTCOMES.setdefault(prop, Counter())[outcome] += 1


# -- strategies ----------------------------------------------------------------------------------
SPECIAL_NUMBERS = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 320,
    "1e-400", "3.5e38", "-3.5e38", "3.4e38", "18446744073709551616", "-0", "0.0", "2", "1e2",
    "9" * 5000])
JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
                | st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                           max_leaves=30)


def _nested(depth: int, leaf: str = "") -> str:
    return "[" * depth + leaf + "]" * depth


def _number_list(n: int) -> st.SearchStrategy[str]:
    """A JSON array of about ``n`` numbers, some of them hostile literals."""
    num = st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr) | SPECIAL_NUMBERS
    return st.lists(num, min_size=max(0, n - 1), max_size=n + 1).map(
        lambda xs: "[" + ", ".join(xs) + "]")


def x_json(nf: int) -> st.SearchStrategy[bytes]:
    texts = (_number_list(nf)
             | st.lists(_number_list(2), min_size=1, max_size=3).map(
                 lambda rows: "[" + ", ".join(rows) + "]")
             | JSON_VALUES.map(lambda v: json.dumps(v))
             | st.integers(1, 1500).map(lambda d: _nested(d, "1"))
             | st.integers(1, 1500).map(_nested)
             | st.text(max_size=40))
    return texts.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=64)


def x_binary(nf: int) -> st.SearchStrategy[bytes]:
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    return (st.lists(floats, min_size=nf, max_size=nf).map(
                lambda xs: np.asarray(xs, dtype="<f4").tobytes())
            | st.lists(floats, min_size=0, max_size=nf + 2).map(
                lambda xs: np.asarray(xs, dtype="<f4").tobytes())
            | st.binary(min_size=4 * nf, max_size=4 * nf) | st.binary(max_size=64))


LABELS = (st.integers(-5, 10).map(str) | st.integers().map(str) | SPECIAL_NUMBERS
          | st.floats(allow_nan=True).map(repr)
          | st.text(max_size=12) | st.text(max_size=300).map(json.dumps)
          | st.sampled_from(['"cat"', "cat", '"seven"', "seven", "7", '"7"', '""', "true",
                             "null", "[1, 2]", "[1.5, NaN]", '["a"]', "[]", "[[1, 2]]",
                             '"' + "x" * (MAX_LABEL_LENGTH + 1) + '"'])
          | JSON_VALUES.map(json.dumps)
          | st.integers(1, 1500).map(lambda d: _nested(d, "1")))
LABEL_BYTES = (LABELS.map(lambda t: t.encode("utf-8", "surrogatepass"))
               | st.binary(max_size=32))


@st.composite
def entries(draw: Any, nf: int) -> dict[Any, Any]:
    """Fields of a stream entry as Redis returns them (bytes), sometimes as str keys/values,
    with x, xb, y and id each present or not, and junk fields."""
    fields: dict[Any, Any] = {}
    if draw(st.booleans()):
        fields[b"x"] = draw(x_json(nf))
    if draw(st.integers(0, 2)) == 0:
        fields[b"xb"] = draw(x_binary(nf))
    if draw(st.integers(0, 5)):
        fields[b"y"] = draw(LABEL_BYTES)
    if draw(st.booleans()):
        fields[b"id"] = draw(st.binary(max_size=16))
    for junk in draw(st.lists(st.binary(min_size=1, max_size=4), max_size=3)):
        fields.setdefault(junk, draw(st.binary(max_size=8)))
    if draw(st.integers(0, 4)) == 0:  # a client that hands over str, not bytes
        fields = {(k.decode("latin-1") if isinstance(k, bytes) else k):
                  (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                  for k, v in fields.items()}
    return fields


# -- what a valid outcome is ---------------------------------------------------------------------
def assert_valid_sample(codec: EntryCodec, sample: Sample) -> None:
    cfg = codec.config
    assert isinstance(sample.x, np.ndarray) and sample.x.dtype == np.float32
    assert sample.x.shape == (cfg.num_features,)
    assert np.isfinite(sample.x).all()
    if cfg.task == "regression":
        assert isinstance(sample.y, np.ndarray) and sample.y.dtype == np.float32
        assert sample.y.shape == (cfg.num_targets,) and np.isfinite(sample.y).all()
    elif codec.label_set == "indices":
        assert type(sample.y) is int and 0 <= sample.y < cfg.num_classes
    else:
        assert (type(sample.y) is int
                or (type(sample.y) is str and 0 < len(sample.y) <= MAX_LABEL_LENGTH)), sample.y
        # Labels go into snapshots and JSON responses: Unicode text, 64-bit integers.
        if type(sample.y) is str:
            sample.y.encode("utf-8")
        else:
            assert -(1 << 63) <= sample.y < (1 << 63), sample.y
        if codec.label_set == "listed":
            assert label_key(sample.y) in {label_key(c) for c in cfg.classes or []}


def assert_dead_letter(err: DecodeError) -> None:
    assert err.reason in REASONS, err.reason
    assert isinstance(err.detail, str) and 0 < len(err.detail) < 400, err.detail


def decode_outcome(codec: EntryCodec, fields: dict[Any, Any]) -> str:
    try:
        sample = codec.decode(fields)
    except DecodeError as err:
        assert_dead_letter(err)
        return err.reason
    assert_valid_sample(codec, sample)
    return "ok"


# -- the stream entry decoder --------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(CODECS))
def test_decode_never_raises_past_the_dead_letter_path(kind: str) -> None:
    codec = CODECS[kind]

    @FUZZ
    @given(entries(codec.num_features))
    def check(fields: dict[Any, Any]) -> None:
        _count(f"decode[{kind}]", decode_outcome(codec, fields))

    check()


@pytest.mark.parametrize("kind", list(CODECS))
def test_decode_of_nearly_valid_entries(kind: str) -> None:
    """Mostly well-formed entries (right-length x, plausible labels): the valid ones pass."""
    codec = CODECS[kind]
    nf = codec.num_features

    @FUZZ
    @given(st.one_of(_number_list(nf).map(lambda t: {b"x": t.encode()}),
                     x_binary(nf).map(lambda b: {b"xb": b})),
           LABEL_BYTES)
    def check(x_fields: dict[bytes, bytes], y: bytes) -> None:
        _count(f"near[{kind}]", decode_outcome(codec, {**x_fields, b"y": y}))

    check()


def test_decode_hostile_examples() -> None:
    """The entries a fuzzer finds only by luck, for every kind of model."""
    for codec in CODECS.values():
        nf = codec.num_features
        good = json.dumps([0.5] * nf).encode()
        cases = [
            {b"x": _nested(980, "1").encode(), b"y": b"1"},
            {b"x": good, b"y": _nested(980, "1").encode()},
            {b"x": good, b"y": _nested(5000).encode()},
            {b"x": ("[" + "1" + "0" * 400 + ", 0" * (nf - 1) + "]").encode(), b"y": b"1"},
            {b"x": good, b"y": ("1" + "0" * 400).encode()},
            {b"x": good, b"y": ("[" + "1" + "0" * 400 + ", 1]").encode()},
            {b"x": good, b"y": ("9" * 4300).encode()},
            {b"x": good, b"y": ("9" * 4301).encode()},
            {b"x": json.dumps(["1.5"] * nf).encode(), b"y": b"1"},
            {b"x": json.dumps([None] * nf).encode(), b"y": b"1"},
            {b"x": ("[" + ", ".join(["NaN"] * nf) + "]").encode(), b"y": b"1"},
            {b"x": ("[" + ", ".join(["1e39"] * nf) + "]").encode(), b"y": b"1"},
            {b"x": good, b"y": b'"1.5"'},
            {b"x": good, b"y": b"\xff\xfe"},
            {b"x": good, b"y": b'"\\ud800"'},
            {b"x": b'"\\ud800"', b"y": b"1"},
            {b"xb": b"\x00\x00\xc0\x7f" * nf, b"y": b"1"},  # NaN as float32
            {b"xb": b"\x00" * (4 * nf + 1), b"y": b"1"},
            {b"x": good, b"y": b"1", b"pad": b"\x00" * 100_000},
        ]
        for fields in cases:
            _count("hostile", decode_outcome(codec, fields))


@given(data=st.data())
@FUZZ
def test_encode_then_decode_round_trips(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(list(CODECS)))
    codec = CODECS[kind]
    cfg = codec.config
    finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
    x = data.draw(st.lists(finite32, min_size=cfg.num_features, max_size=cfg.num_features))
    if cfg.task == "regression":
        y: Any = data.draw(st.lists(finite32, min_size=2, max_size=2))
    elif codec.label_set == "indices":
        y = data.draw(st.integers(0, cfg.num_classes - 1))
    elif codec.label_set == "listed":
        y = data.draw(st.sampled_from(cfg.classes or []))
    else:
        y = data.draw(st.integers(-10**6, 10**6)
                      | st.text(min_size=1, max_size=MAX_LABEL_LENGTH).filter(
                          lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)))
    binary = data.draw(st.booleans())
    sample = codec.decode(codec.encode(x, y, binary=binary))
    assert sample.x.tolist() == np.asarray(x, dtype=np.float32).tolist()
    if cfg.task == "regression":
        assert sample.y.tolist() == np.asarray(y, dtype=np.float32).tolist()
    else:
        assert label_key(sample.y) == label_key(y)
    _count("round trip", "ok")


# -- the API's request readers -------------------------------------------------------------------
def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


BRACKETY_TEXT = st.text(alphabet='[]{}"\\ab', max_size=12)
BRACKETY_JSON = st.recursive(
    st.none() | st.integers() | BRACKETY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(BRACKETY_TEXT, inner,
                                                                max_size=3),
    max_leaves=60)


@FUZZ
@given(BRACKETY_JSON, st.integers(1, 8))
def test_nesting_limit_is_exact(value: Any, limit: int) -> None:
    """The bracket count ignores brackets, quotes and backslashes inside strings."""
    raw = json.dumps(value).encode()
    assert nesting_exceeds(raw, limit) == (_depth(value) > limit)
    _count("nesting", "deep" if _depth(value) > limit else "ok")


@FUZZ
@given(st.binary(max_size=200)
       | st.text(alphabet='[]{}",:0123456789.eE-+ \\unNaIfity', max_size=200).map(str.encode)
       | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_body_reader_raises_only_parse_errors(raw: bytes) -> None:
    """What ``read_json_object`` does to any body: answer 400 (ValueError) or parse it."""
    if nesting_exceeds(raw):
        _count("body", "too deep")
        return
    try:
        loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        _count("body", "400")
        return
    _count("body", "parsed")


@given(data=st.data())
@FUZZ
def test_ingest_sample_validation(data: st.DataObject) -> None:
    """``encode_sample`` (POST /ingest) on any JSON sample: a 422 ApiError naming a reason and
    the index, or stream fields that the worker decodes to the same sample."""
    kind = data.draw(st.sampled_from(list(CODECS)))
    codec = CODECS[kind]
    nf = codec.num_features
    number = st.floats(allow_nan=True, allow_infinity=True) | st.integers()
    x = data.draw(st.lists(number, min_size=nf - 1, max_size=nf + 1) | JSON_VALUES)
    y = data.draw(number | st.text(max_size=5) | st.lists(number, max_size=3) | JSON_VALUES)
    sample = data.draw(st.fixed_dictionaries({"x": st.just(x), "y": st.just(y)},
                                             optional={"id": JSON_VALUES})
                       | JSON_VALUES)
    try:
        fields = encode_sample(codec, 3, sample)
    except ApiError as err:
        assert err.status == 422 and err.extra == {"index": 3}
        assert err.code in REASONS or err.code == "bad_request", err.code
        assert err.message.startswith("sample 3: ")
        _count("ingest sample", err.code)
        return
    decoded = codec.decode(fields)
    assert_valid_sample(codec, decoded)
    assert decoded.x.tolist() == np.asarray(x, dtype=np.float32).tolist()
    _count("ingest sample", "ok")


@given(data=st.data())
@FUZZ
def test_predict_instance_validation(data: st.DataObject) -> None:
    """``parse_instances`` (POST /predict) on any JSON: finite float32 rows or an
    InstanceError with a reason."""
    kind = data.draw(st.sampled_from(list(CODECS)))
    codec = CODECS[kind]
    nf = codec.num_features
    number = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2**64, 2**64)
              | st.booleans())
    row = st.lists(number, min_size=nf - 1, max_size=nf + 1) | JSON_VALUES
    instances = data.draw(st.lists(row, max_size=4) | JSON_VALUES)
    raw = json.dumps(instances).encode()
    try:
        out = parse_instances(codec, instances, b"true" in raw or b"false" in raw)
    except InstanceError as err:
        assert err.reason in REASONS or err.reason == "bad_request", err.reason
        _count("predict instances", err.reason)
        return
    assert out.dtype == np.float32 and out.shape == (len(instances), nf)
    assert np.isfinite(out).all()
    _count("predict instances", "ok")


@given(data=st.data())
@FUZZ
def test_label_validation(data: st.DataObject) -> None:
    """``validate_y`` (POST /label's check) on any JSON label: a valid label or a reason."""
    codec = CODECS[data.draw(st.sampled_from(list(CODECS)))]
    y = data.draw(JSON_VALUES | st.integers() | st.floats())
    try:
        label = codec.validate_y(y)
    except DecodeError as err:
        assert_dead_letter(err)
        _count("label", err.reason)
        return
    if codec.config.task == "regression":
        assert isinstance(label, np.ndarray) and np.isfinite(label).all()
    elif codec.label_set == "indices":
        assert type(label) is int and 0 <= label < codec.config.num_classes
    else:
        assert type(label) in (int, str)
        if type(label) is int:
            assert -(1 << 63) <= label < (1 << 63), label
    _count("label", "ok")


def test_worker_dead_letters_hostile_entries_and_trains_on(redis_server: Any,
                                                          tmp_path: Any) -> None:
    """The real worker loop: hostile entries between good ones are dead-lettered with their
    reason and detail, every good one is trained, and the worker never stops."""
    from worker_helpers import make_settings, running_worker, small_config, synthetic, wait_until

    from service import keys

    models = {"m": small_config(), "o": small_config(name="o", classes=["a"], open_classes=True,
                                                     max_classes=4)}
    settings_ = make_settings(redis_server.url, tmp_path, models=list(models.values()))
    r = redis_server_client(redis_server)
    x, y = synthetic(40)
    good = {"m": [EntryCodec(models["m"]).encode(xi, int(yi)) for xi, yi in zip(x, y)],
            "o": [EntryCodec(models["o"]).encode(xi, ["a", "b", 7][int(yi)])
                  for xi, yi in zip(x, y)]}
    nf = 8
    ok_x = json.dumps([0.5] * nf).encode()
    hostile = [
        {b"x": _nested(980, "1").encode(), b"y": b"1"},
        {b"x": ok_x, b"y": _nested(980, "1").encode()},
        {b"x": ("[" + "1" + "0" * 400 + ", 0" * (nf - 1) + "]").encode(), b"y": b"1"},
        {b"x": ok_x, b"y": ("1" + "0" * 400).encode()},
        {b"x": ok_x, b"y": b"NaN"},
        {b"x": ok_x, b"y": b"-Infinity"},
        {b"x": json.dumps(["1.5"] * nf).encode(), b"y": b"1"},
        {b"x": json.dumps([None] * nf).encode(), b"y": b"1"},
        {b"x": ok_x, b"y": b'"\\ud800"'},
        {b"x": ok_x, b"y": b"\xff\xfe"},
        {b"xb": b"\x00\x00\xc0\x7f" * nf, b"y": b"1"},
        {b"x": ok_x},
        {b"y": b"1"},
        {b"x": ok_x, b"y": b"1", b"pad": b"\x00" * 10_000},
    ]
    expected: dict[str, list[str]] = {}
    for name, cfg in models.items():
        stream = keys.samples_stream(name)
        for fields in good[name][:20] + hostile + good[name][20:]:
            r.xadd(stream, fields)
        expected[name] = [decode_outcome(EntryCodec(cfg), f) for f in hostile]
        assert "ok" not in expected[name], expected[name]
    with running_worker(settings_) as worker:
        for name in models:
            mw = worker.models[name]
            wait_until(lambda: mw.trainer is not None and mw.trainer.samples_trained == 40,
                       timeout=60, what=f"{name}: the 40 good samples trained")
            dead = keys.dead_letter_stream(name)
            wait_until(lambda: r.xlen(dead) == len(hostile), what=f"{name}: dead letters")
            letters = [f for _, f in r.xrange(dead)]
            assert [f[b"reason"].decode() for f in letters] == expected[name]
            assert all(f[b"detail"] for f in letters)
            _count(f"worker[{name}]", f"{len(hostile)} dead, 40 trained")
    r.close()


def redis_server_client(server: Any) -> Any:
    import redis

    return redis.Redis.from_url(server.url)


def test_print_outcomes() -> None:
    """The outcome table (run with -s); also: every property ran."""
    for prop, counts in sorted(OUTCOMES.items()):
        total = sum(counts.values())
        print(f"\n{prop}: {total} examples: {dict(counts.most_common())}", end="")
    print()
    assert not OUTCOMES or all(sum(c.values()) > 0 for c in OUTCOMES.values())
    assert math.isfinite(MAX_JSON_DEPTH)
