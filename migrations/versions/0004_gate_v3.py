"""gate function v3: a delivery finds its tenant and run in the workspace it names; a run id's inputs must be its run's

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 16:00:00
"""

from __future__ import annotations

from alembic import op

from opspolish.gate_sql import CLAIM_V2, CLAIM_V3

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(CLAIM_V3)


def downgrade() -> None:
    op.execute(CLAIM_V2)
