"""TaskIQ tasks. Receivers import this module: ``taskiq worker xagent.broker:broker xagent.tasks``.

Scheduled tasks carry fixed ``schedule_id`` values (``xagent.scheduler`` reads them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import AsyncEngine
from taskiq import Context, TaskiqDepends

from xagent import db
from xagent.broker import broker
from xagent.settings import get_settings
from xagent.tools import ToolError, call_tool

log = logging.getLogger(__name__)
settings = get_settings()

TICK_SCHEDULE_ID = "xagent-tick"
TICK_INTERVAL_SCHEDULE_ID = "xagent-tick-interval"
RECLAIM_SCHEDULE_ID = "xagent-reclaim"
SCHEDULED_FOR_LABEL = "scheduled_for"


def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


@broker.task(task_name="xagent.run_agent")
async def run_agent(run_id: str, request: Request = TaskiqDepends()) -> dict[str, Any]:
    """Run one agent step: call the requested built-in tool and store the result row."""
    engine = _engine(request)
    rid = uuid.UUID(run_id)
    async with engine.begin() as conn:
        row = (
            (
                await conn.execute(
                    update(db.runs)
                    # a redelivery of a run that already finished is a no-op (at-least-once
                    # delivery, idempotent consumer)
                    .where(db.runs.c.id == rid, db.runs.c.status.in_(["queued", "running"]))
                    .values(
                        status="running",
                        attempts=db.runs.c.attempts + 1,
                        worker_host=settings.host_name,
                        worker_pid=os.getpid(),
                    )
                    .returning(db.runs.c.input, db.runs.c.status)
                )
            )
            .mappings()
            .first()
        )
    if row is None:
        log.warning("run %s not found or already finished; nothing to do", run_id)
        return {"status": "skipped"}
    spec = row["input"]
    status, result, error = "done", None, None
    try:
        result = await call_tool(spec["tool"], spec.get("args") or {})
    except ToolError as exc:
        status, error = "failed", str(exc)
    async with engine.begin() as conn:
        await conn.execute(
            update(db.runs)
            .where(db.runs.c.id == rid)
            .values(status=status, result=result, error=error, finished_at=datetime.now(UTC))
        )
    return {"status": status, "result": result, "error": error}


def _tick_schedules() -> list[dict[str, Any]]:
    schedules: list[dict[str, Any]] = []
    if settings.tick_cron:
        schedules.append({"cron": settings.tick_cron, "schedule_id": TICK_SCHEDULE_ID})
    if settings.tick_interval_seconds > 0:
        schedules.append(
            {"interval": settings.tick_interval_seconds, "schedule_id": TICK_INTERVAL_SCHEDULE_ID}
        )
    return schedules


@broker.task(task_name="xagent.record_tick", schedule=_tick_schedules())
async def record_tick(
    context: Context = TaskiqDepends(), request: Request = TaskiqDepends()
) -> None:
    """Record that the scheduler fired (one row per delivered tick)."""
    labels = context.message.labels
    schedule_id = str(labels.get("schedule_id") or "manual")
    raw = labels.get(SCHEDULED_FOR_LABEL)
    scheduled_for = datetime.fromisoformat(str(raw)) if raw else datetime.now(UTC)
    async with _engine(request).begin() as conn:
        await conn.execute(
            insert(db.ticks).values(
                schedule_id=schedule_id,
                scheduled_for=scheduled_for,
                host=settings.host_name,
                pid=os.getpid(),
            )
        )


@broker.task(
    task_name="xagent.reclaim_keepalive",
    schedule=[{"interval": settings.reclaim_interval_seconds, "schedule_id": RECLAIM_SCHEDULE_ID}],
)
async def reclaim_keepalive() -> None:
    """No-op. Its delivery makes the receiver reclaim stale pending messages (XAUTOCLAIM
    runs only after a non-empty read), so a task lost with a killed receiver is retried
    even when the queue is otherwise quiet."""


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
