#!/usr/bin/env python3
"""Open-loop HTTP load probe: counts every failed or refused request.

Sends GET requests at a fixed rate, independently of how fast answers come
back, until SIGTERM/SIGINT (or --count requests); then waits for the requests
in flight and writes a JSON summary. Each request opens a new connection (the
way a load balancer health check or a fresh client arrives), or with
--keepalive reuses an idle HTTP/1.1 connection of earlier requests (the way a
browser, an SDK or a proxy arrives: a server that stops must not cut those).
Standard library only, so it runs on a bare test host.

    probe.py --url http://127.0.0.1:18000/healthz --rate 50 --out /var/tmp/probe.json
    probe.py --url http://127.0.0.1:18000/runs --body '{"tool": "sleep", "args": {"seconds": 2}}' \
             --expect 202 --rate 2 --out /var/tmp/runs.json      (POSTs; collects the "id"s)

A request fails when the connection is refused or reset, no complete answer
arrives within --timeout, or the status is not --expect. Two retries are
what correct clients do and are not failures: a request on a reused
connection that the server closed before any byte of an answer (an idle
connection closed at the same moment: RFC 9112 9.3.1) is sent again on a new
connection when it is a GET or carries an Idempotency-Key; with
--idempotency-key every POST carries a key of its own and is retried up to
--retries times (same key) when it fails. The summary lists the releases that
answered (the app's X-Release header) in order of first appearance, the
longest time without a successful answer, the retries, and with --body the
"id" of every accepted POST.
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
import uuid
from collections import Counter
from typing import Any

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Stale(Exception):
    """A reused connection closed before any byte of the answer."""


class Connections:
    """Idle keep-alive connections (none kept without --keepalive)."""

    def __init__(self, host: str, port: int, keepalive: bool) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self.idle: list[Conn] = []

    async def get(self, timeout: float) -> tuple[Conn, bool]:
        while self.idle:
            conn = self.idle.pop()
            if not conn[0].at_eof() and not conn[1].is_closing():
                return conn, True
            conn[1].close()
        conn = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
        return conn, False

    def put(self, conn: Conn) -> None:
        if self.keepalive:
            self.idle.append(conn)
        else:
            conn[1].close()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, reusable) of one HTTP/1.1 answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError("bad status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunks.append(await reader.readexactly(size + 2))
            if size == 0:
                break
        body = b"".join(chunk[:-2] for chunk in chunks)
    else:
        body = await reader.read()
        return int(parts[1]), headers, body, False
    reusable = headers.get("connection", "").lower() != "close"
    return int(parts[1]), headers, body, reusable


async def exchange(
    conns: Connections, target: str, timeout: float, body: bytes | None, key: str | None
) -> tuple[int, dict[str, str], bytes]:
    """One request and its answer; raises Stale, TimeoutError, OSError or ValueError."""
    host_header = f"Host: {conns.host}:{conns.port}\r\n"
    close = "" if conns.keepalive else "Connection: close\r\n"
    if body is None:
        payload = f"GET {target} HTTP/1.1\r\n{host_header}{close}\r\n".encode()
    else:
        keyed = f"Idempotency-Key: {key}\r\n" if key else ""
        payload = (
            f"POST {target} HTTP/1.1\r\n{host_header}{close}{keyed}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
    (reader, writer), reused = await conns.get(timeout)
    try:
        writer.write(payload)
        await writer.drain()
        status, headers, answer, reusable = await asyncio.wait_for(_read_answer(reader), timeout)
    except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
        writer.close()
        partial = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
        if reused and not partial:
            raise Stale() from None
        if isinstance(exc, asyncio.IncompleteReadError):
            raise ConnectionResetError(errno.ECONNRESET, "closed mid-answer") from None
        raise
    except BaseException:
        writer.close()
        raise
    if reusable:
        conns.put((reader, writer))
    else:
        writer.close()
    return status, headers, answer


# Key prefix in the counts: what a failed attempt that was then retried got.
RETRIED = "retry after: "


async def one_request(
    conns: Connections,
    target: str,
    timeout: float,
    body: bytes | None,
    expect: int,
    key: str | None,
    retries: int,
    counts: Counter[str],
) -> tuple[str, str, bytes]:
    """Return (outcome, release, body): outcome is 'ok', 'status <n>' or an error name."""
    attempt = 0
    while True:
        try:
            status, headers, answer = await exchange(conns, target, timeout, body, key)
            outcome = "ok" if status == expect else f"status {status}"
        except Stale:
            if body is None or key:
                counts["stale-retried"] += 1
                continue
            outcome, headers, answer = "stale-connection", {}, b""
        except TimeoutError:
            outcome, headers, answer = "timeout", {}, b""
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            name = errno.errorcode.get(getattr(exc, "errno", 0) or 0, "")
            outcome, headers, answer = f"{type(exc).__name__} {name}".strip(), {}, b""
        if outcome == "ok" or not key or attempt >= retries or outcome.startswith("status 4"):
            if attempt:
                counts["retried"] += 1
            return outcome, headers.get("x-release", ""), answer
        counts[RETRIED + outcome] += 1
        await asyncio.sleep(0.5 * 2**attempt)
        attempt += 1


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

    conns = Connections(host, port, args.keepalive)
    counts: Counter[str] = Counter()
    key_prefix = f"probe-{uuid.uuid4().hex[:12]}" if args.idempotency_key else None
    sequence = itertools.count()

    async def fire(scheduled: float) -> None:
        key = f"{key_prefix}-{next(sequence)}" if key_prefix else None
        outcome, release, answer = await one_request(
            conns, target, args.timeout, body, args.expect, key, args.retries, counts
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
        "keepalive": args.keepalive,
        "idempotency_keys": key_prefix,
        "retried": counts["retried"],
        "stale_retried": counts["stale-retried"],
        # What the failed attempts that were retried got (the key's run was not lost).
        "retried_outcomes": {
            k.removeprefix(RETRIED): v for k, v in counts.items() if k.startswith(RETRIED)
        },
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
    parser.add_argument("--keepalive", action="store_true", help="reuse idle connections")
    parser.add_argument(
        "--idempotency-key", action="store_true", help="a key of its own on every POST"
    )
    parser.add_argument(
        "--retries", type=int, default=0, help="retries of a failed keyed POST (same key)"
    )
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
