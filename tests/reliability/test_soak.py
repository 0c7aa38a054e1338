"""Soak: the real stack (redis-server with AOF, worker and API processes) under a fixed mixed
load of /ingest and /predict (``benchmarks/soak.py``).

The quick variant runs in the default suite at a lower rate for 30 seconds: every request
answered 2xx, the stream lag bounded and drained, every accepted sample trained exactly once
(the newest checkpoint's count), clean exits. Memory growth means nothing over 30 seconds of
which 6 are warm-up, so only the slow variant (3 minutes at the documented rate, ``-m slow``)
asserts it. No assertion here is on a latency: the machine is shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.soak import SoakOptions, format_report, run_soak  # noqa: E402


def _check_common(result: dict) -> None:
    report = format_report(result)
    t = result["targets"]
    req = result["requests"]
    assert t["zero_errors"]["passed"], report
    for kind in ("ingest", "predict"):
        assert req[kind]["sent"] > 0, report
        assert req[kind]["errors"] == 0, report
    tr = result["training"]
    assert tr["drained"], report
    assert tr["trained"] == tr["accepted"] > 0, report
    assert tr["dead_letters"] == 0, report
    lag = result["lag"]
    assert lag["worker_lag_max"] is not None and lag["worker_lag_max"] <= lag["bound"], report
    assert lag["final_xlen"] == 0 and lag["final_pending"] == 0, report
    assert t["lag_bounded"]["passed"] and t["trained_equals_accepted"]["passed"], report
    assert t["clean_exit"]["passed"], report


def test_soak_quick(tmp_path: Path) -> None:
    """30 s at 20 ingest/s x 8 samples + 40 predict/s."""
    opts = SoakOptions(minutes=0.5, ingest_rate=20, batch=8, predict_rate=40,
                       sample_seconds=1.0, workdir=tmp_path / "soak")
    result = run_soak(opts)
    _check_common(result)
    # Every slot was sent or skipped (none lost by the generator itself).
    for kind, rate in (("ingest", 20), ("predict", 40)):
        assert result["requests"][kind]["scheduled"] == int(rate * opts.seconds)


@pytest.mark.slow
def test_soak_three_minutes(tmp_path: Path) -> None:
    """3 minutes at the documented rate (50 ingest/s x 8 + 100 predict/s); RSS growth < 10 %."""
    opts = SoakOptions(minutes=3.0, workdir=tmp_path / "soak")
    result = run_soak(opts)
    _check_common(result)
    report = format_report(result)
    for name in ("worker", "api", "redis"):
        target = result["targets"][f"rss_growth_{name}"]
        assert target["passed"] is True, report
    assert result["passed"], report
