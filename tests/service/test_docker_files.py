"""docker-compose.yml and the images, checked statically (no Docker engine on the test machine):
the services and their wiring, every NP_* variable is a real Settings field, and every
CMD/ENTRYPOINT names an entry point that exists."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import app as cli_app
from service.settings import ModelConfig, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _resolve(value: str) -> str:
    """Compose's ``${VAR:-default}`` -> default (what runs when VAR is unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def test_services_are_wired(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "worker", "api", "prometheus", "grafana"} <= set(services)

    redis = services["redis"]
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])

    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"

    api = services["api"]
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"
    # Worker and API share the snapshot volume (the API serves from it, not from Redis).
    data = {v.split(":")[0] for v in worker["volumes"]} & {v.split(":")[0] for v in api["volumes"]}
    assert data & set(compose["volumes"])

    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    for name in ("redis", "worker", "api"):
        assert "profiles" not in services[name]


def test_every_np_variable_is_a_settings_field(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    seen = 0
    for name, service in compose["services"].items():
        env = _env(service)
        for key in env:
            if key.startswith("NP_"):
                seen += 1
                assert key[3:].lower() in fields, f"{name}: {key} is not a Settings field"
        if name in ("worker", "api"):
            # What the container gets parses: models file from the repository, paths as mounted.
            resolved = {k[3:].lower(): _resolve(v) for k, v in env.items() if k.startswith("NP_")}
            resolved["models_file"] = str(DOCKER / "models.json")
            for key in [k for k, v in resolved.items() if k.endswith("api_key") and not v]:
                del resolved[key]
            Settings.model_validate(resolved)
    assert seen >= 8
    for model in json.loads((DOCKER / "models.json").read_text()):
        ModelConfig.model_validate(model)
    for path in ("docker/models.json", "docker/prometheus.yml"):
        assert any(path in v for s in compose["services"].values() for v in s.get("volumes", []))


def _instructions(dockerfile: Path, keyword: str) -> list[list[str]]:
    out = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith(keyword + " "):
            out.append(json.loads(line[len(keyword) + 1:]))  # exec form only
    return out


@pytest.mark.parametrize("image", ["api", "worker"])
def test_dockerfile_entry_points_exist(image: str) -> None:
    dockerfile = DOCKER / f"{image}.Dockerfile"
    text = dockerfile.read_text()
    cmds = _instructions(dockerfile, "CMD") + _instructions(dockerfile, "ENTRYPOINT")
    assert cmds, "exec-form CMD expected"
    commands = {c.name or c.callback.__name__ for c in cli_app.registered_commands}
    for cmd in cmds:
        if cmd[:2] == ["python", "-m"]:
            module = cmd[2]
            assert importlib.util.find_spec(module) is not None, module
            if module == "service":
                assert (ROOT / "service" / "__main__.py").exists()
                assert cmd[3] in commands, f"`python -m service {cmd[3]}` is not a CLI command"
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part
    if image == "worker":
        assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
        assert "download.pytorch.org/whl/cu" in text
        assert ["python", "-m", "service", "worker"] in cmds
    else:
        assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
        assert "download.pytorch.org/whl/cpu" in text
        assert ["python", "-m", "service", "api"] in cmds


def test_monitoring_configuration() -> None:
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    assert {"api:8000", "worker:9100"} <= targets
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    uid = ds["datasources"][0]["uid"]
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/normprop.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((DOCKER / "grafana/dashboards/normprop-stream.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("normprop_api_predictions_total", "normprop_api_request_duration_seconds_bucket",
                   "normprop_worker_prequential_accuracy", "normprop_worker_layer_input_mean",
                   "normprop_api_snapshot_version", "normprop_worker_stream_lag"):
        assert metric in exprs
    assert all(t["datasource"]["uid"] == uid for p in dashboard["panels"] for t in p["targets"])
