"""Failed-payment alerts: three failed payments by one user within a minute of event time.

The job (``alerts.yaml``) reads payments keyed by user and runs ``FailedPayments``. The rule,
per user, over the payments in event-time order (ties by ``payment_id``, then status and
amount, so that the order never depends on arrival):

- A failed payment joins the user's current *run* of failures, after the run has dropped
  every failure 60 s or more older than it (exactly 60 s apart is not "within a minute").
- When the run reaches three failures, one alert record is written and the run starts
  again empty: four failures within a minute give one alert, six give two.
- A successful payment ends the run: failures before it never count with failures after it.

::

    {"user_id": "u-17", "failures": 3, "firstFailure": "2024-01-01T00:12:03.000Z",
     "lastFailure": "2024-01-01T00:12:41.250Z", "firstFailureMs": ..., "lastFailureMs": ...,
     "spanMs": 38250, "paymentIds": ["pay-0000412", "pay-0000415", "pay-0000431"],
     "amount": 312.4}

Payments arrive in any order within the watermark's bound, so the function holds each payment
in map state until the watermark reaches its event time (a timer at that time), then applies
the rule to the payments of that millisecond: what it writes depends on event time only.
After the rule, an event-time timer at the oldest failure + 60 s expires the run, so a user
who stops paying leaves no state behind. A payment at or behind the watermark comes after
payments the rule has already applied after it: the function raises ``LateRecord`` and it goes
to the dead-letter topic (``function_error``).

``generate`` makes the payments with bursts of failures (some within a minute, some just over,
exactly a minute, or broken by a success); ``reference`` applies the rule to the list.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator, Sequence
from typing import Any

from weir.examples import Example, Record
from weir.process import Context, KeyedState, ProcessFunction
from weir.results import iso

__all__ = ["EXAMPLE", "FailedPayments", "LateRecord", "generate", "reference"]

WITHIN_MS = 60_000
FAILURES = 3


class LateRecord(ValueError):
    """A payment at or behind the watermark: later payments have already been judged."""


class FailedPayments(ProcessFunction):
    """``FAILURES`` failed payments of ``ctx.key`` within ``WITHIN_MS`` → one alert (see the
    module docstring for the rule). Input records need ``payment_id``, ``status`` (``ok`` or
    ``failed``; anything else raises) and a numeric ``amount``."""

    WITHIN_MS = WITHIN_MS
    FAILURES = FAILURES

    def open(self, state: KeyedState) -> None:
        self.pending = state.map("pending")  # event time -> [[payment id, failed?, amount], ...]
        self.run = state.value("run")  # the current run: [[event time, payment id, amount], ...]

    def process(self, record: dict[str, Any], ctx: Context) -> None:
        status = record["status"]
        if status not in ("ok", "failed"):
            raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
        amount = record["amount"]
        if not isinstance(amount, int | float) or isinstance(amount, bool):
            raise TypeError(f"amount must be a number, got {amount!r}")
        if ctx.timestamp <= ctx.watermark:
            raise LateRecord(f"event time {ctx.timestamp} is at or behind the watermark {ctx.watermark}")
        held = self.pending.get(ctx.timestamp) or []
        held.append([record["payment_id"], status == "failed", amount])
        self.pending.put(ctx.timestamp, held)
        ctx.timers.register(ctx.timestamp)

    def on_timer(self, timestamp: int, ctx: Context) -> Iterator[dict[str, Any]]:
        # One timer per (user, time) serves both the payments held for that time and the run's
        # expiry: registering it twice is a no-op, and both parts are idempotent.
        run: list[list[Any]] = self.run.get() or []
        held = self.pending.get(timestamp)
        if held is not None:
            self.pending.remove(timestamp)
            # By payment id, then the rest: the order never depends on arrival, even for a
            # payment id repeated within one millisecond.
            for payment_id, failed, amount in sorted(held, key=lambda p: (str(p[0]), p[1], p[2])):
                if not failed:
                    run = []
                    continue
                run = [f for f in run if timestamp - f[0] < self.WITHIN_MS]
                run.append([timestamp, payment_id, amount])
                if len(run) == self.FAILURES:
                    yield _alert(ctx.key, run)
                    run = []
        run = [f for f in run if timestamp - f[0] < self.WITHIN_MS]
        if run:
            self.run.set(run)
            ctx.timers.register(run[0][0] + self.WITHIN_MS)
        else:
            self.run.clear()


def _alert(user: str, run: list[list[Any]]) -> dict[str, Any]:
    first, last = run[0][0], run[-1][0]
    return {
        "user_id": user,
        "failures": len(run),
        "firstFailure": iso(first),
        "lastFailure": iso(last),
        "firstFailureMs": first,
        "lastFailureMs": last,
        "spanMs": last - first,
        "paymentIds": [f[1] for f in run],
        "amount": round(sum(f[2] for f in run), 2),
    }


# --------------------------------------------------------------------------- the data

TOPIC = "payments"
PAYMENT_EVERY_MS = 600_000
"""About how often one user pays (event time): the number of users grows as ``step_ms``
shrinks, so that at any rate a burst's failures are seldom broken by the user's own payments."""
FAIL_RATE = 0.01
"""Share of ordinary payments that fail on their own."""
BURST_GAP_MS = (30_000, 120_000)
"""Event time between the starts of two bursts of failures."""
DISORDER_MS = 3_000
"""Records are at most this far behind the newest one (the manifest allows 5 s)."""
MALFORMED_EVERY = 2_000
MALFORMED = b'{"payment_id": "pay-x", "user_id": "u-1", "status": "failed", "amount": '

BURSTS: dict[str, tuple[str, ...]] = {
    # kind -> statuses; the offsets come from _offsets
    "three": ("failed", "failed", "failed"),  # within a minute: one alert
    "four": ("failed", "failed", "failed", "failed"),  # one alert, the 4th starts a new run
    "slow": ("failed", "failed", "failed"),  # the 3rd just over a minute after the 1st: none
    "minute": ("failed", "failed", "failed"),  # the 3rd exactly a minute after the 1st: none
    "cleared": ("failed", "failed", "ok", "failed"),  # a success in between: none
}


def _offsets(kind: str, rng: random.Random) -> list[int]:
    if kind == "slow":
        return [0, rng.randint(15_000, 45_000), rng.randint(60_001, 70_000)]
    if kind == "minute":
        return [0, rng.randint(15_000, 45_000), 60_000]
    count = len(BURSTS[kind])
    return sorted([0, *(rng.randint(1_000, 55_000) for _ in range(count - 1))])


def generate(seed: int, start_ms: int, step_ms: int) -> Iterator[Record]:
    """Payments keyed by user, one every ``step_ms`` of event time by a random user (of
    ``PAYMENT_EVERY_MS // step_ms``, at least 100; ``FAIL_RATE`` of the payments fail), a fifth
    up to ``DISORDER_MS`` late; between them, every ``BURST_GAP_MS`` a burst of ``BURSTS`` for
    one user. Every ``MALFORMED_EVERY``-th record is malformed JSON (dead-lettered)."""
    rng = random.Random(seed)
    users = max(100, PAYMENT_EVERY_MS // max(step_ms, 1))
    planned: list[tuple[int, int, str, str]] = []  # (event time, order, user, status) of bursts
    order = 0
    next_burst = start_ms + rng.randint(*BURST_GAP_MS)
    sent = 0

    def payment(ts: int, user: str, status: str) -> Iterator[Record]:
        nonlocal sent
        sent += 1
        if sent % MALFORMED_EVERY == 0:
            yield Record(TOPIC, user, None, raw=MALFORMED)
        value = {
            "payment_id": f"pay-{sent:07d}",
            "user_id": user,
            "status": status,
            "amount": round(rng.uniform(5, 300), 2),
            "ts": ts,
        }
        yield Record(TOPIC, user, value)

    t = start_ms
    while True:
        # Plan a burst before the tick it starts in, so its payments come in event-time order.
        while next_burst <= t + step_ms:
            kind = rng.choice(sorted(BURSTS))
            user = f"u-{rng.randint(1, users)}"
            for offset, status in zip(_offsets(kind, rng), BURSTS[kind], strict=True):
                heapq.heappush(planned, (next_burst + offset, order, user, status))
                order += 1
            next_burst += rng.randint(*BURST_GAP_MS)
        while planned and planned[0][0] <= t:
            ts, _order, user, status = heapq.heappop(planned)
            yield from payment(ts, user, status)
        ts = t - rng.randrange(DISORDER_MS) if sent and rng.random() < 0.2 else t
        status = "failed" if rng.random() < FAIL_RATE else "ok"
        yield from payment(ts, f"u-{rng.randint(1, users)}", status)
        t += step_ms


# --------------------------------------------------------------------------- the reference


def reference(
    records: Sequence[Record], within_ms: int = WITHIN_MS, failures: int = FAILURES
) -> list[dict[str, Any]]:
    """The alerts the job writes for ``records`` once the watermark has passed them all: the rule
    of the module docstring applied to each user's payments sorted by event time, then payment
    id (as text), status and amount. Records the manifest's filter drops (a status other than
    ok or failed) and those the function dead-letters (a non-numeric amount) are left out.
    Exact when no record is late (out of order by less than the job's maxOutOfOrderness)."""
    by_user: dict[str, list[tuple[int, str, bool, float, Any]]] = {}
    for r in records:
        v = r.value
        if r.raw is not None or v is None or v.get("status") not in ("ok", "failed") or r.key is None:
            continue
        if isinstance(v["amount"], bool) or not isinstance(v["amount"], int | float):
            continue  # the function dead-letters it
        payment = (v["ts"], str(v["payment_id"]), v["status"] == "failed", v["amount"], v["payment_id"])
        by_user.setdefault(r.key, []).append(payment)
    out = []
    for user, payments in sorted(by_user.items()):
        run: list[tuple[int, Any, float]] = []
        for ts, _id, failed, amount, payment_id in sorted(payments, key=lambda p: p[:4]):
            if not failed:
                run.clear()
                continue
            while run and ts - run[0][0] >= within_ms:
                run.pop(0)
            run.append((ts, payment_id, amount))
            if len(run) == failures:
                out.append(_alert(user, [list(f) for f in run]))
                run.clear()
    return out


# --------------------------------------------------------------------------- the demo

HEADER = f"{'last failure':<13} {'user':<7} {'failures':>8} {'within':>8} {'amount':>9}  payments"


def show(r: dict[str, Any]) -> str:
    return (
        f"{r['lastFailure'][11:23]:<13} {r['user_id']:<7} {r['failures']:>8} {r['spanMs'] / 1000:>7.1f}s "
        f"{r['amount']:>9.2f}  {' '.join(r['paymentIds'])}"
    )


EXAMPLE = Example(
    name="alerts",
    summary="failed payments: 3 by one user within a minute (process function, event-time timers)",
    manifest="alerts.yaml",
    generate=generate,
    reference=reference,
    header=HEADER,
    show=show,
    notes=(
        f"One alert per {FAILURES} failed payments of a user within {WITHIN_MS // 1000} s (event time); "
        "a success in between or a gap of a minute or more breaks the run, an alert starts a new one.",
        "The generator makes a burst of failures for one user every 30-120 s of shop time (every second "
        "or two at 60x): two kinds in five alert (3 or 4 failures within 55 s), the others just miss "
        "(the 3rd 61-70 s or exactly 60 s after the 1st, or a success in between).",
    ),
)
