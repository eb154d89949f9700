"""initial schema: workspaces, tenants, operation_runs ledger, directory, gate functions

Revision ID: 0001
Revises:
Create Date: 2026-11-26 19:11:55.121229
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from opspolish.gate_sql import DROP_V1, INSTALL_V1

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workspaces',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('slug', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workspaces')),
    sa.UniqueConstraint('slug', name=op.f('uq_workspaces_slug'))
    )
    op.create_table('tenants',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('workspace_id', sa.UUID(), nullable=False),
    sa.Column('external_id', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("external_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'", name=op.f('ck_tenants_external_id_uuid_v4')),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_tenants_workspace_id_workspaces'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
    sa.UniqueConstraint('external_id', name=op.f('uq_tenants_external_id')),
    sa.UniqueConstraint('id', 'workspace_id', name=op.f('uq_tenants_id_workspace_id'))
    )
    op.create_index(op.f('ix_tenants_workspace_id'), 'tenants', ['workspace_id'], unique=False)
    op.create_table('directory_policies',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('workspace_id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('locked', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id', 'workspace_id'], ['tenants.id', 'tenants.workspace_id'], name=op.f('fk_directory_policies_tenant_id_workspace_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_directory_policies')),
    sa.UniqueConstraint('tenant_id', 'name', name=op.f('uq_directory_policies_tenant_id_name'))
    )
    op.create_table('operation_runs',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('workspace_id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=True),
    sa.Column('type', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), server_default=sa.text("'queued'"), nullable=False),
    sa.Column('outcome', sa.Text(), server_default=sa.text("'pending'"), nullable=False),
    sa.Column('run_identity_hash', sa.Text(), nullable=False),
    sa.Column('fingerprint', sa.Text(), nullable=False),
    sa.Column('context', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('summary_counts', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('reason_code', sa.Text(), nullable=True),
    sa.Column('reason_message', sa.Text(), nullable=True),
    sa.Column('dedupe_of', sa.BigInteger(), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('requeues', sa.SmallInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('queue_name', sa.Text(), nullable=True),
    sa.Column('job_id', sa.Text(), nullable=True),
    sa.Column('lease_owner', sa.UUID(), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(status = 'completed') = (outcome <> 'pending') AND (status = 'completed') = (completed_at IS NOT NULL)", name=op.f('ck_operation_runs_terminal_consistent')),
    sa.CheckConstraint("fingerprint ~ '^[0-9a-f]{64}$'", name=op.f('ck_operation_runs_fingerprint_hex64')),
    sa.CheckConstraint("outcome IN ('pending', 'succeeded', 'partially_succeeded', 'failed', 'skipped', 'cancelled')", name=op.f('ck_operation_runs_outcome_known')),
    sa.CheckConstraint("run_identity_hash ~ '^[0-9a-f]{64}$'", name=op.f('ck_operation_runs_identity_hash_hex64')),
    sa.CheckConstraint("status <> 'completed' OR summary_counts IS NOT NULL", name=op.f('ck_operation_runs_completed_has_counts')),
    sa.CheckConstraint("status IN ('queued', 'running', 'completed')", name=op.f('ck_operation_runs_status_known')),
    sa.CheckConstraint("summary_counts IS NULL OR CASE WHEN jsonb_typeof(summary_counts) = 'object' AND jsonb_typeof(summary_counts->'total') = 'number' AND jsonb_typeof(summary_counts->'processed') = 'number' AND jsonb_typeof(summary_counts->'failed') = 'number' AND (summary_counts->>'total') ~ '^[0-9]{1,18}$' AND (summary_counts->>'processed') ~ '^[0-9]{1,18}$' AND (summary_counts->>'failed') ~ '^[0-9]{1,18}$' THEN (summary_counts->>'failed')::bigint <= (summary_counts->>'processed')::bigint AND (summary_counts->>'processed')::bigint <= (summary_counts->>'total')::bigint ELSE false END", name=op.f('ck_operation_runs_summary_counts_valid')),
    sa.CheckConstraint('attempts >= 0 AND requeues >= 0', name=op.f('ck_operation_runs_counters_non_negative')),
    sa.CheckConstraint('reason_message IS NULL OR length(reason_message) <= 500', name=op.f('ck_operation_runs_reason_message_short')),
    sa.ForeignKeyConstraint(['dedupe_of'], ['operation_runs.id'], name=op.f('fk_operation_runs_dedupe_of_operation_runs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['tenant_id', 'workspace_id'], ['tenants.id', 'tenants.workspace_id'], name=op.f('fk_operation_runs_tenant_id_workspace_id_tenants'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_operation_runs_workspace_id_workspaces'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_operation_runs'))
    )
    op.create_index('ix_operation_runs_cooldown', 'operation_runs', ['run_identity_hash', sa.literal_column('completed_at DESC')], unique=False, postgresql_where=sa.text("status = 'completed' AND outcome <> 'skipped' AND attempts > 0"))
    op.create_index('ix_operation_runs_job_id', 'operation_runs', ['job_id'], unique=False, postgresql_where=sa.text('job_id IS NOT NULL'))
    op.create_index('ix_operation_runs_reconcile', 'operation_runs', ['workspace_id', 'status', 'heartbeat_at'], unique=False, postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.create_index('ix_operation_runs_tenant_listing', 'operation_runs', ['tenant_id', sa.literal_column('id DESC')], unique=False)
    op.create_index('ix_operation_runs_workspace_listing', 'operation_runs', ['workspace_id', sa.literal_column('id DESC')], unique=False)
    op.create_index('uq_operation_runs_active_identity', 'operation_runs', ['run_identity_hash'], unique=True, postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.create_table('assignment_snapshots',
    sa.Column('run_id', sa.BigInteger(), nullable=False),
    sa.Column('policy_id', sa.UUID(), nullable=False),
    sa.Column('workspace_id', sa.UUID(), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('assignments', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['operation_runs.id'], name=op.f('fk_assignment_snapshots_run_id_operation_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id', 'workspace_id'], ['tenants.id', 'tenants.workspace_id'], name=op.f('fk_assignment_snapshots_tenant_id_workspace_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'policy_id', name=op.f('pk_assignment_snapshots'))
    )
    op.create_table('directory_assignments',
    sa.Column('policy_id', sa.UUID(), nullable=False),
    sa.Column('target', sa.Text(), nullable=False),
    sa.Column('intent', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['policy_id'], ['directory_policies.id'], name=op.f('fk_directory_assignments_policy_id_directory_policies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('policy_id', 'target', name=op.f('pk_directory_assignments'))
    )
    for statement in INSTALL_V1:
        op.execute(statement)


def downgrade() -> None:
    for statement in DROP_V1:
        op.execute(statement)
    op.drop_table('directory_assignments')
    op.drop_table('assignment_snapshots')
    op.drop_index('uq_operation_runs_active_identity', table_name='operation_runs', postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.drop_index('ix_operation_runs_workspace_listing', table_name='operation_runs')
    op.drop_index('ix_operation_runs_tenant_listing', table_name='operation_runs')
    op.drop_index('ix_operation_runs_reconcile', table_name='operation_runs', postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.drop_index('ix_operation_runs_job_id', table_name='operation_runs', postgresql_where=sa.text('job_id IS NOT NULL'))
    op.drop_index('ix_operation_runs_cooldown', table_name='operation_runs', postgresql_where=sa.text("status = 'completed' AND outcome <> 'skipped' AND attempts > 0"))
    op.drop_table('operation_runs')
    op.drop_table('directory_policies')
    op.drop_index(op.f('ix_tenants_workspace_id'), table_name='tenants')
    op.drop_table('tenants')
    op.drop_table('workspaces')

