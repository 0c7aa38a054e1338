"""Configuration: one pydantic-settings class read from the environment (prefix ``NP_``).

Every field name is the environment variable the compose file sets, upper-cased with the
prefix: ``redis_url`` is ``NP_REDIS_URL``, ``models`` is ``NP_MODELS`` (a JSON list), and so on.
Models are declared by configuration alone; ``NP_MODELS_FILE`` may point at a JSON file instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import (BaseModel, Field, FilePath, SecretStr, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ModelConfig", "Settings", "MODEL_NAME_PATTERN", "MAX_LABEL_LENGTH", "label_key"]

#: Model names appear in Redis keys, file names and metric labels.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: Longest string label (labels travel in stream entries, metadata and responses).
MAX_LABEL_LENGTH = 256


def label_key(label: int | str) -> tuple[bool, int | str]:
    """A dict key that keeps the integer label ``3`` and the string label ``"3"`` apart."""
    return (isinstance(label, str), label)


class ModelConfig(BaseModel):
    """One named model: its data, architecture and training settings.

    Defaults were chosen from measurements on several real streams (see ``docs/DEFAULTS.md``,
    ``benchmarks/defaults_sweep.py``): SGD with momentum 0.9 at ``lr=0.001`` per sample,
    scaled *linearly* with the batch the worker actually takes (0.016 at 16, 0.064 at 64) --
    the best one-pass prequential accuracy at batch size 1, 16 and 64 alike, with no tuning.
    """

    model_config = {"extra": "forbid"}

    name: str = Field("default", pattern=MODEL_NAME_PATTERN)
    input_shape: list[int] = Field(default_factory=lambda: [64], min_length=1, max_length=3)
    task: Literal["classification", "regression"] = "classification"
    num_classes: int = Field(10, ge=2, le=100_000)
    #: Labels listed up front (integers or strings): the label map is fixed, one output unit
    #: per listed label, in this order; ``num_classes`` is then ignored. With
    #: ``open_classes`` they are only the initial classes. None (and not open): labels are the
    #: class indices ``0..num_classes-1``, as always.
    classes: list[int | str] | None = None
    #: Open label set (class-incremental): a label never seen before grows the output layer by
    #: one unit, up to ``max_classes``; past it the entry is dead-lettered ``too_many_classes``.
    open_classes: bool = False
    max_classes: int = Field(1000, ge=2, le=100_000)
    num_targets: int = Field(1, ge=1, le=10_000)
    spec: str = "mlp:256,256"
    activation: str = "relu"
    data_norm: Literal["batch", "running", "global", "none"] = "batch"
    half_life: float | None = Field(None, gt=0)
    clip: float | None = Field(10.0, gt=0)
    global_mean: list[float] | None = None
    global_std: list[float] | None = None
    lr: float = Field(0.001, gt=0)
    lr_scaling: Literal["sqrt", "linear", "none"] = "linear"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    max_batch: int = Field(64, ge=1, le=65_536)
    snapshot_every_steps: int = Field(500, ge=1)
    snapshot_every_seconds: float = Field(2.0, gt=0)
    keep_snapshots: int = Field(5, ge=1)
    seed: int = 0
    #: Delayed labels: when set, ``POST /predict`` keeps each instance's features, answering
    #: version and prediction in Redis this long, for ``POST /label`` to join a label to.
    label_ttl_seconds: float | None = Field(None, gt=0, le=30 * 86400)

    @field_validator("input_shape")
    @classmethod
    def _positive_dims(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError("input_shape dimensions must be positive")
        return v

    @model_validator(mode="after")
    def _label_set(self) -> ModelConfig:
        if self.classes is None and not self.open_classes:
            return self
        if self.task != "classification":
            raise ValueError("classes and open_classes apply to classification only")
        labels = self.classes or []
        if any(isinstance(c, bool) or (isinstance(c, str) and not 0 < len(c) <= MAX_LABEL_LENGTH)
               for c in labels):
            raise ValueError(f"classes must be integers or strings of 1 to {MAX_LABEL_LENGTH} "
                             "characters")
        if len(set(map(label_key, labels))) != len(labels):
            raise ValueError("classes must be unique")
        if not self.open_classes and len(labels) < 2:
            raise ValueError("a fixed label set needs at least 2 classes")
        if self.open_classes and len(labels) > self.max_classes:
            raise ValueError(f"{len(labels)} classes listed but max_classes={self.max_classes}")
        if self.open_classes and not self.spec.replace(" ", "").startswith("mlp:"):
            raise ValueError("open_classes needs an MLP spec ('mlp:...'): its output layer grows")
        return self

    @property
    def label_set(self) -> Literal["indices", "listed", "open"]:
        """How labels map to output units: class indices (the default), a fixed listed set, or
        an open set that grows."""
        if self.open_classes:
            return "open"
        return "listed" if self.classes is not None else "indices"

    @property
    def initial_label_map(self) -> list[int | str] | None:
        """The user labels of the output units at the start, in unit order (None: indices)."""
        if self.label_set == "indices":
            return None
        return list(self.classes or [])

    @model_validator(mode="after")
    def _global_stats(self) -> ModelConfig:
        if self.data_norm == "global" and (self.global_mean is None or self.global_std is None):
            raise ValueError("data_norm='global' needs global_mean and global_std")
        return self

    @property
    def num_features(self) -> int:
        """Values per sample (the flattened input size)."""
        return math.prod(self.input_shape)

    @property
    def num_outputs(self) -> int:
        """Output units at the start (an open label set may grow past it)."""
        if self.task != "classification":
            return self.num_targets
        if self.label_set == "listed":
            return len(self.classes or [])
        if self.label_set == "open":
            # At least 2 units: a classifier with one logit has nothing to learn.
            return max(2, len(self.classes or []))
        return self.num_classes


class Settings(BaseSettings):
    """Service settings; every field is an ``NP_``-prefixed environment variable."""

    # hide_input_in_errors: a validation error must not echo NP_REDIS_URL (its password).
    model_config = SettingsConfigDict(env_prefix="NP_", env_file=None, extra="ignore",
                                      hide_input_in_errors=True)

    # Redis. None: the CLI's `run` starts a private redis-server child and fills this in.
    redis_url: str | None = None
    # Bounds on a hung Redis (tests/reliability/test_faults.py freezes it): a worker call
    # gives up after about (retries + 1) x socket timeout plus backoff, ~10 s with these
    # (it was ~30 s with 5 s and 5 retries); the API's ingest answers 503 within one timeout.
    redis_socket_timeout: float = Field(3.0, gt=0)
    redis_connect_timeout: float = Field(2.0, gt=0)
    redis_retries: int = Field(2, ge=0)
    # TLS (``rediss://`` URLs only): the CA that signed the server's certificate, and a client
    # certificate and key where the server requires one (see service/redis_options.py).
    redis_ssl_ca_certs: FilePath | None = None
    redis_ssl_certfile: FilePath | None = None
    redis_ssl_keyfile: FilePath | None = None
    redis_ssl_check_hostname: bool = True

    # Models.
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()])
    models_file: Path | None = None

    # Storage shared by worker and API (a volume in docker compose).
    data_dir: Path = Path("var")

    # Worker.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    worker_metrics_port: int = Field(9100, ge=0, le=65535)
    worker_block_ms: int = Field(200, ge=1)
    consumer_name: str | None = None
    torch_threads: int | None = Field(None, ge=1)
    #: How ``normprop.ProjectedSGD`` takes each weight's step (the same iterates every way):
    #: ``auto`` -- its C kernel on the CPU when the worker can build it (a C compiler, once;
    #: ``NORMPROP_CACHE_DIR`` keeps the build), else torch ops; ``eager`` -- torch ops only;
    #: ``native`` -- the kernel or fail at start; ``compile`` -- ``torch.compile`` (GPU);
    #: ``project`` -- torch's SGD then the projection (auto's choice on a GPU: fewest launches).
    optimizer_backend: Literal["auto", "eager", "native", "compile", "project"] = "auto"
    #: The service's own log level (worker and API; uvicorn's access log has its own flags).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value
    # Only the holder of a model's lease trains it; it renews every third of the TTL, and
    # another worker takes over this long after the holder dies.
    lease_ttl_seconds: float = Field(10.0, gt=0)

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    ingest_api_key: SecretStr | None = None
    admin_api_key: SecretStr | None = None
    predict_api_key: SecretStr | None = None
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_instances: int = Field(1024, ge=1)
    max_backlog: int = Field(100_000, ge=1)
    #: How long POST /ingest remembers an Idempotency-Key (a retry within it is answered with
    #: the first request's IDs instead of writing the samples again).
    ingest_idempotency_ttl_seconds: float = Field(86_400.0, gt=0)
    snapshot_poll_seconds: float = Field(0.2, gt=0)
    #: A prediction whose measured compute is below this runs on the event loop, above it in a
    #: thread (0: always a thread). See ``service/serving.py`` and docs/SERVICE.md.
    predict_inline_budget_seconds: float = Field(0.002, ge=0)
    cors_origins: list[str] = Field(default_factory=list)
    #: The dashboard's history: one point per model every this many seconds, this many kept.
    dashboard_sample_seconds: float = Field(1.0, gt=0)
    dashboard_history: int = Field(600, ge=2, le=100_000)
    #: Optional: the worker's /metrics (e.g. http://worker:9100/metrics); the dashboard then
    #: shows the exact batch-size mix from its histogram, else the mean batch per checkpoint.
    dashboard_worker_metrics_url: str | None = None

    @model_validator(mode="after")
    def _redis_tls_needs_rediss(self) -> Settings:
        tls = [f for f in ("redis_ssl_ca_certs", "redis_ssl_certfile", "redis_ssl_keyfile")
               if getattr(self, f) is not None]
        if tls and self.redis_url is not None and not self.redis_url.startswith("rediss://"):
            raise ValueError(f"NP_{tls[0].upper()} is set but NP_REDIS_URL is not a rediss:// "
                             "URL (TLS options apply to rediss:// only)")
        return self

    @model_validator(mode="after")
    def _load_models_file(self) -> Settings:
        if self.models_file is not None:
            raw = json.loads(Path(self.models_file).read_text())
            self.models = [ModelConfig.model_validate(m) for m in raw]
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if not self.models:
            raise ValueError("at least one model must be configured")
        return self

    def model(self, name: str) -> ModelConfig:
        """The configuration of model ``name``; ``KeyError`` if it is not declared."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / "snapshots"
