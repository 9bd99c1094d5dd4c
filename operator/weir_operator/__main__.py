"""``python -m weir_operator``: the operator process the chart runs (flags as in its Deployment).

Start-up: serve ``/healthz`` and ``/readyz`` on ``--health-port`` and ``/metrics`` on
``--metrics-port``; with ``--leader-election-lease`` wait until this replica holds the Lease
(a standby is alive and ready: it is doing its job, waiting); then run kopf and the resync
loop. A leader that cannot renew the Lease within the renew deadline stops with exit code 1
(its pod restarts as a standby). SIGTERM stops kopf, releases the Lease and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from datetime import timedelta
from typing import Any

import kopf
from kubernetes import client, config
from pydantic import BaseModel, ConfigDict

from weir import control
from weir_operator import decide, handlers, kube
from weir_operator.leases import LeaderElector, LeaseSettings
from weir_operator.metrics import OperatorMetrics

logger = logging.getLogger("weir_operator")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m weir_operator",
        description="The weir operator: runs StreamJobs (weir.dev/v1alpha1) as StatefulSets of weir workers.",
    )
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument("--all-namespaces", action="store_true", help="watch StreamJobs in every namespace")
    scope.add_argument(
        "--namespace", action="append", metavar="NS", help="watch StreamJobs in NS (repeat for several)"
    )
    parser.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics (default 8080)")
    parser.add_argument(
        "--health-port", type=int, default=8081, help="port of /healthz and /readyz (default 8081)"
    )
    parser.add_argument("--worker-image", required=True, help="image of workers of jobs without spec.image")
    parser.add_argument(
        "--leader-election-lease", metavar="NS/NAME", help="hold this Lease to lead (default: no election)"
    )
    parser.add_argument("--leader-election-lease-duration", type=int, default=15, metavar="SECONDS")
    parser.add_argument("--leader-election-renew-deadline", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--leader-election-retry-period", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument(
        "--resync-interval", type=float, default=10.0, metavar="SECONDS",
        help="re-observe every job this often: worker reports, crash loops, retries (default 10)",
    )
    parser.add_argument(
        "--savepoint-timeout", type=float, default=600.0, metavar="SECONDS",
        help="how long workers may take to answer a savepoint request (default 600)",
    )
    parser.add_argument(
        "--cleanup-timeout", type=float, default=600.0, metavar="SECONDS",
        help="how long a deleted job with cleanupPolicy: delete waits for its store to be removed before "
        "it is let go with a Warning (default 600)",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else KUBECONFIG)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _api_client(kubeconfig: str | None) -> Any:
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    return client.ApiClient()


class OperatorStatus(BaseModel):
    """The operator's own ``/status`` on its health and metrics ports."""

    model_config = ConfigDict(frozen=True)

    identity: str
    """This replica's leader-election identity."""
    leader: bool
    """Whether it holds the lease (always true without leader election)."""


async def _serve(args: argparse.Namespace) -> int:
    api = _api_client(args.kubeconfig)
    metrics = OperatorMetrics()
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"

    def status() -> OperatorStatus:
        return OperatorStatus(identity=identity, leader=bool(metrics.leader._value.get()))

    health = control.ControlServer(
        metrics.registry, alive=lambda: True, ready=lambda: (True, ""), status=status, port=args.health_port
    )
    scrape = control.ControlServer(
        metrics.registry, alive=lambda: True, ready=lambda: (True, ""), status=status, port=args.metrics_port
    )
    health.start()
    scrape.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    elector: LeaderElector | None = None
    try:
        if args.leader_election_lease:
            namespace, _, name = args.leader_election_lease.partition("/")
            if not namespace or not name:
                print("--leader-election-lease: expected NAMESPACE/NAME", file=sys.stderr)
                return 2
            elector = LeaderElector(
                api,
                LeaseSettings(
                    namespace, name, identity,
                    lease_duration_s=args.leader_election_lease_duration,
                    renew_deadline_s=args.leader_election_renew_deadline,
                    retry_period_s=args.leader_election_retry_period,
                ),
            )
            logger.info("%s: waiting for the lease %s", identity, args.leader_election_lease)
            while not await asyncio.to_thread(_attempt, elector):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=args.leader_election_retry_period)
                if stop.is_set():
                    return 0
            logger.info("%s: leading", identity)
        metrics.leader.set(1)
        return await _lead(args, api, metrics, elector, stop)
    finally:
        metrics.leader.set(0)
        if elector is not None:
            await asyncio.to_thread(elector.release)
        scrape.stop()
        health.stop()
        api.close()


def _attempt(elector: LeaderElector) -> bool:
    try:
        return elector.try_acquire_or_renew()
    except Exception as exc:  # noqa: BLE001 - an unreachable API server only delays leading
        logger.warning("lease: %s", exc)
        return False


async def _lead(
    args: argparse.Namespace,
    api: Any,
    metrics: OperatorMetrics,
    elector: LeaderElector | None,
    stop: asyncio.Event,
) -> int:
    platform = kube.KubernetesPlatform(
        api, worker_image=args.worker_image, savepoint_timeout_s=args.savepoint_timeout
    )
    policy = decide.Policy(cleanup_timeout=timedelta(seconds=args.cleanup_timeout))
    controller = handlers.Controller(api, platform, metrics, policy=policy)
    registry = handlers.build_registry(controller, clusterwide=bool(args.all_namespaces))
    kopf_stop = asyncio.Event()
    operator = asyncio.create_task(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=bool(args.all_namespaces),
            namespaces=args.namespace or (),
            stop_flag=kopf_stop,
        )
    )
    resync = asyncio.create_task(controller.resync_forever(args.resync_interval, kopf_stop))
    lost = False
    last_renewal = time.monotonic()
    while not stop.is_set() and not operator.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=args.leader_election_retry_period)
        if elector is None or stop.is_set():
            continue
        if await asyncio.to_thread(_attempt, elector):
            last_renewal = time.monotonic()
        elif time.monotonic() - last_renewal > args.leader_election_renew_deadline:
            logger.error("lost the lease: stopping so that another replica leads")
            lost = True
            break
    kopf_stop.set()
    await asyncio.gather(operator, resync, return_exceptions=True)
    if lost:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Client libraries' debug logs dump requests and responses (headers included): never ours to show.
    for noisy in ("kubernetes", "botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
