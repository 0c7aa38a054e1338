"""``python -m service push``: CSV, JSONL and NPZ files land in the model's stream, validated,
as binary ``xb`` entries the worker decodes; bad rows stop the push (or are skipped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from service import keys
from service.cli import app
from service.codec import EntryCodec
from service.settings import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(name="digits", input_shape=[8], num_classes=3, spec="mlp:8")


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NP_")}
    env.update(PYTHONPATH=str(ROOT), NP_REDIS_URL=url,
               NP_MODELS=json.dumps([CFG.model_dump(mode="json")]))
    return env


def _entries(url: str) -> list[tuple[np.ndarray, int]]:
    client = redis.Redis.from_url(url)
    try:
        codec = EntryCodec(CFG)
        out = []
        for _, fields in client.xrange(keys.samples_stream("digits")):
            assert b"xb" in fields and b"x" not in fields
            s = codec.decode(fields)
            out.append((s.x, s.y))
        return out
    finally:
        client.close()


def test_push_csv_and_jsonl(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=25)
    csv_path = tmp_path / "data.csv"
    with csv_path.open("w") as f:
        f.write(",".join([f"f{i}" for i in range(8)] + ["label"]) + "\n")
        for xi, yi in zip(x, y):
            f.write(",".join(f"{v:.7g}" for v in xi) + f",{yi}\n")
    # As a user runs it: a subprocess, progress bar on stderr.
    done = subprocess.run([sys.executable, "-m", "service", "push", str(csv_path), "--model",
                           "digits", "--batch", "10"], env=_env(redis_server.url), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pushed 25 samples" in done.stdout
    got = _entries(redis_server.url)
    assert len(got) == 25
    np.testing.assert_allclose(np.stack([g[0] for g in got]), x, rtol=1e-6)
    assert [g[1] for g in got] == y.tolist()

    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("".join(json.dumps({"x": xi.tolist(), "y": int(yi)}) + "\n"
                             for xi, yi in zip(x[:17], y[:17])) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["push", str(jsonl), "--model", "digits", "--no-progress"],
                           env={"NP_REDIS_URL": redis_server.url,
                                "NP_MODELS": json.dumps([CFG.model_dump(mode="json")])})
    assert result.exit_code == 0, result.output
    assert len(_entries(redis_server.url)) == 42

    npz = tmp_path / "arrays.npz"
    np.savez(npz, x=x[:5], y=y[:5])
    result = runner.invoke(app, ["push", str(npz), "--model", "digits", "--no-progress"],
                           env={"NP_REDIS_URL": redis_server.url,
                                "NP_MODELS": json.dumps([CFG.model_dump(mode="json")])})
    assert result.exit_code == 0, result.output
    assert len(_entries(redis_server.url)) == 47


def test_push_bad_rows(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {"NP_REDIS_URL": redis_server.url,
           "NP_MODELS": json.dumps([CFG.model_dump(mode="json")])}
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,4,5,6,7,8,0\n1,2,3,4,5,6,7,8,1\n1,2,3,4,5,6,7,8,9\n1,2,3,4,5,6,7,8,2\n")
    runner = CliRunner()
    result = runner.invoke(app, ["push", str(bad), "--model", "digits", "--no-progress"], env=env)
    assert result.exit_code == 1
    assert "row 3" in result.output and "label 9" in result.output
    assert "2 samples pushed before it" in result.output
    result = runner.invoke(app, ["push", str(bad), "--model", "digits", "--no-progress",
                                 "--skip-invalid"], env=env)
    assert result.exit_code == 0 and "skipped 1" in result.output
    assert len(_entries(redis_server.url)) == 2 + 3

    unknown = runner.invoke(app, ["push", str(bad), "--model", "nope"], env=env)
    assert unknown.exit_code == 2 and "no model named 'nope'" in unknown.output
    weird = tmp_path / "data.parquet"
    weird.write_text("x")
    out = runner.invoke(app, ["push", str(weird), "--model", "digits"], env=env)
    assert out.exit_code == 1 and "unknown format" in out.output


def test_run_without_redis_server_says_how_to_install(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NP_")}
    env.update(PYTHONPATH=str(ROOT), PATH=str(tmp_path))  # nothing on the PATH
    done = subprocess.run([sys.executable, "-m", "service", "run", "--data-dir",
                           str(tmp_path / "var")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "apt-get install redis-server" in done.stderr


@pytest.mark.parametrize("command", ["run", "api", "worker", "push"])
def test_cli_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_push_string_labels(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Models with their own labels take them from files as they are written: bare words in a
    CSV, JSON strings in JSONL; a label outside a closed set stops the push, naming the row."""
    pets = ModelConfig(name="pets", input_shape=[2], classes=["cat", "dog", "7"], spec="mlp:4")
    env = {"NP_REDIS_URL": redis_server.url,
           "NP_MODELS": json.dumps([pets.model_dump(mode="json")])}
    csv_path = tmp_path / "pets.csv"
    csv_path.write_text("a,b,label\n0.5,1,cat\n1.5,2,dog\n2.5,3,\"7\"\n")
    runner = CliRunner()
    result = runner.invoke(app, ["push", str(csv_path), "--model", "pets", "--no-progress"],
                           env=env)
    assert result.exit_code == 0, result.output
    jsonl = tmp_path / "pets.jsonl"
    jsonl.write_text(json.dumps({"x": [3.5, 4], "y": "dog"}) + "\n")
    result = runner.invoke(app, ["push", str(jsonl), "--model", "pets", "--no-progress"], env=env)
    assert result.exit_code == 0, result.output
    client = redis.Redis.from_url(redis_server.url)
    codec = EntryCodec(pets)
    labels = [codec.decode(f).y for _, f in client.xrange(keys.samples_stream("pets"))]
    assert labels == ["cat", "dog", "7", "dog"]  # the CSV cell 7 is the listed string "7"
    bad = tmp_path / "bad.csv"
    bad.write_text("0.5,1,cat\n0.5,1,cow\n")
    result = runner.invoke(app, ["push", str(bad), "--model", "pets", "--no-progress"], env=env)
    assert result.exit_code != 0 and "row 2" in result.output and "cow" in result.output
    assert client.xlen(keys.samples_stream("pets")) == 5  # the good row before it was pushed
    client.close()
