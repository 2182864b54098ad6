"""Configuration: environment variables (prefix ``XAGENT_``) plus secret files.

Secrets (``database_password``, ``redis_password``, ``root_password``) are read from
``$CREDENTIALS_DIRECTORY/<name>`` when systemd provides that directory (``LoadCredential=``);
otherwise they may come from ``XAGENT_<NAME>`` or be embedded in the URLs.

A missing or malformed setting raises :class:`SettingsError` whose message is one line that
names the variable, e.g. ``XAGENT_MODELS: not valid JSON (Expecting value ...)``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import urllib.parse
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

ENV_PREFIX = "XAGENT_"
SECRET_NAMES = ("database_password", "redis_password", "root_password")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class SettingsError(Exception):
    """A setting is missing or malformed; ``str(exc)`` is a one-line message naming it."""


def redact_url(url: str) -> str:
    """``url`` fit for a log line or an error message: a password in the user part and
    every query value (signed URLs carry their token there) become ``***``, and a fragment
    is dropped. What is left still tells which host and file were meant."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"***@{hostport}"
    query = "&".join(
        f"{key}=***" if sep else "***"
        for key, sep, _ in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class ModelFile(BaseModel):
    """A model's identity on disk: its name and content (``xagent.models.file_name``)."""

    name: str
    sha256: str

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _MODEL_NAME_RE.match(value) or value in {".", ".."}:
            raise ValueError(f"model name {value!r} is not a safe file name")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if not _SHA256_RE.match(value):
            raise ValueError("sha256 must be 64 hex characters")
        return value


class ModelSpec(ModelFile):
    """One model file that the bootstrap downloads and /readyz checks."""

    url: str

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "file://")):
            raise ValueError(f"model url {redact_url(value)!r} must be http(s):// or file://")
        return value


class Settings(BaseSettings):
    """All settings of the app; see docs/contract.md for the names."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
    )

    database_url: str
    database_password: SecretStr | None = None
    # This process's connection pool: at most pool size + max overflow connections at once
    # (the deployment budgets PostgreSQL's max_connections from them, per process kind).
    database_pool_size: int = Field(default=5, ge=1)
    database_max_overflow: int = Field(default=5, ge=0)
    redis_url: str
    redis_password: SecretStr | None = None
    models_dir: Path = Path("/var/lib/xagent/models")
    models: Annotated[list[ModelSpec], NoDecode] = Field(default_factory=list)
    root_username: str = "root"
    root_password: SecretStr | None = None
    host_name: str = Field(default_factory=socket.gethostname)

    queue_name: str = "xagent"
    stream_xread_count: int = Field(default=4, ge=1)
    result_ttl_seconds: int = Field(default=3600, ge=1)
    tick_cron: str = "* * * * *"
    tick_interval_seconds: int = Field(default=0, ge=0)

    # -- delivery, runs and the scheduler (app/README.md "Guarantees") --------------------
    # A pending stream entry idle this long is taken over by another receiver. Receivers
    # heartbeat the entries they hold, so only entries of dead receivers get that old.
    stream_idle_timeout_ms: int = Field(default=60_000, ge=100)
    # How often each receiver looks for such entries (also on a quiet queue).
    reclaim_interval_seconds: int = Field(default=10, ge=1)
    # Lease of a run's execution (0: half the idle timeout). Shorter than the idle timeout, so
    # a redelivered run always finds the lease of the lost execution expired.
    run_lease_seconds: float = Field(default=0, ge=0, validate_default=True)
    # Heartbeat of stream entries and run leases (0: a third of the lease, at most 10 s).
    heartbeat_seconds: float = Field(default=0, ge=0, validate_default=True)
    # Executions of one run before it fails (redeliveries and infrastructure errors count).
    run_max_attempts: int = Field(default=5, ge=1)
    # In-process retries of one database/Redis step of a task, backoff doubling from this.
    run_retries: int = Field(default=3, ge=0)
    run_retry_backoff_seconds: float = Field(default=1.0, gt=0)
    # Sweeper (schedule xagent-sweep): re-enqueue runs queued this long whose message is no
    # longer in the stream; fail runs whose lease expired this long ago (0: 5 min, at least
    # twice the idle timeout).
    run_queued_timeout_seconds: float = Field(default=300, gt=0)
    run_stuck_seconds: float = Field(default=0, ge=0, validate_default=True)
    sweep_interval_seconds: int = Field(default=30, ge=1)
    # Stream maintenance (schedule xagent-stream-maintenance): trim acknowledged entries,
    # delete consumers idle this long that hold nothing.
    stream_maintenance_interval_seconds: int = Field(default=60, ge=1)
    consumer_stale_seconds: float = Field(default=600, gt=0)
    # Scheduler leadership: lease renewed every third of it; a standby takes over when it
    # expires. Missed ticks up to this old are sent late (catch-up).
    scheduler_lease_seconds: float = Field(default=15, ge=1)
    scheduler_catchup_seconds: int = Field(default=600, ge=0)
    # Longest pause between attempts to reach an unreachable Redis (scheduler, receivers).
    redis_retry_max_seconds: float = Field(default=30, gt=0)
    download_progress_seconds: float = Field(default=2.0, gt=0)
    download_retries: int = Field(default=5, ge=0)

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip() or "[]"
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(value, list):
            raise ValueError('must be a JSON list of {"name","url","sha256"} objects')
        names = [item.get("name") for item in value if isinstance(item, dict)]
        if len(names) != len(set(names)):
            raise ValueError("model names must be unique")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except Exception as exc:
            raise ValueError(f"not a database URL ({exc})") from None
        if url.get_backend_name() != "postgresql":
            raise ValueError("must be a postgresql:// or postgresql+asyncpg:// URL")
        return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("run_lease_seconds")
    @classmethod
    def _run_lease(cls, value: float, info: ValidationInfo) -> float:
        idle_ms = info.data.get("stream_idle_timeout_ms")
        if idle_ms is None:  # reported on its own
            return value
        if value == 0:
            return float(idle_ms) / 2000
        if value * 1000 >= idle_ms:
            raise ValueError(
                f"must be shorter than the stream idle timeout ({idle_ms / 1000:g} s, "
                "XAGENT_STREAM_IDLE_TIMEOUT_MS)"
            )
        return value

    @field_validator("heartbeat_seconds")
    @classmethod
    def _heartbeat(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("run_lease_seconds")
        if lease is None:
            return value
        if value == 0:
            return min(10.0, float(lease) / 3)
        if value > lease / 2:
            raise ValueError(f"must be at most half the run lease ({lease:g} s)")
        return value

    @field_validator("run_stuck_seconds")
    @classmethod
    def _run_stuck(cls, value: float, info: ValidationInfo) -> float:
        idle_ms = info.data.get("stream_idle_timeout_ms")
        if idle_ms is None:
            return value
        if value == 0:
            return max(300.0, 2 * float(idle_ms) / 1000)
        if value * 1000 <= idle_ms:
            raise ValueError(
                f"must be longer than the stream idle timeout ({idle_ms / 1000:g} s, "
                "XAGENT_STREAM_IDLE_TIMEOUT_MS) so a redelivery gets its chance first"
            )
        return value

    @field_validator("tick_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if value.strip() and len(value.split()) != 5:
            raise ValueError("must be a 5-field cron expression (or empty to disable)")
        return value.strip()

    # -- derived values -------------------------------------------------------------------

    def sqlalchemy_url(self) -> Any:
        """The database URL with the password from the secret, if any."""
        url = make_url(self.database_url)
        if self.database_password is not None:
            url = url.set(password=self.database_password.get_secret_value())
        return url

    def redis_kwargs(self) -> dict[str, Any]:
        """Extra connection arguments for redis clients (the password secret, the CA)."""
        kwargs: dict[str, Any] = {}
        if self.redis_password is not None:
            kwargs["password"] = self.redis_password.get_secret_value()
        if self.redis_ssl_ca is not None:
            kwargs.update(
                ssl_ca_certs=str(self.redis_ssl_ca),
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
            )
        return kwargs

    # -- bootstrap limits for unattended boots and release units (a block of its own at the
    # end of the class; fields declared after methods are still pydantic fields) ----------
    # Seconds `xagent-bootstrap` keeps retrying an unreachable PostgreSQL (0 = one attempt).
    bootstrap_wait_seconds: float = Field(default=900.0, ge=0)
    # `migrate`: how long a revision waits for a table lock before it gives up, rolls back
    # and is tried again (while it waits, every query on that table queues behind it), and
    # how many times it is tried again (backoff doubling from 0.5 s, at most 10 s).
    migrate_lock_timeout_ms: int = Field(default=2000, ge=1)
    migrate_lock_retries: int = Field(default=30, ge=0)
    # A model download fails when no new byte arrived for this long, across resumed
    # attempts. It replaces download_retries (above: still accepted, no longer used).
    download_stall_seconds: float = Field(default=120.0, gt=0)

    # -- TLS to the data services (another host: traffic between hosts is encrypted) -------
    # CA certificate (PEM) the server's certificate must chain to, its name (the host of the
    # URL) checked too. Redis: needs a rediss:// URL. PostgreSQL: TLS is then required (no
    # clear-text fallback). Empty or unset: Redis as the URL says, PostgreSQL as asyncpg's
    # default (TLS if offered, unverified; plain loopback setups).
    redis_ssl_ca: Path | None = None
    database_ssl_ca: Path | None = None

    @field_validator("redis_ssl_ca", "database_ssl_ca", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # the roles render every setting, an empty one for "no TLS"
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_ssl_ca", "database_ssl_ca")
    @classmethod
    def _readable_ca(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        try:
            ssl.create_default_context(cafile=str(value))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{value}: not a readable PEM CA certificate ({exc})") from None
        if info.field_name == "redis_ssl_ca":
            url = info.data.get("redis_url")
            if isinstance(url, str) and not url.startswith("rediss://"):
                raise ValueError(f"needs a rediss:// XAGENT_REDIS_URL (got {redact_url(url)!r})")
        return value

    def database_ssl_context(self) -> ssl.SSLContext | None:
        """TLS for asyncpg verifying the server against ``XAGENT_DATABASE_SSL_CA``."""
        if self.database_ssl_ca is None:
            return None
        # create_default_context: CERT_REQUIRED and check_hostname (IP addresses in the SAN
        # match too)
        return ssl.create_default_context(cafile=str(self.database_ssl_ca))


def _read_credentials(directory: str) -> dict[str, str]:
    found: dict[str, str] = {}
    base = Path(directory)
    for name in SECRET_NAMES:
        path = base / name
        if path.is_file():
            try:
                found[name] = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise SettingsError(f"{path}: cannot read credential ({exc.strerror})") from None
    return found


def _describe(error: Any) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else "?"
    name = f"{ENV_PREFIX}{field.upper()}"
    if field in SECRET_NAMES:
        name += f" (or $CREDENTIALS_DIRECTORY/{field})"
    if len(loc) > 1:
        name += "[" + "].[".join(loc[1:]) + "]"
    if error.get("type") == "missing":
        return f"{name}: required setting is missing"
    msg = str(error.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return f"{name}: {msg}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and credential files.

    Raises :class:`SettingsError` with a one-line message naming the first bad setting.
    """
    values: dict[str, Any] = {}
    creds_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds_dir:
        values.update(_read_credentials(creds_dir))
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0]) if errors else str(exc)
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SettingsError(first.replace("\n", " ") + more) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, loaded once."""
    return load_settings()
