"""The task stream in Redis: consumer names, the group, trimming, stale consumers, statistics.

Everything that must not race with receivers (trim, deleting consumers, heartbeats, the
hand-over at a receiver's stop) is one Lua script, so it is atomic in Redis.

Stream facts relied on: entry ids grow; the group's ``last-delivered-id`` only moves forward
(XREADGROUP ``>``); an entry is unacknowledged while it is pending (delivered, not acked) or
after ``last-delivered-id`` (not yet delivered). Everything older than the oldest
unacknowledged entry is acknowledged and may be trimmed.
"""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

# Pseudo-consumer that holds the entries of a receiver that stopped cleanly, already idle for
# the reclaim timeout, so the next reclaim pass of any receiver takes them.
HANDOVER_CONSUMER = "_handover"


def consumer_name(host: str, pid: int | None = None) -> str:
    """``<host>-<pid>``: operators and ``xagent-check`` see which host's process consumes."""
    return f"{host}-{os.getpid() if pid is None else pid}"


def alive_key(stream: str, consumer: str) -> str:
    """Key a consuming receiver child keeps refreshed (with a TTL) while it runs.

    XINFO CONSUMERS cannot tell a live reader from a dead one on Redis 7.0: a blocking
    XREADGROUP that returns nothing does not refresh the consumer's idle time, so an idle
    but healthy receiver looks as old as a killed one."""
    return f"{stream}:alive:{consumer}"


def parse_consumer(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of a receiver's consumer name, None for other consumers."""
    host, _, pid = name.rpartition("-")
    if not host or not pid.isdigit():
        return None
    return host, int(pid)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def id_ms(entry_id: str) -> int:
    """The millisecond part (Redis server time when added) of a stream entry id."""
    return int(entry_id.split("-", 1)[0])


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> bool:
    """Create the stream and the group at id 0 (every entry already in the stream is
    delivered, none skipped). True when created, False when it existed."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


_LUA_COMMON = """
local function split(id)
  local dash = string.find(id, '-', 1, true)
  return string.sub(id, 1, dash - 1), tonumber(string.sub(id, dash + 1))
end
local function less(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  am, bm = tonumber(am), tonumber(bm)
  return am < bm or (am == bm and as < bs)
end
local function field(t, name)
  for i = 1, #t, 2 do
    if t[i] == name then return t[i + 1] end
  end
  return nil
end
-- The oldest entry some group has not acknowledged (pending, or after the group's
-- last-delivered-id), or false; second result: whether the stream has a group at all.
local function oldest_unacked(key)
  if redis.call('EXISTS', key) == 0 then return false, false end
  local groups = redis.call('XINFO', 'GROUPS', key)
  if #groups == 0 then
    local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
    if #first == 0 then return false, false end
    return first[1][1], false
  end
  local oldest = false
  for _, g in ipairs(groups) do
    local name = field(g, 'name')
    local pending = redis.call('XPENDING', key, name)
    if pending[1] > 0 and (not oldest or less(pending[2], oldest)) then
      oldest = pending[2]
    end
    local nxt = redis.call('XRANGE', key, '(' .. field(g, 'last-delivered-id'), '+', 'COUNT', 1)
    if #nxt > 0 and (not oldest or less(nxt[1][1], oldest)) then
      oldest = nxt[1][1]
    end
  end
  return oldest, true
end
"""

# KEYS[1] stream. Returns {oldest unacknowledged id or false, has group (0/1), Redis time ms}.
OLDEST_UNACKED_LUA = (
    _LUA_COMMON
    + """
local oldest, has_group = oldest_unacked(KEYS[1])
local t = redis.call('TIME')
return {oldest, has_group and 1 or 0, t[1] .. string.sub(string.format('%06d', t[2]), 1, 3)}
"""
)

# KEYS[1] stream. Trims every entry older than the oldest unacknowledged one (all of them when
# everything is acknowledged); nothing without a group. Returns {entries removed, MINID used}.
TRIM_LUA = (
    _LUA_COMMON
    + """
local oldest, has_group = oldest_unacked(KEYS[1])
if not has_group then return {0, ''} end
local minid = oldest
if not minid then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #newest == 0 then return {0, ''} end
  local ms, seq = split(newest[1][1])
  minid = ms .. '-' .. string.format('%d', seq + 1)
end
return {redis.call('XTRIM', KEYS[1], 'MINID', minid), minid}
"""
)

# KEYS[1] stream; ARGV[1] group, ARGV[2] minimum idle ms. Deletes consumers that hold no
# pending entry and were idle that long (never one that holds something: its entries would
# be lost). Returns the deleted names.
SWEEP_CONSUMERS_LUA = (
    _LUA_COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers.err then return {} end
local removed = {}
for _, c in ipairs(consumers) do
  if tonumber(field(c, 'pending')) == 0 and tonumber(field(c, 'idle')) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], field(c, 'name'))
    removed[#removed + 1] = field(c, 'name')
  end
end
return removed
"""
)

# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids. Heartbeat: resets the
# idle time of each entry still pending for this consumer (XCLAIM JUSTID to itself, no
# delivery counted); an entry another consumer took over is left alone. Returns the ids kept.
HEARTBEAT_LUA = """
local kept = {}
for i = 3, #ARGV do
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if not p.err and #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""

# KEYS[1] stream; ARGV[1] group, ARGV[2] this consumer, ARGV[3] hand-over consumer, ARGV[4]
# idle ms. A receiver's clean stop: its pending entries move to the hand-over consumer, idle
# for the reclaim timeout (taken by the next reclaim pass of any receiver), then the consumer
# is deleted (DELCONSUMER would otherwise drop its pending entries). Returns entries moved.
LEAVE_GROUP_LUA = """
local moved = 0
while true do
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 100, ARGV[2])
  if p.err or #p == 0 then break end
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0}
  for _, e in ipairs(p) do args[#args + 1] = e[1] end
  args[#args + 1] = 'IDLE'
  args[#args + 1] = ARGV[4]
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
  moved = moved + #p
end
redis.pcall('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return moved
"""


async def oldest_unacked_age(client: aioredis.Redis, stream: str) -> float | None:
    """Seconds (Redis clock) since the oldest unacknowledged entry was added, None when every
    entry is acknowledged. Without a group every entry counts as unacknowledged."""
    oldest, _has_group, now_ms = await client.eval(OLDEST_UNACKED_LUA, 1, stream)
    if not oldest:
        return None
    return max(0.0, (int(_text(now_ms)) - id_ms(_text(oldest))) / 1000)


async def trim(client: aioredis.Redis, stream: str) -> tuple[int, str]:
    """Remove acknowledged entries (XTRIM MINID below the oldest unacknowledged one)."""
    removed, minid = await client.eval(TRIM_LUA, 1, stream)
    return int(removed), str(_text(minid))


async def sweep_consumers(
    client: aioredis.Redis, stream: str, group: str, stale_seconds: float
) -> list[str]:
    """Delete consumers that hold nothing and were idle ``stale_seconds``; their names."""
    names = await client.eval(SWEEP_CONSUMERS_LUA, 1, stream, group, int(stale_seconds * 1000))
    return [str(_text(n)) for n in names]


async def stats(client: aioredis.Redis, stream: str, group: str) -> dict[str, Any]:
    """Length, lag, pending entries and consumers of the stream (for /queue and the CLI)."""
    out: dict[str, Any] = {
        "stream": stream,
        "group": group,
        "exists": bool(await client.exists(stream)),
        "length": 0,
        "group_exists": False,
        "last_delivered_id": None,
        "lag": None,
        "pending": 0,
        "oldest_pending_id": None,
        "oldest_unacked_age_seconds": None,
        "consumers": [],
    }
    if not out["exists"]:
        return out
    out["length"] = int(await client.xlen(stream))
    out["oldest_unacked_age_seconds"] = await oldest_unacked_age(client, stream)
    info = next(
        (g for g in await client.xinfo_groups(stream) if _text(g.get("name")) == group), None
    )
    if info is None:
        out["lag"] = out["length"]  # no group: nothing delivered yet
        return out
    out["group_exists"] = True
    last = str(_text(info.get("last-delivered-id")))
    out["last_delivered_id"] = last
    lag = info.get("lag")
    if lag is None:  # Redis cannot tell (deleted entries in between): count, capped
        lag = len(await client.xrange(stream, min=f"({last}", max="+", count=100_000) or [])
    out["lag"] = int(lag)
    summary = await client.xpending(stream, group)
    out["pending"] = int(summary.get("pending") or 0)
    if out["pending"]:
        out["oldest_pending_id"] = str(_text(summary.get("min")))
    consumers = []
    for c in await client.xinfo_consumers(stream, group):
        name = str(_text(c.get("name")))
        parsed = parse_consumer(name)
        consumers.append(
            {
                "name": name,
                "host": parsed[0] if parsed else None,
                "pid": parsed[1] if parsed else None,
                "pending": int(c.get("pending") or 0),
                "idle_ms": int(c.get("idle") or 0),
            }
        )
    out["consumers"] = sorted(consumers, key=lambda c: c["name"])
    return out
