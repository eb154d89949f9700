"""Coalesced completion writes: concurrent completions share a statement, each is still fenced on its lease."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from opspolish.batching import CompletionWriter
from opspolish.dispatch import dispatch
from opspolish.runtime import Runtime
from tests.support.jobs import EFFECT_TYPE


async def test_concurrent_completions_share_flushes_and_each_is_fenced_on_its_lease(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    leases: list[tuple[int, uuid.UUID]] = []
    for i in range(20):
        run = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": f"b{i}"})
        owner = uuid.uuid4()
        claim = await rt.ledger.claim(run_id=run.run_id, tenant=tenant, workspace_id=None, run_type=EFFECT_TYPE,
                                      fingerprint=None, context=None, job_id="j", queue_name="q", lease_owner=owner,
                                      cooldown_s=0, lease_ttl_s=60)
        assert claim.decision == "claimed"
        leases.append((run.run_id, owner))
    writer = CompletionWriter(rt.pool)
    # Every fourth delivery lost its lease: a stranger's owner id must not write.
    owners = [uuid.uuid4() if i % 4 == 0 else owner for i, (_, owner) in enumerate(leases)]
    results = await asyncio.gather(*[
        writer.complete(run_id, owner, outcome="succeeded", counts={"total": i, "processed": i, "failed": 0},
                        reason_code=None, reason_message=None)
        for i, ((run_id, _), owner) in enumerate(zip(leases, owners, strict=True))
    ])
    await writer.close()
    assert results == [i % 4 != 0 for i in range(20)]
    assert writer.writes == 20 and writer.flushes < 20  # coalesced
    rows = {r["id"]: r for r in await conn.fetch("SELECT id, status, summary_counts FROM operation_runs")}
    for i, (run_id, _) in enumerate(leases):
        if i % 4 == 0:
            assert rows[run_id]["status"] == "running" and rows[run_id]["summary_counts"] is None
        else:
            assert rows[run_id]["summary_counts"] == {"total": i, "processed": i, "failed": 0}


async def test_a_failed_flush_reaches_every_waiter(rt: Runtime) -> None:
    writer = CompletionWriter(rt.pool)
    await rt.pool.close()
    results = await asyncio.gather(
        *[writer.complete(i, uuid.uuid4(), outcome="succeeded", counts={"total": 0, "processed": 0, "failed": 0},
                          reason_code=None, reason_message=None) for i in range(3)],
        return_exceptions=True)
    assert len(results) == 3 and all(isinstance(r, Exception) for r in results)
