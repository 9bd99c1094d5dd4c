"""The `weir` command: run a worker, validate a manifest, run the demo."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

import orjson

from weir import __version__

EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC, EXIT_KAFKA_UNAVAILABLE, EXIT_KAFKA_AUTH = 0, 1, 2, 3, 4
EXIT_STORE = 5
"""The checkpoint store refused the worker (credentials, bucket, region, URL) or stayed
unreachable for ``--connect-timeout`` at start-up."""
EXIT_FUNCTION = 6
"""A user function raised in a step with ``onError: fail`` (or a process function's ``open``)."""


def _add_kafka_security(parser: argparse.ArgumentParser) -> None:
    """The Kafka security flags (``weir run`` and ``weir demo``). Passwords are never flags:
    a command line is visible to every user of the machine (``ps``)."""
    group = parser.add_argument_group(
        "Kafka security",
        "Each flag overrides the environment (WEIR_KAFKA_SASL_MECHANISM, WEIR_KAFKA_SASL_USERNAME, "
        "WEIR_KAFKA_SASL_PASSWORD, WEIR_KAFKA_TLS, WEIR_KAFKA_SSL_CA_LOCATION, "
        "WEIR_KAFKA_SSL_CERTIFICATE_LOCATION, WEIR_KAFKA_SSL_KEY_LOCATION, WEIR_KAFKA_SSL_KEY_PASSWORD), "
        "which overrides spec.kafka.sasl / spec.kafka.tls.",
    )
    group.add_argument("--sasl-mechanism", choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    group.add_argument("--sasl-username", metavar="NAME")
    group.add_argument(
        "--sasl-password-file", type=Path, metavar="FILE",
        help="file holding the SASL password (else WEIR_KAFKA_SASL_PASSWORD)",
    )
    group.add_argument(
        "--tls", action="store_true", default=None,
        help="connect over TLS (implied by spec.kafka.tls and by any --tls-* file)",
    )
    group.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) to verify the brokers with")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    group.add_argument("--tls-key", metavar="PEM", help="private key of the client certificate")
    group.add_argument(
        "--tls-key-password-file", type=Path, metavar="FILE",
        help="file holding the password of an encrypted --tls-key (else WEIR_KAFKA_SSL_KEY_PASSWORD)",
    )


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (``weir demo --rate``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _kafka_security_flags(args: argparse.Namespace) -> Any:
    """``KafkaSecurityInputs`` from the flags; raises KafkaSecurityConfigError when a password
    file cannot be read."""
    from weir.config import KafkaSecurityInputs, Secret
    from weir.kafka import KafkaSecurityConfigError

    def secret_file(path: Path | None, flag: str) -> Secret | None:
        if path is None:
            return None
        try:
            return Secret(path.read_text().rstrip("\r\n"))
        except OSError as exc:
            raise KafkaSecurityConfigError(f"{flag} {path}: {exc.strerror or exc}") from None

    return KafkaSecurityInputs(
        sasl_mechanism=args.sasl_mechanism,
        sasl_username=args.sasl_username,
        sasl_password=secret_file(args.sasl_password_file, "--sasl-password-file"),
        tls=args.tls,
        ca_location=args.tls_ca,
        certificate_location=args.tls_cert,
        key_location=args.tls_key,
        key_password=secret_file(args.tls_key_password_file, "--tls-key-password-file"),
        origin="the command line",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weir", description="Stateful, windowed Kafka pipelines. Run `weir COMMAND --help` for details."
    )
    parser.add_argument("--version", action="version", version=f"weir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run one worker of a StreamJob",
        description="Run one worker of the StreamJob in JOB (YAML or JSON manifest). Worker I of N owns "
        "the input partitions p with p % N == I, for the source topics and for the "
        "repartition topic alike. Metrics and the control API are served on --http-port. "
        "SIGTERM finishes the current batch, flushes output, commits and exits 0.",
        epilog="exit codes: 0 stopped cleanly, 1 failed while running, 2 invalid manifest, settings or "
        "missing topic, 3 Kafka unreachable at start-up, 4 Kafka refused the credentials or TLS failed, "
        "5 checkpoint store refused (credentials, bucket, region) or unreachable at start-up, 6 a user "
        "function failed in a step with onError: fail. Outages "
        "after start-up are ridden out, never an exit.",
    )
    run.add_argument("job", type=Path, help="StreamJob manifest, YAML or JSON")
    run.add_argument(
        "--worker-index",
        type=int,
        help="this worker's index I (default: WEIR_WORKER_INDEX, the pod ordinal in Kubernetes, else 0)",
    )
    run.add_argument(
        "--workers", type=int, help="number of workers N (default: WEIR_WORKERS, else spec.parallelism)"
    )
    run.add_argument("--bootstrap-servers", help="override spec.kafka.bootstrapServers")
    run.add_argument(
        "--state-dir", type=Path, help="where RocksDB state lives (default: WEIR_STATE_DIR, else <tmp>/weir)"
    )
    run.add_argument(
        "--http-port",
        type=int,
        help="metrics and control port (default: WEIR_HTTP_PORT, else 9249; 0 picks a free port)",
    )
    run.add_argument("--http-host", default="0.0.0.0", help="address to serve HTTP on (default 0.0.0.0)")
    run.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="at start-up, how long to retry an unreachable broker or checkpoint store before giving "
        "up with exit code 3 or 5; 0 waits for ever, not ready meanwhile (default: for ever inside "
        "Kubernetes, else 60). Outages after start-up are always waited out.",
    )
    run.add_argument(
        "--checkpoint-interval",
        "--commit-interval",
        type=float,
        metavar="SECONDS",
        help="how often state is checkpointed and output and offsets are committed with it "
        "(default: spec.checkpoint.interval, else 5)",
    )
    run.add_argument(
        "--guarantee",
        choices=["exactly-once", "at-least-once"],
        help="exactly-once: output, dead letters and offsets commit in one Kafka transaction per "
        "checkpoint (results become visible at checkpoints); at-least-once: a crash may repeat "
        "results (default: spec.deliveryGuarantee, else exactly-once)",
    )
    run.add_argument(
        "--checkpoint-url",
        help="checkpoint store: file:///path or s3://bucket/prefix (default: WEIR_CHECKPOINT_URL, "
        "spec.checkpoint.url, else file://<state-dir>/checkpoints)",
    )
    run.add_argument(
        "--checkpoint-retain", type=int, metavar="N", help="checkpoints kept per worker (default 3)"
    )
    run.add_argument(
        "--restore-from",
        metavar="URL",
        help="start from this savepoint (or checkpoint) instead of the latest checkpoint "
        "(default: WEIR_RESTORE_FROM)",
    )
    run.add_argument(
        "--allow-state-reset",
        action="store_true",
        help="when the restored snapshot's state does not fit the pipeline (window size, keyBy, an "
        "aggregate's function changed...), start from its offsets with empty state instead of "
        "exiting with code 2 (default: WEIR_ALLOW_STATE_RESET)",
    )
    run.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="memory the worker process stays within, e.g. 256Mi, 1Gi or bytes: shared by the window "
        "cache and timers, RocksDB's block cache and memtables and the Kafka client queues; windows "
        "beyond it live in RocksDB on disk (default: WEIR_MEMORY_BUDGET, else no budget)",
    )
    run.add_argument("--max-cached-windows", type=int, default=1_000_000, metavar="N",
                     help="deprecated, use --memory-budget: an upper bound on the windows kept in "
                          "memory per partition (default 1000000)")
    run.add_argument("--max-records-per-second", type=float, default=None, metavar="N",
                     help="process at most N input records per second, the rest wait as lag: a known "
                          "per-worker capacity for autoscaler tests and benchmarks (default: "
                          "WEIR_MAX_RECORDS_PER_SECOND, else no limit)")
    run.add_argument("--print-results", action="store_true", help="also print each window result")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    _add_kafka_security(run)

    validate = sub.add_parser(
        "validate",
        help="check a StreamJob manifest and print its plan",
        description="Validate a StreamJob manifest; errors name the field path.",
    )
    validate.add_argument("job", type=Path)

    demo = sub.add_parser(
        "demo",
        help="run an example job on generated input (default: revenue per product per minute)",
        description="Create an example's topics, produce its generated records (e-commerce events "
        "at 60x speed: one wall-clock second is a minute of shop time), run the job through "
        "`weir up` and print each result as it is committed. Without NAME: the revenue example.",
    )
    demo.add_argument(
        "name", nargs="?", metavar="NAME", help="the example to run (see --list; default revenue)"
    )
    demo.add_argument(
        "--list", action="store_true", help="print each example's name and summary, and exit"
    )
    demo.add_argument(
        "--bootstrap-servers", default="127.0.0.1:19092",
        help="the broker (default 127.0.0.1:19092, the one make demo starts)",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=40.0,
        metavar="SECONDS",
        help="stop after this long (default 40; Ctrl-C stops earlier)",
    )
    demo.add_argument(
        "--rate", type=_positive_int, default=2000,
        help="records per second (default 2000); shop time runs at 60x at any rate, so the rate sets "
        "how many records a minute of shop time has",
    )
    _add_kafka_security(demo)

    # `weir checkpoints ls|inspect`: parser and logic live in weir.checkpoint_cli.
    from weir import checkpoint_cli

    checkpoint_cli.add_cli(sub)

    for name, command in _plugins().items():
        plugin = sub.add_parser(name, help=command.help, description=command.description)
        command.configure(plugin)
        plugin.set_defaults(plugin=command)
    return parser


PLUGIN_GROUP = "weir.commands"
"""Entry-point group of further ``weir`` subcommands. Each names an object with ``help``,
``description``, ``configure(parser)`` and ``run(args) -> int``. This is how ``weir up``
(in the operator package, ``weir_operator.up``) joins the command without the runtime
importing the operator: the import-linter contract forbids that, and the entry point keeps
the dependency pointing from the operator to the runtime."""


def _plugins() -> dict[str, Any]:
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            found[entry.name] = entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break `weir run`
            print(f"weir: ignoring the {entry.name!r} command ({entry.value}): {exc}", file=sys.stderr)
    return found


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Client libraries' debug logs dump requests and responses (headers included): never ours to show.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "validate":
        return _validate(args)
    if args.command == "checkpoints":
        from weir import checkpoint_cli

        return checkpoint_cli.run_cli(args)
    plugin = getattr(args, "plugin", None)
    if plugin is not None:
        return int(plugin.run(args))
    if args.command == "demo":
        from weir import demo

        if args.list:
            print("\n".join(demo.list_lines()))
            return EXIT_OK
        from weir import kafka as kio
        from weir.config import Environment

        try:
            flags = _kafka_security_flags(args)
            kio.security(None, flags, Environment.read().kafka_security)
        except kio.KafkaSecurityConfigError as exc:
            print(f"weir demo: {exc}", file=sys.stderr)
            return EXIT_BAD_SPEC
        return demo.main(args.bootstrap_servers, args.duration, args.rate, flags, args.name)
    return _run(args)


def _validate(args: argparse.Namespace) -> int:
    from weir.native import explain
    from weir.spec import SpecError, load_job

    try:
        job = load_job(args.job)
    except SpecError as exc:
        print(f"{args.job}: invalid StreamJob:\n{exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    plan = job.pipeline.stages()
    print(f"{job.namespace}/{job.name}: valid")
    print(f"  source topics: {', '.join(job.pipeline.source.topics)}")
    print(f"  repartition topic: {job.repartition_topic or '(none: keyed by the message key)'}")
    if plan.window is not None and plan.aggregate is not None:
        print(f"  window: {plan.window.type}; outputs: {', '.join(plan.aggregate.outputs)}")
    elif plan.process is not None:
        print(f"  process: {plan.process.function}")
    else:
        print("  stateless: every prepared record goes to the sink")
    print(f"  sink: {job.pipeline.sink.topic}; dead letters: {job.dead_letter_topic}")
    print(f"  {explain(job.pipeline)}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from weir import kafka as kio
    from weir.chain import resolve_functions
    from weir.checkpoint import CheckpointError
    from weir.config import Environment
    from weir.control import ControlServer
    from weir.functions import FunctionFailed
    from weir.graph import compile_job
    from weir.memory import MemoryBudgetTooSmall
    from weir.metrics import WorkerMetrics
    from weir.spec import SpecError, load_job
    from weir.state_migration import StateShapeMismatch
    from weir.worker import StoreUnavailable, Worker, WorkerSettings

    log = logging.getLogger("weir")
    env = Environment.read()
    try:
        job = load_job(args.job)
    except SpecError as exc:
        print(f"{args.job}: invalid StreamJob:\n{exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    workers = args.workers or env.workers or job.spec.parallelism
    index = args.worker_index if args.worker_index is not None else (env.worker_index or 0)
    if not 0 <= index < workers:
        print(f"--worker-index {index} is outside 0..{workers - 1}", file=sys.stderr)
        return EXIT_BAD_SPEC
    budget_text = args.memory_budget or env.memory_budget
    budget: int | None = None
    if budget_text is not None:
        from weir import memory

        try:
            budget = memory.parse_size(budget_text)
            # Refused now rather than after connecting (the worker splits it again at start).
            memory.MemoryPlan.split(budget, memory.rss_bytes() + memory.BASE_HEADROOM)
        except ValueError as exc:
            print(f"--memory-budget: {exc}", file=sys.stderr)
            return EXIT_BAD_SPEC
    try:
        security = kio.security(job.spec.kafka, _kafka_security_flags(args), env.kafka_security)
    except kio.KafkaSecurityConfigError as exc:
        print(f"{args.job}: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    kafka = kio.KafkaSettings(
        bootstrap_servers=args.bootstrap_servers or env.bootstrap_servers or job.spec.kafka.bootstrap_servers,
        consumer=dict(job.spec.kafka.consumer),
        producer=dict(job.spec.kafka.producer),
        connect_timeout_s=_connect_timeout(args.connect_timeout, env.in_kubernetes),
        security=security,
    )
    settings = WorkerSettings(
        index=index,
        count=workers,
        state_dir=(args.state_dir or env.state_dir) / job.namespace / job.name,
        http_host=args.http_host,
        http_port=args.http_port if args.http_port is not None else env.http_port,
        max_cached_windows=args.max_cached_windows,
        max_records_per_second=args.max_records_per_second or env.max_records_per_second,
        memory_budget=budget,
        **_checkpoint_settings(args, env, job),
    )
    metrics = WorkerMetrics(f"{job.namespace}/{job.name}", index)

    def show(record: dict[str, Any]) -> None:
        print(orjson.dumps(record).decode(), flush=True)

    try:
        resolve_functions(job.pipeline)  # user code that does not import is a bad spec, not a crash
        graph = compile_job(job)
    except SpecError as exc:
        print(f"{args.job}: invalid StreamJob:\n{exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    worker = Worker(graph, kafka, settings, metrics, on_result=show if args.print_results else None)
    worker.install_signal_handlers()
    control = ControlServer(
        metrics.registry,
        alive=worker.alive,
        ready=worker.readiness,
        status=worker.status,
        savepoint=worker.savepoint,
        host=settings.http_host,
        port=settings.http_port,
    )
    control.start()
    log.info("serving metrics and control on %s:%d", settings.http_host, control.port)
    log.info("Kafka at %s over %s", kafka.bootstrap_servers, security.describe())
    try:
        return worker.run()
    except MemoryBudgetTooSmall as exc:
        log.error("--memory-budget: %s", exc)
        return EXIT_BAD_SPEC
    except (kio.TopicMissing, SpecError, StateShapeMismatch) as exc:
        log.error("%s", exc)
        return EXIT_BAD_SPEC
    except kio.KafkaUnavailable as exc:
        log.error("%s", exc)
        return EXIT_KAFKA_UNAVAILABLE
    except (CheckpointError, StoreUnavailable) as exc:
        log.error("checkpoint store: %s", exc)
        return EXIT_STORE
    except kio.KafkaAuthFailed as exc:
        log.error("%s", exc)
        return EXIT_KAFKA_AUTH
    except FunctionFailed as exc:
        log.error("stopping: %s", exc)
        return EXIT_FUNCTION
    finally:
        control.stop()


def _connect_timeout(flag: float | None, in_kubernetes: bool) -> float:
    """Seconds a starting worker waits for an unreachable broker or store; ``math.inf``: for ever.

    Inside Kubernetes the default is for ever: the pod stays up and not ready, shows why in
    ``/status``, and starts the moment the dependency is back. Exiting instead would put it in
    CrashLoopBackOff, whose back-off (up to 5 minutes) outlasts most outages; this is what a
    Flink job on Kubernetes does too (its Kafka source retries, the pod is not restarted). On a
    laptop a typo in the address should fail fast: 60 s, then exit code 3 (or 5).
    """
    if flag is None:
        return math.inf if in_kubernetes else 60.0
    return math.inf if flag <= 0 else flag


def _checkpoint_settings(args: argparse.Namespace, env: Any, job: Any) -> dict[str, Any]:
    """Checkpointing from flags, then the environment, then the spec, then defaults."""
    ck = job.spec.checkpoint
    interval = args.checkpoint_interval
    if interval is None and ck is not None:
        interval = ck.interval / 1000
    out: dict[str, Any] = {
        "checkpoint_interval_s": interval if interval is not None else 5.0,
        "guarantee": args.guarantee or job.spec.delivery_guarantee,
        "checkpoint_url": args.checkpoint_url or env.checkpoint_url or (ck.url if ck else None),
        "restore_from": args.restore_from or env.restore_from,
        "allow_state_reset": bool(args.allow_state_reset or env.allow_state_reset),
    }
    retain = args.checkpoint_retain or (ck.retain if ck else None)
    if retain is not None:
        out["checkpoint_retain"] = retain
    if ck is not None and (ck.endpoint or ck.region):
        from weir.checkpoint import S3Settings

        out["s3"] = S3Settings.from_env(endpoint_url=ck.endpoint, region=ck.region)
    return out


if __name__ == "__main__":
    sys.exit(main())
