"""A small HTTP file server for model-download tests (127.0.0.1, ephemeral port).

It serves files from a dict, honours ``Range: bytes=N-`` with 206 and logs every request.
Faults, per path:
- ``drop_first_after``: the first response sends that many body bytes, then drops the
  connection;
- ``drop_every``: every response sends at most that many body bytes, then drops;
- ``stall_at``: responses stop at that absolute file offset and hang, sending nothing, until
  :meth:`FileServer.resume` (or :meth:`FileServer.stop`);
- ``fail_next``: status codes answered (one per request, in order) before serving;
- ``ignore_range``: answer 200 with the whole file even when a Range was asked for.
``chunk_size`` and ``chunk_delay`` pace the body (slow but steady links).
"""

from __future__ import annotations

import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    path: str
    range: str | None
    status: int = 0


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that give up mid-body are part of the tests


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    drop_first_after: dict[str, int] = field(default_factory=dict)
    drop_every: dict[str, int] = field(default_factory=dict)
    stall_at: dict[str, int] = field(default_factory=dict)
    fail_next: dict[str, list[int]] = field(default_factory=dict)
    ignore_range: set[str] = field(default_factory=set)
    chunk_size: int = 256 * 1024
    chunk_delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _resume: threading.Event = field(default_factory=threading.Event)
    _stopping: bool = False

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def resume(self) -> None:
        """Let stalled responses continue (and stop stalling new ones)."""
        self._resume.set()

    def start(self) -> FileServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                # a signed URL's query selects nothing here: files are found by path
                path = urllib.parse.urlsplit(self.path).path.lstrip("/")
                range_header = self.headers.get("Range")
                request = Request(path, range_header)
                owner.requests.append(request)
                data = owner.files.get(path)
                if data is None:
                    request.status = 404
                    self.send_error(404)
                    return
                failures = owner.fail_next.get(path)
                if failures:
                    request.status = failures.pop(0)
                    self.send_response(request.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if range_header and path not in owner.ignore_range:
                    match = re.fullmatch(r"bytes=(\d+)-", range_header)
                    if match is None:
                        request.status = 400
                        self.send_error(400)
                        return
                    start = int(match.group(1))
                    if start >= len(data):
                        request.status = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    request.status = 206
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    request.status = 200
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                limit = owner.drop_first_after.pop(path, None)
                if limit is None:
                    limit = owner.drop_every.get(path)
                stall = owner.stall_at.get(path)
                self._send(memoryview(body), start, limit, stall)

            def _send(
                self, body: memoryview, start: int, limit: int | None, stall: int | None
            ) -> None:
                end = len(body) if limit is None else min(limit, len(body))
                sent = 0
                while sent < end:
                    if stall is not None and start + sent >= stall and not owner._resume.is_set():
                        self.wfile.flush()
                        owner._resume.wait()
                        if owner._stopping:
                            return
                    step = min(owner.chunk_size, end - sent)
                    if stall is not None and start + sent < stall and not owner._resume.is_set():
                        step = min(step, stall - start - sent)
                    self.wfile.write(body[sent : sent + step])
                    sent += step
                    if owner.chunk_delay:
                        self.wfile.flush()
                        threading.Event().wait(owner.chunk_delay)
                if limit is not None and end < len(body):
                    # part of the body only, then drop the connection without finishing
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._resume.set()  # stalled handlers return instead of hanging on
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
