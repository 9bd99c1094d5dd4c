"""An S3-compatible server (S3Proxy, from Maven Central) for tests and dev.

S3Proxy (Apache-2.0) with its filesystem backend: it arrives as jars from Maven Central in
seconds and runs on the JDK the Kafka broker already needs, where MinIO (AGPL-3.0) had to be
compiled from Go modules (minutes on 2 cores). It is a separate process that keeps its
objects on disk, so it can be stopped and started again in the middle of a test (the
checkpoint outage tests) without losing what was stored, and it checks AWS SigV4 signatures,
so a wrong secret key is refused as by a real store.
"""

from __future__ import annotations

import shutil
import urllib.error
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
    fetch_maven_jars,
    file_lock,
    java,
    port_open,
    read_live_info,
    run_dir,
    spawn,
    stop_pid,
    wait_until,
    write_info,
)

VERSION = "4.1.0"
POM = Path(__file__).with_name("s3proxy-pom.xml")
NAME = "s3"
ACCESS_KEY = "weir-test"
SECRET_KEY = "weir-test-secret"
REGION = "us-east-1"

PROPERTIES = """\
s3proxy.endpoint=http://{host}:{port}
s3proxy.authorization=aws-v2-or-v4
s3proxy.identity={access_key}
s3proxy.credential={secret_key}
jclouds.provider=filesystem
jclouds.filesystem.basedir={data}
"""

# Without a configuration logback logs every request at DEBUG, headers included.
LOGBACK = """\
<configuration>
  <appender name="out" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d{{HH:mm:ss.SSS}} %-5level %logger{{36}} - %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="out"/></root>
</configuration>
"""


def libs_dir() -> Path:
    return CACHE / f"s3proxy-{VERSION}" / "libs"


def ensure_jars() -> Path:
    """Fetch S3Proxy's jars with Maven once (seconds with a warm ~/.m2, under a minute cold)."""
    return fetch_maven_jars(POM, libs_dir(), f"S3Proxy {VERSION} jars", {"s3proxy.version": VERSION})


def _ready(port: int) -> bool:
    # An anonymous request is refused (403) once the server is up: any HTTP answer means ready.
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True


def _start(rdir: Path, port: int, fresh: bool) -> None:
    data = rdir / "data"
    if fresh:
        shutil.rmtree(data, ignore_errors=True)
    data.mkdir(exist_ok=True)
    props = rdir / "s3proxy.properties"
    props.write_text(
        PROPERTIES.format(host=HOST, port=port, access_key=ACCESS_KEY, secret_key=SECRET_KEY, data=data)
    )
    logback = rdir / "logback.xml"
    logback.write_text(LOGBACK)
    spawn(
        [
            java(),
            "-Xmx512m",
            f"-Dlogback.configurationFile={logback}",
            "-cp",
            f"{ensure_jars()}/*",
            "org.gaul.s3proxy.Main",
            "--properties",
            str(props),
        ],
        rdir,
    )
    wait_until(lambda: _ready(port), 60, "S3Proxy", rdir / "server.log")


def up() -> Running:
    """Start S3Proxy, or reuse the one already recorded as running."""
    rdir = run_dir(NAME)
    with file_lock(rdir):
        info = read_live_info(rdir)
        if info is not None and port_open(int(info["port"])):
            return Running(NAME, info, rdir, started_here=False)
        stop_pid(rdir)
        ensure_jars()
        port = env_port("WEIR_S3_PORT", 19000)
        if port_open(port):
            raise ServerError(f"port {port} is taken by another process; set WEIR_S3_PORT to a free port")
        _start(rdir, port, fresh=True)
        info = {
            "endpoint": f"http://{HOST}:{port}",
            "port": port,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "region": REGION,
            "version": VERSION,
        }
        write_info(rdir, info)
        return Running(NAME, info, rdir, started_here=True)


def down() -> None:
    stop_pid(run_dir(NAME))


def describe(r: Running) -> str:
    i = r.info
    return (
        f"S3 (S3Proxy {i['version']}, filesystem backend): endpoint {i['endpoint']} region {i['region']}\n"
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
        _start(self.running.run_dir, int(info["port"]), fresh=False)
        write_info(self.running.run_dir, info)
