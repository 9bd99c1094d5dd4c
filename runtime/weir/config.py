"""The one place the runtime reads its environment: worker identity, paths and ports."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_ORDINAL = re.compile(r"-(\d+)$")


@dataclass(frozen=True)
class Environment:
    """What a worker learns from its environment; command-line flags override each field."""

    worker_index: int | None
    """``WEIR_WORKER_INDEX``, else, inside Kubernetes, the ordinal at the end of ``HOSTNAME``
    (a StatefulSet pod is named ``<job>-<ordinal>``), else None."""
    workers: int | None
    """``WEIR_WORKERS``: how many workers the job has."""
    state_dir: Path
    """``WEIR_STATE_DIR``: where RocksDB state lives (default: a ``weir`` folder in the temp dir)."""
    http_port: int
    """``WEIR_HTTP_PORT``: the metrics and control port (default 9249)."""
    bootstrap_servers: str | None
    """``WEIR_KAFKA_BOOTSTRAP_SERVERS``: overrides ``spec.kafka.bootstrapServers``."""
    checkpoint_url: str | None = None
    """``WEIR_CHECKPOINT_URL``: overrides ``spec.checkpoint.url``."""
    restore_from: str | None = None
    """``WEIR_RESTORE_FROM``: a savepoint to start from (set by the operator for an upgrade)."""
    memory_budget: str | None = None
    """``WEIR_MEMORY_BUDGET``: the worker's memory budget, bytes or a quantity such as ``256Mi``
    (set by the operator from the pod's memory limit; parsed by ``weir.memory.parse_size``)."""

    @classmethod
    def read(cls, env: Mapping[str, str] | None = None) -> Environment:
        env = os.environ if env is None else env
        index: int | None = None
        if env.get("WEIR_WORKER_INDEX"):
            index = int(env["WEIR_WORKER_INDEX"])
        elif env.get("KUBERNETES_SERVICE_HOST") and (m := _ORDINAL.search(env.get("HOSTNAME", ""))):
            index = int(m.group(1))
        return cls(
            worker_index=index,
            workers=int(env["WEIR_WORKERS"]) if env.get("WEIR_WORKERS") else None,
            state_dir=Path(env.get("WEIR_STATE_DIR") or Path(tempfile.gettempdir()) / "weir"),
            http_port=int(env.get("WEIR_HTTP_PORT") or 9249),
            bootstrap_servers=env.get("WEIR_KAFKA_BOOTSTRAP_SERVERS") or None,
            checkpoint_url=env.get("WEIR_CHECKPOINT_URL") or None,
            restore_from=env.get("WEIR_RESTORE_FROM") or None,
            memory_budget=env.get("WEIR_MEMORY_BUDGET") or None,
        )
