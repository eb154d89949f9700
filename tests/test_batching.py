"""Coalesced gate traffic: concurrent claims and completions share statements, each decided as if alone."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
import structlog.testing

from opspolish import db
from opspolish.batching import GateBatcher
from opspolish.dispatch import dispatch
from opspolish.errors import DbUnavailable
from opspolish.fingerprint import fingerprint
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
    writer = GateBatcher(lambda: db.connect_gate(rt.settings), rt.ledger)
    # Every fourth delivery lost its lease: a stranger's owner id must not write.
    owners = [uuid.uuid4() if i % 4 == 0 else owner for i, (_, owner) in enumerate(leases)]
    results = await asyncio.gather(*[
        writer.complete(run_id, owner, outcome="succeeded", counts={"total": i, "processed": i, "failed": 0},
                        reason_code=None, reason_message=None)
        for i, ((run_id, _), owner) in enumerate(zip(leases, owners, strict=True))
    ])
    await writer.close()
    assert results == [i % 4 != 0 for i in range(20)]
    assert writer.completions == 20 and writer.flushes < 20  # coalesced
    rows = {r["id"]: r for r in await conn.fetch("SELECT id, status, summary_counts FROM operation_runs")}
    for i, (run_id, _) in enumerate(leases):
        if i % 4 == 0:
            assert rows[run_id]["status"] == "running" and rows[run_id]["summary_counts"] is None
        else:
            assert rows[run_id]["summary_counts"] == {"total": i, "processed": i, "failed": 0}


async def test_two_completions_of_one_run_in_one_batch_only_the_lease_holder_is_told_written(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # A stale delivery and the one that took its run over finish in the same flush: the row takes the holder's
    # write, and the stale one must hear "not written" (it logs run_abandoned), not its run id's success.
    tenant = seeded["tenants"][0]["external_id"]
    run = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "pair"})
    stale, holder = uuid.uuid4(), uuid.uuid4()
    await conn.execute("UPDATE operation_runs SET status = 'running', attempts = 2, lease_owner = $2, "
                       "heartbeat_at = now() WHERE id = $1", run.run_id, holder)
    writer = GateBatcher(lambda: db.connect_gate(rt.settings), rt.ledger)
    try:
        for first, second in ((stale, holder), (holder, stale)):  # either order within the batch
            await conn.execute("UPDATE operation_runs SET status = 'running', outcome = 'pending', "
                               "summary_counts = NULL, reason_code = NULL, completed_at = NULL WHERE id = $1",
                               run.run_id)
            flushes = writer.flushes
            done = await asyncio.gather(*[
                writer.complete(run.run_id, owner, outcome="failed" if owner == stale else "succeeded",
                                counts={"total": 9, "processed": 9, "failed": 9} if owner == stale
                                else {"total": 1, "processed": 1, "failed": 0},
                                reason_code="items.all_failed" if owner == stale else None,
                                reason_message=None)
                for owner in (first, second)])
            assert writer.flushes == flushes + 1  # both in one statement
            assert dict(zip((first, second), done, strict=True)) == {stale: False, holder: True}
            row = await conn.fetchrow("SELECT outcome, summary_counts FROM operation_runs WHERE id = $1", run.run_id)
            assert row is not None and row["outcome"] == "succeeded"
            assert row["summary_counts"] == {"total": 1, "processed": 1, "failed": 0}
    finally:
        await writer.close()


async def test_a_failed_flush_reaches_every_waiter(rt: Runtime) -> None:
    async def refused() -> asyncpg.Connection:
        raise DbUnavailable("cannot connect to PostgreSQL: refused")

    writer = GateBatcher(refused, rt.ledger)
    results = await asyncio.gather(
        *[writer.complete(i, uuid.uuid4(), outcome="succeeded", counts={"total": 0, "processed": 0, "failed": 0},
                          reason_code=None, reason_message=None) for i in range(3)],
        return_exceptions=True)
    assert len(results) == 3 and all(isinstance(r, Exception) for r in results)


def _claim_args(run_id: int | None, tenant: str | None, *, fp: str | None = None, job_id: str = "j",
                context: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"run_id": run_id, "tenant": tenant, "workspace_id": None, "run_type": EFFECT_TYPE, "fingerprint": fp,
            "context": context, "job_id": job_id, "queue_name": "q", "lease_owner": uuid.uuid4(),
            "cooldown_s": 900.0, "lease_ttl_s": 60.0}


async def test_two_deliveries_of_one_identity_in_one_batch_run_once(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    run = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "same"})
    fp = fingerprint({"tag": "raw"})
    batcher = GateBatcher(lambda: db.connect_gate(rt.settings), rt.ledger)
    try:
        decided = await asyncio.gather(
            batcher.claim(**_claim_args(run.run_id, tenant, job_id=run.job_id)),
            batcher.claim(**_claim_args(run.run_id, tenant, job_id=run.job_id)),
            batcher.claim(**_claim_args(None, tenant, fp=fp, job_id="raw-1", context={"tag": "raw"})),
            batcher.claim(**_claim_args(None, tenant, fp=fp, job_id="raw-2", context={"tag": "raw"})),
        )
    finally:
        await batcher.close()
    assert batcher.flushes == 1 and batcher.claims == 4  # one statement decided all four
    assert [c.decision for c in decided] == ["claimed", "overlap", "claimed", "skipped"]
    assert decided[3].reason_code == "dedupe.non_canonical" and decided[3].dedupe_of == decided[2].run_id
    rows = await conn.fetch("SELECT status, count(*) FROM operation_runs GROUP BY status ORDER BY status")
    assert [tuple(r) for r in rows] == [("completed", 1), ("running", 2)]


async def test_a_claim_the_database_refuses_fails_alone_and_its_batch_is_replayed(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    runs = [await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": f"r{i}"}) for i in range(3)]
    batcher = GateBatcher(lambda: db.connect_gate(rt.settings), rt.ledger)
    try:
        # A raw delivery with neither tenant nor workspace: opspolish_claim raises, failing the whole statement.
        decided = await asyncio.gather(
            batcher.claim(**_claim_args(runs[0].run_id, tenant, job_id=runs[0].job_id)),
            batcher.claim(**_claim_args(None, None, fp=fingerprint({"x": 1}), context={"x": 1})),
            batcher.claim(**_claim_args(runs[1].run_id, tenant, job_id=runs[1].job_id)),
            batcher.complete(runs[2].run_id, uuid.uuid4(), outcome="succeeded",
                             counts={"total": 0, "processed": 0, "failed": 0}, reason_code=None,
                             reason_message=None),
            return_exceptions=True,
        )
    finally:
        await batcher.close()
    assert batcher.replays == 1
    assert isinstance(decided[1], asyncpg.PostgresError) and "needs a tenant or a workspace" in str(decided[1])
    assert [getattr(d, "decision", None) for d in (decided[0], decided[2])] == ["claimed", "claimed"]
    assert decided[3] is False  # a stranger's completion: fenced, not written
    statuses = {r["id"]: r["status"] for r in await conn.fetch("SELECT id, status FROM operation_runs")}
    assert statuses == {runs[0].run_id: "running", runs[1].run_id: "running", runs[2].run_id: "queued"}


async def test_a_claim_whose_delivery_was_cancelled_in_flight_is_handed_back(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    run = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "cancelled"})
    batcher = GateBatcher(lambda: db.connect_gate(rt.settings), rt.ledger)
    try:
        waiter = asyncio.create_task(batcher.claim(**_claim_args(run.run_id, tenant, job_id=run.job_id)))
        await asyncio.sleep(0)  # queued; the flush starts on the next turn of the loop
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    finally:
        with structlog.testing.capture_logs() as logs:
            await batcher.close()  # waits for the flush and the hand-back
    row = await conn.fetchrow("SELECT status, attempts, lease_owner, reason_code FROM operation_runs WHERE id = $1",
                              run.run_id)
    assert row is not None
    assert dict(row) == {"status": "queued", "attempts": 1, "lease_owner": None, "reason_code": "job.cancelled"}
    # Logged like a hand-back from a body: a worker stopped mid-claim used to hand runs back without a line.
    assert [(e["event"], e["run_id"], e["reason_code"]) for e in logs] == [
        ("run_handed_back", run.run_id, "job.cancelled")]


async def test_back_to_back_operations_of_one_task_never_wait_on_a_finished_flush(
    rt: Runtime, seeded: dict[str, Any]
) -> None:
    # Each operation is queued the moment the previous one's flush resolved it, before that flush's task has
    # quite finished: it must start a flush of its own, not wait for one that is already over.
    tenant = seeded["tenants"][0]["external_id"]
    batcher = GateBatcher(lambda: db.connect_gate(rt.settings), rt.ledger)
    try:
        async with asyncio.timeout(30):
            for i in range(40):
                fp = fingerprint({"seq": i})
                claim = await batcher.claim(**_claim_args(None, tenant, fp=fp, job_id=f"seq-{i}",
                                                          context={"seq": i}))
                assert claim.decision == "claimed" and claim.run_id is not None
                assert await batcher.complete(claim.run_id, uuid.uuid4(), outcome="succeeded",
                                              counts={"total": 0, "processed": 0, "failed": 0},
                                              reason_code=None, reason_message=None) is False  # not its lease
    finally:
        await batcher.close()
    assert batcher.flushes == 80


async def test_a_row_locked_by_someone_else_holds_up_only_its_own_delivery(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    blocked, free = [await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": t}) for t in ("blocked", "free")]
    batcher = GateBatcher(lambda: db.connect_gate(rt.settings), rt.ledger)
    operator = await db.connect(rt.settings)
    try:
        await operator.execute("BEGIN")
        await operator.execute("SELECT 1 FROM operation_runs WHERE id = $1 FOR UPDATE", blocked.run_id)
        held = asyncio.create_task(batcher.claim(**_claim_args(blocked.run_id, tenant, job_id=blocked.job_id)))
        other = asyncio.create_task(batcher.claim(**_claim_args(free.run_id, tenant, job_id=free.job_id)))
        # The shared flush gives up on the lock (lock_timeout) and is replayed one operation per statement.
        async with asyncio.timeout(15):
            assert (await other).decision == "claimed"
        assert not held.done()
        await operator.execute("ROLLBACK")
        async with asyncio.timeout(15):
            assert (await held).decision == "claimed"
    finally:
        await operator.close()
        await batcher.close()
    assert batcher.replays == 1


async def test_several_lanes_flush_side_by_side_and_still_run_each_identity_once(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # lanes > 1 is not the worker's default (docs/performance.md: tried, not kept), but GateBatcher offers it:
    # operations that arrive while a flush is in flight start another flush on another connection, and duplicates
    # split across those concurrent transactions are decided by the identity's lock and the ledger, like two
    # workers' would be.
    tenant = seeded["tenants"][0]["external_id"]
    runs = [await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": f"lane{i}"}) for i in range(24)]
    fp = fingerprint({"tag": "lanes-raw"})
    opened = 0

    async def connect() -> asyncpg.Connection:
        nonlocal opened
        opened += 1
        return await db.connect_gate(rt.settings)

    batcher = GateBatcher(connect, rt.ledger, lanes=3)

    async def decide(args: dict[str, Any]) -> Any:
        while True:  # a busy lock is retried, as the worker's delivery is
            claim = await batcher.claim(**args)
            if claim.decision != "busy":
                return claim
            await asyncio.sleep(0.01)

    try:
        async with asyncio.timeout(60):
            tasks = []
            for i, run in enumerate(runs):  # one new operation per turn of the loop: flushes overlap
                tasks.append(asyncio.create_task(decide(_claim_args(run.run_id, tenant, job_id=run.job_id))))
                if i % 3 == 0:
                    tasks.append(asyncio.create_task(decide(
                        _claim_args(None, tenant, fp=fp, job_id=f"lanes-raw-{i}", context={"tag": "lanes-raw"}))))
                await asyncio.sleep(0)
            decided = await asyncio.gather(*tasks)
    finally:
        await batcher.close()
    assert 2 <= opened <= 3, opened  # flushes ran side by side, never on more connections than lanes
    dispatched = [c for c in decided if c.run_id in {r.run_id for r in runs}]
    assert sorted(c.run_id for c in dispatched if c.decision == "claimed") == sorted(r.run_id for r in runs)
    raw = [c for c in decided if c not in dispatched]
    assert len(raw) == 8
    claimed = [c for c in raw if c.decision == "claimed"]
    assert len(claimed) == 1, [c.decision for c in raw]  # one identity: one execution
    assert {(c.decision, c.reason_code, c.dedupe_of) for c in raw if c is not claimed[0]} == {
        ("skipped", "dedupe.non_canonical", claimed[0].run_id)}
    rows = await conn.fetch("SELECT status, count(*) FROM operation_runs GROUP BY status ORDER BY status")
    assert [tuple(r) for r in rows] == [("completed", 7), ("running", 25)]
