"""The engine's pool: XAGENT_DATABASE_POOL_SIZE + XAGENT_DATABASE_MAX_OVERFLOW bound the
connections one process opens (the deployment's connection budget counts on it)."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from conftest import TEST_DB_URL, TEST_REDIS_URL
from xagent import db
from xagent.settings import load_settings


async def _backend_pid(engine: AsyncEngine, hold: asyncio.Event | None = None) -> int:
    async with engine.connect() as conn:
        pid = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        if hold is not None:
            await hold.wait()
        return pid


async def test_pool_size_and_overflow_bound_the_connections(services: None) -> None:
    settings = load_settings(
        database_url=TEST_DB_URL,
        redis_url=TEST_REDIS_URL,
        database_pool_size=1,
        database_max_overflow=1,
    )
    engine = db.make_engine(settings)
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    release = asyncio.Event()
    try:
        held = [asyncio.ensure_future(_backend_pid(engine, release)) for _ in range(2)]
        while pool.checkedout() < 2:
            await asyncio.sleep(0.05)
        # pool size 1 + overflow 1 are in use: a third checkout waits instead of connecting
        third = asyncio.ensure_future(_backend_pid(engine))
        await asyncio.sleep(1.0)
        assert not third.done()
        assert pool.checkedout() == 2
        release.set()
        pids = set(await asyncio.gather(*held))
        assert len(pids) == 2
        # and gets one of the two connections back: the engine never opened a third
        assert await asyncio.wait_for(third, 10) in pids
    finally:
        release.set()
        await engine.dispose()
