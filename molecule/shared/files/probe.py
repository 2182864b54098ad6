#!/usr/bin/env python3
"""Open-loop HTTP load probe: counts every failed or refused request.

Sends GET requests at a fixed rate (each on a new connection, the way a
load balancer health check or a fresh client arrives), independently of how
fast answers come back, until SIGTERM/SIGINT (or --count requests); then waits for
the requests in flight and writes a JSON summary. Standard library only, so it runs on a bare
test host.

    probe.py --url http://127.0.0.1:18000/healthz --rate 50 --out /var/tmp/probe.json
    probe.py --url http://127.0.0.1:18000/runs --body '{"tool": "sleep", "args": {"seconds": 2}}' \
             --expect 202 --rate 2 --out /var/tmp/runs.json      (POSTs; collects the "id"s)

A request fails when the connection is refused or reset, no complete answer
arrives within --timeout, or the status is not --expect. The summary also
lists the releases that answered (the app's X-Release header) in order of
first appearance, the longest time without a successful answer, and with
--body the "id" of every accepted POST.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import json
import os
import resource
import signal
import time
import urllib.parse
from collections import Counter
from typing import Any


async def one_request(
    host: str, port: int, target: str, timeout: float, body: bytes | None, expect: int
) -> tuple[str, str, bytes]:
    """Return (outcome, release, body): outcome is 'ok', 'status <n>' or an error name."""
    writer = None
    if body is None:
        request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        payload = request.encode()
    else:
        request = (
            f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        payload = request.encode() + body
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(payload)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        return "timeout", "", b""
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "") if exc.errno else ""
        return f"{type(exc).__name__} {name}".strip(), "", b""
    finally:
        if writer is not None:
            writer.close()
    head, _, answer = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2) if lines and lines[0] else []
    if len(parts) < 2 or not parts[1].isdigit():
        return "bad-answer", "", b""
    release = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-release":
            release = value.strip()
    return ("ok" if int(parts[1]) == expect else f"status {parts[1]}"), release, answer


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = urllib.parse.urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    target = url.path + (f"?{url.query}" if url.query else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    outcomes: Counter[str] = Counter()
    releases: list[str] = []
    latencies: list[float] = []
    ok_times: list[float] = []
    failures: list[dict[str, Any]] = []
    ids: list[str] = []
    body = args.body.encode() if args.body is not None else None
    started = time.monotonic()
    wall0 = time.time()

    async def fire(scheduled: float) -> None:
        outcome, release, answer = await one_request(
            host, port, target, args.timeout, body, args.expect
        )
        done = time.monotonic()
        outcomes[outcome] += 1
        latencies.append(done - scheduled)
        if outcome == "ok":
            ok_times.append(done - started)
            if release and release not in releases:
                releases.append(release)
            if body is not None:
                try:
                    ids.append(str(json.loads(answer)["id"]))
                except (ValueError, KeyError, TypeError):
                    outcomes["ok-without-id"] += 1
        elif len(failures) < 50:
            failures.append(
                {
                    "at": round(scheduled - started, 3),
                    "wall": time.strftime("%H:%M:%S", time.gmtime(wall0 + scheduled - started)),
                    "outcome": outcome,
                }
            )

    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / args.rate
    n = 0
    while not stop.is_set() and (args.count is None or n < args.count):
        scheduled = started + n * interval
        delay = scheduled - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break
            except TimeoutError:
                pass
        task = asyncio.create_task(fire(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.gather(*tasks)

    latencies.sort()
    ok_times.sort()
    gaps = [b - a for a, b in itertools.pairwise(ok_times)]

    def pct(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 4)
            if latencies
            else 0.0
        )

    sent = sum(outcomes.values())
    return {
        "url": args.url,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(wall0)),
        "rate": args.rate,
        "seconds": round(time.monotonic() - started, 1),
        "sent": sent,
        "ok": outcomes["ok"],
        "failed": sent - outcomes["ok"] + outcomes["ok-without-id"],
        "outcomes": dict(outcomes),
        "first_failures": failures,
        "releases": releases,
        "latency_p50": pct(0.50),
        "latency_p99": pct(0.99),
        "latency_max": round(latencies[-1], 4) if latencies else 0.0,
        "longest_gap_without_success": round(max(gaps), 3) if gaps else 0.0,
        "ids": ids,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds per request")
    parser.add_argument("--body", help="JSON body: POST it instead of GET")
    parser.add_argument("--expect", type=int, default=200, help="status that counts as success")
    parser.add_argument("--count", type=int, help="stop after this many requests")
    parser.add_argument("--out", required=True, help="JSON summary written on stop")
    args = parser.parse_args()
    # Requests queue while the server restarts: each one holds a socket.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    summary = asyncio.run(run(args))
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
