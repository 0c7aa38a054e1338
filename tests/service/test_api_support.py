"""Helpers for the API tests (no tests here): an API server process, snapshot publishing.

The API is always tested as it runs in production: a real uvicorn process speaking HTTP on a
free port (``python -m uvicorn --factory service.api:create_app``), configured only through
``NP_*`` environment variables, against a real redis-server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import torch

from service.settings import ModelConfig
from service.snapshots import SnapshotStore, build_network, config_fingerprint, load_network

ROOT = Path(__file__).resolve().parents[2]


def shared_conftest(config: pytest.Config) -> ModuleType:
    """``tests/conftest.py`` as pytest loaded it (its ``RedisServer`` for module-scoped use)."""
    mod = config.pluginmanager.get_plugin(str(ROOT / "tests" / "conftest.py"))
    assert mod is not None, "tests/conftest.py is not loaded"
    return mod  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def np_env(redis_url: str, data_dir: Path, models: list[dict[str, Any]] | None = None,
           **extra: Any) -> dict[str, str]:
    """The environment of a service process: ``NP_*`` variables only, as compose sets them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NP_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["NP_REDIS_URL"] = redis_url
    env["NP_DATA_DIR"] = str(data_dir)
    if models is not None:
        env["NP_MODELS"] = json.dumps(models)
    for key, value in extra.items():
        env[f"NP_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


class ApiProcess:
    """``python -m uvicorn --factory service.api:create_app`` on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.api:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log",
             "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0, path: str = "/healthz") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the API was not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def publish(store: SnapshotStore, cfg: ModelConfig, version: int, seed: int | None = None,
            corrupt: bool = False, **metadata: Any) -> None:
    """Write snapshot ``version`` of a freshly initialised net (weights differ by ``seed``).

    ``corrupt`` puts a NaN into a weight: the API must refuse to serve it.
    """
    net = build_network(cfg.model_copy(update={"seed": version if seed is None else seed}))
    state = {f"model.{k}": v.clone() for k, v in net.state_dict().items()}
    if corrupt:
        key = next(k for k, v in state.items() if k.endswith("weight") and v.dim() == 2)
        state[key][0, 0] = float("nan")
    meta = {"fingerprint": config_fingerprint(cfg), "config": cfg.model_dump(mode="json"),
            "samples_trained": 10 * version, "steps": version,
            "prequential": {"accuracy": 0.5, "window_accuracy": 0.6, "loss": 1.2},
            "layer_stats": [{"name": "layers.0", "mean": 0.01, "std": 0.98},
                            {"name": "layers.1", "mean": -0.02, "std": 1.01}],
            "dead_letters": {"bad_x": 1}, "skipped_steps": {}, **metadata}
    store.write(version, state, meta)


def expected_outputs(store: SnapshotStore, cfg: ModelConfig, version: int,
                     x: torch.Tensor) -> torch.Tensor:
    """What version ``version`` must answer for ``x``: the un-folded net's probabilities."""
    net = load_network(store.read(version), cfg)
    with torch.no_grad():
        out = net(x)
    return torch.softmax(out, 1) if cfg.task == "classification" else out


def metric_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse a scrape with prometheus_client's parser: sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def metric_value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
                 **labels: str) -> float | None:
    for lab, value in samples.get(name, []):
        if all(lab.get(k) == v for k, v in labels.items()):
            return value
    return None


__all__ = ["ApiProcess", "ROOT", "expected_outputs", "free_port", "metric_samples",
           "metric_value", "np_env", "publish", "shared_conftest"]


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
