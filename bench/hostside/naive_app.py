"""The seed article's design, for comparison only (never part of the app package).

The same xagent app, but every gunicorn worker's lifespan also
- downloads each model into the worker's heap (one-time work done once per worker),
- starts a TaskIQ receiver and the scheduler with ``asyncio.create_task`` over
  ``taskiq.api.run_receiver_task`` / ``run_scheduler_task`` (so tasks run in the web's
  event loop, or, for sync tasks, in a thread pool of the web process).

    gunicorn -k uvicorn_worker.UvicornWorker -w N naive_app:app    (PYTHONPATH=this dir)

Environment: ``BENCH_NAIVE_MODELS`` (JSON list of {"name", "url"}: fetched in the lifespan;
``[]`` for none), ``BENCH_NAIVE_MODELS_FILES`` (JSON list of paths: read into the heap
instead of a download), ``BENCH_NAIVE_RECEIVER`` (1/0).
The app's own ``XAGENT_MODELS`` should be ``[]`` here: /readyz then checks PostgreSQL
and Redis, and the lifespan's own download (which /readyz waits for by construction:
the worker accepts only after it) stands for the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI
from taskiq.api import run_receiver_task, run_scheduler_task
from taskiq_fastapi.initializator import populate_dependency_context
from xagent import main as bundle
from xagent.broker import broker
from xagent.scheduler import scheduler

log = logging.getLogger("naive")
app = bundle.app
_bundle_lifespan = bundle.lifespan


@broker.task(task_name="bench.burn_cpu_sync")
def burn_cpu_sync(ms: int) -> dict[str, Any]:
    """The same work as xagent.burn_cpu, as a sync function: taskiq runs it in the
    receiver's thread pool, i.e. in a thread of the web worker (sharing its GIL)."""
    deadline = time.perf_counter() + max(0, min(ms, 60_000)) / 1000
    digest = b"xagent"
    while time.perf_counter() < deadline:
        for _ in range(200):
            digest = hashlib.sha256(digest).digest()
    return {"pid": os.getpid()}


def _download(name: str, url: str) -> bytes:
    """What the seed's lifespan does: fetch the model, keep it in this worker's memory."""
    log.warning("worker %s: downloading model %s", os.getpid(), name)
    started = time.monotonic()
    chunks = []
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_raw():
            chunks.append(chunk)
    data = b"".join(chunks)
    log.warning(
        "worker %s: model %s: %d bytes in %.1f s",
        os.getpid(),
        name,
        len(data),
        time.monotonic() - started,
    )
    return data


def _read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


@contextlib.asynccontextmanager
async def naive_lifespan(fastapi_app: FastAPI) -> AsyncIterator[None]:
    models = json.loads(os.environ.get("BENCH_NAIVE_MODELS", "[]"))
    files = json.loads(os.environ.get("BENCH_NAIVE_MODELS_FILES", "[]"))
    # blocking, in the event loop, as a model library's download call would be
    fastapi_app.state.naive_models = [_download(m["name"], m["url"]) for m in models] + [
        _read_file(p) for p in files
    ]
    background: list[asyncio.Task[None]] = []
    async with _bundle_lifespan(fastapi_app):
        # what taskiq-fastapi does in a receiver process: tasks get the app state
        populate_dependency_context(broker, fastapi_app)
        if os.environ.get("BENCH_NAIVE_RECEIVER", "1") == "1":
            background.append(asyncio.create_task(run_scheduler_task(scheduler)))
            background.append(asyncio.create_task(run_receiver_task(broker, max_async_tasks=100)))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            # the receiver flipped this: let the bundle lifespan close the producer
            broker.is_worker_process = False


app.router.lifespan_context = naive_lifespan
