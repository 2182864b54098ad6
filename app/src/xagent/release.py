"""Which release is running: for /healthz and the ``X-Release`` header of every response.

On hosts each release has its own virtualenv, ``/opt/xagent/releases/<id>/venv``, reached
through the ``/opt/xagent/current`` symlink; the release id is the name of the directory the
running interpreter's venv lives in (resolved, so a process started through ``current``
keeps reporting the release it really runs, also after ``current`` moved on).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-release"


def release_id(prefix: str | None = None, base_prefix: str | None = None) -> str:
    """The parent directory name of this interpreter's venv; ``dev`` outside a venv."""
    prefix = sys.prefix if prefix is None else prefix
    base_prefix = sys.base_prefix if base_prefix is None else base_prefix
    if prefix == base_prefix:
        return "dev"
    return Path(prefix).resolve().parent.name or "dev"


def package_version() -> str:
    try:
        return version("xagent")
    except PackageNotFoundError:  # pragma: no cover - running from a plain source tree
        return "unknown"


RELEASE = release_id()
VERSION = package_version()


class ReleaseHeaderMiddleware:
    """Adds ``X-Release: <id>`` to every HTTP response (pure ASGI: no body buffering), so a
    load probe sees which release answered each request during a switch."""

    def __init__(self, app: ASGIApp, release: str = RELEASE) -> None:
        self.app = app
        self.value = release.encode("latin-1", "replace")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (HEADER, self.value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)
