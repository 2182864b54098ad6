"""``xagent-check``: readiness checks for deploys, and the queue's state.

    xagent-check receivers [--host H] [--min N] [--timeout S] [--recent S]
    xagent-check scheduler [--timeout S]
    xagent-check queue

Run it with the settings and credentials of the units (same environment file,
``$CREDENTIALS_DIRECTORY`` with ``redis_password``). Checks retry until they pass or the
timeout ends. Exit 0 with one line on stdout when ready; exit 1 with one line on stderr.

- ``receivers``: at least N consumers named ``<H>-<pid>`` are alive (their process
  refreshed its liveness key within the last ``--recent`` seconds), and a ``xagent.ping``
  task sent now was executed by some receiver and its result came back.
- ``scheduler``: some scheduler holds the lease and renewed it recently (prints the holder).
- ``queue``: the stream's statistics as JSON (as ``GET /queue``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from xagent import streams
from xagent.leases import Keys, SchedulerLease
from xagent.settings import Settings, SettingsError, get_settings


class CheckFailed(Exception):
    """Not ready; ``str(exc)`` is the one-line reason."""


def _client(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=5, socket_timeout=5, **settings.redis_kwargs()
    )


async def _live_consumers(
    client: aioredis.Redis, settings: Settings, host: str, recent: float
) -> tuple[list[str], list[str]]:
    """(names of host's consumers alive within ``recent`` s, names of all of host's known).

    Alive: the receiver child refreshed its liveness key (its heartbeat thread) within
    ``recent`` s. XINFO CONSUMERS cannot tell (see streams.alive_key): on Redis 7.0 a
    consumer shows up there only once it received an entry, and its idle time grows while
    it waits on an empty stream."""
    info = await streams.stats(client, settings.queue_name, settings.queue_name)
    known = {c["name"] for c in info["consumers"] if c["host"] == host}
    prefix = streams.alive_key(settings.queue_name, "")
    live = []
    now = time.time()
    async for key in client.scan_iter(match=f"{prefix}{host}-*", count=1000):
        name = (key.decode() if isinstance(key, bytes) else str(key))[len(prefix) :]
        parsed = streams.parse_consumer(name)
        if parsed is None or parsed[0] != host:
            continue  # another host whose name starts with this one
        known.add(name)
        stamp = await client.get(key)
        if stamp is not None and now - int(stamp) <= recent:
            live.append(name)
    return sorted(live), sorted(known)


async def check_receivers(
    settings: Settings, host: str, minimum: int, timeout: float, recent: float
) -> str:
    from xagent.broker import broker
    from xagent.tasks import ping

    client = _client(settings)
    live: list[str] = []
    known: list[str] = []
    answer: dict[str, Any] | None = None
    took = 0.0
    try:
        deadline = time.monotonic() + timeout
        # the explicit deadline as well: a cancellation by asyncio.timeout can get lost in
        # redis-py on Python 3.11 (xagent.aio)
        async with asyncio.timeout(timeout):
            await broker.startup()
            sent = time.time()
            task = await ping.kiq(sent)
            while time.monotonic() < deadline:
                live, known = await _live_consumers(client, settings, host, recent)
                if answer is None and await task.is_ready():
                    result = await task.get_result()
                    if result.is_err:
                        raise CheckFailed(f"the ping task failed: {result.error!r}")
                    answer, took = result.return_value, time.time() - sent
                if len(live) >= minimum and answer is not None:
                    return (
                        f"ok: {len(live)} consumer(s) of {host} reading ({', '.join(live)}); "
                        f"ping answered by {answer['consumer']} in {took:.2f} s"
                    )
                await asyncio.sleep(0.5)
            raise TimeoutError
    except TimeoutError:
        problems = []
        if len(live) < minimum:
            others = [name for name in known if name not in live]
            problems.append(
                f"{len(live)} of {minimum} consumer(s) of {host} alive in the last "
                f"{recent:g} s" + (f" (not alive: {', '.join(others)})" if others else "")
            )
        if answer is None:
            problems.append(f"no receiver answered a ping within {timeout:g} s")
        raise CheckFailed("; ".join(problems) or f"timed out after {timeout:g} s") from None
    finally:
        await broker.shutdown()
        await client.aclose()


async def check_scheduler(settings: Settings, timeout: float) -> str:
    client = _client(settings)
    lease = SchedulerLease(client, Keys.for_queue(settings.queue_name))
    status: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout
    try:
        async with asyncio.timeout(timeout):
            while time.monotonic() < deadline:
                status = await lease.status()
                # renewed every third of the lease: two thirds is late
                if status and status["renewed_age_ms"] <= status["lease_ms"] * 2 / 3:
                    return (
                        f"ok: scheduler lease held by {status['holder']} "
                        f"(token {status['token']}), renewed "
                        f"{status['renewed_age_ms'] / 1000:.1f} s ago, held for "
                        f"{status['held_for_ms'] / 1000:.0f} s"
                    )
                await asyncio.sleep(0.5)
            raise TimeoutError
    except TimeoutError:
        if status is None:
            raise CheckFailed(f"no scheduler held the lease within {timeout:g} s") from None
        raise CheckFailed(
            f"scheduler lease held by {status['holder']} but not renewed for "
            f"{status['renewed_age_ms'] / 1000:.1f} s"
        ) from None
    finally:
        await client.aclose()


async def queue_stats(settings: Settings) -> str:
    client = _client(settings)
    try:
        info = await streams.stats(client, settings.queue_name, settings.queue_name)
    finally:
        await client.aclose()
    return json.dumps(info, sort_keys=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xagent-check", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    rec = sub.add_parser("receivers", help="consumers of a host read, and a ping comes back")
    rec.add_argument("--host", help="XAGENT_HOST_NAME of the receivers (default: this one)")
    rec.add_argument("--min", type=int, default=1, help="consumers required (default 1)")
    rec.add_argument("--timeout", type=float, default=30, help="seconds (default 30)")
    rec.add_argument(
        "--recent", type=float, default=20, help="a consumer read within this many seconds"
    )
    sch = sub.add_parser("scheduler", help="a scheduler holds and renews the lease")
    sch.add_argument("--timeout", type=float, default=30, help="seconds (default 30)")
    sub.add_parser("queue", help="stream statistics as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = get_settings()
        if args.what == "receivers":
            line = asyncio.run(
                check_receivers(
                    settings, args.host or settings.host_name, args.min, args.timeout, args.recent
                )
            )
        elif args.what == "scheduler":
            line = asyncio.run(check_scheduler(settings, args.timeout))
        else:
            line = asyncio.run(queue_stats(settings))
    except (SettingsError, CheckFailed) as exc:
        print(f"xagent-check {args.what}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        print(f"xagent-check {args.what}: {type(exc).__name__}: {detail}", file=sys.stderr)
        return 1
    print(line)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
