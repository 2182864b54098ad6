"""Alembic environment: always driven programmatically with an open connection."""

from __future__ import annotations

from typing import Any

from alembic import context

from xagent.db import metadata

# Bookkeeping tables the bootstrap manages itself, outside the app's metadata: autogenerate
# must never propose to drop them.
_NOT_OURS = {"xagent_schema_history"}

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only used through xagent.bootstrap
    raise RuntimeError("xagent migrations run through `xagent-bootstrap migrate`")


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    return not (type_ == "table" and name in _NOT_OURS)


context.configure(
    connection=connection,
    target_metadata=metadata,
    # one transaction per revision: a revision that gives up on its lock_timeout is retried
    # alone, and xagent.ddl's concurrent index builds can step outside it
    transaction_per_migration=True,
    include_name=_include_name,
)
with context.begin_transaction():
    context.run_migrations()
