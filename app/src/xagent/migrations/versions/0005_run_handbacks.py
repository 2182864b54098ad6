"""Hand-backs: a receiver that stops before a run finishes gives the run back, recorded here.

``handbacks`` counts them (they are not attempts: a rolling restart does not use up a
run's attempts); ``handed_back_at`` is the last one. Both are new columns with constant
defaults (no table rewrite, a short lock taken under lock_timeout). Expand-only: code of
0004 runs unchanged on it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None
backward_compatible = True


def upgrade() -> None:
    op.add_column("runs", sa.Column("handbacks", sa.Integer, nullable=False, server_default="0"))
    op.add_column("runs", sa.Column("handed_back_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "handed_back_at")
    op.drop_column("runs", "handbacks")
