"""The live dashboard: its JSON endpoint and static files over HTTP, then the page in a real
browser (Debian's ``chromium`` driven by Python ``playwright``) against a real redis-server, the
worker process and the API process: the page loads with nothing fetched from outside the API,
samples are pushed, and the version and the curves move. Saves ``docs/figures/dashboard.png``.

Without chromium or playwright the browser test fails under CI (``CI`` set) and is skipped
elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_api_support import ROOT, ApiProcess, free_port, stop_process, np_env, publish

from service.settings import ModelConfig
from service.snapshots import SnapshotStore

STATIC = ROOT / "service" / "static"
SCREENSHOT = ROOT / "docs" / "figures" / "dashboard.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_static_files_fetch_nothing_external() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        urls = re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", text)
        # The SVG namespace is an identifier, never fetched.
        assert set(urls) <= {"http://www.w3.org/2000/svg"}, (path.name, urls)


def test_dashboard_data_and_files(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = ModelConfig(name="default", input_shape=[8], num_classes=3, spec="mlp:16,16",
                      label_ttl_seconds=30)
    store = SnapshotStore(tmp_path / "data" / "snapshots", cfg.name)
    publish(store, cfg, 1)
    api = ApiProcess(np_env(redis_server.url, tmp_path / "data",
                            models=[cfg.model_dump(mode="json")], snapshot_poll_seconds="0.05",
                            dashboard_sample_seconds="0.1", dashboard_history="12"),
                     tmp_path / "api.log")
    try:
        api.wait_ready(path="/readyz")
        http = httpx.Client(base_url=api.url, timeout=10)
        page = http.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for src in re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', page.text):
            assert http.get(src).status_code == 200, src
        assert http.get("/dashboard/static/../api.py").status_code == 404
        assert http.get("/dashboard/static/nope.js").status_code == 404

        body = http.post("/predict", json={"instances": [[0.5] * 8] * 4}).json()
        http.post("/label", json={"labels": [{"id": p["id"], "y": 1}
                                             for p in body["predictions"]]})
        publish(store, cfg, 2, samples_trained=100, steps=10)
        time.sleep(0.8)
        data = http.get("/dashboard/data").json()
        m = data["models"]["default"]
        s = m["series"]
        assert 2 <= len(s["t"]) <= 12 and all(len(v) == len(s["t"]) for v in s.values())
        assert m["version"] == 2 and s["version"][-1] == 2
        assert s["prequential_accuracy"][-1] == 0.5
        assert s["served_accuracy"][-1] == pytest.approx(
            sum(p["label"] == 1 for p in body["predictions"]) / 4)
        assert m["served"]["labelled"] == 4
        assert s["lag"][-1] == 4  # the four joined samples wait for a trainer
        assert set(m["layers"]) == {"layers.0", "layers.1"}
        assert m["layers"]["layers.0"]["std"][-1] == 0.98
        assert m["dead_letters"] == {} or isinstance(m["dead_letters"], dict)
        # Two versions seen: samples/s and mean batch between them.
        assert s["mean_batch"][-1] == pytest.approx((100 - 10) / (10 - 1))
        time.sleep(0.6)
        assert len(http.get("/dashboard/data").json()["models"]["default"]["series"]["t"]) == 12
    finally:
        api.stop()


def _browser() -> Any:
    """playwright's chromium, or fail (CI) / skip (elsewhere) when it is not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = None
    if importlib.util.find_spec("playwright") is None:
        missing = "Python playwright is not installed (pip install playwright)"
    elif chromium is None:
        missing = "chromium is not installed (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return chromium


def test_dashboard_in_a_browser(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    chromium = _browser()
    from playwright.sync_api import sync_playwright

    import sklearn.datasets as sklearn
    digits = sklearn.load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    model = {"name": "default", "input_shape": [64], "num_classes": 10, "spec": "mlp:64,64",
             "max_batch": 16, "snapshot_every_seconds": 0.5, "snapshot_every_steps": 200,
             "label_ttl_seconds": 300}
    metrics_port = free_port()
    env = np_env(redis_server.url, tmp_path / "data", models=[model],
                 snapshot_poll_seconds="0.1", worker_metrics_port=str(metrics_port),
                 torch_threads="1", dashboard_sample_seconds="0.25",
                 dashboard_worker_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    worker_log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "service.worker"], cwd=ROOT, env=env,
                              stdout=worker_log, stderr=subprocess.STDOUT)
    api = ApiProcess(env, tmp_path / "api.log")
    requests: list[str] = []
    try:
        api.wait_ready(path="/readyz", timeout=60)
        http = httpx.Client(base_url=api.url, timeout=30)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(api.url + "/dashboard")
            page.wait_for_function(
                "() => /^\\d+$/.test(document.getElementById('version-default')?.textContent)",
                timeout=15000)
            v0 = int(page.inner_text("#version-default"))
            points0 = int(page.get_attribute("#chart-accuracy-default svg", "data-points") or 0)

            # Push samples: half through /ingest, half through predict-then-label.
            for start in range(0, 1200, 100):
                xs, ys = x[start:start + 100], y[start:start + 100]
                if start % 200 == 0:
                    r = http.post("/ingest", json={"samples": [
                        {"x": xi.tolist(), "y": int(yi)} for xi, yi in zip(xs, ys)]})
                    assert r.status_code == 202, r.text
                else:
                    pred = http.post("/predict", json={"instances": xs.tolist()}).json()
                    r = http.post("/label", json={"labels": [
                        {"id": pr["id"], "y": int(yi)} for pr, yi in zip(pred["predictions"], ys)]})
                    assert r.status_code == 202, r.text
                time.sleep(0.15)
            # Invalid entries straight onto the stream: dead letters by reason.
            import redis as redis_lib
            rc = redis_lib.Redis.from_url(redis_server.url)
            rc.xadd("np:{default}:samples", {"x": "[1, 2]", "y": "3"})
            rc.xadd("np:{default}:samples", {"x": "[" + ",".join(["0"] * 64) + "]", "y": "12"})

            page.wait_for_function(
                f"() => Number(document.getElementById('version-default').textContent) > {v0}",
                timeout=30000)
            page.wait_for_function(
                "() => Number(document.querySelector('#chart-accuracy-default svg')"
                f".getAttribute('data-points')) > {points0 + 5}", timeout=30000)
            page.wait_for_function(
                "() => document.querySelectorAll('#chart-dead-default rect').length >= 2",
                timeout=30000)
            page.wait_for_function(
                "() => document.querySelectorAll('#chart-layer-std-default path.line').length >= 2",
                timeout=30000)
            page.wait_for_function(
                "() => document.querySelectorAll('#chart-batch-default rect').length >= 1",
                timeout=30000)
            page.wait_for_function(
                "() => Number(document.getElementById('labelled-default')?.textContent) >= 600",
                timeout=30000)
            time.sleep(2.0)  # a few more points for the picture
            v1 = int(page.inner_text("#version-default"))
            served_path = page.get_attribute(
                "#chart-accuracy-default svg path[data-name='served (total)']", "d")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            updates = int(page.get_attribute("body", "data-updates") or 0)
            browser.close()
        assert v1 > v0 and served_path and updates >= 10
        assert requests and all(u.startswith(api.url) for u in requests), \
            [u for u in requests if not u.startswith(api.url)][:5]
        assert SCREENSHOT.stat().st_size > 20_000
    finally:
        api.stop()
        stop_process(worker)
        worker_log.close()
