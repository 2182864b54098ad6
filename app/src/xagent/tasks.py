"""TaskIQ tasks. Receivers import this module: ``taskiq worker xagent.broker:broker xagent.tasks``.

Scheduled tasks carry fixed ``schedule_id`` values; ``xagent.scheduler`` sends them (one
leader at a time, every tick once). ``catch_up``: whether ticks missed while no scheduler was
leading are sent late (ticks: yes; maintenance: only the latest one).

Tasks that must not be lost (``run_agent``, ``record_tick``) acknowledge their message
themselves, once their outcome is stored; otherwise the message is redelivered.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine
from taskiq import Context, TaskiqDepends

from xagent import db, runs, streams
from xagent.broker import broker
from xagent.leases import SCHEDULED_FOR_LABEL
from xagent.settings import get_settings

log = logging.getLogger(__name__)
settings = get_settings()
POLICY = runs.Policy.from_settings(settings)

TICK_SCHEDULE_ID = "xagent-tick"
TICK_INTERVAL_SCHEDULE_ID = "xagent-tick-interval"
SWEEP_SCHEDULE_ID = "xagent-sweep"
STREAM_MAINTENANCE_SCHEDULE_ID = "xagent-stream-maintenance"
# taskiq acknowledge type: the task acks itself (Context.ack)
MANUAL_ACK = "manual"


def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


def _redis(request: Request) -> aioredis.Redis:
    client: aioredis.Redis = request.app.state.redis
    return client


@broker.task(task_name="xagent.run_agent", ack_type=MANUAL_ACK)
async def run_agent(
    run_id: str, context: Context = TaskiqDepends(), request: Request = TaskiqDepends()
) -> dict[str, Any]:
    """Run one agent step (a built-in tool) under an execution lease; see ``xagent.runs``."""
    return await runs.execute_run(_engine(request), run_id, POLICY, ack=context.ack)


async def enqueue_run(run_id: str) -> None:
    """(Re-)send a run's message; its task id is the run id."""
    await run_agent.kicker().with_task_id(run_id).kiq(run_id)


def _tick_schedules() -> list[dict[str, Any]]:
    schedules: list[dict[str, Any]] = []
    if settings.tick_cron:
        schedules.append(
            {"cron": settings.tick_cron, "schedule_id": TICK_SCHEDULE_ID, "catch_up": True}
        )
    if settings.tick_interval_seconds > 0:
        schedules.append(
            {
                "interval": settings.tick_interval_seconds,
                "schedule_id": TICK_INTERVAL_SCHEDULE_ID,
                "catch_up": True,
            }
        )
    return schedules


@broker.task(task_name="xagent.record_tick", schedule=_tick_schedules(), ack_type=MANUAL_ACK)
async def record_tick(
    context: Context = TaskiqDepends(), request: Request = TaskiqDepends()
) -> dict[str, Any]:
    """Record that the scheduler fired: one row per sent message (a redelivery of the same
    message adds none, a second send of the same tick adds a second row)."""
    labels = context.message.labels
    schedule_id = str(labels.get("schedule_id") or "manual")
    raw = labels.get(SCHEDULED_FOR_LABEL)
    scheduled_for = datetime.fromisoformat(str(raw)) if raw else datetime.now(UTC)
    task_id = context.message.task_id

    async def insert() -> None:
        async with _engine(request).begin() as conn:
            await conn.execute(
                pg_insert(db.ticks)
                .values(
                    schedule_id=schedule_id,
                    scheduled_for=scheduled_for,
                    host=settings.host_name,
                    pid=os.getpid(),
                    task_id=task_id,
                )
                .on_conflict_do_nothing(index_elements=["task_id"])
            )

    try:
        await runs.retry(f"tick {schedule_id}@{raw}: insert", insert, POLICY)
    except runs.InfraError as exc:
        log.error("%s; leaving the message for redelivery", exc)
        return {"recorded": False}
    await runs.ack_with_retry(context.ack, POLICY, f"tick {schedule_id}@{raw}")
    return {"recorded": True, "scheduled_for": scheduled_for.isoformat()}


@broker.task(
    task_name="xagent.sweep_runs",
    schedule=[
        {
            "interval": settings.sweep_interval_seconds,
            "schedule_id": SWEEP_SCHEDULE_ID,
            "catch_up": False,
        }
    ],
)
async def sweep_runs(request: Request = TaskiqDepends()) -> dict[str, list[str]]:
    """Fail runs stuck past their lease, re-enqueue runs whose message was lost."""
    requeue = True
    age: float | None = None
    try:
        age = await streams.oldest_unacked_age(_redis(request), settings.queue_name)
    except Exception as exc:
        # without the stream's state a re-enqueue could duplicate messages needlessly
        log.warning("sweeper: stream state unknown (%s); no re-enqueue this time", exc)
        requeue = False
    return await runs.sweep(
        _engine(request), POLICY, oldest_unacked_age=age, enqueue=enqueue_run, requeue=requeue
    )


@broker.task(
    task_name="xagent.maintain_stream",
    schedule=[
        {
            "interval": settings.stream_maintenance_interval_seconds,
            "schedule_id": STREAM_MAINTENANCE_SCHEDULE_ID,
            "catch_up": False,
        }
    ],
)
async def maintain_stream(request: Request = TaskiqDepends()) -> dict[str, Any]:
    """Trim acknowledged entries, delete stale consumers that hold nothing, make sure the
    group exists (at id 0)."""
    client = _redis(request)
    queue = settings.queue_name
    created = await streams.ensure_group(client, queue, queue)
    removed, minid = await streams.trim(client, queue)
    stale = await streams.sweep_consumers(client, queue, queue, settings.consumer_stale_seconds)
    if created or removed or stale:
        log.info(
            "stream %s: group created=%s, trimmed %d entries below %s, removed consumers %s",
            queue,
            created,
            removed,
            minid or "-",
            stale,
        )
    return {"group_created": created, "trimmed": removed, "minid": minid, "consumers": stale}


@broker.task(task_name="xagent.ping")
async def ping(sent_at: float = 0.0) -> dict[str, Any]:
    """Readiness probe (``xagent-check receivers``): which receiver answered."""
    return {
        "host": settings.host_name,
        "pid": os.getpid(),
        "consumer": broker.consumer_name,
        "sent_at": sent_at,
    }


@broker.task(task_name="xagent.burn_cpu")
async def burn_cpu(ms: int) -> dict[str, Any]:
    """Keep one CPU busy for ``ms`` milliseconds (blocks this receiver's event loop)."""
    deadline = time.perf_counter() + max(0, min(ms, 60_000)) / 1000
    rounds = 0
    digest = b"xagent"
    while time.perf_counter() < deadline:
        for _ in range(200):
            digest = hashlib.sha256(digest).digest()
        rounds += 1
    return {"rounds": rounds, "pid": os.getpid()}
