"""The stream's durability helpers against a real Redis: the group starts at id 0, trimming
never drops an undelivered or unacknowledged entry, consumers holding entries are never
deleted, heartbeats touch only this consumer's entries, a clean leave hands entries over."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from conftest import TEST_REDIS_URL
from xagent import streams

GROUP = "g"


@pytest.fixture
async def client(queue_name: str) -> AsyncIterator[aioredis.Redis]:
    conn = aioredis.Redis.from_url(TEST_REDIS_URL)
    yield conn
    await conn.aclose()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def add(client: aioredis.Redis, stream: str, n: int) -> list[str]:
    return [_s(await client.xadd(stream, {"data": f"m{i}"})) for i in range(n)]


async def read(client: aioredis.Redis, stream: str, consumer: str, count: int) -> list[str]:
    got: Any = await client.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
    return [_s(entry_id) for _, entries in got for entry_id, _ in entries]


async def entries(client: aioredis.Redis, stream: str) -> list[str]:
    found: Any = await client.xrange(stream)
    return [_s(entry_id) for entry_id, _ in found]


def test_consumer_names_say_host_and_pid() -> None:
    assert streams.consumer_name("web-2.example", 4711) == "web-2.example-4711"
    assert streams.parse_consumer("web-2.example-4711") == ("web-2.example", 4711)
    assert streams.parse_consumer(streams.HANDOVER_CONSUMER) is None


async def test_group_starts_at_zero_so_earlier_entries_are_delivered(
    client: aioredis.Redis, queue_name: str
) -> None:
    # the web added entries while no group existed (Redis lost the stream, or a first start)
    early = await add(client, queue_name, 2)
    assert await streams.ensure_group(client, queue_name, GROUP) is True
    assert await streams.ensure_group(client, queue_name, GROUP) is False
    assert await read(client, queue_name, "h-1", 10) == early


async def test_trim_drops_only_acknowledged_entries(
    client: aioredis.Redis, queue_name: str
) -> None:
    ids = await add(client, queue_name, 8)
    await streams.ensure_group(client, queue_name, GROUP)
    assert await read(client, queue_name, "h-1", 5) == ids[:5]
    await client.xack(queue_name, GROUP, ids[0], ids[1], ids[3])
    # ids[2] and ids[4] pending, ids[5:] never delivered
    removed, minid = await streams.trim(client, queue_name)
    assert (removed, minid) == (2, ids[2])
    assert await entries(client, queue_name) == ids[2:]
    # acknowledged entries after a pending one stay until the pending one is acknowledged
    await client.xack(queue_name, GROUP, ids[2], ids[4])
    removed, minid = await streams.trim(client, queue_name)
    assert (removed, minid) == (3, ids[5])
    assert await entries(client, queue_name) == ids[5:]  # undelivered: kept
    assert await read(client, queue_name, "h-1", 10) == ids[5:]
    await client.xack(queue_name, GROUP, *ids[5:])
    removed, _ = await streams.trim(client, queue_name)
    assert removed == 3
    assert await client.xlen(queue_name) == 0
    # the stream and its group survive being empty
    new = await add(client, queue_name, 1)
    assert await read(client, queue_name, "h-1", 10) == new


async def test_trim_keeps_everything_without_a_group(
    client: aioredis.Redis, queue_name: str
) -> None:
    await add(client, queue_name, 3)
    assert await streams.trim(client, queue_name) == (0, "")
    assert await client.xlen(queue_name) == 3
    assert await streams.oldest_unacked_age(client, queue_name) is not None


async def test_oldest_unacknowledged_age(client: aioredis.Redis, queue_name: str) -> None:
    assert await streams.oldest_unacked_age(client, queue_name) is None
    ids = await add(client, queue_name, 2)
    await streams.ensure_group(client, queue_name, GROUP)
    await read(client, queue_name, "h-1", 2)
    age = await streams.oldest_unacked_age(client, queue_name)
    assert age is not None
    assert 0 <= age < 60
    await client.xack(queue_name, GROUP, *ids)
    assert await streams.oldest_unacked_age(client, queue_name) is None


async def test_stale_consumers_are_deleted_unless_they_hold_entries(
    client: aioredis.Redis, queue_name: str
) -> None:
    await add(client, queue_name, 1)
    await streams.ensure_group(client, queue_name, GROUP)
    await read(client, queue_name, "holder-1", 1)  # dies holding an entry
    await client.xgroup_createconsumer(queue_name, GROUP, "idle-2")  # holds nothing
    assert await streams.sweep_consumers(client, queue_name, GROUP, 3600) == []
    assert await streams.sweep_consumers(client, queue_name, GROUP, 0) == ["idle-2"]
    names = [c["name"].decode() for c in await client.xinfo_consumers(queue_name, GROUP)]
    assert names == ["holder-1"]  # deleting it would drop its pending entry
    assert await streams.sweep_consumers(client, f"{queue_name}-none", GROUP, 0) == []


async def test_heartbeat_touches_only_own_pending_entries(
    client: aioredis.Redis, queue_name: str
) -> None:
    ids = await add(client, queue_name, 3)
    await streams.ensure_group(client, queue_name, GROUP)
    await read(client, queue_name, "me-1", 2)
    await read(client, queue_name, "other-2", 1)
    await client.xack(queue_name, GROUP, ids[1])
    kept: Any = await client.eval(streams.HEARTBEAT_LUA, 1, queue_name, GROUP, "me-1", *ids)
    assert [_s(k) for k in kept] == [ids[0]]
    pending = {
        _s(p["message_id"]): p for p in await client.xpending_range(queue_name, GROUP, "-", "+", 10)
    }
    assert pending[ids[2]]["consumer"] == b"other-2"  # not taken from its owner
    assert pending[ids[0]]["times_delivered"] == 1  # a heartbeat is not a delivery


async def test_leaving_hands_entries_over_already_idle(
    client: aioredis.Redis, queue_name: str
) -> None:
    ids = await add(client, queue_name, 3)
    await streams.ensure_group(client, queue_name, GROUP)
    await read(client, queue_name, "leaving-1", 2)
    moved = await client.eval(
        streams.LEAVE_GROUP_LUA,
        1,
        queue_name,
        GROUP,
        "leaving-1",
        streams.HANDOVER_CONSUMER,
        60_000,
    )
    assert moved == 2
    names = [c["name"].decode() for c in await client.xinfo_consumers(queue_name, GROUP)]
    assert names == [streams.HANDOVER_CONSUMER]
    # the next reclaim pass of any receiver (idle timeout 60 s) takes them right away
    _, claimed, _ = await client.xautoclaim(queue_name, GROUP, "next-2", 60_000, "0-0")
    assert [entry_id.decode() for entry_id, _ in claimed] == ids[:2]


async def test_stats(client: aioredis.Redis, queue_name: str) -> None:
    empty = await streams.stats(client, queue_name, GROUP)
    assert (empty["exists"], empty["length"], empty["consumers"]) == (False, 0, [])
    ids = await add(client, queue_name, 4)
    assert (await streams.stats(client, queue_name, GROUP))["lag"] == 4  # no group yet
    await streams.ensure_group(client, queue_name, GROUP)
    await read(client, queue_name, "box-77", 3)
    await client.xack(queue_name, GROUP, ids[0])
    info = await streams.stats(client, queue_name, GROUP)
    assert (info["length"], info["lag"], info["pending"]) == (4, 1, 2)
    assert info["oldest_pending_id"] == ids[1]
    assert info["last_delivered_id"] == ids[2]
    (consumer,) = info["consumers"]
    assert (consumer["name"], consumer["host"], consumer["pid"]) == ("box-77", "box", 77)
    assert consumer["pending"] == 2
