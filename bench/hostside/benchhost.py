"""Helper run INSIDE the benchmark host with the live release's interpreter, as root.

    /opt/xagent/current/venv/bin/python benchhost.py enqueue --n 3000 --ms 20
    ... progress                    consumer-group counters of the task stream (JSON)
    ... wait-drained --timeout 300  until every enqueued task was acked
    ... task-latency --n 200 --rate 20   enqueue -> result-saved latency of no-op tasks
    ... pss --units 'xagent-web.service ...'   PSS/RSS of every process of those units

It reads the settings like the units do (the environment file) and the secrets from the
credential files (root only), so it talks to the same Redis the app uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

ENV_FILE = Path("/etc/xagent/xagent.env")
CRED_DIR = Path("/etc/xagent/credentials")
ADMIN_PASSWORD = Path("/etc/redis/admin-password")


def load_settings_env() -> None:
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        os.environ[key] = "".join(shlex.split(value)) if value else ""
    for name in ("redis_password", "database_password"):
        path = CRED_DIR / name
        if path.exists():
            os.environ[f"XAGENT_{name.upper()}"] = path.read_text().strip()


def emit(obj: Any) -> None:
    json.dump(obj, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


async def redis_client() -> Any:
    import redis.asyncio as aioredis
    from xagent.settings import get_settings

    settings = get_settings()
    if not ADMIN_PASSWORD.exists():
        return aioredis.Redis.from_url(settings.redis_url, **settings.redis_kwargs()), settings
    # The bench is an operator (CONFIG SET, PSUBSCRIBE, XDEL), beyond what the app's ACL
    # user may do: it connects as Redis's administrator, to the server the app uses.
    parts = urllib.parse.urlsplit(settings.redis_url)
    url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    password = ADMIN_PASSWORD.read_text().strip()
    return aioredis.Redis.from_url(url, username="default", password=password), settings


async def group_progress(client: Any, queue: str) -> dict[str, int]:
    """Counters of the consumer group: delivered (entries-read), pending (delivered, not
    acked yet), lag (not delivered yet). Acked = delivered - pending."""
    groups = await client.xinfo_groups(queue)
    group = next(g for g in groups if g["name"] in (queue, queue.encode()))
    read = int(group.get("entries-read") or 0)
    pending = int(group["pending"])
    lag = int(group.get("lag") or 0)
    return {"read": read, "pending": pending, "lag": lag, "acked": read - pending}


async def cmd_enqueue(args: argparse.Namespace) -> None:
    from taskiq.kicker import AsyncKicker
    from xagent.broker import broker

    await broker.startup()
    # by name: the naive design's sync task is not in xagent.tasks
    kicker: AsyncKicker[Any, Any] = AsyncKicker(task_name=args.task, broker=broker, labels={})
    started = time.monotonic()
    batch = 200
    for first in range(0, args.n, batch):
        await asyncio.gather(*(kicker.kiq(args.ms) for _ in range(min(batch, args.n - first))))
    emit({"enqueued": args.n, "seconds": round(time.monotonic() - started, 3)})
    await broker.shutdown()


async def cmd_progress(args: argparse.Namespace) -> None:
    client, settings = await redis_client()
    emit(await group_progress(client, settings.queue_name))
    await client.aclose()


async def cmd_purge(args: argparse.Namespace) -> None:
    """Drop the undelivered backlog, then wait until what receivers hold is acked."""
    client, settings = await redis_client()
    queue = settings.queue_name
    deleted = 0
    while True:
        ids = [
            entry[0]
            for _, entries in await client.xreadgroup(queue, "bench-purge", {queue: ">"}, 2000)
            for entry in entries
        ]
        if not ids:
            break
        await client.xack(queue, queue, *ids)
        await client.xdel(queue, *ids)
        deleted += len(ids)
    await client.xgroup_delconsumer(queue, queue, "bench-purge")
    deadline = time.monotonic() + args.timeout
    stale = 0
    while (await group_progress(client, queue))["pending"] > 0:
        if time.monotonic() > deadline:
            emit({"purged": deleted, "drained": False})
            sys.exit(1)
        # entries held by a consumer that is gone (a stopped naive web worker, a receiver
        # killed mid-task) stay pending until the stream's idle timeout reclaims them:
        # nothing runs them now, ack them (tasks here take milliseconds, not seconds)
        for entry in await client.xpending_range(queue, queue, "-", "+", 1000, idle=5000):
            await client.xack(queue, queue, entry["message_id"])
            stale += 1
        await asyncio.sleep(0.05)
    emit({"purged": deleted, "stale_acked": stale, "drained": True})
    await client.aclose()


async def cmd_wait_drained(args: argparse.Namespace) -> None:
    client, settings = await redis_client()
    deadline = time.monotonic() + args.timeout
    started = time.monotonic()
    while True:
        progress = await group_progress(client, settings.queue_name)
        if progress["pending"] == 0 and progress["lag"] == 0:
            break
        if time.monotonic() > deadline:
            emit({"drained": False, **progress})
            sys.exit(1)
        await asyncio.sleep(args.interval)
    emit({"drained": True, "seconds": round(time.monotonic() - started, 3), **progress})
    await client.aclose()


async def cmd_throughput(args: argparse.Namespace) -> None:
    """Enqueue N no-op tasks at once, then time until all are acked (tasks/s)."""
    from xagent.broker import broker
    from xagent.tasks import burn_cpu

    client, settings = await redis_client()
    await broker.startup()
    before = await group_progress(client, settings.queue_name)
    started = time.monotonic()
    batch = 200
    for first in range(0, args.n, batch):
        await asyncio.gather(*(burn_cpu.kiq(0) for _ in range(min(batch, args.n - first))))
    enqueued = time.monotonic()
    at_enqueued = await group_progress(client, settings.queue_name)
    deadline = started + args.timeout
    while True:
        progress = await group_progress(client, settings.queue_name)
        if progress["acked"] - before["acked"] >= args.n:
            break
        if time.monotonic() > deadline:
            emit({"done": False, **progress})
            sys.exit(1)
        await asyncio.sleep(0.02)
    seconds = time.monotonic() - started
    emit(
        {
            "n": args.n,
            "seconds": round(seconds, 3),
            "enqueue_seconds": round(enqueued - started, 3),
            "tasks_per_s": round(args.n / seconds, 1),
            # after the last enqueue: the receivers alone, no longer sharing the CPU
            # with the client that enqueues
            "drain_tasks_per_s": round(
                (progress["acked"] - at_enqueued["acked"]) / max(time.monotonic() - enqueued, 1e-6),
                1,
            ),
        }
    )
    await broker.shutdown()
    await client.aclose()


async def cmd_task_latency(args: argparse.Namespace) -> None:
    """Open-loop stream of no-op tasks (burn_cpu 0 ms) at --rate; the latency of each is
    from its scheduled enqueue time until Redis reports its result key written (keyspace
    notification), i.e. an upper bound of enqueue -> start for a task that does nothing."""
    from xagent.broker import broker
    from xagent.tasks import burn_cpu

    client, settings = await redis_client()
    await client.config_set("notify-keyspace-events", "K$")
    await broker.startup()
    prefix = f"{settings.queue_name}:result:"
    pubsub = client.pubsub()
    db = client.connection_pool.connection_kwargs.get("db", 0)
    await pubsub.psubscribe(f"__keyspace@{db}__:{prefix}*")
    done: dict[str, float] = {}

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] != "pmessage":
                continue
            channel = msg["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            done.setdefault(channel.rsplit(":", 1)[-1], time.monotonic())

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.2)
    sent: dict[str, float] = {}
    start = time.monotonic() + 0.1
    for i in range(args.n):
        scheduled = start + i / args.rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = await burn_cpu.kiq(0)
        sent[task.task_id] = scheduled
    deadline = time.monotonic() + 30
    while len(done.keys() & sent.keys()) < len(sent) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    listener.cancel()
    await client.config_set("notify-keyspace-events", "")
    lat = sorted(done[t] - s for t, s in sent.items() if t in done)
    emit({"n": args.n, "completed": len(lat), "latencies": [round(x, 6) for x in lat]})
    await broker.shutdown()
    await client.aclose()


def unit_pids(unit: str) -> list[int]:
    out = subprocess.run(
        ["systemctl", "show", "-p", "ControlGroup", "--value", unit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not out:
        return []
    # the pids controller (cgroup v1) or the unified hierarchy list a unit's processes
    for base in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        procs = Path(base + out) / "cgroup.procs"
        if procs.exists():
            return [int(p) for p in procs.read_text().split()]
    return []


def rollup(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return values
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "kB":
            values[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return values


def mapping_pss(pid: int, suffix: str) -> int:
    """PSS of the mappings of one file (path ending in ``suffix``) in a process."""
    total, inside = 0, False
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[-1].endswith(suffix)
        elif inside and head and head[0] == "Pss:":
            total += int(head[1]) * 1024
    return total


async def cmd_pss(args: argparse.Namespace) -> None:
    result: dict[str, Any] = {"units": {}, "total": {}}
    keys = ("Pss", "Rss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Pss_Model")
    for unit in args.units.split():
        procs = []
        for pid in unit_pids(unit):
            r = rollup(pid)
            if r:
                r["Pss_Model"] = mapping_pss(pid, args.model) if args.model else 0
                procs.append({"pid": pid, **{k: r.get(k, 0) for k in keys}})
        result["units"][unit] = procs
        for k in keys:
            result["total"][k] = result["total"].get(k, 0) + sum(p[k] for p in procs)
    result["processes"] = sum(len(p) for p in result["units"].values())
    emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("enqueue")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--ms", type=int, required=True)
    p.add_argument("--task", default="xagent.burn_cpu")
    sub.add_parser("progress")
    p = sub.add_parser("purge")
    p.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("wait-drained")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--interval", type=float, default=0.05)
    p = sub.add_parser("throughput")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300)
    p = sub.add_parser("task-latency")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p = sub.add_parser("pss")
    p.add_argument("--units", required=True)
    p.add_argument("--model", default="", help="file name: PSS of its mappings too")
    args = parser.parse_args()
    if args.cmd != "pss":
        load_settings_env()
    handler = {
        "enqueue": cmd_enqueue,
        "progress": cmd_progress,
        "purge": cmd_purge,
        "wait-drained": cmd_wait_drained,
        "throughput": cmd_throughput,
        "task-latency": cmd_task_latency,
        "pss": cmd_pss,
    }[args.cmd]
    asyncio.run(handler(args))


if __name__ == "__main__":
    main()
