"""weir: stateful, windowed Kafka pipelines; the runtime that StreamJob workers execute."""

from weir.custom_aggregates import AggregateFunction
from weir.process import Context, KeyedState, ListState, MapState, ProcessFunction, Timers, ValueState

__all__ = [
    "AggregateFunction",
    "Context",
    "KeyedState",
    "ListState",
    "MapState",
    "ProcessFunction",
    "Timers",
    "ValueState",
]

__version__ = "0.1.0.dev0"
