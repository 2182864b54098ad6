"""Idempotency keys of ``POST /runs``: one row per key, naming the run it created.

A table of its own (no column on ``runs``): creating it takes no lock on ``runs``, which
may be large and busy. Expand-only: code of 0003 runs unchanged on it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None
backward_compatible = True


def upgrade() -> None:
    op.create_table(
        "run_keys",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("run_id", sa.Uuid, nullable=False),
        # sha256 of the request: the same key with another request is refused
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("run_keys")
