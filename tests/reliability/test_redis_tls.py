"""Production Redis: a password and TLS (``rediss://``), for real.

A throw-away CA and a server certificate for 127.0.0.1 are made at test time (the openssl CLI,
or the ``cryptography`` package where there is no CLI); a ``redis-server`` listens on a TLS
port only (``--port 0``) and requires a password. Then:

- a worker and an API process, configured only by ``NP_*`` variables, train and serve through
  it: the API's CA comes from ``NP_REDIS_SSL_CA_CERTS``, the worker's from the URL's
  ``?ssl_ca_certs=`` (both ways work); samples ingested over HTTP and pushed by the CLI's
  ``push_file`` are trained (every one, none pending) and ``/predict`` answers;
- a wrong password, a plain ``redis://`` URL to the TLS port, and ``rediss://`` without the CA
  each fail clearly: ingest answers 503 ``redis_unavailable``, ``/readyz`` says Redis is down,
  both processes stay up and log one readable reason -- no traceback, and never the password;
- the settings refuse TLS files with a plain ``redis://`` URL, without echoing the URL.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import redis

_SERVICE_TESTS = str(Path(__file__).resolve().parents[1] / "service")
if _SERVICE_TESTS not in sys.path:
    sys.path.insert(0, _SERVICE_TESTS)

from test_api_support import ROOT, ApiProcess, free_port, np_env  # noqa: E402

from service import keys  # noqa: E402
from service.redis_options import redact_url  # noqa: E402
from service.settings import ModelConfig, Settings  # noqa: E402
from service.snapshots import SnapshotStore  # noqa: E402

PASSWORD = "tls-Pw-7c1e9a"          # distinctive: grepped for in every log
WRONG_PASSWORD = "wrong-Pw-4b2d88"
CFG = ModelConfig(name="tls", input_shape=[4], num_classes=2, spec="mlp:16", max_batch=16,
                  snapshot_every_seconds=0.3)


# -- certificates ---------------------------------------------------------------------------

def _certs_openssl(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=normprop-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")


def _certs_cryptography(d: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def key() -> Any:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem_key(k: Any) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = key(), key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "normprop-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
           .issuer_name(ca_name).public_key(srv_key.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(minutes=5))
           .not_valid_after(now + datetime.timedelta(days=2))
           .add_extension(x509.SubjectAlternativeName(
               [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
               critical=False)
           .sign(ca_key, hashes.SHA256()))
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "ca.key").write_bytes(pem_key(ca_key))
    (d / "server.crt").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(pem_key(srv_key))


def make_certs(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if shutil.which("openssl"):
        _certs_openssl(d)
        return
    try:
        _certs_cryptography(d)
    except ImportError:
        pytest.fail("neither the openssl CLI nor the cryptography package is installed: "
                    "cannot make a test certificate (apt-get install openssl)")


# -- a TLS-only redis-server ----------------------------------------------------------------

class TlsRedis:
    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not on the PATH (apt-get install redis-server)")
        self.workdir = workdir
        self.certs = workdir / "certs"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def url(self, password: str = PASSWORD, scheme: str = "rediss", query: str = "") -> str:
        return f"{scheme}://:{password}@127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def start(self) -> None:
        make_certs(self.certs)
        log = self.workdir / "redis.log"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(self.certs / "server.crt"),
             "--tls-key-file", str(self.certs / "server.key"),
             "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--daemonize", "no", "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis.from_url(self.url(), ssl_ca_certs=str(self.ca), socket_timeout=2)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                text = (log.read_text(errors="replace") if log.exists() else "") + err
                # Debian's redis-server is built with TLS; a build without it must not pass
                # silently.
                pytest.fail(f"redis-server with --tls-port did not start (built without TLS "
                            f"support?):\n{text[-2000:]}")
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(), ssl_ca_certs=str(self.ca), socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path_factory.mktemp("tls-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- service processes ----------------------------------------------------------------------

def service_env(redis_url: str, data_dir: Path, **extra: Any) -> dict[str, str]:
    base: dict[str, Any] = dict(device="cpu", torch_threads="1", worker_block_ms="50",
                                lease_ttl_seconds="2", redis_retries="1",
                                redis_socket_timeout="2", redis_connect_timeout="1",
                                worker_metrics_port="0", log_level="INFO")
    base.update(extra)
    return np_env(redis_url, data_dir, models=[CFG.model_dump(mode="json")], **base)


@contextlib.contextmanager
def service(tmp: Path, worker_url: str, api_url: str, worker_extra: dict[str, Any] | None = None,
            api_extra: dict[str, Any] | None = None
            ) -> Iterator[tuple[ApiProcess, subprocess.Popen[bytes], Path]]:
    """A worker and an API process (started together: their imports overlap); stopped after."""
    data_dir = tmp / "data"
    worker_log = tmp / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "service.worker"], cwd=ROOT,
                                  env=service_env(worker_url, data_dir, **(worker_extra or {})),
                                  stdout=log, stderr=subprocess.STDOUT)
    api = ApiProcess(service_env(api_url, data_dir, **(api_extra or {})), tmp / "api.log")
    try:
        yield api, worker, worker_log
    finally:
        api.stop()
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def wait_for(pred: Callable[[], bool], timeout: float, what: str,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    detail = f"\n{log.name}:\n{read(log)[-3000:]}" if log is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def assert_no_secret_no_traceback(*logs: Path) -> None:
    for log in logs:
        text = read(log)
        assert PASSWORD not in text and WRONG_PASSWORD not in text, (log.name, text[-3000:])
        assert "Traceback" not in text, (log.name, text[-3000:])


def samples(n: int, offset: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(offset, offset + n):
        y = i % 2
        out.append({"x": [(1.5 if y else -1.5) + 0.01 * (i % 7), 0.2, -0.1 * y, 0.05],
                    "y": y})
    return out


# -- tests ----------------------------------------------------------------------------------

def test_worker_and_api_train_and_serve_over_tls_with_a_password(
        tls_redis: TlsRedis, tmp_path: Path) -> None:
    # The worker names its CA in the URL, the API through NP_REDIS_SSL_CA_CERTS.
    worker_url = tls_redis.url(query=f"ssl_ca_certs={tls_redis.ca}")
    api_url = tls_redis.url()
    with service(tmp_path, worker_url, api_url,
                 api_extra={"redis_ssl_ca_certs": str(tls_redis.ca)}) as (api, worker, worker_log):
        api.wait_ready(90, path="/readyz")
        http = httpx.Client(base_url=api.url, timeout=10)
        assert http.get("/readyz").json()["redis"] is True
        accepted = 0
        for k in range(4):
            r = http.post("/ingest", json={"model": "tls", "samples": samples(50, 50 * k)})
            assert r.status_code == 202, r.text
            accepted += r.json()["accepted"]

        # The CLI's bulk push goes through the same TLS options (settings in-process).
        from service.cli import push_file

        data = tmp_path / "more.jsonl"
        data.write_text("".join(json.dumps(s) + "\n" for s in samples(100, 1000)))
        settings = Settings(redis_url=api_url, redis_ssl_ca_certs=tls_redis.ca,
                            models=[CFG], data_dir=tmp_path / "data")
        pushed, skipped = push_file(settings, data, "tls", progress=False)
        assert (pushed, skipped) == (100, 0)
        total = accepted + pushed

        store = SnapshotStore(tmp_path / "data" / "snapshots", "tls")

        def trained() -> int:
            v = store.latest_version()
            try:
                return int(store.read_header_metadata(v).get("samples_trained", -1)) if v else -1
            except Exception:  # noqa: BLE001 - pruned between the two reads: ask again
                return -1

        wait_for(lambda: trained() == total, 90, f"{total} samples trained over TLS", worker_log)
        r = http.post("/predict", json={"model": "tls", "instances": [samples(1)[0]["x"]]})
        assert r.status_code == 200, r.text
        assert r.json()["version"] >= 1 and r.json()["predictions"][0]["label"] in (0, 1)

        client = tls_redis.client()
        try:
            stream = keys.samples_stream("tls")
            wait_for(lambda: client.xpending(stream, keys.CONSUMER_GROUP)["pending"] == 0,
                     30, "every entry acked")
            info = client.xinfo_groups(stream)[0]
            assert info["entries-read"] >= total
            assert client.xlen(keys.dead_letter_stream("tls")) == 0
        finally:
            client.close()
        http.close()
        assert worker.poll() is None, read(worker_log)[-3000:]
    assert_no_secret_no_traceback(worker_log, tmp_path / "api.log")


@pytest.mark.parametrize("case", ["wrong_password", "plain_redis_url", "no_ca"])
def test_bad_connection_settings_fail_clearly_without_leaking_the_password(
        tls_redis: TlsRedis, tmp_path: Path, case: str) -> None:
    url, extra, reason = {
        "wrong_password": (tls_redis.url(WRONG_PASSWORD), {"redis_ssl_ca_certs": str(tls_redis.ca)},
                           ("invalid username-password pair",)),
        # The server resets a connection that does not start with a TLS handshake.
        "plain_redis_url": (tls_redis.url(scheme="redis"), {},
                            ("Connection reset by peer", "Connection closed by server")),
        "no_ca": (tls_redis.url(), {}, ("CERTIFICATE_VERIFY_FAILED",)),
    }[case]
    with service(tmp_path, url, url, extra, extra) as (api, worker, worker_log):
        api.wait_ready(90)  # /healthz: the API runs (and would serve snapshots) without Redis
        r = httpx.post(api.url + "/ingest", json={"model": "tls", "samples": samples(1)},
                       timeout=10)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "redis_unavailable", r.text
        assert r.headers.get("retry-after") == "1"
        assert httpx.get(api.url + "/readyz", timeout=10).json()["redis"] is False
        wait_for(lambda: "Redis unavailable" in read(worker_log), 90, "the worker's Redis error",
                 worker_log)
        wait_for(lambda: "Redis is unreachable" in read(api.log_path), 30, "the API's Redis error",
                 api.log_path)
        assert worker.poll() is None and api.proc.poll() is None
    worker_text, api_text = read(worker_log), read(tmp_path / "api.log")
    assert any(r in worker_text for r in reason), worker_text[-3000:]
    assert any(r in api_text for r in reason), api_text[-3000:]
    assert_no_secret_no_traceback(worker_log, tmp_path / "api.log")


def test_tls_files_with_a_plain_url_are_refused_without_echoing_it(tls_redis: TlsRedis) -> None:
    with pytest.raises(ValueError) as err:
        Settings(redis_url=tls_redis.url(scheme="redis"), redis_ssl_ca_certs=tls_redis.ca)
    assert "rediss://" in str(err.value) and PASSWORD not in str(err.value)
    with pytest.raises(ValueError) as err:
        Settings(redis_url=tls_redis.url(), redis_ssl_ca_certs=tls_redis.workdir / "missing.pem")
    assert "redis_ssl_ca_certs" in str(err.value) and PASSWORD not in str(err.value)
    # Any other validation error does not echo the URL either (inputs are hidden).
    with pytest.raises(ValueError) as err:
        Settings(redis_url=tls_redis.url(), models=[CFG, CFG])
    assert PASSWORD not in str(err.value)
    assert redact_url(tls_redis.url()) == f"rediss://:***@127.0.0.1:{tls_redis.port}/0"
