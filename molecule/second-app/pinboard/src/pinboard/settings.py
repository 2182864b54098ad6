"""Settings from the environment (``PINBOARD_*``), secrets included: this app reads its
Redis password and API token from environment variables, as many apps do."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit


@dataclass(frozen=True)
class Settings:
    redis_url: str
    data_dir: Path
    pins_dir: Path
    host_name: str
    api_token: str


def _with_password(url: str, password: str) -> str:
    if not password:
        return url
    parts = urlsplit(url)
    user = parts.username or ""
    netloc = f"{quote(user)}:{quote(password, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def load() -> Settings:
    env = os.environ
    return Settings(
        redis_url=_with_password(
            env.get("PINBOARD_REDIS_URL", "redis://127.0.0.1:6379/0"),
            env.get("PINBOARD_REDIS_PASSWORD", ""),
        ),
        data_dir=Path(env.get("PINBOARD_DATA_DIR", "/var/lib/pinboard")),
        pins_dir=Path(env.get("PINBOARD_PINS_DIR", "/var/lib/pinboard/pins")),
        host_name=env.get("PINBOARD_HOST_NAME") or socket.gethostname(),
        # only the web needs it (and only the web gets it)
        api_token=env.get("PINBOARD_API_TOKEN", ""),
    )
