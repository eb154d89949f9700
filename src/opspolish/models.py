"""SQLAlchemy models: the schema. Alembic migrations create it; a test holds them equal."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UUID_V4_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"

RUN_STATUSES = ("queued", "running", "completed")
RUN_OUTCOMES = ("pending", "succeeded", "partially_succeeded", "failed", "skipped", "cancelled")
ACTIVE_STATUSES = ("queued", "running")

naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _hex64(column: str) -> str:
    return f"length({column}) = 64 AND {column} !~ '[^0-9a-f]'"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=naming_convention)


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=text("now()"))


class Workspace(Base):
    __tablename__ = "workspaces"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True,
                                          server_default=text("gen_random_uuid()"))
    slug: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint(f"external_id ~ '{UUID_V4_PATTERN}'", name="external_id_uuid_v4"),
        UniqueConstraint("id", "workspace_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True,
                                          server_default=text("gen_random_uuid()"))
    workspace_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False, index=True
    )
    external_id: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class OperationRun(Base):
    """The ledger: one row per background operation run."""

    __tablename__ = "operation_runs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "workspace_id"], ["tenants.id", "tenants.workspace_id"], ondelete="CASCADE"
        ),
        CheckConstraint(_in("status", RUN_STATUSES), name="status_known"),
        CheckConstraint(_in("outcome", RUN_OUTCOMES), name="outcome_known"),
        # Every UPDATE re-checks every constraint, each prepared once per statement: these spellings are the cheap
        # ones (migration 0003). 64 hex characters, without a counted-repetition regex:
        CheckConstraint(_hex64("run_identity_hash"), name="identity_hash_hex64"),
        CheckConstraint(_hex64("fingerprint"), name="fingerprint_hex64"),
        CheckConstraint(
            "(status = 'completed') = (outcome <> 'pending') AND (status = 'completed') = (completed_at IS NOT NULL)",
            name="terminal_consistent",
        ),
        CheckConstraint("status <> 'completed' OR summary_counts IS NOT NULL", name="completed_has_counts"),
        # Non-negative integer total, processed and failed with failed <= processed <= total: the rule lives in the
        # IMMUTABLE function opspolish_counts_valid (migration 0003), so it is one call to prepare per statement.
        CheckConstraint("summary_counts IS NULL OR opspolish_counts_valid(summary_counts)",
                        name="summary_counts_valid"),
        CheckConstraint("reason_message IS NULL OR length(reason_message) <= 500", name="reason_message_short"),
        CheckConstraint("attempts >= 0 AND requeues >= 0", name="counters_non_negative"),
        # One active run per identity: dispatch of a duplicate joins it.
        Index(
            "uq_operation_runs_active_identity", "run_identity_hash", unique=True,
            postgresql_where=text(_in("status", ACTIVE_STATUSES)),
        ),
        # Cooldown look-up: the newest executed (not skipped) completion of an identity.
        Index(
            "ix_operation_runs_cooldown", "run_identity_hash", text("completed_at DESC"),
            postgresql_where=text("status = 'completed' AND outcome <> 'skipped' AND attempts > 0"),
        ),
        # Reconcile look-up: the active runs of a workspace.
        Index(
            "ix_operation_runs_reconcile", "workspace_id", "status", "heartbeat_at",
            postgresql_where=text(_in("status", ACTIVE_STATUSES)),
        ),
        # Scoped listing, newest first.
        Index("ix_operation_runs_tenant_listing", "tenant_id", text("id DESC")),
        Index("ix_operation_runs_workspace_listing", "workspace_id", text("id DESC")),
        # Redelivery of a raw-enqueued job (no run id) finds its run by arq job id.
        Index("ix_operation_runs_job_id", "job_id", postgresql_where=text("job_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    workspace_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False
    )
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    type: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'queued'"))
    outcome: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'pending'"))
    run_identity_hash: Mapped[str] = mapped_column(Text, nullable=False)
    fingerprint: Mapped[str] = mapped_column(Text, nullable=False)
    context: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    summary_counts: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    reason_code: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    dedupe_of: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("operation_runs.id", ondelete="SET NULL"), nullable=True
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    requeues: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default=text("0"))
    queue_name: Mapped[str | None] = mapped_column(Text, nullable=True)
    job_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class OperationRunBeat(Base):
    """A lease's heartbeat written beside its run, when the run's row was locked by another transaction.

    The lease keeper never waits for a row lock: a row someone holds (an operator's open transaction) cannot take
    its ``heartbeat_at``, so the beat goes here instead, and a takeover or reconcile reads it before it calls the
    lease stale. No foreign key: inserting here must not wait for the locked run row either. A row is removed by the
    next beat that reaches the run's own row."""

    __tablename__ = "operation_run_beats"

    run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    lease_owner: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class Policy(Base):
    """The embedded assignment directory: a tenant's policies (DESIGN §8)."""

    __tablename__ = "directory_policies"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "workspace_id"], ["tenants.id", "tenants.workspace_id"], ondelete="CASCADE"
        ),
        UniqueConstraint("tenant_id", "name"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True,
                                          server_default=text("gen_random_uuid()"))
    workspace_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    #: A locked policy refuses writes (the provider answers ``provider.rejected``).
    locked: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))


class PolicyAssignment(Base):
    """One assignment of a policy to a target group, in the embedded directory."""

    __tablename__ = "directory_assignments"

    policy_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("directory_policies.id", ondelete="CASCADE"), primary_key=True
    )
    target: Mapped[str] = mapped_column(Text, primary_key=True)
    intent: Mapped[str] = mapped_column(Text, nullable=False)


class AssignmentSnapshot(Base):
    """A fetch run's snapshot of one policy's assignments. Owned by the run; a retry replaces it."""

    __tablename__ = "assignment_snapshots"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "workspace_id"], ["tenants.id", "tenants.workspace_id"], ondelete="CASCADE"
        ),
    )

    run_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("operation_runs.id", ondelete="CASCADE"), primary_key=True
    )
    policy_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    workspace_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    assignments: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False)
