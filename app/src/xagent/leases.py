"""Scheduler leadership and tick bookkeeping in Redis (used by ``xagent.scheduler``).

Keys (prefix ``XAGENT_QUEUE_NAME``):

- ``<queue>:scheduler:lease``  hash ``holder`` (``<host>-<pid>``), ``token``, ``acquired_ms``,
  ``renewed_ms``, ``lease_ms``; expires unless renewed. Whoever holds it sends ticks.
- ``<queue>:scheduler:fence``  counter: every acquisition gets a larger token.
- ``<queue>:scheduler:last``   hash schedule id -> the last tick sent (epoch seconds).

A tick is sent by one Lua script that checks the caller's token against the lease, compares
the tick with the last one sent (compare-and-set) and adds the message to the stream, all
atomically: a deposed leader cannot send, no tick is sent twice, and a tick is recorded as
sent exactly when its message is in the stream.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pycron  # type: ignore[import-untyped]
import redis.asyncio as aioredis

if TYPE_CHECKING:  # taskiq (and FastAPI through it) is slow to import: xagent-check skips it
    from taskiq import AsyncBroker

log = logging.getLogger(__name__)

SCHEDULED_FOR_LABEL = "scheduled_for"


@dataclass(frozen=True)
class Keys:
    lease: str
    fence: str
    last: str
    stream: str

    @classmethod
    def for_queue(cls, queue: str) -> Keys:
        return cls(
            lease=f"{queue}:scheduler:lease",
            fence=f"{queue}:scheduler:fence",
            last=f"{queue}:scheduler:last",
            stream=queue,
        )


_NOW_MS = (
    "local t = redis.call('TIME')\n"
    "local now = t[1] .. string.format('%03d', math.floor(t[2] / 1000))\n"
)

# KEYS lease, fence; ARGV holder, lease ms -> {token (0: held by another), holder}
ACQUIRE_LUA = (
    _NOW_MS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'holder') or ''}
end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', token, 'acquired_ms', now,
  'renewed_ms', now, 'lease_ms', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {token, ARGV[1]}
"""
)

# KEYS lease; ARGV token, lease ms -> 1 renewed, 0 not ours any more
RENEW_LUA = (
    _NOW_MS
    + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'renewed_ms', now)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS lease; ARGV token -> 1 released
RELEASE_LUA = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS lease, last, stream; ARGV token, schedule id, tick (epoch s), message
# -> 1 sent, 0 this tick (or a later one) was already sent, -1 the token does not hold the lease
SEND_TICK_LUA = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -1 end
local last = redis.call('HGET', KEYS[2], ARGV[2])
if last and tonumber(last) >= tonumber(ARGV[3]) then return 0 end
redis.call('XADD', KEYS[3], '*', 'data', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SchedulerLease:
    """The lease and tick scripts bound to one Redis client."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._send = client.register_script(SEND_TICK_LUA)

    async def acquire(self, holder: str, lease_ms: int) -> tuple[int, str]:
        token, current = await self._acquire(
            keys=[self.keys.lease, self.keys.fence], args=[holder, lease_ms]
        )
        return int(token), _text(current)

    async def renew(self, token: int, lease_ms: int) -> bool:
        return bool(await self._renew(keys=[self.keys.lease], args=[token, lease_ms]))

    async def release(self, token: int) -> bool:
        return bool(await self._release(keys=[self.keys.lease], args=[token]))

    async def send_tick(self, token: int, schedule_id: str, tick: int, message: bytes) -> int:
        return int(
            await self._send(
                keys=[self.keys.lease, self.keys.last, self.keys.stream],
                args=[token, schedule_id, tick, message],
            )
        )

    async def server_time(self) -> float:
        """Redis's clock (TIME): ticks are due by one clock for every host, whatever their
        own clocks say (a scheduler on a host whose clock is ahead would send early)."""
        seconds, micros = await self.client.time()
        return float(seconds) + float(micros) / 1e6

    async def last_sent(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.keys.last)
        return {_text(k): int(_text(v)) for k, v in raw.items()}

    async def status(self) -> dict[str, Any] | None:
        """The lease as stored plus ``age_ms`` since the last renewal (Redis clock)."""
        raw = await self.client.hgetall(self.keys.lease)
        if not raw:
            return None
        info = {_text(k): _text(v) for k, v in raw.items()}
        seconds, micros = await self.client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return {
            "holder": info.get("holder", ""),
            "token": int(info.get("token", "0")),
            "lease_ms": int(info.get("lease_ms", "0")),
            "renewed_age_ms": now_ms - int(info.get("renewed_ms", "0")),
            "held_for_ms": now_ms - int(info.get("acquired_ms", "0")),
        }


# -- schedules -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """One ``schedule=[...]`` entry of a task: cron (minutes, UTC) or interval (seconds)."""

    schedule_id: str
    task_name: str
    cron: str | None = None
    interval: int | None = None
    catch_up: bool = True
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def period(self) -> int:
        return 60 if self.cron is not None else int(self.interval or 1)

    def matches(self, tick: int) -> bool:
        if self.cron is None:
            return tick % self.period == 0
        return bool(pycron.is_now(self.cron, datetime.fromtimestamp(tick, UTC)))


def collect_schedules(broker: AsyncBroker) -> list[Schedule]:
    """Schedules from the ``schedule`` label of the broker's tasks (TaskIQ's label format,
    plus ``catch_up``); each needs a fixed ``schedule_id``."""
    found: list[Schedule] = []
    for task_name, task in sorted(broker.get_all_tasks().items()):
        task_labels = {k: v for k, v in task.labels.items() if k != "schedule"}
        for spec in task.labels.get("schedule", []):
            if "schedule_id" not in spec or not ({"cron", "interval"} & spec.keys()):
                log.warning("schedule %r of %s ignored: needs schedule_id and cron/interval",
                            spec, task_name)  # fmt: skip
                continue
            interval = spec.get("interval")
            found.append(
                Schedule(
                    schedule_id=str(spec["schedule_id"]),
                    task_name=task_name,
                    cron=spec.get("cron"),
                    interval=int(interval) if interval is not None else None,
                    catch_up=bool(spec.get("catch_up", True)),
                    args=list(spec.get("args", [])),
                    kwargs=dict(spec.get("kwargs", {})),
                    labels={**task_labels, **spec.get("labels", {})},
                )
            )
    return found


def due_ticks(
    schedule: Schedule, last: int | None, now: float, catchup_seconds: int, limit: int = 100
) -> tuple[list[int], int | None]:
    """Ticks (epoch seconds, at most ``limit``, oldest first) to send now, and the first tick
    of the catch-up window when older ticks were left out.

    No tick sent yet: the current one, if it matches. Otherwise every matching tick after
    ``last`` up to now, but none older than ``catchup_seconds`` (``catch_up=False``: only the
    newest).
    """
    period = schedule.period
    current = int(now // period) * period
    if last is None:
        return ([current] if schedule.matches(current) else []), None
    if current <= last:
        return [], None
    # the window always holds the current tick (catch-up 0: no catch-up, no skip of it)
    first = max(last + 1, min(int(now - catchup_seconds), current))
    first = -(-first // period) * period  # round up to a tick
    skipped_from = first if first > last + period else None
    ticks: list[int] = []
    if not schedule.catch_up:
        tick = current
        while tick >= first and not ticks:
            if schedule.matches(tick):
                ticks.append(tick)
            tick -= period
        return ticks, None
    tick = first
    while tick <= current and len(ticks) < limit:
        if schedule.matches(tick):
            ticks.append(tick)
        tick += period
    return ticks, skipped_from


def tick_message(broker: AsyncBroker, schedule: Schedule, tick: int) -> bytes:
    """The TaskIQ message of one tick (labels ``schedule_id`` and ``scheduled_for``)."""
    from taskiq import TaskiqMessage
    from taskiq.labels import prepare_label

    labels = {
        **schedule.labels,
        "schedule_id": schedule.schedule_id,
        SCHEDULED_FOR_LABEL: datetime.fromtimestamp(tick, UTC).isoformat(),
    }
    prepared = {name: prepare_label(value) for name, value in labels.items()}
    message = TaskiqMessage(
        task_id=uuid.uuid4().hex,
        task_name=schedule.task_name,
        labels={name: value for name, (value, _) in prepared.items()},
        labels_types={name: kind for name, (_, kind) in prepared.items()},
        args=schedule.args,
        kwargs=schedule.kwargs,
    )
    return broker.formatter.dumps(message).message
