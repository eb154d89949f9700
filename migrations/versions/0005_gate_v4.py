"""gate function v4: a job id reused by a later enqueue is a new job; a raw delivery's workspace must exist; a
claim re-checks under the row's lock what it decided on, and a takeover waits for a fenced write

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 18:10:00
"""

from __future__ import annotations

from alembic import op

from opspolish.gate_sql import CLAIM_V3, CLAIM_V4, DROP_CLAIM_V3, DROP_CLAIM_V4

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(DROP_CLAIM_V3)
    op.execute(CLAIM_V4)


def downgrade() -> None:
    op.execute(DROP_CLAIM_V4)
    op.execute(CLAIM_V3)
