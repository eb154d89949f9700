"""The gate's look-ups stay on their indexes as the ledger grows (DESIGN §4: none may scan the ledger).

The trap: PL/pgSQL and prepared statements cache plans per connection. A plan cached while the ledger was empty
and freshly analyzed could be a scan that never goes away. The gate keeps generic plans with sequential scans
priced out (gate_sql v2, db.GATE_SERVER_SETTINGS); this test warms its connections on an empty ledger, grows the
ledger to 1,000,000 runs, and reads the plans the gate's statements really use (auto_explain, nested statements)
on those same connections: each look-up on its own index.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from opspolish import db
from opspolish.batching import _CLAIM_ONE, _COMPLETE_ONE, _FLUSH
from opspolish.settings import Settings
from tests.support.jobs import EFFECT_TYPE

pytestmark = pytest.mark.timeout(300)
HISTORY_ROWS = 1_000_000


async def _claim(conn: asyncpg.Connection, tenant: str, tag: str) -> Any:
    return await conn.fetchrow(
        "SELECT * FROM opspolish_claim(NULL, $1, NULL, $2, $3, '{}'::jsonb, $4, 'q', $5, 900, 60, now())",
        tenant, EFFECT_TYPE, tag * 64, f"job-{uuid.uuid4()}", uuid.uuid4())


async def _dispatch_and_claim(conn: asyncpg.Connection, tenant: str, tag: str) -> Any:
    """The dispatched path: opspolish_dispatch, then a claim by run id (with a cooldown to look up)."""
    run = await conn.fetchrow("SELECT * FROM opspolish_dispatch($1, NULL, $2, $3, '{}'::jsonb, 'q')",
                              tenant, EFFECT_TYPE, (tag * 64)[:64])
    assert run is not None
    return await conn.fetchrow(
        "SELECT * FROM opspolish_claim($1, $2, NULL, $3, NULL, NULL, $4, 'q', $5, 900, 60, NULL)",
        run["run_id"], tenant, EFFECT_TYPE, run["job_id"], uuid.uuid4())


async def _flush(stmt: Any, tenant: str, tag: str, done: tuple[int, uuid.UUID] | None = None) -> list[Any]:
    """The gate batcher's statement with one raw claim (and one completion when ``done`` is given)."""
    completions: list[list[Any]] = (
        [[done[0]], [done[1]], ["succeeded"], ['{"total": 0, "processed": 0, "failed": 0}'], [None], [None]]
        if done else [[], [], [], [], [], []])
    owner = uuid.uuid4()
    rows: list[Any] = await stmt.fetch(
        *completions, [None], [tenant], [None], [EFFECT_TYPE], [(tag * 64)[:64]], ["{}"],
        [f"job-{uuid.uuid4()}"], ["q"], [owner], [900.0], [60.0], [datetime.now(UTC)])
    return [*rows, owner]


async def _one_by_one(claim_one: Any, complete_one: Any, tenant: str, tag: str) -> Any:
    """The batcher's statements for a lone claim and a lone completion: one raw claim, then its completion."""
    owner = uuid.uuid4()
    claimed = await claim_one.fetchrow(None, tenant, None, EFFECT_TYPE, (tag * 64)[:64], "{}",
                                       f"job-{uuid.uuid4()}", "q", owner, 900.0, 60.0, datetime.now(UTC))
    assert claimed["decision"] == "claimed", claimed
    return await complete_one.fetchrow(claimed["run_id"], owner, "succeeded",
                                       '{"total": 0, "processed": 0, "failed": 0}', None, None)


async def _grow_ledger(settings: Settings, tenant_id: uuid.UUID, workspace_id: uuid.UUID) -> None:
    conn = await db.connect(settings)
    try:
        await conn.execute(
            """INSERT INTO operation_runs (workspace_id, tenant_id, type, status, outcome, run_identity_hash,
                   fingerprint, summary_counts, attempts, job_id, created_at, started_at, completed_at)
               SELECT $1, $2, $3, 'completed', 'succeeded', encode(sha256(int8send(g)), 'hex'), repeat('0', 64),
                      '{"total": 1, "processed": 1, "failed": 0}', 1, 'hist-' || g,
                      now() - interval '2 days', now() - interval '2 days', now() - interval '1 day'
               FROM generate_series(1, $4) g""",
            workspace_id, tenant_id, EFFECT_TYPE, HISTORY_ROWS)
        # No ANALYZE here: it would invalidate the cached plans and hide the trap this test is about.
    finally:
        await conn.close()


async def test_gate_statements_use_indexes_at_a_million_runs_even_after_warming_on_an_empty_ledger(
    settings: Settings, seeded: dict[str, Any]
) -> None:
    tenant = seeded["tenants"][0]
    gate = await db.connect(settings)  # a pool-like connection: the gate functions bring their own plan settings
    batch = await db.connect_gate(settings)  # the batcher's own connection: one generic plan, no seq scans
    plans: list[str] = []
    batch_plans: list[str] = []
    try:
        # Autovacuum off (DDL first: it invalidates plans), so only the gate's own plan choice is under test.
        await gate.execute("ALTER TABLE operation_runs SET (autovacuum_enabled = false)")
        await gate.execute("ANALYZE operation_runs")  # freshly analyzed while (nearly) empty
        for i in range(12):  # past the 5 custom plans after which a generic plan may be cached
            await _claim(gate, tenant["external_id"], "0123456789abcdef"[i % 16])
            await _dispatch_and_claim(gate, tenant["external_id"], f"b{i:x}")
        stmt = await batch.prepare(_FLUSH)
        claim_one, complete_one = await batch.prepare(_CLAIM_ONE), await batch.prepare(_COMPLETE_ONE)
        for i in range(6):  # their generic plans are made now, on the (nearly) empty ledger
            claimed_row, owner = await _flush(stmt, tenant["external_id"], f"c{i}")
            await _flush(stmt, tenant["external_id"], f"d{i}", done=(claimed_row["run_id"], owner))
            await _one_by_one(claim_one, complete_one, tenant["external_id"], f"a{i}")
        started = time.monotonic()
        await _grow_ledger(settings, tenant["id"], tenant["workspace_id"])
        grow_s = time.monotonic() - started

        await gate.execute("LOAD 'auto_explain'")
        await gate.execute("SET auto_explain.log_min_duration = 0")
        await gate.execute("SET auto_explain.log_nested_statements = on")
        await gate.execute("SET client_min_messages = log")
        gate.add_log_listener(lambda _c, msg: plans.append(str(msg)))
        claimed = await _claim(gate, tenant["external_id"], "e")  # cooldown look-up + insert path
        dispatched = await _dispatch_and_claim(gate, tenant["external_id"], "ea")  # by id + cooldown look-up
        await gate.execute("RESET client_min_messages")

        for statement in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                          "SET auto_explain.log_nested_statements = on", "SET client_min_messages = log"):
            await batch.execute(statement)
        batch.add_log_listener(lambda _c, msg: batch_plans.append(str(msg)))
        batch_claim, batch_owner = await _flush(stmt, tenant["external_id"], "fa")
        completed = await _flush(stmt, tenant["external_id"], "fb", done=(batch_claim["run_id"], batch_owner))
        lone_plans_from = len(batch_plans)
        lone_completed = await _one_by_one(claim_one, complete_one, tenant["external_id"], "fc")
    finally:
        await gate.close()
        await batch.close()
    assert claimed["decision"] == "claimed" and dispatched["decision"] == "claimed"
    text = "\n".join(plans)
    assert "operation_runs" in text, "auto_explain captured no plan of the gate's statements"
    assert "Seq Scan on operation_runs" not in text, text
    # Each look-up on its own index: the job id, the active identity, the cooldown, the primary key; never a
    # walk over an index that does not narrow it (what a generic plan made on an empty table could pick).
    for index in ("ix_operation_runs_job_id", "uq_operation_runs_active_identity", "ix_operation_runs_cooldown",
                  "pk_operation_runs"):
        assert index in text, f"{index} not used:\n{text}"
    for index in ("ix_operation_runs_tenant_listing", "ix_operation_runs_workspace_listing",
                  "ix_operation_runs_reconcile"):
        assert index not in text, f"{index} used by the gate:\n{text}"
    assert grow_s < 240
    # The batcher's statement: its completion join and its claims, at a million runs, on the plan made empty.
    assert batch_claim["decision"] == "claimed" and any(r["decision"] is None for r in completed[:-1])
    batch_text = "\n".join(batch_plans)
    [update_plan] = [p for p in batch_plans if "CTE done" in p and "ix_operation_runs_job_id" not in p][-1:]
    assert "Index Scan using pk_operation_runs on operation_runs o" in update_plan, update_plan
    assert "Seq Scan on operation_runs" not in batch_text, batch_text
    # The statements for a lone claim (opspolish_claim's own plans, checked above) and a lone completion.
    assert lone_completed is not None and lone_completed["run_id"] is not None
    [lone_update] = [p for p in batch_plans[lone_plans_from:] if "Update on operation_runs" in p][-1:]
    assert "Index Scan using pk_operation_runs on operation_runs o" in lone_update, lone_update


@pytest.mark.parametrize(("label", "sql", "indexes"), [
    ("cooldown", """SELECT id FROM operation_runs WHERE run_identity_hash = $1 AND status = 'completed'
                    AND outcome <> 'skipped' AND attempts > 0 AND completed_at > now() - interval '15 minutes'
                    ORDER BY completed_at DESC LIMIT 1""", ("ix_operation_runs_cooldown",)),
    # Both partial indexes over active runs hold only active rows: either is a small, bounded look-up.
    ("active", "SELECT id FROM operation_runs WHERE run_identity_hash = $1 AND status IN ('queued', 'running')",
     ("uq_operation_runs_active_identity", "ix_operation_runs_reconcile")),
    ("reconcile", """SELECT id FROM operation_runs WHERE workspace_id = '00000000-0000-4000-8000-000000000000'
                     AND status IN ('queued', 'running') AND id > 0 ORDER BY id LIMIT 500""",
     ("uq_operation_runs_active_identity", "ix_operation_runs_reconcile")),
])
async def test_lookups_plan_onto_their_partial_indexes(
    conn: asyncpg.Connection, seeded: dict[str, Any], label: str, sql: str, indexes: tuple[str, ...]
) -> None:
    tenant = seeded["tenants"][0]
    await conn.execute(
        """INSERT INTO operation_runs (workspace_id, tenant_id, type, status, outcome, run_identity_hash,
               fingerprint, summary_counts, attempts, completed_at)
           SELECT $1, $2, 'x', 'completed', 'succeeded', encode(sha256(int8send(g)), 'hex'), repeat('0', 64),
                  '{"total": 0, "processed": 0, "failed": 0}', 1, now() FROM generate_series(1, 20000) g""",
        tenant["workspace_id"], tenant["id"])
    await conn.execute("ANALYZE operation_runs")
    plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql.replace('$1', repr('a' * 64))}"))
    assert any(index in plan for index in indexes) and "Seq Scan" not in plan, f"{label}: {plan}"
