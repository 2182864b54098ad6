"""Model origin for the benchmarks: serves files on loopback and counts the bytes it sends.

A model download in production crosses a real link; on loopback 500 MB take a second.
The origin therefore caps its TOTAL send rate (one token bucket shared by every
connection, like one uplink), so four workers downloading at once each get a quarter of
it, as they would in production. ``GET /_stats`` returns the bytes and requests per file
since the last ``POST /_reset``; ``POST /_rate?mbps=N`` changes the cap (0 = none).

    python3 bench/origin.py --dir DIR --port 30099 [--mbps 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

CHUNK = 256 * 1024


class Origin:
    def __init__(self, root: Path, mbps: float) -> None:
        self.root = root
        self.mbps = mbps
        self.bytes: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        # token bucket shared by all connections (bytes may go negative: debt)
        self.tokens = 0.0
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if self.mbps <= 0:
            return
        async with self.lock:
            rate = self.mbps * 1e6
            now = time.monotonic()
            self.tokens = min(self.tokens + (now - self.last) * rate, rate * 0.05)
            self.last = now
            self.tokens -= n
            if self.tokens < 0:
                await asyncio.sleep(-self.tokens / rate)

    def stats(self) -> dict[str, Any]:
        return {"mbps": self.mbps, "bytes": dict(self.bytes), "requests": dict(self.requests)}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = [*lines[0].split(" "), "", "", ""][:3]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        url = urllib.parse.urlsplit(target)
        try:
            if url.path == "/_stats":
                await self.reply(writer, 200, json.dumps(self.stats()).encode())
            elif url.path == "/_reset" and method == "POST":
                self.bytes.clear()
                self.requests.clear()
                await self.reply(writer, 200, b"{}")
            elif url.path == "/_rate" and method == "POST":
                self.mbps = float(urllib.parse.parse_qs(url.query).get("mbps", ["0"])[0])
                await self.reply(writer, 200, json.dumps(self.stats()).encode())
            elif method in ("GET", "HEAD"):
                await self.send_file(writer, url.path.lstrip("/"), headers, method == "HEAD")
            else:
                await self.reply(writer, 405, b"")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def reply(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    async def send_file(
        self, writer: asyncio.StreamWriter, name: str, headers: dict[str, str], head_only: bool
    ) -> None:
        path = self.root / name
        if "/" in name or name.startswith(".") or not path.is_file():
            await self.reply(writer, 404, b"")
            return
        size = path.stat().st_size
        start = 0
        status = "200 OK"
        rng = headers.get("range", "")
        if rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start = int(rng[6:].split("-")[0])
            if start >= size:
                await self.reply(writer, 416, b"")
                return
            status = "206 Partial Content"
        extra = f"Content-Range: bytes {start}-{size - 1}/{size}\r\n" if start else ""
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {size - start}\r\n{extra}"
            "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode()
        )
        self.requests[name] = self.requests.get(name, 0) + 1
        if head_only:
            await writer.drain()
            return
        with path.open("rb") as fh:
            fh.seek(start)
            while chunk := fh.read(CHUNK):
                await self.take(len(chunk))
                writer.write(chunk)
                await writer.drain()
                # counted once handed to the kernel: what the clients fetched
                self.bytes[name] = self.bytes.get(name, 0) + len(chunk)


async def serve(args: argparse.Namespace) -> None:
    origin = Origin(Path(args.dir), args.mbps)
    server = await asyncio.start_server(origin.handle, "127.0.0.1", args.port, backlog=128)
    print(f"origin: serving {args.dir} on 127.0.0.1:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mbps", type=float, default=0.0, help="total MB/s cap (0: none)")
    args = parser.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
