"""`python -m harness up|down|status [kafka s3 kube]`: the test servers for manual work.

`python -m harness prepare` fetches and builds every server the suite needs (Kafka and
S3Proxy jars from Maven Central, kube-apiserver, etcd and helm from Go modules) into the
cache with one line per step, so that `make test` never does a first build inside a test's
timeout. Each step is skipped when its result is already cached.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable

from harness.common import ServerError, read_live_info, run_dir

SERVERS = ("kafka", "s3", "kube")


def _steps() -> list[tuple[str, Callable[[], object]]]:
    from harness import helm, kafka, kube, s3

    return [
        (f"Kafka {kafka.VERSION} jars (Maven Central)", kafka.ensure_jars),
        (f"S3Proxy {s3.VERSION} jars (Maven Central)", s3.ensure_jars),
        (
            f"etcd {kube.ETCD_VERSION} and kube-apiserver {kube.KUBERNETES_VERSION} (Go modules)",
            kube.ensure_built,
        ),
        (f"helm {helm.HELM_VERSION} (Go modules)", helm.ensure_built),
    ]


def prepare() -> int:
    """Fetch or build each server once, printing a line per step with how long it took."""
    total = time.monotonic()
    for what, step in _steps():
        print(f"harness: {what} ...", flush=True)
        started = time.monotonic()
        try:
            step()
        except ServerError as exc:
            print(f"harness: {what} failed: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"harness: {what} ready in {time.monotonic() - started:.0f}s", flush=True)
    print(f"harness: every server is ready ({time.monotonic() - total:.0f}s)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    parser.add_argument("action", choices=("prepare", "up", "down", "status"))
    # No `choices=` here: argparse checks an empty `*` list against them and refuses it.
    parser.add_argument("servers", nargs="*", help=f"of {', '.join(SERVERS)}; default: kafka s3")
    args = parser.parse_args(argv)
    if args.action == "prepare":
        return prepare()
    unknown = [n for n in args.servers if n not in SERVERS]
    if unknown:
        parser.error(f"unknown server {', '.join(unknown)} (choose from {', '.join(SERVERS)})")
    names = args.servers or ["kafka", "s3"]
    for name in names:
        module = importlib.import_module(f"harness.{name}")
        if args.action == "up":
            try:
                running = module.up()
            except ServerError as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                return 1
            print(module.describe(running))
        elif args.action == "down":
            module.down()
            print(f"{name}: stopped")
        else:
            info = read_live_info(run_dir(name))
            print(f"{name}: {'up ' + str(info) if info else 'down'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
