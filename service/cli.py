"""The command line: ``python -m service run | api | worker | push`` (also ``normprop-stream``).

``run`` is the whole service on one machine: a private ``redis-server`` (append-only file in
``data_dir``) unless ``NP_REDIS_URL`` is given, the training worker and the API, each a child
process in its own session so that Ctrl-C reaches only this supervisor, which then stops them in
order -- API, worker (it writes a last checkpoint and acks what it covers), Redis last (it
fsyncs its append-only file) -- and never leaves one behind.

Every setting is an ``NP_*`` environment variable (:class:`service.settings.Settings`); the few
options here are shortcuts that set those variables for the children.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from .settings import Settings

__all__ = ["app", "iter_samples", "push_file"]

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="NormProp Stream: train NormProp networks online from a Redis stream "
                       "and serve their predictions.")

REDIS_MISSING = ("redis-server is not on the PATH. Install it (Debian/Ubuntu: "
                 "`apt-get install redis-server`; macOS: `brew install redis`) or point "
                 "NP_REDIS_URL at a running Redis.")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


# -- api / worker -----------------------------------------------------------------------------
@app.command()
def api(host: Optional[str] = typer.Option(None, help="bind address (NP_API_HOST)"),
        port: Optional[int] = typer.Option(None, help="port (NP_API_PORT)"),
        access_log: bool = typer.Option(False, help="log every request (costs throughput)")
        ) -> None:
    """Serve the HTTP API (uvicorn, one process)."""
    import uvicorn

    from .api import create_app

    _logging()
    settings = Settings()
    host = host or settings.api_host
    port = settings.api_port if port is None else port
    uvicorn.run(create_app(settings), host=host, port=port, access_log=access_log,
                log_level="info", timeout_graceful_shutdown=5)


@app.command()
def worker() -> None:
    """Run the training worker (the same as ``python -m service.worker``)."""
    if importlib.util.find_spec("service.worker") is None:
        typer.echo("service.worker is not installed in this checkout", err=True)
        raise typer.Exit(2)
    sys.argv = [sys.argv[0]]
    runpy.run_module("service.worker", run_name="__main__", alter_sys=True)


# -- run ----------------------------------------------------------------------------------------
class _Child:
    """One supervised child process and how to stop it gracefully."""

    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 stop_signal: int) -> None:
        self.name = name
        self.stop_signal = stop_signal
        # A new session: Ctrl-C in the terminal reaches only the supervisor, which stops the
        # children in order (Redis must outlive the worker's last checkpoint).
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(args, env=env,
                                                              start_new_session=True)

    def stop(self, timeout: float) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            typer.echo(f"[run] {self.name} did not stop in {timeout:.0f}s; killing it", err=True)
            self.proc.kill()
            self.proc.wait()


@app.command()
def run(api_port: Optional[int] = typer.Option(None, help="API port (NP_API_PORT)"),
        worker_metrics_port: Optional[int] = typer.Option(
            None, help="worker metrics port (NP_WORKER_METRICS_PORT)"),
        redis_port: Optional[int] = typer.Option(
            None, help="port of the private redis-server (default: a free one)"),
        data_dir: Optional[Path] = typer.Option(None, help="snapshots and Redis AOF (NP_DATA_DIR)"),
        ) -> None:
    """Start Redis (unless NP_REDIS_URL is set), the worker and the API; Ctrl-C stops all."""
    env = dict(os.environ)
    if api_port is not None:
        env["NP_API_PORT"] = str(api_port)
    if worker_metrics_port is not None:
        env["NP_WORKER_METRICS_PORT"] = str(worker_metrics_port)
    if data_dir is not None:
        env["NP_DATA_DIR"] = str(data_dir)
    # Settings read from the children's environment, so what we print is what they use.
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        settings = Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if settings.redis_url is None and shutil.which("redis-server") is None:
        typer.echo(f"[run] {REDIS_MISSING}", err=True)
        raise typer.Exit(2)
    if importlib.util.find_spec("service.worker") is None:
        typer.echo("[run] service.worker is not installed in this checkout", err=True)
        raise typer.Exit(2)

    children: list[_Child] = []
    stopping = False

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        if settings.redis_url is None:
            exe = shutil.which("redis-server")
            assert exe is not None
            port = redis_port or _free_port()
            redis_dir = (settings.data_dir / "redis").resolve()
            redis_dir.mkdir(parents=True, exist_ok=True)
            children.append(_Child("redis", [
                exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(redis_dir / "redis.log")], env, signal.SIGTERM))
            if not _wait_for_port(port, 15, children[-1].proc):
                typer.echo(f"[run] redis-server did not start; see {redis_dir / 'redis.log'}",
                           err=True)
                raise typer.Exit(1)
            env["NP_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            typer.echo(f"[run] redis-server on 127.0.0.1:{port} (AOF in {redis_dir})")
        children.append(_Child("worker", [sys.executable, "-m", "service.worker"], env,
                               signal.SIGINT))
        children.append(_Child("api", [sys.executable, "-m", "service", "api"], env,
                               signal.SIGINT))
        typer.echo(f"[run] API on http://{settings.api_host}:{settings.api_port} "
                   f"(docs at /docs), worker metrics on :{settings.worker_metrics_port}; "
                   "Ctrl-C stops everything")
        while not stopping:
            dead = [c for c in children if c.proc.poll() is not None]
            if dead:
                typer.echo(f"[run] {dead[0].name} exited with code {dead[0].proc.returncode}; "
                           "stopping the rest", err=True)
                code = 1
                break
            time.sleep(0.2)
    finally:
        typer.echo("[run] stopping")
        # API first (stop taking requests), then the worker, Redis last.
        for child in reversed(children):
            child.stop(timeout=30 if child.name == "worker" else 15)
        for s, handler in previous.items():
            signal.signal(s, handler)
    raise typer.Exit(code)


# -- push ---------------------------------------------------------------------------------------
def _parse_label(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class CsvCell:
    """A CSV label cell: its JSON reading (a number, or the word) and the text as written."""

    value: Any
    text: str

    def resolve(self, listed: list[Any] | None) -> Any:
        """A cell ``7`` is the number 7 unless the model's declared classes hold the string
        "7" and not the number (CSV cannot tell them apart; JSONL can: ``"y": "7"``)."""
        if listed is not None and self.value not in listed and self.text in listed:
            return self.text
        return self.value


def iter_samples(path: Path, label_column: Optional[str] = None
                 ) -> Iterator[tuple[int, Any, Any]]:
    """``(line, x, y)`` from a CSV, JSONL or NPZ file (``line`` names a bad row in errors).

    * CSV: one sample per row, the label in ``label_column`` (a header name or a 0-based index;
      default: a column named y/label/target, else the last one); an optional header row.
    * JSONL: one object per line, ``{"x": [...], "y": ...}``.
    * NPZ: arrays ``x`` (or ``X``) of shape ``(n, ...)`` and ``y`` (or ``Y``); never unpickled.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with path.open() as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"line {line_no}: not JSON ({exc})") from None
                if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
                    raise ValueError(f"line {line_no}: expected an object with 'x' and 'y'")
                yield line_no, obj["x"], obj["y"]
    elif suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            xk = "x" if "x" in data else "X"
            yk = "y" if "y" in data else "Y"
            if xk not in data or yk not in data:
                raise ValueError(f"{path.name} needs arrays 'x' and 'y', has {list(data.keys())}")
            xs, ys = data[xk], data[yk]
        if len(xs) != len(ys):
            raise ValueError(f"{path.name}: {len(xs)} x rows but {len(ys)} labels")
        for i in range(len(xs)):
            y = ys[i]
            yield i, xs[i], (y.item() if y.ndim == 0 else y.tolist())
    elif suffix in (".csv", ".tsv", ".txt"):
        with path.open(newline="") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            label_index: int | None = None
            for line_no, row in enumerate(reader, 1):
                if not row:
                    continue
                if line_no == 1:
                    # A header unless the feature cells are numbers (a label may be a word;
                    # without a header the label column is an index, default the last).
                    guess = (int(label_column) if label_column is not None
                             and label_column.lstrip("-").isdigit() else -1)
                    features = [v for j, v in enumerate(row) if j != guess % len(row)]
                    try:
                        [float(v) for v in features]
                        header = None
                    except ValueError:
                        header = [h.strip() for h in row]
                    label_index = _label_index(header, len(row), label_column)
                    if header is not None:
                        continue
                assert label_index is not None
                if len(row) <= label_index:
                    raise ValueError(f"line {line_no}: has {len(row)} columns")
                values = [v for j, v in enumerate(row) if j != label_index]
                try:
                    x = [float(v) for v in values]
                except ValueError:
                    raise ValueError(f"line {line_no}: a feature is not a number") from None
                cell = row[label_index].strip()
                yield line_no, x, CsvCell(_parse_label(cell), cell)
    else:
        raise ValueError(f"{path.name}: unknown format (use .csv, .tsv, .jsonl or .npz)")


def _label_index(header: list[str] | None, width: int, label_column: Optional[str]) -> int:
    if label_column is not None:
        if label_column.lstrip("-").isdigit():
            idx = int(label_column)
            return idx % width
        if header is None or label_column not in header:
            raise ValueError(f"no column named {label_column!r} (header: {header})")
        return header.index(label_column)
    if header is not None:
        for name in ("y", "label", "target", "class"):
            if name in header:
                return header.index(name)
    return width - 1


def _count_rows(path: Path) -> int | None:
    if path.suffix.lower() == ".npz":
        return None
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def push_file(settings: Settings, path: Path, model: str, batch: int = 500,
              skip_invalid: bool = False, wait_backlog: bool = True,
              progress: bool = True, label_column: Optional[str] = None) -> tuple[int, int]:
    """Validate and XADD every sample of ``path`` (pipelined, ``xb`` binary); (pushed, skipped).

    Before each pipeline the stream's length is checked: past ``max_backlog`` it waits for the
    trainer instead of overfilling the stream (ingest's 429, applied to a bulk producer).
    """
    import redis
    from tqdm import tqdm

    from . import keys
    from .codec import DecodeError, EntryCodec
    from .redis_options import tls_options

    config = settings.model(model)
    codec = EntryCodec(config)
    listed = list(config.classes) if getattr(config, "classes", None) else None
    stream = keys.samples_stream(model)
    client = redis.Redis.from_url(settings.redis_url or "redis://127.0.0.1:6379/0",
                                  socket_timeout=settings.redis_socket_timeout,
                                  socket_connect_timeout=settings.redis_connect_timeout,
                                  **tls_options(settings))
    total = _count_rows(path)
    pushed = skipped = 0
    pending: list[dict[str, bytes]] = []

    def flush(bar: Any) -> None:
        nonlocal pushed
        if not pending:
            return
        while wait_backlog and client.xlen(stream) + len(pending) > settings.max_backlog:
            bar.set_postfix_str("backlog full, waiting for the trainer")
            time.sleep(0.5)
        pipe = client.pipeline(transaction=False)
        for fields in pending:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        pipe.execute()
        pushed += len(pending)
        bar.update(len(pending))
        pending.clear()

    try:
        with tqdm(total=total, unit="sample", desc=f"push {path.name} -> {stream}",
                  disable=not progress) as bar:
            for line_no, x, y in iter_samples(path, label_column):
                if isinstance(y, CsvCell):
                    y = y.resolve(listed)
                try:
                    pending.append(codec.encode(x, y, binary=True))
                except (DecodeError, ValueError, TypeError) as exc:
                    if not skip_invalid:
                        flush(bar)
                        raise ValueError(f"{path.name} row {line_no}: {exc} "
                                         f"({pushed} samples pushed before it)") from None
                    skipped += 1
                    bar.update(1)
                    continue
                if len(pending) >= batch:
                    flush(bar)
            flush(bar)
    finally:
        client.close()
    return pushed, skipped


@app.command()
def push(file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                     help="a .csv, .tsv, .jsonl or .npz file"),
         model: str = typer.Option("default", help="the model whose stream receives it"),
         label_column: Optional[str] = typer.Option(
             None, help="CSV: label column name or 0-based index (default y/label/target or last)"),
         batch: int = typer.Option(500, min=1, help="XADDs per pipelined round trip"),
         skip_invalid: bool = typer.Option(False, help="skip bad rows instead of stopping"),
         wait: bool = typer.Option(True, help="wait while the backlog is over NP_MAX_BACKLOG"),
         progress: bool = typer.Option(True, help="show a progress bar"),
         ) -> None:
    """Push a data file into a model's training stream (validated, pipelined XADD)."""
    import redis

    from .redis_options import redact_url

    settings = Settings()
    try:
        settings.model(model)
    except KeyError:
        typer.echo(f"no model named {model!r}; declared: {[m.name for m in settings.models]} "
                   "(declare models with NP_MODELS)", err=True)
        raise typer.Exit(2) from None
    try:
        pushed, skipped = push_file(settings, file, model, batch=batch, skip_invalid=skip_invalid,
                                    wait_backlog=wait, progress=progress,
                                    label_column=label_column)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    except redis.RedisError as exc:
        typer.echo(f"Redis at {redact_url(settings.redis_url or 'redis://127.0.0.1:6379/0')} "
                   f"is unavailable: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"pushed {pushed} samples to {model!r}" + (f", skipped {skipped}" if skipped else ""))


if __name__ == "__main__":
    app()
