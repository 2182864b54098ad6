"""The web app ``xagent.main:app``.

Its lifespan opens only per-process resources (database engine, Redis client, the broker's
producer side). It never downloads, migrates or registers anything: that is the job of
``xagent-bootstrap``, which runs once per host/cluster before the web and receiver units.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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


IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\"}
# error prefix of a run whose enqueue failed (a retry with its key queues it again)
ENQUEUE_FAILED = "enqueue failed: "


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` (a quoted string as the IETF draft writes it, or
    bare), or None. 400 when it is malformed: a key the client did not mean is no key."""
    values = request.headers.getlist(IDEMPOTENCY_HEADER)
    if not values:
        return None
    raw = values[0].strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    if len(values) > 1 or not 1 <= len(raw) <= 255 or not set(raw) <= _KEY_CHARS:
        raise HTTPException(
            status_code=400,
            detail=f"{IDEMPOTENCY_HEADER}: one header of 1 to 255 visible ASCII characters "
            '(no quote or backslash inside), e.g. "3f0c9a7e-..."',
        )
    return raw


def _request_sha256(body: RunRequest) -> str:
    data = json.dumps({"tool": body.tool, "args": body.args}, sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()


async def _enqueue(engine: AsyncEngine, run_id: uuid.UUID) -> None:
    try:
        await run_agent.kicker().with_task_id(str(run_id)).kiq(str(run_id))
    except Exception as exc:
        async with engine.begin() as conn:
            # only a run nobody took yet: a receiver may own it already
            await conn.execute(
                update(db.runs)
                .where(db.runs.c.id == run_id, db.runs.c.status == "queued")
                .values(status="failed", error=f"{ENQUEUE_FAILED}{exc}")
            )
        raise HTTPException(status_code=503, detail="task queue unavailable") from exc


@app.post("/runs", status_code=202)
async def create_run(body: RunRequest, request: Request, response: Response) -> dict[str, Any]:
    """Accept a run. With an ``Idempotency-Key`` header, the same key returns the run the
    first request created (``Idempotent-Replayed: true``) instead of a second run, so a
    client or proxy may retry; the same key with another request is refused (422). A retry
    of a run still queued sends its message again (the first one may have been lost)."""
    if body.tool not in REGISTRY:
        raise HTTPException(status_code=422, detail=f"unknown tool {body.tool!r}")
    key = idempotency_key(request)
    engine = _engine(request)
    run_id = uuid.uuid4()
    async with engine.begin() as conn:
        if key is not None:
            fingerprint = _request_sha256(body)
            claimed = await conn.execute(
                pg_insert(db.run_keys)
                .values(key=key, run_id=run_id, request_sha256=fingerprint)
                .on_conflict_do_nothing(index_elements=[db.run_keys.c.key])
                .returning(db.run_keys.c.run_id)
            )
            if claimed.first() is None:
                # a concurrent first request with this key committed before this insert
                # returned; its row is visible now
                return await _replay(conn, engine, key, fingerprint, response)
        await conn.execute(
            insert(db.runs).values(
                id=run_id, status="queued", input={"tool": body.tool, "args": body.args}
            )
        )
    await _enqueue(engine, run_id)
    return {"id": str(run_id), "status": "queued"}


async def _replay(
    conn: AsyncConnection, engine: AsyncEngine, key: str, fingerprint: str, response: Response
) -> dict[str, Any]:
    row = (
        await conn.execute(
            select(db.run_keys.c.request_sha256, db.runs.c.id, db.runs.c.status, db.runs.c.error)
            .select_from(db.run_keys.join(db.runs, db.runs.c.id == db.run_keys.c.run_id))
            .where(db.run_keys.c.key == key)
        )
    ).first()
    if row is None:  # pragma: no cover - the key row and its run commit together
        raise HTTPException(status_code=503, detail="run of this key not found, retry")
    if row.request_sha256 != fingerprint:
        raise HTTPException(
            status_code=422,
            detail=f"{IDEMPOTENCY_HEADER} {key!r} was used for another request",
        )
    response.headers["Idempotent-Replayed"] = "true"
    status = row.status
    if status == "failed" and (row.error or "").startswith(ENQUEUE_FAILED):
        # the first request answered 503 (queue unavailable): this retry queues it again
        requeued = await conn.execute(
            update(db.runs)
            .where(db.runs.c.id == row.id, db.runs.c.status == "failed", db.runs.c.attempts == 0)
            .values(status="queued", error=None)
        )
        await conn.commit()
        if requeued.rowcount:
            await _enqueue(engine, row.id)
            status = "queued"
    elif status == "queued":
        # the first request may have died between its commit and its message (a client
        # retries exactly then): send it again; a second message of a run is harmless
        # (the claim runs it once), a lost one left it waiting for the sweeper
        await _enqueue(engine, row.id)
    return {"id": str(row.id), "status": status}


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
        "handbacks": row["handbacks"],
        "handed_back_at": row["handed_back_at"].isoformat() if row["handed_back_at"] else None,
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
