"""Connect to Redis and PostgreSQL with no password; print why each refused.

Run with the app's interpreter (redis, asyncpg). Args: redis_host redis_port pg_host pg_port.
"""

import asyncio
import json
import sys

import asyncpg
import redis

redis_host, redis_port, pg_host, pg_port = sys.argv[1:5]
result = {}
try:
    redis.Redis(host=redis_host, port=int(redis_port), socket_timeout=10).ping()
    result["redis"] = "accepted"
except redis.RedisError as exc:
    result["redis"] = f"{type(exc).__name__}: {exc}"


async def postgresql() -> str:
    try:
        conn = await asyncpg.connect(
            host=pg_host, port=int(pg_port), user="xagent", database="xagent", timeout=10
        )
    except Exception as exc:  # the reason is the result
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return "accepted"


result["postgresql"] = asyncio.run(postgresql())
print(json.dumps(result))
