"""leases beaten beside a locked run row: operation_run_beats, and gate function v5 that reads it

The lease keeper never waits for a row lock, so a run row someone holds locked (an operator's open transaction) was
skipped by every beat and its heartbeat_at aged. Held for longer than the lease TTL, the live run looked stale, and a
redelivery that waited for the lock took it over and ran its body beside the live one. The keeper now writes such a
beat beside the row, and the gate's takeover (and reconcile) read it before calling a lease stale.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 08:40:00
"""

from __future__ import annotations

from alembic import op

from opspolish.gate_sql import CLAIM_V4, CLAIM_V5

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE operation_run_beats (
            run_id bigint PRIMARY KEY,
            lease_owner uuid NOT NULL,
            beat_at timestamptz NOT NULL
        )""")
    op.execute(CLAIM_V5)


def downgrade() -> None:
    op.execute(CLAIM_V4)
    op.execute("DROP TABLE operation_run_beats")
