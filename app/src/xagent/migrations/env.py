"""Alembic environment: always driven programmatically with an open connection."""

from __future__ import annotations

from alembic import context

from xagent.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only used through xagent.bootstrap
    raise RuntimeError("xagent migrations run through `xagent-bootstrap migrate`")

context.configure(
    connection=connection,
    target_metadata=metadata,
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
