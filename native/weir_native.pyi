"""Types of weir's native hot path (the Rust extension in native/src); see ``weir.native``."""

from collections.abc import Callable
from typing import Any

class Windows:
    def __init__(
        self,
        size: int,
        slide: int,
        lateness: int,
        ooo: int,
        max_bytes: int,
        cache_limit: int,
        fields: list[str],
        time: tuple[str, int],
        key: tuple[str, int],
        filter: Any,
        aggs: list[tuple[str, int]],
    ) -> None: ...
    def run(
        self,
        values: list[bytes | None],
        keys: list[bytes | None] | None,
        kafka_ts: list[int] | None,
        start: int,
        task_wm: int,
        op_wm: int,
        horizon: int,
        loader: Callable[[str, int, int], list[Any] | None],
    ) -> tuple[int, int, int, int, int, int]: ...
    def flush(self, adopt: Callable[[tuple[str, int, int], list[Any], bool], None], threshold: int) -> None: ...
    def evict(
        self, key: str, ts: int, adopt: Callable[[tuple[str, int, int], list[Any], bool], None]
    ) -> None: ...
    def clear(self) -> None: ...
    def take_counts(self) -> tuple[int, int]: ...
    @property
    def cached(self) -> int: ...
