"""The TaskIQ broker: a Redis stream with a consumer group, acks and expiring results.

``taskiq worker xagent.broker:broker xagent.tasks`` runs receivers;
``taskiq_fastapi.init`` makes the FastAPI lifespan (engine, redis) available to tasks.

What :class:`XagentStreamBroker` changes in taskiq-redis's ``RedisStreamBroker``:

- consumer name ``<XAGENT_HOST_NAME>-<pid>``; the group is created at id 0 (nothing already in
  the stream is skipped) and created again the same way when Redis lost it;
- no MAXLEN on XADD (it drops entries whether delivered or not): the stream maintenance task
  trims acknowledged entries only (``xagent.streams.trim``);
- a heartbeat thread resets the idle time of every entry this consumer holds (running,
  waiting for a slot, or fetched in a batch), so only entries of dead receivers reach the idle
  timeout; a thread, because a task that blocks the event loop must not lose its entry;
- reclaim (XAUTOCLAIM) every ``XAGENT_RECLAIM_INTERVAL_SECONDS``, also on a quiet queue;
- Redis errors while listening are retried with backoff instead of crashing the child;
- a clean stop first hands back the runs still executing after the drain
  (``xagent.runs.hand_back_all``), then hands the consumer's pending entries over
  (immediately reclaimable) and deletes the consumer;
- an entry whose task this code does not know (a task new in the release a rolling deploy
  is bringing, reaching a receiver still on the old one) is neither run nor acknowledged:
  it stays pending and is reclaimed after the idle timeout, by a receiver that knows it
  once one runs (taskiq would acknowledge and drop it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import redis
import taskiq_fastapi
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import AckableMessage, TaskiqMessage, TaskiqMiddleware, TaskiqResult
from taskiq.labels import LabelType
from taskiq.message import BrokerMessage
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from xagent import aio, runs, streams
from xagent.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Label added to each delivered message: the stream entry id (tasks and logs can name it).
STREAM_ID_LABEL = "xagent_stream_id"
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_Fields = dict[bytes, bytes]


def async_retry_kwargs() -> dict[str, Any]:
    """Connection arguments of the async clients: a pooled connection that Redis closed (a
    restart, a failover) fails when it is next used; redis-py's default is not to retry, so
    the request that drew it would fail (503 on POST /runs) although Redis is back. Retried
    on a new connection instead, a few times with a short backoff. A retried XADD may add a
    message twice; a run executes once anyway (run lease)."""
    return {
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.1), 3),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }


class XagentStreamBroker(RedisStreamBroker):
    """RedisStreamBroker with heartbeats, periodic reclaim, group recovery and a clean leave."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            url=settings.redis_url,
            queue_name=settings.queue_name,
            consumer_group_name=settings.queue_name,
            consumer_name=streams.consumer_name(settings.host_name),
            consumer_id="0",
            idle_timeout=settings.stream_idle_timeout_ms,
            xread_count=settings.stream_xread_count,
            # redis-py's default socket timeout (5 s) bounds reads and sends; bound connecting
            socket_connect_timeout=5,
            socket_keepalive=True,
            **async_retry_kwargs(),
            **settings.redis_kwargs(),
        )
        self.settings = settings
        self.reclaim_interval = float(settings.reclaim_interval_seconds)
        self.heartbeat_seconds = settings.heartbeat_seconds
        self.retry_max_seconds = settings.redis_retry_max_seconds
        # stream entry id -> monotonic time fetched; entries this consumer holds unacked
        self._held: dict[str, float] = {}
        self._held_lock = threading.Lock()
        self._heartbeat: _Heartbeat | None = None
        self._consuming = False
        self._reclaim_cursor = "0-0"
        self.add_middlewares(_ReleaseAfterExecution())

    # -- producer side --------------------------------------------------------------------

    async def kick(self, message: BrokerMessage) -> None:
        """XADD without MAXLEN: entries leave the stream only when acknowledged (trim)."""
        queue_name = message.labels.get("queue_name") or self.queue_name
        async with Redis(connection_pool=self.connection_pool) as conn:
            await conn.xadd(queue_name, {b"data": message.message})

    async def startup(self) -> None:
        """Create the group (id 0). A receiver starts even while Redis is down: ``listen``
        retries and creates the group when Redis is back."""
        await super(RedisStreamBroker, self).startup()
        try:
            await self._declare_consumer_group()
        except _REDIS_DOWN as exc:
            if not self.is_worker_process:
                raise
            log.warning("Redis unreachable at startup (%s); listening will retry", exc)

    async def _declare_consumer_group(self) -> None:
        async with Redis(connection_pool=self.connection_pool) as conn:
            if await streams.ensure_group(conn, self.queue_name, self.consumer_group_name):
                log.info(
                    "created consumer group %s on stream %s at id 0",
                    self.consumer_group_name,
                    self.queue_name,
                )

    # -- consumer side --------------------------------------------------------------------

    def _ack_generator(self, id: str, queue_name: str) -> Callable[[], Awaitable[None]]:
        async def _ack() -> None:
            async with Redis(connection_pool=self.connection_pool) as conn:
                await conn.xack(queue_name, self.consumer_group_name, id)
            self.release(id)

        return _ack

    def release(self, entry_id: str | None) -> None:
        """Stop heartbeating an entry (acked, or its task ended without an ack)."""
        if entry_id:
            with self._held_lock:
                self._held.pop(entry_id, None)

    def held(self) -> list[str]:
        with self._held_lock:
            return list(self._held)

    def _hold(self, entry_ids: list[str]) -> None:
        now = time.monotonic()
        with self._held_lock:
            for entry_id in entry_ids:
                self._held.setdefault(entry_id, now)

    def _message(self, entry_id: str, fields: _Fields) -> AckableMessage | None:
        """The entry as taskiq's receiver takes it; None for a task this code does not
        know (left pending, not held: it goes idle and is reclaimed)."""
        data = fields.get(b"data", b"")
        try:
            parsed = self.formatter.loads(data)
        except Exception:
            parsed = None  # the receiver reports and acks an unparsable message
        if parsed is not None and self.find_task(parsed.task_name) is None:
            self.release(entry_id)
            log.warning(
                "entry %s: task %r is unknown to this release; left pending for a receiver "
                "that knows it (reclaimable after %d ms)",
                entry_id,
                parsed.task_name,
                self.idle_timeout,
            )
            return None
        if parsed is not None:
            parsed.labels[STREAM_ID_LABEL] = entry_id
            if parsed.labels_types is not None:
                parsed.labels_types[STREAM_ID_LABEL] = LabelType.STR
            data = self.formatter.dumps(parsed).message
        return AckableMessage(
            data=data, ack=self._ack_generator(id=entry_id, queue_name=self.queue_name)
        )

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Read new entries, and reclaim entries idle past the timeout every reclaim
        interval (also when nothing new arrives)."""
        # the name is fixed when consuming starts: the process that consumes names it
        self.consumer_name = streams.consumer_name(self.settings.host_name)
        self._consuming = True
        if self._heartbeat is None:
            self._heartbeat = _Heartbeat(self)
            self._heartbeat.start()
        log.info("consuming stream %s as %s", self.queue_name, self.consumer_name)
        next_reclaim = 0.0
        failures = 0
        async with Redis(connection_pool=self.connection_pool) as conn:
            while True:
                aio.raise_if_cancel_lost()
                batch: list[tuple[str, _Fields]] = []
                try:
                    now = time.monotonic()
                    if now >= next_reclaim:
                        next_reclaim = now + self.reclaim_interval
                        batch = await self._reclaim(conn)
                    if not batch:
                        batch = await self._read(conn, max(next_reclaim - now, 0.1))
                    failures = 0
                    if self._reclaim_cursor != "0-0":
                        next_reclaim = now  # more to look at: go on right away
                except ResponseError as exc:
                    # NOGROUP: no group (or stream); UNBLOCKED: the stream was deleted while
                    # this read was blocked on it
                    if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                        raise
                    # Redis lost the stream or the group: recreate it at id 0, so entries
                    # added meanwhile (the web kept sending) are delivered, not skipped
                    log.warning("consumer group missing (%s); creating it at id 0", exc)
                    self._reclaim_cursor = "0-0"
                    with contextlib.suppress(*_REDIS_DOWN):
                        await self._declare_consumer_group()
                    continue
                except _REDIS_DOWN as exc:
                    failures += 1
                    delay = min(0.5 * 2 ** min(failures, 10), self.retry_max_seconds)
                    log.warning("Redis error while listening (%s); retrying in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                self._hold([entry_id for entry_id, _ in batch])
                # stopping: these stay pending and are handed over when the consumer leaves
                aio.raise_if_cancel_lost()
                for entry_id, fields in batch:
                    message = self._message(entry_id, fields)
                    if message is not None:
                        yield message

    async def _read(self, conn: Redis, block_seconds: float) -> list[tuple[str, _Fields]]:
        fetched: Any = await conn.xreadgroup(
            self.consumer_group_name,
            self.consumer_name,
            {self.queue_name: ">"},
            block=int(min(block_seconds * 1000, self.block)),
            count=self.count,
        )
        batch: list[tuple[str, _Fields]] = []
        for _stream, entries in fetched or []:
            for entry_id, fields in entries:
                batch.append((_decode(entry_id), fields))
        return batch

    async def _reclaim(self, conn: Redis) -> list[tuple[str, _Fields]]:
        """Entries idle past the timeout: their receiver died (or stopped and handed them
        over). XAUTOCLAIM is atomic: two receivers never claim the same entry, no lock."""
        result: Any = await conn.xautoclaim(
            self.queue_name,
            self.consumer_group_name,
            self.consumer_name,
            min_idle_time=self.idle_timeout,
            start_id=self._reclaim_cursor,
            count=self.count,
        )
        # a pass scans a bounded part of the pending list; the cursor resumes it
        self._reclaim_cursor = _decode(result[0])
        batch = [(_decode(entry_id), fields) for entry_id, fields in result[1] if fields]
        if batch:
            log.warning(
                "reclaimed %d stream entries idle > %d ms: %s",
                len(batch),
                self.idle_timeout,
                ", ".join(entry_id for entry_id, _ in batch),
            )
        return batch

    async def shutdown(self) -> None:
        """On a receiver's clean stop: hand pending entries over and delete the consumer."""
        if self._consuming:
            # still running after the drain: cancelled, their runs queued again (recorded);
            # the heartbeat keeps their entries fresh until then. Within taskiq's 5 s
            # --shutdown-timeout together with the hand-over below.
            with contextlib.suppress(Exception):
                handed = await runs.hand_back_all(timeout=2.0)
                if handed:
                    log.warning("handed back %d run(s) still executing after the drain", handed)
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._consuming:
            self._consuming = False
            try:
                pool = self.connection_pool
                async with asyncio.timeout(2.5), Redis(connection_pool=pool) as conn:
                    moved = await conn.eval(
                        streams.LEAVE_GROUP_LUA,
                        1,
                        self.queue_name,
                        self.consumer_group_name,
                        self.consumer_name,
                        streams.HANDOVER_CONSUMER,
                        self.idle_timeout,
                    )
                log.info(
                    "consumer %s left group %s (%d pending entries handed over)",
                    self.consumer_name,
                    self.consumer_group_name,
                    int(moved),
                )
            except Exception as exc:
                # its entries are reclaimed after the idle timeout, the consumer is swept later
                log.warning("consumer %s could not leave the group: %s", self.consumer_name, exc)
        await super().shutdown()


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _ReleaseAfterExecution(TaskiqMiddleware):
    """After a task ran, its entry is no longer heartbeated: acked right after (default ack),
    or, when the task chose not to ack, left to be reclaimed after the idle timeout."""

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        if isinstance(self.broker, XagentStreamBroker):
            self.broker.release(message.labels.get(STREAM_ID_LABEL))


class _Heartbeat(threading.Thread):
    """Every heartbeat interval: refresh this consumer's liveness key, and reset the idle
    time of the held entries still ours."""

    def __init__(self, broker: XagentStreamBroker) -> None:
        super().__init__(name="xagent-stream-heartbeat", daemon=True)
        self.broker = broker
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def run(self) -> None:
        settings = self.broker.settings
        client = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=5,
            socket_timeout=5,
            **settings.redis_kwargs(),
        )
        script = client.register_script(streams.HEARTBEAT_LUA)
        alive = streams.alive_key(self.broker.queue_name, self.broker.consumer_name)
        alive_ttl = max(int(3 * self.broker.heartbeat_seconds), 15)
        try:
            while True:
                try:
                    client.set(alive, str(int(time.time())), ex=alive_ttl)
                except redis.RedisError as exc:
                    log.warning("consumer liveness key not refreshed (%s); retrying", exc)
                if self._stop_event.wait(self.broker.heartbeat_seconds):
                    break
                held = self.broker.held()
                if not held:
                    continue
                try:
                    kept = {
                        _decode(i)
                        for i in script(
                            keys=[self.broker.queue_name],
                            args=[
                                self.broker.consumer_group_name,
                                self.broker.consumer_name,
                                *held,
                            ],
                        )
                    }
                except redis.RedisError as exc:
                    log.warning("stream heartbeat failed (%s); retrying", exc)
                    continue
                for entry_id in set(held) - kept:
                    # acked meanwhile, or taken over by another consumer (our execution then
                    # loses the run lease; its result is not written)
                    self.broker.release(entry_id)
        finally:
            with contextlib.suppress(redis.RedisError):
                client.delete(alive)
            client.close()


def make_broker(settings: Settings) -> XagentStreamBroker:
    """Build the broker from settings (one per process)."""
    result_backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(
        redis_url=settings.redis_url,
        result_ex_time=settings.result_ttl_seconds,
        prefix_str=f"{settings.queue_name}:result",
        **async_retry_kwargs(),
        **settings.redis_kwargs(),
    )
    return XagentStreamBroker(settings).with_result_backend(result_backend)


broker = make_broker(get_settings())
taskiq_fastapi.init(broker, "xagent.main:app")
