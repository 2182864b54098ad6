"""The TaskIQ broker: a Redis stream (consumer group, acks) with expiring results.

``taskiq worker xagent.broker:broker xagent.tasks`` runs receivers;
``taskiq_fastapi.init`` makes the FastAPI lifespan (engine, redis) available to tasks.
"""

from __future__ import annotations

import taskiq_fastapi
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from xagent.settings import Settings, get_settings


def make_broker(settings: Settings) -> RedisStreamBroker:
    """Build the broker from settings (one per process)."""
    redis_kwargs = settings.redis_kwargs()
    result_backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(
        redis_url=settings.redis_url,
        result_ex_time=settings.result_ttl_seconds,
        prefix_str=f"{settings.queue_name}:result",
        **redis_kwargs,
    )
    new_broker = RedisStreamBroker(
        url=settings.redis_url,
        queue_name=settings.queue_name,
        consumer_group_name=settings.queue_name,
        maxlen=settings.stream_maxlen,
        idle_timeout=settings.stream_idle_timeout_ms,
        xread_count=settings.stream_xread_count,
        # a receiver killed while holding the reclaim lock must not block reclaim forever
        unacknowledged_lock_timeout=30,
        **redis_kwargs,
    )
    return new_broker.with_result_backend(result_backend)


broker = make_broker(get_settings())
taskiq_fastapi.init(broker, "xagent.main:app")
