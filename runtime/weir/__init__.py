"""weir: stateful, windowed Kafka pipelines; the runtime that StreamJob workers execute."""

__version__ = "0.1.0.dev0"
