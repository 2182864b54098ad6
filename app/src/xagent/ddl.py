"""Schema changes that keep the serving release answering, for migration modules.

``xagent-bootstrap migrate`` runs each revision in a transaction of its own with
``lock_timeout`` set (``XAGENT_MIGRATE_LOCK_TIMEOUT_MS``): a revision that cannot get its lock
at once gives up, rolls back and is retried, instead of queueing every query on the table
behind its ``ACCESS EXCLUSIVE`` request. A retried revision runs its ``upgrade()`` again from
the start, so what it does outside the transaction must be repeatable.

``CREATE INDEX`` blocks writes to the table for the whole build; build indexes here instead:
concurrently, outside the revision's transaction (the transactional part before it is
committed first). A build that failed half-way leaves an invalid index behind, which the
retry drops and builds again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

_VALID = sa.text(
    "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace"
)


def create_index_concurrently(
    name: str,
    table: str,
    columns: Sequence[str],
    *,
    where: str | None = None,
    unique: bool = False,
) -> None:
    """``CREATE INDEX CONCURRENTLY``; a valid index of that name is kept, an invalid one (a
    build that failed) is rebuilt."""
    with op.get_context().autocommit_block():
        valid = op.get_bind().execute(_VALID, {"name": name}).scalar()
        if valid is True:
            return
        if valid is False:
            op.drop_index(name, table_name=table, postgresql_concurrently=True)
        op.create_index(
            name,
            table,
            list(columns),
            unique=unique,
            postgresql_concurrently=True,
            postgresql_where=sa.text(where) if where else None,
        )
