"""A real S3-compatible server process on loopback, as pytest fixtures.

``s3_server`` (session scope) starts the server as a subprocess on a free 127.0.0.1 port with freshly
generated credentials and stops it at the end of the session. ``s3_env`` (function scope) points boto3's
default credential chain at it through environment variables and gives each test its own bucket.

The server is a separate process speaking the S3 HTTP API, so the code under test goes through botocore's real
HTTP, signing, retry and multipart paths. ``RLHF_TEST_S3_SERVER`` picks it:
- ``minio``: MinIO, built from the Go module proxy by ``tests/cluster/build-binaries.sh minio`` (cached);
- ``moto``: moto's standalone server (``python -m moto.server``);
- unset (``auto``): MinIO when its binary is built, else moto. A full run (``make test``) builds MinIO before the
  first test (tests/cluster/conftest.py), so moto is only the fallback when that build fails or when a partial
  run starts before MinIO was ever built.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGION = "us-east-1"
STARTUP_TIMEOUT_S = 30.0

#: A launcher returns (argv, extra environment) for a server on ``port`` with these credentials.
Launcher = Callable[[int, str, str, Path], tuple[list[str], dict[str, str]]]


def _moto(port: int, access_key: str, secret_key: str, data_dir: Path) -> tuple[list[str], dict[str, str]]:
    # moto accepts any credentials; it keeps everything in memory, so data_dir is unused.
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], {}


def _minio(port: int, access_key: str, secret_key: str, data_dir: Path) -> tuple[list[str], dict[str, str]]:
    from cluster import binaries

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # the console port, loopback too
        sock.bind(("127.0.0.1", 0))
        console_port = sock.getsockname()[1]
    argv = [str(binaries.binary("minio", "minio")), "server", "--quiet", "--address", f"127.0.0.1:{port}",
            "--console-address", f"127.0.0.1:{console_port}", str(data_dir)]
    env = {"MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key, "MINIO_BROWSER": "off",
           "MINIO_UPDATE": "off", "MINIO_REGION": REGION}
    return argv, env


def _default_server() -> str:
    """``minio`` when its binary is built (a full run builds it first), else ``moto``."""
    try:
        from cluster import binaries
    except ImportError:
        return "moto"
    return "minio" if binaries.is_built("minio") else "moto"


LAUNCHERS: dict[str, Launcher] = {"moto": _moto, "minio": _minio}


@dataclass
class S3Server:
    """A running S3-compatible server and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = REGION
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def client(self):  # -> botocore S3 client; untyped to keep boto3 stubs optional
        """A boto3 S3 client for setup and for tampering with objects behind the code under test."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name``; return ``s3://name``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_answering(endpoint: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the S3 test server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            direct.open(endpoint, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (403 from MinIO, say) means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(
        f"the S3 test server did not answer at {endpoint} in {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def running_server(kind: str, workdir: Path) -> Iterator[S3Server]:
    """A ``kind`` server (a key of ``LAUNCHERS``) on a free loopback port, stopped on exit."""
    (workdir / "data").mkdir()
    port = _free_port()
    server = S3Server(
        endpoint=f"http://127.0.0.1:{port}",
        access_key="AK" + secrets.token_hex(9).upper(),
        secret_key=secrets.token_urlsafe(30),
    )
    argv, extra_env = LAUNCHERS[kind](port, server.access_key, server.secret_key, workdir / "data")
    log = workdir / "server.log"
    with open(log, "wb") as log_file:
        server.process = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **extra_env}, cwd=workdir
        )
    try:
        _wait_until_answering(server.endpoint, server.process, log)
        yield server
    finally:
        _stop(server.process)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Start an S3-compatible server on loopback for the session; stop it afterwards."""
    kind = os.environ.get("RLHF_TEST_S3_SERVER", "auto")
    if kind == "auto":
        kind = _default_server()
    if kind not in LAUNCHERS:
        raise pytest.UsageError(f"RLHF_TEST_S3_SERVER={kind!r}: known servers are auto, {', '.join(LAUNCHERS)}")
    with running_server(kind, tmp_path_factory.mktemp(f"s3-{kind}")) as server:
        yield server


@pytest.fixture(scope="session")
def moto_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's server whatever ``RLHF_TEST_S3_SERVER`` says: it stores any key AWS S3 stores (``a/../../b``,
    ``//b``), which MinIO refuses, so the tests of hostile keys run against it."""
    with running_server("moto", tmp_path_factory.mktemp("s3-moto")) as server:
        yield server


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> str:
    """Credentials for ``s3_server`` in the environment (boto3's default chain); return a fresh bucket's
    ``s3://<bucket>/prefix`` URI."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("NO_PROXY", ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"])))
    bucket = f"rlhf-test-{uuid.uuid4().hex[:16]}"
    return s3_server.make_bucket(bucket) + "/prefix"
