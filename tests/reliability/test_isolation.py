"""Tenant and workspace isolation across workspaces: a scoped repository cannot list, read, update, claim or
settle another scope's runs; a forged delivery cannot run another tenant's run; the database refuses a run
whose workspace differs from its tenant's. (Same-workspace isolation is covered in tests/test_gate.py.)"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

import opspolish
from opspolish.jobs.assignments import FETCH_TYPE, RESTORE_TYPE
from opspolish.ledger import Scope
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from opspolish.tracking import execute, get_job
from tests.conftest import drain
from tests.reliability.faults import effects, run_cli, run_rows
from tests.support.jobs import EFFECT_TYPE, WORKSPACE_EFFECT_TYPE

pytestmark = pytest.mark.timeout(60)


def _pick(seeded: dict[str, Any]) -> tuple[Any, Any]:
    a = seeded["tenants"][0]
    c = next(t for t in seeded["tenants"] if t["workspace_id"] != a["workspace_id"])
    return a, c


async def _row(conn: asyncpg.Connection, run_id: int) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", run_id)
    assert row is not None
    return dict(row)


async def test_scoped_repositories_cannot_list_read_update_claim_or_settle_runs_outside_their_scope(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any],
) -> None:
    a, c = _pick(seeded)
    b = next(t for t in seeded["tenants"] if t["workspace_id"] == a["workspace_id"] and t["id"] != a["id"])
    own = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=a["external_id"], inputs={"tag": "own"})
    sibling = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=b["external_id"], inputs={"tag": "sibling"})
    foreign = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=c["external_id"], inputs={"tag": "foreign"})
    own_ws = await opspolish.dispatch(rt, WORKSPACE_EFFECT_TYPE, workspace_id=a["workspace_id"],
                                      inputs={"tag": "own-ws"})
    foreign_ws = await opspolish.dispatch(rt, WORKSPACE_EFFECT_TYPE, workspace_id=c["workspace_id"],
                                          inputs={"tag": "foreign-ws"})
    # Make runs look like every kind of reconcile candidate (stale running, old queued), to tempt the writes.
    for run in (sibling, foreign):
        await conn.execute("UPDATE operation_runs SET status = 'running', attempts = 1, lease_owner = "
                           "gen_random_uuid(), heartbeat_at = now() - interval '1 hour' WHERE id = $1", run.run_id)
    others = {sibling.run_id, foreign.run_id, own_ws.run_id, foreign_ws.run_id}
    everything = {own.run_id, *others}
    out_of_reach = {
        "tenant A": (Scope(a["workspace_id"], a["id"]), others),
        "A's workspace": (Scope(a["workspace_id"]), {foreign.run_id, foreign_ws.run_id}),
        "A's workspace with C's tenant": (Scope(a["workspace_id"], c["id"]), everything),
        "C's workspace with A's tenant": (Scope(c["workspace_id"], a["id"]), everything),
    }
    before = {i: await _row(conn, i) for i in everything}
    for name, (scope, unreachable) in out_of_reach.items():
        repo = rt.ledger.scoped(scope)
        listed = {r.id for r in await repo.list_runs(limit=1000)}
        listed |= {r.id for r in await repo.list_runs(run_type=EFFECT_TYPE, status="running", limit=1000)}
        listed |= {r.id for r in await repo.unbacked_candidates(lease_ttl_s=0, min_age_s=0)}
        assert listed.isdisjoint(unreachable), (name, listed & unreachable)
        for run_id in unreachable:
            assert await repo.get(run_id) is None, (name, run_id)
            assert not await repo.update_context(run_id, {"tag": "hijacked"}), (name, run_id)
            assert not await repo.settle_orphaned(run_id, lease_ttl_s=0, message="x"), (name, run_id)
            assert not await repo.mark_requeued(run_id), (name, run_id)
            assert not await repo.settle_lost(run_id, message="x"), (name, run_id)
            if scope.tenant_id is not None:
                claim = await repo.claim(run_id, run_type=EFFECT_TYPE, job_id="forged", queue_name="q",
                                         lease_owner=uuid.uuid4(), cooldown_s=0, lease_ttl_s=1)
                assert (claim.decision, claim.reason_code) == ("run_not_found", "run.not_found"), (name, run_id)
    assert {i: await _row(conn, i) for i in everything} == before  # not a byte changed
    # The control: a tenant scope does reach its own run, a workspace scope its tenants' and its own runs.
    assert [r.id for r in await rt.ledger.scoped(out_of_reach["tenant A"][0]).list_runs()] == [own.run_id]
    ws_repo = rt.ledger.scoped(out_of_reach["A's workspace"][0])
    assert {r.id for r in await ws_repo.list_runs()} == {own.run_id, sibling.run_id, own_ws.run_id}
    assert {r.id for r in await ws_repo.unbacked_candidates(lease_ttl_s=0, min_age_s=0)} == {
        own.run_id, sibling.run_id, own_ws.run_id}



def test_a_scope_with_no_workspace_and_no_tenant_is_refused_not_read_as_every_workspace() -> None:
    # Scope(None) was the operator's view: a scope built from a look-up that found nothing saw every tenant's runs.
    with pytest.raises(ValueError, match=r"Scope\.operator\(\)"):
        Scope(None)
    with pytest.raises(ValueError, match=r"Scope\.operator\(\)"):
        Scope(None, None)
    assert Scope.operator().workspace_id is None and Scope(None, uuid.uuid4()).workspace_id is None

async def test_a_forged_delivery_of_another_tenants_run_runs_nothing_and_changes_nothing(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any],
) -> None:
    a, c = _pick(seeded)
    foreign = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=c["external_id"], inputs={"tag": "victim"})
    before = await _row(conn, foreign.run_id)
    job = get_job(EFFECT_TYPE)
    for tenant, run_type, inputs in ((str(a["id"]), EFFECT_TYPE, {"tag": "victim"}),
                                     (a["external_id"], EFFECT_TYPE, {"tag": "victim"}),
                                     (str(c["id"]), FETCH_TYPE, {})):
        result = await execute(rt, get_job(run_type), run_id=foreign.run_id, tenant=tenant, workspace_id=None,
                               inputs=inputs, job_id=foreign.job_id)
        assert (result["decision"], result["reason_code"]) == ("run_not_found", "run.not_found")
    ws_result = await execute(rt, get_job(WORKSPACE_EFFECT_TYPE), run_id=foreign.run_id, tenant=None,
                              workspace_id=a["workspace_id"], inputs={}, job_id=foreign.job_id)
    assert ws_result["decision"] == "run_not_found"
    # A delivery that names no scope at all reaches no run: only a raw one used to be held to naming it.
    for run_type in (EFFECT_TYPE, WORKSPACE_EFFECT_TYPE):
        bare = await execute(rt, get_job(run_type), run_id=foreign.run_id, tenant=None, workspace_id=None,
                             inputs={"tag": "victim"}, job_id=foreign.job_id)
        assert (bare["decision"], bare["reason_code"]) == ("rejected", "input.invalid"), bare
    # A delivery naming C's own tenant but A's workspace: the workspace scopes the tenant, as dispatch's does.
    moved = await execute(rt, job, run_id=foreign.run_id, tenant=c["external_id"], workspace_id=a["workspace_id"],
                          inputs={"tag": "victim"}, job_id=foreign.job_id)
    assert (moved["decision"], moved["reason_code"]) == ("run_not_found", "run.not_found")
    runs_before = await conn.fetchval("SELECT count(*) FROM operation_runs")
    raw = await execute(rt, job, run_id=None, tenant=c["external_id"], workspace_id=a["workspace_id"],
                        inputs={"tag": "raw"}, job_id="forged:raw")
    assert (raw["decision"], raw["reason_code"]) == ("tenant_not_found", "tenant.not_found")
    assert await conn.fetchval("SELECT count(*) FROM operation_runs") == runs_before
    assert await _row(conn, foreign.run_id) == before and await effects(conn) == []
    # Naming the tenant's own workspace is the control: a raw delivery then runs.
    own_raw = await execute(rt, job, run_id=None, tenant=c["external_id"], workspace_id=c["workspace_id"],
                            inputs={"tag": "raw"}, job_id="raw:own")
    assert own_raw["outcome"] == "succeeded" and len(await effects(conn, "raw")) == 1, own_raw
    # Delivered with its own tenant, the run does execute: the refusals above were about scope.
    ok = await execute(rt, job, run_id=foreign.run_id, tenant=c["external_id"], workspace_id=None,
                       inputs={"tag": "victim"}, job_id=foreign.job_id)
    assert ok["outcome"] == "succeeded" and len(await effects(conn, "victim")) == 1


async def test_restore_cannot_apply_another_tenants_snapshot(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any],
) -> None:
    a, c = _pick(seeded)
    fetched = await opspolish.dispatch(rt, FETCH_TYPE, tenant=c["external_id"], inputs={})
    await drain(settings)
    assert (await _row(conn, fetched.run_id))["outcome"] == "succeeded"
    directory = await conn.fetch("SELECT * FROM directory_assignments ORDER BY policy_id, target")
    restore = await opspolish.dispatch(rt, RESTORE_TYPE, tenant=a["external_id"],
                                       inputs={"source_run_id": fetched.run_id})
    await drain(settings)
    row = await _row(conn, restore.run_id)
    assert (row["outcome"], row["reason_code"]) == ("failed", "input.invalid")
    assert "not a fetch of this tenant" in row["reason_message"]
    assert await conn.fetch("SELECT * FROM directory_assignments ORDER BY policy_id, target") == directory


async def test_the_database_refuses_a_run_outside_its_tenants_workspace_on_update(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any],
) -> None:
    a, c = _pick(seeded)
    run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=a["external_id"], inputs={})
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute("UPDATE operation_runs SET workspace_id = $2 WHERE id = $1", run.run_id,
                           c["workspace_id"])
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute("UPDATE operation_runs SET tenant_id = $2 WHERE id = $1", run.run_id, c["id"])
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # nor by moving the tenant under its runs
        await conn.execute("UPDATE tenants SET workspace_id = $2 WHERE id = $1", a["id"], c["workspace_id"])
    [row] = await run_rows(conn)
    assert (row["workspace_id"], row["tenant_id"]) == (a["workspace_id"], a["id"])



async def test_no_tenant_can_take_another_tenants_id_as_its_external_id(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any],
) -> None:
    # A reference is looked up by id first: a tenant whose external_id was another's id could not be reached by its
    # own external_id, and a dispatch naming it made a run of the other tenant (another workspace's, here).
    a, c = _pick(seeded)
    collides = str(uuid.UUID(str(a["id"]))).lower()
    with pytest.raises(asyncpg.UniqueViolationError, match="another tenant's external_id or id"):
        await conn.execute("INSERT INTO tenants (id, workspace_id, external_id, name) VALUES ($1, $2, $3, 'x')",
                           uuid.uuid4(), c["workspace_id"], collides)
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute("UPDATE tenants SET external_id = $2 WHERE id = $1", c["id"], collides)
    with pytest.raises(asyncpg.UniqueViolationError):  # nor the other way round: an id that is an external_id
        await conn.execute("INSERT INTO tenants (id, workspace_id, external_id, name) VALUES ($1, $2, $3, 'x')",
                           uuid.UUID(c["external_id"]), a["workspace_id"], str(uuid.uuid4()))
    fresh = await conn.fetchval("INSERT INTO tenants (id, workspace_id, external_id, name) VALUES ($1, $2, $3, 'y') "
                                "RETURNING external_id", uuid.uuid4(), c["workspace_id"], str(uuid.uuid4()))
    run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=fresh, inputs={})
    assert run.workspace_id == c["workspace_id"]

async def test_cli_listing_for_a_tenant_shows_only_that_tenants_runs(
    settings: Settings, rt: Runtime, seeded: dict[str, Any],
) -> None:
    a, c = _pick(seeded)
    own = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=a["external_id"], inputs={})
    await opspolish.dispatch(rt, EFFECT_TYPE, tenant=c["external_id"], inputs={})
    listed = await run_cli(settings, "runs", "list", "--tenant", a["external_id"], "--json")
    assert listed.code == 0, listed
    assert [r["id"] for r in json.loads(listed.stdout)] == [own.run_id]
