"""Scheduler bookkeeping: which ticks are due (cron and interval, catch-up window), and the
lease/tick scripts against a real Redis (fencing, compare-and-set, atomic send)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from conftest import TEST_REDIS_URL
from xagent.leases import Keys, Schedule, SchedulerLease, due_ticks

EVERY_MINUTE = Schedule("tick", "t", cron="* * * * *")
EVERY_5_MIN = Schedule("five", "t", cron="*/5 * * * *")
EVERY_10_S = Schedule("ten", "t", interval=10)
MAINTENANCE = Schedule("sweep", "t", interval=30, catch_up=False)


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def iso(ticks: list[int]) -> list[str]:
    return [datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S") for t in ticks]


def test_first_start_sends_the_current_tick_only() -> None:
    now = ts("2026-11-27T12:03:25")
    assert iso(due_ticks(EVERY_MINUTE, None, now, 600)[0]) == ["12:03:00"]
    assert due_ticks(EVERY_5_MIN, None, now, 600)[0] == []  # 12:03 does not match
    assert iso(due_ticks(EVERY_10_S, None, now, 600)[0]) == ["12:03:20"]


def test_a_tick_already_sent_is_not_due_again() -> None:
    now = ts("2026-11-27T12:03:59")
    assert due_ticks(EVERY_MINUTE, ts("2026-11-27T12:03:00"), now, 600) == ([], None)
    assert due_ticks(EVERY_10_S, ts("2026-11-27T12:03:50"), now, 600) == ([], None)


def test_missed_ticks_are_caught_up_each_with_its_own_time() -> None:
    # the old scheduler sent 12:00 and stopped; the new one leads at 12:03:05
    now = ts("2026-11-27T12:03:05")
    ticks, skipped = due_ticks(EVERY_MINUTE, ts("2026-11-27T12:00:00"), now, 600)
    assert (iso(ticks), skipped) == (["12:01:00", "12:02:00", "12:03:00"], None)
    ticks, _ = due_ticks(EVERY_5_MIN, ts("2026-11-27T11:55:00"), ts("2026-11-27T12:11:00"), 3600)
    assert iso(ticks) == ["12:00:00", "12:05:00", "12:10:00"]
    ticks, _ = due_ticks(EVERY_10_S, ts("2026-11-27T12:00:30"), ts("2026-11-27T12:01:01"), 600)
    assert iso(ticks) == ["12:00:40", "12:00:50", "12:01:00"]


def test_catch_up_is_bounded_by_the_window() -> None:
    now = ts("2026-11-27T12:10:30")
    ticks, skipped = due_ticks(EVERY_MINUTE, ts("2026-11-27T11:00:00"), now, 180)
    assert iso(ticks) == ["12:08:00", "12:09:00", "12:10:00"]
    assert skipped == ts("2026-11-27T12:08:00")
    # a window of 0: no catch-up, but the current tick is not lost
    ticks, _ = due_ticks(EVERY_MINUTE, ts("2026-11-27T12:05:00"), now, 0)
    assert iso(ticks) == ["12:10:00"]
    ticks, _ = due_ticks(EVERY_10_S, ts("2026-11-27T12:00:00"), now, 600, limit=5)
    assert iso(ticks) == ["12:00:30", "12:00:40", "12:00:50", "12:01:00", "12:01:10"]


def test_maintenance_schedules_send_only_the_newest_missed_tick() -> None:
    now = ts("2026-11-27T12:10:31")
    ticks, skipped = due_ticks(MAINTENANCE, ts("2026-11-27T12:00:00"), now, 600)
    assert (iso(ticks), skipped) == (["12:10:30"], None)


@pytest.fixture
async def lease(queue_name: str) -> AsyncIterator[SchedulerLease]:
    client = aioredis.Redis.from_url(TEST_REDIS_URL)
    yield SchedulerLease(client, Keys.for_queue(queue_name))
    await client.aclose()


# long: nothing here may expire by itself on a slow machine (expiry is simulated by a DELETE)
LEASE_MS = 60_000


async def test_lease_is_exclusive_and_fenced(lease: SchedulerLease, queue_name: str) -> None:
    token_a, holder = await lease.acquire("a-1", LEASE_MS)
    assert (token_a, holder) == (1, "a-1")
    assert await lease.acquire("b-2", LEASE_MS) == (0, "a-1")  # b stands by
    assert await lease.renew(token_a, LEASE_MS)
    status = await lease.status()
    assert status is not None
    assert (status["holder"], status["token"], status["lease_ms"]) == ("a-1", 1, LEASE_MS)
    assert 0 <= status["renewed_age_ms"] < LEASE_MS
    # a's lease expires (a stalled); b takes over with a larger token
    await lease.client.delete(lease.keys.lease)
    token_b, _ = await lease.acquire("b-2", LEASE_MS)
    assert token_b == 2
    assert not await lease.renew(token_a, LEASE_MS)
    assert not await lease.release(token_a)  # a cannot release b's lease
    assert await lease.release(token_b)
    assert await lease.status() is None


async def test_each_tick_is_sent_once_and_only_by_the_holder(
    lease: SchedulerLease, queue_name: str
) -> None:
    token, _ = await lease.acquire("a-1", LEASE_MS)
    tick = ts("2026-11-27T12:01:00")
    assert await lease.send_tick(token, "tick", tick, b'{"n": 1}') == 1
    assert await lease.send_tick(token, "tick", tick, b'{"n": 2}') == 0  # already sent
    assert await lease.send_tick(token, "tick", tick - 60, b'{"n": 3}') == 0  # older
    assert await lease.send_tick(token + 1, "tick", tick + 60, b'{"n": 4}') == -1  # deposed
    assert await lease.send_tick(token, "other", tick, b'{"n": 5}') == 1
    assert await lease.last_sent() == {"tick": tick, "other": tick}
    stream: Any = await lease.client.xrange(queue_name)
    sent = [json.loads(f[b"data"]) for _, f in stream]
    assert sent == [{"n": 1}, {"n": 5}]  # in the stream exactly when recorded as sent
