"""The scheduler ``xagent.scheduler:scheduler``.

``taskiq scheduler xagent.scheduler:scheduler xagent.tasks`` (stop it with SIGINT or SIGTERM).

Any number may run: they compete for a lease in Redis (``xagent.leases``); the holder sends
the ticks and renews it every third of ``XAGENT_SCHEDULER_LEASE_SECONDS``, the others stand by
and take over when it expires (holder died) or at once when it is released (clean stop). Each
tick is sent by an atomic compare-and-set on the last tick sent per schedule, so a restart, a
swap or a failover neither repeats nor skips a tick: missed ticks up to
``XAGENT_SCHEDULER_CATCHUP_SECONDS`` old are sent late, each with its own ``scheduled_for``.

TaskIQ's own scheduler loop is kept as the process shell (entry point, startup/shutdown) but
gets no schedules: its in-memory "last run" cannot survive a restart or follow a failover,
so the leader loop here decides what is due, once a second, for cron and interval schedules
alike (``--skip-first-run`` has no effect).

Redis down: startup and the leader loop retry with backoff (one log line per attempt,
pauses up to ``XAGENT_REDIS_RETRY_MAX_SECONDS``); the process never exits for it.

Signals: TaskIQ relies on asyncio.run's SIGINT handler, which asyncio installs only when
SIGINT has its default disposition. A process started with SIGINT ignored (e.g. as a
background job of a non-interactive shell: `cmd &`) inherits SIG_IGN, so SIGINT did nothing
and a stop hung until SIGKILL. The handlers are installed here explicitly instead.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from taskiq import AsyncBroker, ScheduledTask, TaskiqScheduler
from taskiq.abc.schedule_source import ScheduleSource

from xagent import aio, streams
from xagent import tasks as _tasks  # noqa: F401  (registers the tasks and their schedules)
from xagent.broker import broker
from xagent.leases import Keys, Schedule, SchedulerLease, collect_schedules, due_ticks, tick_message
from xagent.runs import one_line
from xagent.settings import Settings, get_settings

log = logging.getLogger("xagent.scheduler")


class _LeaderOnly(ScheduleSource):
    """Gives TaskIQ's loop nothing to send: the leader loop sends every schedule."""

    async def get_schedules(self) -> list[ScheduledTask]:
        return []


class LeaderScheduler(TaskiqScheduler):
    """TaskIQ scheduler whose sends happen in a leader loop under a Redis lease."""

    def __init__(self, broker: AsyncBroker, settings: Settings) -> None:
        super().__init__(broker=broker, sources=[_LeaderOnly()])
        self.settings = settings
        self.holder = streams.consumer_name(settings.host_name)
        self.lease_ms = int(settings.scheduler_lease_seconds * 1000)
        self.renew_every = settings.scheduler_lease_seconds / 3
        self.keys = Keys.for_queue(settings.queue_name)
        self.schedules: list[Schedule] = []
        self._token: int | None = None
        self._renewed_at = 0.0
        self._standby_for: str | None = None
        self._leader_task: asyncio.Task[None] | None = None
        self._main_task: asyncio.Task[Any] | None = None
        self._stop_requested = False
        self._shutting_down = False

    # -- process lifetime -----------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        self._main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_requested and self._shutting_down:
            log.warning("%s again: stopping without cleanup", sig.name)
        else:
            log.info("%s received: stopping the scheduler", sig.name)
        self._stop_requested = True
        self._cancel_main()

    def _cancel_main(self) -> None:
        if self._main_task is not None and not self._main_task.done():
            self._main_task.cancel()

    async def startup(self) -> None:
        """Wait for Redis (forever, with backoff), then start the leader loop."""
        self._install_signal_handlers()
        self.holder = streams.consumer_name(self.settings.host_name)
        self.schedules = collect_schedules(self.broker)
        for schedule in self.schedules:
            kind = f"cron {schedule.cron!r}" if schedule.cron else f"every {schedule.interval} s"
            log.info("schedule %s: %s %s", schedule.schedule_id, schedule.task_name, kind)
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(10):
                    await self.broker.startup()
                break
            except asyncio.CancelledError:
                if self._stop_requested:
                    log.info("stopped before Redis was reachable")
                    raise SystemExit(0) from None
                raise
            except Exception as exc:
                delay = self._backoff(attempt)
                log.warning(
                    "Redis unreachable (attempt %d: %s); retrying in %.1f s",
                    attempt,
                    one_line(exc),
                    delay,
                )
                try:
                    await asyncio.sleep(delay)
                except asyncio.CancelledError:
                    if self._stop_requested:
                        log.info("stopped before Redis was reachable")
                        raise SystemExit(0) from None
                    raise
        if self._stop_requested:  # its cancellation got lost in the last Redis call
            log.info("stopped during startup")
            raise SystemExit(0)
        self._leader_task = asyncio.create_task(self._lead(), name="xagent-scheduler-leader")

    async def shutdown(self) -> None:
        """Stop sending, release the lease (a standby takes over at once), close Redis."""
        self._shutting_down = True
        # cancelled until done: on Python 3.11 redis-py can drop a cancellation (xagent.aio)
        if self._leader_task is not None and not await aio.cancel_and_wait(
            self._leader_task, timeout=5
        ):
            log.warning("the leader loop did not stop; releasing the lease anyway")
        if self._token is not None:
            try:
                async with asyncio.timeout(2):
                    released = await self._lease().release(self._token)
                if released:
                    log.info("released scheduler lease (token %d)", self._token)
            except Exception as exc:
                log.warning("could not release the lease (%s); it expires", one_line(exc))
            self._token = None
        await self.broker.shutdown()

    # -- leader loop ----------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        return float(min(0.5 * 2 ** min(failures - 1, 10), self.settings.redis_retry_max_seconds))

    def _lease(self) -> SchedulerLease:
        pool = getattr(self.broker, "connection_pool", None)
        client = (
            aioredis.Redis(connection_pool=pool)
            if pool is not None
            else aioredis.Redis.from_url(self.settings.redis_url, **self.settings.redis_kwargs())
        )
        return SchedulerLease(client, self.keys)

    async def _lead(self) -> None:
        lease = self._lease()
        failures = 0
        while not self._shutting_down:
            aio.raise_if_cancel_lost()
            if self._stop_requested:
                # the main task's cancellation got lost (xagent.aio): repeat it
                self._cancel_main()
            try:
                await self._step(lease)
                if failures:
                    log.info("Redis reachable again")
                failures = 0
                delay = 1.01 - time.time() % 1  # just after the next second
                if self._token is not None:
                    # wake when the renewal is due, not at the next second after it: that
                    # renewed up to 1 s late (2 s apart for a 3 s lease; a 1 s lease lapsed)
                    due = self._renewed_at + self.renew_every - time.monotonic()
                    delay = min(delay, max(0.05, due))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = self._backoff(failures)
                log.warning("scheduler: Redis error (%s); retrying in %.1f s", one_line(exc), delay)
                if (
                    self._token is not None
                    and time.monotonic() - self._renewed_at > self.settings.scheduler_lease_seconds
                ):
                    log.warning("scheduler lease (token %d) expired meanwhile", self._token)
                    self._token = None
            await asyncio.sleep(delay)

    async def _step(self, lease: SchedulerLease) -> None:
        if self._token is None:
            token, holder = await lease.acquire(self.holder, self.lease_ms)
            if not token:
                if holder != self._standby_for:
                    log.info("standby: scheduler lease held by %s", holder)
                    self._standby_for = holder
                return
            self._token, self._renewed_at, self._standby_for = token, time.monotonic(), None
            log.info("scheduler lease acquired by %s (token %d); sending ticks", self.holder, token)
        elif time.monotonic() - self._renewed_at >= self.renew_every:
            if not await lease.renew(self._token, self.lease_ms):
                log.warning("scheduler lease (token %d) lost; standing by", self._token)
                self._token = None
                return
            self._renewed_at = time.monotonic()
        await self._send_due(lease, self._token)

    async def _send_due(self, lease: SchedulerLease, token: int) -> None:
        last = await lease.last_sent()
        now = await lease.server_time()
        for schedule in self.schedules:
            ticks, skipped_from = due_ticks(
                schedule,
                last.get(schedule.schedule_id),
                now,
                self.settings.scheduler_catchup_seconds,
            )
            if skipped_from is not None:
                log.warning(
                    "schedule %s: ticks before %s are older than the catch-up window (%d s); "
                    "not sent",
                    schedule.schedule_id,
                    _iso(skipped_from),
                    self.settings.scheduler_catchup_seconds,
                )
            for tick in ticks:
                sent = await lease.send_tick(
                    token, schedule.schedule_id, tick, tick_message(self.broker, schedule, tick)
                )
                if sent < 0:
                    log.warning("scheduler lease (token %d) lost while sending", token)
                    self._token = None
                    return
                if sent:
                    late = now - tick
                    log.info(
                        "Sent task %s with schedule_id %s for %s%s (token %d).",
                        schedule.task_name,
                        schedule.schedule_id,
                        _iso(tick),
                        f", {late:.0f} s late" if late >= 2 else "",
                        token,
                    )


def _iso(tick: int) -> str:
    return datetime.fromtimestamp(tick, UTC).isoformat()


scheduler = LeaderScheduler(broker, get_settings())
