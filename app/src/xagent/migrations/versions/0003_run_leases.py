"""Run execution leases (fencing by attempts), sweeper bookkeeping, idempotent tick rows.

Expand-only: new nullable/defaulted columns and indexes; code of 0002 runs unchanged on it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None
backward_compatible = True

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    # until when the execution that set status 'running' owns the run (extended by heartbeats)
    op.add_column("runs", sa.Column("lease_expires_at", _TZ, nullable=True))
    # re-enqueues by the sweeper (a run whose message was lost)
    op.add_column("runs", sa.Column("requeued_at", _TZ, nullable=True))
    op.add_column("runs", sa.Column("requeues", sa.Integer, nullable=False, server_default="0"))
    # the sweeper reads only unfinished runs
    op.create_index(
        "runs_unfinished_idx",
        "runs",
        ["status", "created_at"],
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    )
    # the message's task id: a redelivered tick is recorded once, a second send shows twice
    op.add_column("ticks", sa.Column("task_id", sa.String(64), nullable=True))
    op.create_index("ticks_task_id_key", "ticks", ["task_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ticks_task_id_key", table_name="ticks")
    op.drop_column("ticks", "task_id")
    op.drop_index("runs_unfinished_idx", table_name="runs")
    op.drop_column("runs", "requeues")
    op.drop_column("runs", "requeued_at")
    op.drop_column("runs", "lease_expires_at")
