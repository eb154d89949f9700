"""The schema: migrations equal the models, round-trip, and the database refuses bad rows."""

from __future__ import annotations

import re
import uuid
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from opspolish import db
from opspolish.models import Base
from opspolish.seed import seed
from opspolish.settings import Settings

UUID_V4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _diff(connection: Connection) -> list[Any]:
    ctx = MigrationContext.configure(connection, opts={
        "compare_type": True,
        "include_object": lambda obj, name, type_, reflected, compare_to: name != "test_effects",
    })
    return list(compare_metadata(ctx, Base.metadata))


async def test_upgrade_head_matches_the_models_exactly(settings: Settings) -> None:
    engine = db.create_engine(settings)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(_diff)
    finally:
        await engine.dispose()
    assert diff == []


async def test_downgrade_to_base_then_upgrade_round_trips(settings: Settings, conn: asyncpg.Connection) -> None:
    await db.downgrade(settings, "base")
    tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
                                 "AND tablename NOT IN ('alembic_version', 'test_effects')")
    functions = await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname LIKE 'opspolish_%'")
    assert (tables, functions) == (0, 0)
    await db.upgrade(settings)
    assert await db.current_revision(settings) == db.head_revision()
    await test_upgrade_head_matches_the_models_exactly(settings)
    assert await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname LIKE 'opspolish_%'") == 5


async def test_seeded_tenants_have_v4_external_ids_and_a_workspace(conn: asyncpg.Connection) -> None:
    report = await seed(conn)
    assert report.workspaces >= 2 and report.tenants >= 6
    rows = await conn.fetch("SELECT external_id, workspace_id FROM tenants")
    assert rows and all(UUID_V4.match(r["external_id"]) and r["workspace_id"] for r in rows)
    per_ws = await conn.fetch("SELECT count(*) FROM tenants GROUP BY workspace_id")
    assert all(r[0] >= 3 for r in per_ws)


async def test_seeding_twice_adds_nothing(conn: asyncpg.Connection) -> None:
    first = await seed(conn)
    second = await seed(conn)
    assert second.created_tenants == 0
    assert (first.workspaces, first.tenants, first.policies) == (second.workspaces, second.tenants, second.policies)
    assert await conn.fetchval("SELECT count(*) FROM directory_assignments") > 0


async def _workspace(conn: asyncpg.Connection, slug: str) -> uuid.UUID:
    ws: uuid.UUID = await conn.fetchval("INSERT INTO workspaces (slug, name) VALUES ($1, $1) RETURNING id", slug)
    return ws


async def test_database_refuses_a_tenant_without_workspace(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.NotNullViolationError):
        await conn.execute("INSERT INTO tenants (workspace_id, external_id, name) VALUES (NULL, $1, 'x')",
                           str(uuid.uuid4()))


@pytest.mark.parametrize("external_id", [
    str(uuid.uuid1()),  # version 1
    str(uuid.uuid4()).upper(),  # not lowercase
    str(uuid.uuid4()).replace("-", ""),  # no dashes
    "not-a-uuid",
    "",
    str(uuid.UUID(int=0)),
])
async def test_database_refuses_a_non_v4_external_id(conn: asyncpg.Connection, external_id: str) -> None:
    ws = await _workspace(conn, "w")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO tenants (workspace_id, external_id, name) VALUES ($1, $2, 'x')",
                           ws, external_id)


async def test_database_refuses_a_run_outside_its_tenants_workspace(conn: asyncpg.Connection) -> None:
    ws_a, ws_b = await _workspace(conn, "a"), await _workspace(conn, "b")
    tenant = await conn.fetchval(
        "INSERT INTO tenants (workspace_id, external_id, name) VALUES ($1, $2, 't') RETURNING id", ws_a,
        str(uuid.uuid4()))
    insert = ("INSERT INTO operation_runs (workspace_id, tenant_id, type, run_identity_hash, fingerprint) "
              "VALUES ($1, $2, 'x', repeat('a', 64), repeat('b', 64))")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(insert, ws_b, tenant)
    await conn.execute(insert, ws_a, tenant)  # its own workspace is fine


async def test_database_refuses_invalid_summary_counts_and_two_active_runs(conn: asyncpg.Connection) -> None:
    ws = await _workspace(conn, "w")
    insert = ("INSERT INTO operation_runs (workspace_id, type, run_identity_hash, fingerprint, status, outcome, "
              "summary_counts, completed_at) VALUES ($1, 'x', repeat($2, 64), repeat('b', 64), $3, $4, $5, $6)")
    for counts in ({"total": 1, "processed": 2, "failed": 0}, {"total": 2, "processed": 1, "failed": 2},
                   {"total": 1, "processed": 1}, {"total": 1, "processed": 1, "failed": -1}):
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(insert, ws, "c", "completed", "succeeded", counts, db_now())
    with pytest.raises(asyncpg.CheckViolationError):  # completed without counts
        await conn.execute(insert, ws, "c", "completed", "succeeded", None, db_now())
    await conn.execute(insert, ws, "d", "queued", "pending", None, None)
    with pytest.raises(asyncpg.UniqueViolationError):  # one active run per identity
        await conn.execute(insert, ws, "d", "running", "pending", None, None)


def db_now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)
