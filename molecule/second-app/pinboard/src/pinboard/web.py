"""The ASGI app (``pinboard.web:api``) for gunicorn. Its lifespan opens per-process
resources only: the broker client and a Redis connection."""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Response
from pydantic import BaseModel
from redis.asyncio import Redis

from pinboard.broker import broker, settings
from pinboard.tasks import save_pin


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await broker.startup()  # creates the consumer group: nothing sent is skipped
    app.state.redis = Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        yield
    finally:
        await app.state.redis.aclose()
        await broker.shutdown()


api = FastAPI(title="pinboard", lifespan=lifespan)


class Pin(BaseModel):
    text: str


@api.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok", "host": settings.host_name}


@api.get("/health/ready")
async def ready(response: Response) -> dict[str, Any]:
    catalog = settings.data_dir / "catalog.json"
    if not catalog.exists():
        response.status_code = 503
        return {"ready": False, "reason": f"no {catalog} (pinboard-init has not run)"}
    try:
        await api.state.redis.ping()
    except Exception as exc:
        response.status_code = 503
        return {"ready": False, "reason": f"redis: {exc}"}
    return {"ready": True, "boards": json.loads(catalog.read_text())["boards"]}


@api.post("/pins", status_code=202)
async def post_pin(pin: Pin, authorization: str = Header(default="")) -> dict[str, str]:
    expected = f"Bearer {settings.api_token}"
    if not settings.api_token or not hmac.compare_digest(authorization, expected):
        raise HTTPException(status_code=401, detail="bad token")
    pin_id = uuid.uuid4().hex
    task = await save_pin.kiq(pin_id, pin.text)
    return {"id": pin_id, "task_id": task.task_id}


@api.get("/pins/{task_id}")
async def get_pin(task_id: str, response: Response) -> dict[str, Any]:
    if not await broker.result_backend.is_result_ready(task_id):
        response.status_code = 202
        return {"status": "pending"}
    result = await broker.result_backend.get_result(task_id)
    if result.is_err:
        return {"status": "failed", "error": str(result.error)}
    return {"status": "done", "result": result.return_value}
