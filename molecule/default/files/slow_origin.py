#!/usr/bin/env python3
"""A model origin that serves files slowly, on loopback, for the upgrade test.

    slow_origin.py --dir /srv/slow-origin --port 18098 --kib-per-second 256

Each GET streams the file at the given rate (a few MB then take long enough
that a release phase downloading them visibly overlaps live traffic) and
writes one line per request to stdout, so the journal counts downloads.
Ranges are ignored (always the whole file, 200). Standard library only.
"""

from __future__ import annotations

import argparse
import http.server
import os
import time
from pathlib import Path

CHUNK = 16 * 1024


class Handler(http.server.BaseHTTPRequestHandler):
    root: Path
    rate: float

    def _file(self) -> Path | None:
        name = self.path.split("?", 1)[0].lstrip("/")
        path = (self.root / name).resolve()
        if path.parent != self.root or not path.is_file():
            self.send_error(404)
            return None
        return path

    def _headers(self, path: Path) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()

    def do_HEAD(self) -> None:
        path = self._file()
        if path is not None:
            self._headers(path)

    def do_GET(self) -> None:
        path = self._file()
        if path is None:
            return
        self._headers(path)
        started = time.monotonic()
        sent = 0
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                self.wfile.write(chunk)
                sent += len(chunk)
                ahead = sent / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    def log_message(self, format: str, *args: object) -> None:
        print(f"{self.address_string()} {format % args}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kib-per-second", type=float, default=256.0)
    args = parser.parse_args()
    Handler.root = Path(args.dir).resolve()
    Handler.rate = args.kib_per_second * 1024
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"serving {Handler.root} on 127.0.0.1:{args.port} (pid {os.getpid()})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
