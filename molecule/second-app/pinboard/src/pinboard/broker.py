"""The TaskIQ broker: a Redis stream with a consumer group (at-least-once delivery) and
results that expire, every key under ``pinboard``."""

from __future__ import annotations

import os
import time

from taskiq import TaskiqMessage, TaskiqMiddleware
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from pinboard.settings import load

settings = load()


class SentAt(TaskiqMiddleware):
    """Stamps each message with the time it was sent: a scheduled tick records the minute it
    was sent for, even when a receiver executes it later."""

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        message.labels.setdefault("sent_at", str(time.time()))
        return message


broker = (
    RedisStreamBroker(
        url=settings.redis_url,
        queue_name="pinboard",
        consumer_group_name="pinboard",
        consumer_name=f"{settings.host_name}-{os.getpid()}",
        xread_count=1,
    )
    .with_result_backend(
        RedisAsyncResultBackend(
            redis_url=settings.redis_url, result_ex_time=3600, prefix_str="pinboard:result"
        )
    )
    .with_middlewares(SentAt())
)
