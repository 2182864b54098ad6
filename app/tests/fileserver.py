"""A small HTTP file server for model-download tests (127.0.0.1, ephemeral port).

It serves files from a dict, honours ``Range: bytes=N-`` with 206, can drop the connection
after a number of bytes on the first request for a path, and logs every request.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    path: str
    range: str | None


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict)
    drop_first_after: dict[str, int] = field(default_factory=dict)
    chunk_delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def start(self) -> FileServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.lstrip("/")
                range_header = self.headers.get("Range")
                owner.requests.append(Request(path, range_header))
                data = owner.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if range_header:
                    match = re.fullmatch(r"bytes=(\d+)-", range_header)
                    if match is None:
                        self.send_error(400)
                        return
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                limit = owner.drop_first_after.pop(path, None)
                if limit is not None:
                    # send part of the body, then drop the connection without finishing
                    self.wfile.write(body[:limit])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                view = memoryview(body)
                step = 256 * 1024
                for offset in range(0, len(body), step):
                    self.wfile.write(view[offset : offset + step])
                    if owner.chunk_delay:
                        threading.Event().wait(owner.chunk_delay)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
