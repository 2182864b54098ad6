"""The web app ``xagent.main:app``.

Its lifespan opens only per-process resources (database engine, Redis client, the broker's
producer side). It never downloads, migrates or registers anything: that is the job of
``xagent-bootstrap``, which runs once per host/cluster before the web and receiver units.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from xagent import db, models, streams
from xagent.broker import async_retry_kwargs, broker
from xagent.release import RELEASE, VERSION, ReleaseHeaderMiddleware
from xagent.settings import Settings, get_settings
from xagent.tasks import run_agent
from xagent.tools import REGISTRY

settings: Settings = get_settings()
log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Per-process resources only; entered by every gunicorn worker and every receiver."""
    engine = db.make_engine(settings)
    redis_client = aioredis.Redis.from_url(
        settings.redis_url, **async_retry_kwargs(), **settings.redis_kwargs()
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.redis = redis_client
    # the models, mapped read-only and shared by every process (one copy in the page cache)
    app.state.models = await asyncio.to_thread(models.map_all, settings)
    if not broker.is_worker_process:
        try:
            await asyncio.wait_for(broker.startup(), timeout=10)
        except Exception as exc:
            # Redis down at boot must not crash-loop the web workers: /readyz reports it,
            # sends reconnect later, and the receivers (re)create the consumer group.
            log.error("broker startup failed (%s); serving, /readyz reports Redis", exc)
    try:
        yield
    finally:
        if not broker.is_worker_process:
            await broker.shutdown()
        await redis_client.aclose()
        await engine.dispose()
        for model in app.state.models:
            model.close()


app = FastAPI(title="xagent", lifespan=lifespan)


class RunRequest(BaseModel):
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)


def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


# every response says which release answered (a probe across a release switch reads it)
app.add_middleware(ReleaseHeaderMiddleware)


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {
        "status": "ok",
        "host": settings.host_name,
        "pid": os.getpid(),
        "release": RELEASE,
        "version": VERSION,
    }


async def _check_database(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


@app.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    reason: str | None = None
    try:
        await asyncio.wait_for(_check_database(_engine(request)), timeout=3)
    except Exception as exc:
        reason = f"postgresql: {type(exc).__name__}: {exc}".splitlines()[0]
    if reason is None:
        try:
            await asyncio.wait_for(request.app.state.redis.ping(), timeout=3)
        except Exception as exc:
            reason = f"redis: {type(exc).__name__}: {exc}".splitlines()[0]
    if reason is None:
        problems = await asyncio.to_thread(models.check_all, settings)
        if problems:
            reason = "models: " + "; ".join(problems)
    if reason is not None:
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)
    return JSONResponse({"ready": True, "host": settings.host_name})


@app.post("/runs", status_code=202)
async def create_run(body: RunRequest, request: Request) -> dict[str, Any]:
    if body.tool not in REGISTRY:
        raise HTTPException(status_code=422, detail=f"unknown tool {body.tool!r}")
    run_id = uuid.uuid4()
    async with _engine(request).begin() as conn:
        await conn.execute(
            insert(db.runs).values(
                id=run_id, status="queued", input={"tool": body.tool, "args": body.args}
            )
        )
    try:
        await run_agent.kicker().with_task_id(str(run_id)).kiq(str(run_id))
    except Exception as exc:
        async with _engine(request).begin() as conn:
            await conn.execute(
                update(db.runs)
                .where(db.runs.c.id == run_id)
                .values(status="failed", error=f"enqueue failed: {exc}")
            )
        raise HTTPException(status_code=503, detail="task queue unavailable") from exc
    return {"id": str(run_id), "status": "queued"}


@app.get("/runs/{run_id}")
async def get_run(run_id: uuid.UUID, request: Request) -> dict[str, Any]:
    async with _engine(request).connect() as conn:
        row = (await conn.execute(select(db.runs).where(db.runs.c.id == run_id))).mappings().first()
    if row is None:
        raise HTTPException(status_code=404, detail="no such run")
    return {
        "id": str(row["id"]),
        "status": row["status"],
        "input": row["input"],
        "result": row["result"],
        "error": row["error"],
        "attempts": row["attempts"],
        "worker_host": row["worker_host"],
        "worker_pid": row["worker_pid"],
        "created_at": row["created_at"].isoformat(),
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
    }


@app.get("/tools")
async def list_tools(request: Request) -> list[dict[str, Any]]:
    async with _engine(request).connect() as conn:
        rows = (await conn.execute(select(db.tools).order_by(db.tools.c.name))).mappings().all()
    return [
        {
            "name": r["name"],
            "description": r["description"],
            "schema": r["schema"],
            "version": r["version"],
            "active": r["active"],
            "updated_at": r["updated_at"].isoformat(),
        }
        for r in rows
    ]


@app.get("/ticks")
async def list_ticks(request: Request, limit: int = 50) -> list[dict[str, Any]]:
    limit = max(1, min(limit, 1000))
    query = select(db.ticks).order_by(db.ticks.c.scheduled_for.desc(), db.ticks.c.id.desc())
    async with _engine(request).connect() as conn:
        rows = (await conn.execute(query.limit(limit))).mappings().all()
    return [
        {
            "schedule_id": r["schedule_id"],
            "scheduled_for": r["scheduled_for"].isoformat(),
            "host": r["host"],
            "pid": r["pid"],
            "recorded_at": r["recorded_at"].isoformat(),
        }
        for r in rows
    ]


@app.get("/queue")
async def queue_stats(request: Request) -> JSONResponse:
    """The task stream: length, lag (not yet delivered), pending (delivered, not acked),
    consumers (``<host>-<pid>``, pending, idle ms). 503 when Redis does not answer."""
    try:
        body = await asyncio.wait_for(
            streams.stats(request.app.state.redis, settings.queue_name, settings.queue_name),
            timeout=5,
        )
    except Exception as exc:
        reason = f"redis: {type(exc).__name__}: {exc}".splitlines()[0]
        return JSONResponse({"error": reason}, status_code=503)
    return JSONResponse(body)
