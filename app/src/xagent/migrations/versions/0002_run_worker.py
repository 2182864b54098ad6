"""Record which process executed a run (host and pid of the receiver child).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None
# Two new nullable columns: code from 0001 names its columns and never sees them.
backward_compatible = True


def upgrade() -> None:
    op.add_column("runs", sa.Column("worker_host", sa.String(255), nullable=True))
    op.add_column("runs", sa.Column("worker_pid", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "worker_pid")
    op.drop_column("runs", "worker_host")
