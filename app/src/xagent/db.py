"""Database tables (SQLAlchemy Core) and engine helpers.

The schema is created by the Alembic migrations in ``xagent.migrations`` (run by
``xagent-bootstrap migrate``), never by ``create_all``; these definitions are for queries.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    func,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from xagent.settings import Settings

metadata = MetaData()

tools = Table(
    "tools",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("description", Text, nullable=False),
    Column("schema", JSON, nullable=False),
    Column("version", String(50), nullable=False),
    Column("active", Boolean, nullable=False, server_default="true"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("status", String(20), nullable=False),
    Column("input", JSON, nullable=False),
    Column("result", JSON, nullable=True),
    Column("error", Text, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # The receiver process that executed the run last (deployment tests read it).
    Column("worker_host", String(255), nullable=True),
    Column("worker_pid", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # Execution lease: the execution whose `attempts` value set status 'running' owns the run
    # until then (heartbeats extend it); `attempts` is the fencing token of every write.
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    # Re-enqueued by the sweeper (its message was no longer in the stream).
    Column("requeued_at", DateTime(timezone=True), nullable=True),
    Column("requeues", Integer, nullable=False, server_default="0"),
    # Given back by a stopping receiver before it finished (not an attempt: see xagent.runs).
    Column("handbacks", Integer, nullable=False, server_default="0"),
    Column("handed_back_at", DateTime(timezone=True), nullable=True),
)

# Idempotency-Key of POST /runs -> the run it created (no foreign key: the key row is
# written first, in the run's transaction).
run_keys = Table(
    "run_keys",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("run_id", Uuid, nullable=False),
    Column("request_sha256", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

ticks = Table(
    "ticks",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("schedule_id", String(200), nullable=False),
    Column("scheduled_for", DateTime(timezone=True), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # TaskIQ task id of the message (unique): a redelivered message adds no second row.
    Column("task_id", String(64), nullable=True, unique=True),
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(200), nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),
    Column("is_admin", Boolean, nullable=False, server_default="false"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

bootstrap_runs = Table(
    "bootstrap_runs",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("steps", String(200), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("ok", Boolean, nullable=True),
    Column("error", Text, nullable=True),
)


def make_engine(settings: Settings) -> AsyncEngine:
    """A per-process async engine (asyncpg) holding at most ``XAGENT_DATABASE_POOL_SIZE`` +
    ``XAGENT_DATABASE_MAX_OVERFLOW`` connections; a checkout beyond waits for a free one.
    With ``XAGENT_DATABASE_SSL_CA`` every connection is TLS, verified against that CA."""
    connect_args: dict[str, Any] = {
        "timeout": 10,
        "server_settings": {"application_name": "xagent"},
    }
    tls = settings.database_ssl_context()
    if tls is not None:
        connect_args["ssl"] = tls
    return create_async_engine(
        settings.sqlalchemy_url(),
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=connect_args,
    )
