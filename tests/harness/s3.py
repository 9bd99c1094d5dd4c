"""An S3-compatible server (MinIO, built from the Go module proxy) for tests and dev.

MinIO rather than moto: it is what most people run as in-cluster S3, it is a separate
process that keeps its objects on disk, and so it can be stopped and started again in the
middle of a test (the checkpoint outage test) without losing what was already stored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.common import (
    CACHE,
    HOST,
    Running,
    ServerError,
    env_port,
    file_lock,
    port_open,
    read_live_info,
    run_dir,
    spawn,
    stop_pid,
    wait_until,
    write_info,
)

# MinIO publishes no semver tags, so the module proxy serves it as a pseudo-version; this
# one is pinned so every machine builds the same server.
MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
NAME = "s3"
ACCESS_KEY = "weir-test"
SECRET_KEY = "weir-test-secret"
REGION = "us-east-1"


def binary() -> Path:
    return CACHE / f"minio-{MINIO_VERSION}" / "bin" / "minio"


def ensure_built() -> Path:
    """Build MinIO once with ``go install`` into the cache (about 4 minutes on 2 cores)."""
    path = binary()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.parent.parent):
        if path.exists():
            return path
        go = shutil.which("go") or "/usr/local/go/bin/go"
        env = {**os.environ, "GOBIN": str(path.parent), "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
        done = subprocess.run(
            [go, "install", "-trimpath", "-ldflags", "-s -w", f"{MINIO_MODULE}@{MINIO_VERSION}"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode != 0 or not path.exists():
            raise ServerError(
                f"building MinIO {MINIO_VERSION} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            )
    return path


def _ready(port: int) -> bool:
    with urllib.request.urlopen(f"http://{HOST}:{port}/minio/health/ready", timeout=2) as resp:
        return bool(resp.status == 200)


def _start(rdir: Path, port: int, console_port: int, fresh: bool) -> None:
    data = rdir / "data"
    if fresh:
        shutil.rmtree(data, ignore_errors=True)
    data.mkdir(exist_ok=True)
    env = {
        "MINIO_ROOT_USER": ACCESS_KEY,
        "MINIO_ROOT_PASSWORD": SECRET_KEY,
        "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off",
        "MINIO_REGION": REGION,
    }
    spawn(
        [
            str(ensure_built()),
            "server",
            "--quiet",
            "--address",
            f"{HOST}:{port}",
            "--console-address",
            f"{HOST}:{console_port}",
            str(data),
        ],
        rdir,
        env=env,
    )
    wait_until(lambda: _ready(port), 60, "MinIO", rdir / "server.log")


def up() -> Running:
    """Start MinIO, or reuse the one already recorded as running."""
    rdir = run_dir(NAME)
    with file_lock(rdir):
        info = read_live_info(rdir)
        if info is not None and port_open(int(info["port"])):
            return Running(NAME, info, rdir, started_here=False)
        stop_pid(rdir)
        ensure_built()
        port = env_port("WEIR_S3_PORT", 19000)
        console_port = env_port("WEIR_S3_CONSOLE_PORT", 19001)
        for p in (port, console_port):
            if port_open(p):
                raise ServerError(
                    f"port {p} is taken by another process; set WEIR_S3_PORT / "
                    "WEIR_S3_CONSOLE_PORT to free ports"
                )
        _start(rdir, port, console_port, fresh=True)
        info = {
            "endpoint": f"http://{HOST}:{port}",
            "port": port,
            "console_port": console_port,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "region": REGION,
            "version": MINIO_VERSION,
        }
        write_info(rdir, info)
        return Running(NAME, info, rdir, started_here=True)


def down() -> None:
    stop_pid(run_dir(NAME))


def describe(r: Running) -> str:
    i = r.info
    return (
        f"S3 (MinIO {i['version']}): endpoint {i['endpoint']} region {i['region']}\n"
        f"  AWS_ACCESS_KEY_ID={i['access_key']} AWS_SECRET_ACCESS_KEY={i['secret_key']}\n"
        f"  logs: {r.run_dir / 'server.log'}"
    )


@dataclass
class S3Helper:
    """What tests need from S3: endpoint and credentials, clients, and an outage switch."""

    running: Running
    bucket: str = ""

    @property
    def endpoint(self) -> str:
        return str(self.running.info["endpoint"])

    @property
    def access_key(self) -> str:
        return str(self.running.info["access_key"])

    @property
    def secret_key(self) -> str:
        return str(self.running.info["secret_key"])

    @property
    def region(self) -> str:
        return str(self.running.info["region"])

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2},
                connect_timeout=2,
                read_timeout=10,
            ),
        )

    def new_bucket(self, prefix: str = "weir") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return name

    def drop_bucket(self, name: str) -> None:
        """Delete the bucket and everything in it."""
        client = self.client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            client.delete_bucket(Bucket=name)
        finally:
            client.close()

    def env(self) -> dict[str, str]:
        """The variables a worker process reads to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def stop(self) -> None:
        """Stop the server process but keep its data (an outage, not a wipe)."""
        stop_pid(self.running.run_dir)

    def start(self) -> None:
        """Start the server again on the same port and data after ``stop``."""
        info = self.running.info
        _start(self.running.run_dir, int(info["port"]), int(info["console_port"]), fresh=False)
        write_info(self.running.run_dir, info)
