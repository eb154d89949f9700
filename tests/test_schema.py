"""The schema: migrations equal the models, round-trip, and the database refuses bad rows."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import uuid
from pathlib import Path
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


def test_the_workers_schema_head_is_the_migrations_head() -> None:
    """A worker checks its database against db.SCHEMA_HEAD without loading alembic: a new migration must move it."""
    assert db.head_revision() == db.SCHEMA_HEAD


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
    # The gate's five, the counts check's (0003) and the tenant-reference trigger's (0006).
    assert await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname LIKE 'opspolish_%'") == 7


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


def _migration(name: str) -> Any:
    path = Path(db.MIGRATIONS_DIR) / "versions" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"migration_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hex_corpus(rng: random.Random) -> list[str]:
    alphabet = "0123456789abcdef" * 4 + "ABCDEFgxz -\n\u00e9"
    out = ["a" * 64, "0" * 64, "f" * 63, "f" * 65, "", "A" * 64, "a" * 63 + "\n", "\u00e9" + "a" * 63]
    for _ in range(3000):
        n = rng.choice([63, 64, 64, 64, 65, rng.randrange(0, 80)])
        out.append("".join(rng.choice(alphabet) for _ in range(n)))
    return out


def _counts_corpus(rng: random.Random) -> list[Any]:
    numbers = [0, 1, 2, 7, -1, 10**17, 10**18, 10**19, 1.5, 2.0, "1", None, True, [1], {"n": 1}, 1e3]
    out: list[Any] = [[], "x", 3, None, {}, {"total": 1, "processed": 1, "failed": 0, "extra": 9}]
    for _ in range(3000):
        counts = {key: rng.choice(numbers) for key in ("total", "processed", "failed") if rng.random() < 0.95}
        out.append(counts)
    return out


async def test_cheaper_checks_accept_and_refuse_exactly_what_the_original_rules_did(conn: asyncpg.Connection) -> None:
    """Migration 0003 respelled three CHECK rules for speed: on thousands of generated values (and the edge cases
    a regex rewrite can get wrong: length, case, a trailing newline, non-ASCII), old and new rules agree."""
    m = _migration("0003_cheaper_checks")
    rng = random.Random(20261129)
    hexes, counts = _hex_corpus(rng), _counts_corpus(rng)
    as_json = [json.dumps(c) for c in counts]
    # A CHECK passes when its expression is true or NULL.
    for name, column, values, cast in (("identity_hash_hex64", "run_identity_hash", hexes, "text"),
                                       ("fingerprint_hex64", "fingerprint", hexes, "text"),
                                       ("summary_counts_valid", "summary_counts", as_json, "text::jsonb")):
        old, new = (rules[name].replace(column, "v") for rules in (m._OLD, m._NEW))
        rows = await conn.fetch(
            f"SELECT v, coalesce(({old}), true) AS old, coalesce(({new}), true) AS new "
            f"FROM unnest($1::text[]) AS u(raw), LATERAL (SELECT raw::{cast} AS v) AS c", values)
        differ = [(r["v"], r["old"], r["new"]) for r in rows if r["old"] != r["new"]]
        assert not differ, f"{name}: {differ[:5]}"
        accepted = sum(r["new"] for r in rows)
        assert 0 < accepted < len(rows), f"{name}: the corpus must hold both kinds ({accepted} of {len(rows)})"


@pytest.mark.parametrize("identity", ["A" * 64, "a" * 63, "a" * 65, "a" * 63 + "g", "a" * 63 + "\n"])
async def test_database_refuses_a_run_identity_that_is_not_64_lowercase_hex(
    conn: asyncpg.Connection, identity: str
) -> None:
    ws = await _workspace(conn, "w")
    with pytest.raises(asyncpg.CheckViolationError, match="identity_hash_hex64"):
        await conn.execute("INSERT INTO operation_runs (workspace_id, type, run_identity_hash, fingerprint) "
                           "VALUES ($1, 'x', $2, repeat('b', 64))", ws, identity)


def db_now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)
