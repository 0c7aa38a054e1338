"""``python -m service run``: a private redis-server, the worker and the API come up on free
ports, /readyz goes 200, samples posted to /ingest get trained and served, and Ctrl-C (SIGINT)
stops all three cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"name": "default", "input_shape": [4], "num_classes": 2, "spec": "mlp:8",
         "snapshot_every_seconds": 0.5, "snapshot_every_steps": 20}
# A second model by configuration alone: its own stream, snapshots and metric labels.
SECOND = {"name": "sensors", "input_shape": [3], "task": "regression", "num_targets": 1,
          "spec": "mlp:8"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_run_starts_redis_worker_api_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    api_port, metrics_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NP_")}
    env.update(PYTHONPATH=str(ROOT), NP_MODELS=json.dumps([MODEL, SECOND]),
               NP_SNAPSHOT_POLL_SECONDS="0.1", NP_TORCH_THREADS="1")
    log = (tmp_path / "run.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "service", "run", "--api-port", str(api_port),
                             "--worker-metrics-port", str(metrics_port), "--data-dir",
                             str(tmp_path / "var")], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.2)
        print(f"\nready in {time.monotonic() - t0:.1f}s")
        assert httpx.get(url + "/readyz").json()["models"] == {"default": 1, "sensors": 1}
        reg = httpx.post(url + "/predict", json={"model": "sensors", "instances": [[1, 2, 3]]})
        assert reg.status_code == 200 and "value" in reg.json()["predictions"][0]
        assert (tmp_path / "var" / "snapshots" / "sensors").is_dir()
        assert (tmp_path / "var" / "redis" / "appendonlydir").exists()  # AOF in data_dir
        worker_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'model="sensors"' in worker_metrics
        assert 'model="sensors"' in httpx.get(url + "/metrics").text

        # The whole path: ingest -> worker trains -> new snapshot -> served.
        samples = [{"x": [1.0, 0.0, 0.0, float(i % 2)], "y": i % 2} for i in range(50)]
        r = httpx.post(url + "/ingest", json={"samples": samples})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 30
        while httpx.get(url + "/models/default").json()["samples_trained"] in (None, 0):
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.2)
        pred = httpx.post(url + "/predict", json={"instances": [[1, 0, 0, 1]]}).json()
        assert pred["version"] >= 2
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            code = proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert code == 0, text
    assert "[run] stopping" in text
    assert not _listening(api_port) and not _listening(metrics_port)
    redis_port = int(text.split("redis-server on 127.0.0.1:")[1].split()[0])
    assert not _listening(redis_port)
