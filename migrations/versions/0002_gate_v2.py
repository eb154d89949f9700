"""gate functions v2: one generic plan per statement (sequential scans priced out), no look-up for a zero cooldown

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 23:30:00
"""

from __future__ import annotations

from alembic import op

from opspolish.gate_sql import INSTALL_V2, UNINSTALL_V2

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in INSTALL_V2:
        op.execute(statement)


def downgrade() -> None:
    for statement in UNINSTALL_V2:
        op.execute(statement)
