"""The execution gate (DESIGN §5) and tracked jobs, against real Postgres, Redis and in-process arq workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import MutableMapping
from typing import Any

import asyncpg
import pytest
import structlog
import structlog.testing
from arq import Retry

from opspolish.counts import Counts
from opspolish.dispatch import dispatch
from opspolish.errors import DbUnavailable, InputInvalid, LeaseLost, QueueConflict
from opspolish.fingerprint import fingerprint, identity_hash, lock_key
from opspolish.ledger import Scope
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from opspolish.tracking import RunContext, execute, get_job
from tests.conftest import ROOT, drain, wait_until, worker_env
from tests.support.jobs import EFFECT_TYPE, FENCED_PAUSES, FENCED_TYPE


async def runs(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch("SELECT * FROM operation_runs ORDER BY id")]


async def effects(conn: asyncpg.Connection, tag: str | None = None) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(
        "SELECT * FROM test_effects WHERE $1::text IS NULL OR tag = $1 ORDER BY id", tag)]


@pytest.fixture
def tenant(seeded: dict[str, Any]) -> str:
    return str(seeded["tenants"][0]["external_id"])


async def test_dispatch_runs_the_body_once_and_records_partial_counts(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    first = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"items": 4, "fail_items": 1})
    joined = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"fail_items": 1.0, "items": 4})
    assert first.created and not joined.created and joined.run_id == first.run_id
    await drain(settings)
    [run] = await runs(conn)
    assert (run["status"], run["outcome"], run["reason_code"]) == (
        "completed", "partially_succeeded", "items.partially_failed")
    assert run["summary_counts"] == {"total": 4, "processed": 4, "failed": 1}
    assert len(await effects(conn)) == 1


async def test_dispatch_by_id_or_external_id_is_the_same_identity(
    rt: Runtime, seeded: dict[str, Any]
) -> None:
    t = seeded["tenants"][0]
    a = await dispatch(rt, EFFECT_TYPE, tenant=t["external_id"], inputs={"tag": "x"})
    b = await dispatch(rt, EFFECT_TYPE, tenant=str(t["id"]).upper(), inputs={"tag": "x"})
    assert a.run_id == b.run_id
    expected = identity_hash(f"tenant:{t['id']}", EFFECT_TYPE, fingerprint({"tag": "x"}))
    run = await rt.ledger.scoped(Scope(t["workspace_id"], t["id"])).get(a.run_id)
    assert run is not None and run.run_identity_hash == expected
    assert await rt.pool.fetchval("SELECT opspolish_lock_key($1)", expected) == lock_key(expected)


# Imports nothing but opspolish: in this process the registry starts empty, unlike in the test process.
PLAIN_DISPATCH = """
import asyncio, json, sys
import opspolish

async def main():
    async with opspolish.connect() as rt:
        results = [await opspolish.dispatch(rt, run_type, tenant=sys.argv[1]) for run_type in sys.argv[2:]]
    print(json.dumps([r.run_id for r in results]))

asyncio.run(main())
"""


async def test_dispatch_after_a_plain_import_knows_the_built_in_and_configured_job_types(
    settings: Settings, conn: asyncpg.Connection, tenant: str
) -> None:
    # worker_env sets OPSPOLISH_JOB_MODULES=tests.support.jobs, where test.effect lives.
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", PLAIN_DISPATCH, tenant, "assignments.fetch", EFFECT_TYPE],
        cwd=ROOT, env=worker_env(settings), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    run_ids = json.loads(out.stdout.splitlines()[-1])
    rows = await conn.fetch("SELECT type, status FROM operation_runs WHERE id = ANY($1::bigint[]) ORDER BY id",
                            run_ids)
    assert [(r["type"], r["status"]) for r in rows] == [("assignments.fetch", "queued"), (EFFECT_TYPE, "queued")]


# The same tenant: the job left from before the reset names the new run's id, type, tenant and workspace, and was
# taken for the new run's own (its delivery then refused as other inputs, the new run left with no job).
@pytest.mark.parametrize("second_tenant", [1, 0], ids=["another tenant", "the same tenant"])
async def test_a_new_run_whose_job_id_another_job_holds_in_redis_is_recorded_failed_not_reported_queued(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any], second_tenant: int
) -> None:
    # Run ids start again after a ledger reset while Redis keeps its queue: the new run 1's job id was the old run
    # 1's, enqueue_job returned None, and dispatch reported "queued" for a run with no job of its own.
    tenants = seeded["tenants"]
    first = await dispatch(rt, EFFECT_TYPE, tenant=tenants[0]["external_id"], inputs={"tag": "old"})
    await conn.execute("TRUNCATE operation_runs RESTART IDENTITY CASCADE")
    with pytest.raises(QueueConflict) as refused:
        await dispatch(rt, EFFECT_TYPE, tenant=tenants[second_tenant]["external_id"], inputs={"tag": "new"})
    assert f"job id {first.job_id!r} is already taken" in refused.value.message
    [run] = await runs(conn)
    assert (run["id"], run["status"], run["outcome"], run["reason_code"]) == (
        first.run_id, "completed", "failed", "queue.conflict")
    # Joining an active run whose job is queued stays quiet: that job is the run's own.
    again = await dispatch(rt, EFFECT_TYPE, tenant=tenants[1]["external_id"], inputs={"tag": "again"})
    joined = await dispatch(rt, EFFECT_TYPE, tenant=tenants[1]["external_id"], inputs={"tag": "again"})
    assert (again.verdict, joined.verdict, joined.run_id) == ("queued", "joined", again.run_id)


async def test_two_dispatches_racing_for_one_identity_both_get_the_run_and_it_runs_once(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # The dispatch that joined enqueued the run's job id first; the creator's enqueue_job returned None and it recorded
    # its own run failed queue.conflict, the job in Redis being that very run's (80 of 300 pairs, before).
    pairs = [(str(t["external_id"]), f"race-{i}") for i in range(40) for t in seeded["tenants"]]
    results = await asyncio.gather(*(
        dispatch(rt, EFFECT_TYPE, tenant=ref, inputs={"tag": tag}) for ref, tag in pairs for _ in range(2)))
    assert all(a.run_id == b.run_id for a, b in zip(results[::2], results[1::2], strict=True))
    assert sorted(r.verdict for r in results) == ["joined"] * len(pairs) + ["queued"] * len(pairs)
    await drain(settings)
    rows = await runs(conn)
    assert len(rows) == len(pairs)
    assert {(r["status"], r["outcome"], r["reason_code"]) for r in rows} == {("completed", "succeeded", None)}
    done = await effects(conn)
    assert sorted(e["tag"] for e in done) == sorted(tag for _, tag in pairs)


async def test_worker_lines_carry_the_tenants_id_whichever_reference_the_delivery_named(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # A raw delivery may name its tenant by external_id, in upper case, without hyphens: the lines carried that text
    # as tenant_id, which joins to nothing in operation_runs.
    t = seeded["tenants"][0]
    spelled = str(t["external_id"]).replace("-", "").upper()
    await rt.require_redis().enqueue_job(EFFECT_TYPE, tenant_id=spelled, inputs={"tag": "spelled"},
                                         _queue_name=settings.queue_name)
    with structlog.testing.capture_logs() as logs:
        await drain(settings)
    [done] = [e for e in logs if e["event"] == "run_completed"]
    [run] = await runs(conn)
    assert done["tenant_id"] == str(run["tenant_id"]) == str(t["id"])


async def test_fingerprint_with_the_job_type_is_the_one_dispatch_records(rt: Runtime, tenant: str) -> None:
    inputs = {"policy_ids": [str(uuid.uuid4()).upper()]}  # the job's model turns the UUID lower-case
    result = await dispatch(rt, "assignments.fetch", tenant=tenant, inputs=inputs)
    recorded = await rt.pool.fetchval("SELECT fingerprint FROM operation_runs WHERE id = $1", result.run_id)
    assert fingerprint(inputs, job_type="assignments.fetch") == recorded
    assert fingerprint(inputs) != recorded  # hashed as given
    with pytest.raises(InputInvalid, match=r"inputs\.policy_ids\.0"):
        fingerprint({"policy_ids": ["nope"]}, job_type="assignments.fetch")


async def test_all_items_failing_ends_failed_with_items_all_failed(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"items": 2, "fail_items": 2})
    await drain(settings)
    [run] = await runs(conn)
    assert (run["outcome"], run["reason_code"]) == ("failed", "items.all_failed")
    assert run["summary_counts"] == {"total": 2, "processed": 2, "failed": 2}



async def test_items_announced_but_not_processed_never_pass_for_done(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    cases = {  # inputs -> outcome, reason code, message, counts
        (4, 0, 2): ("partially_succeeded", "items.unprocessed", "2 of 6 announced items were not processed",
                    {"total": 6, "processed": 4, "failed": 0}),
        (4, 1, 2): ("partially_succeeded", "items.partially_failed",
                    "1 of 4 items failed; 2 of 6 announced items were not processed",
                    {"total": 6, "processed": 4, "failed": 1}),
        (0, 0, 3): ("failed", "items.unprocessed", "3 of 3 announced items were not processed",
                    {"total": 3, "processed": 0, "failed": 0}),
        (2, 2, 1): ("failed", "items.all_failed", "all 2 items failed; 1 of 3 announced items were not processed",
                    {"total": 3, "processed": 2, "failed": 2}),
        (3, 0, 0): ("succeeded", None, None, {"total": 3, "processed": 3, "failed": 0}),
    }
    run_ids = {}
    for case in cases:
        items, fail_items, unprocessed = case
        result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={
            "items": items, "fail_items": fail_items, "unprocessed": unprocessed})
        run_ids[case] = result.run_id
    await drain(settings)
    by_id = {run["id"]: run for run in await runs(conn)}
    for case, (outcome, code, message, counts) in cases.items():
        run = by_id[run_ids[case]]
        assert (run["outcome"], run["reason_code"], run["reason_message"], run["summary_counts"]) == (
            outcome, code, message, counts), case


async def test_a_cancelled_error_raised_inside_the_body_fails_the_run_once_instead_of_coming_back_for_ever(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # Taken for a worker shutdown, the run was handed back and arq ran it again at once: 30 attempts in 15 s.
    await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"inner_cancel": True, "items": 1})
    await drain(settings, timeout_s=20)
    [run] = await runs(conn)
    assert (run["status"], run["outcome"], run["reason_code"], run["attempts"]) == (
        "completed", "failed", "internal.unexpected", 1)
    assert run["reason_message"] == "CancelledError raised inside the job body"
    assert len(await effects(conn)) == 1


async def test_a_retry_due_in_days_keeps_its_job_in_redis_until_it_is_due(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # arq's job key expires a day after the job was first due, and a Retry does not renew it: a retry due in two days
    # found its job gone ("job expired") and the run, queued with nothing behind it, ended run.lost.
    two_days = 2 * 86_400
    queued = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={
        "fail_times": 1, "throttle": True, "retry_after_s": two_days})
    redis = rt.require_redis()
    assert await redis.pttl(f"arq:job:{queued.job_id}") <= 86_400_000  # as arq enqueued it
    await drain(settings, max_burst_jobs=1)
    [run] = await runs(conn)
    assert (run["status"], run["reason_code"], run["attempts"]) == ("queued", "provider.throttled", 1)
    due_ms = await redis.zscore(settings.queue_name, queued.job_id)
    now_ms = time.time() * 1000
    assert due_ms is not None and abs(due_ms - now_ms - two_days * 1000) < 60_000
    ttl_ms = await redis.pttl(f"arq:job:{queued.job_id}")
    assert ttl_ms > due_ms - now_ms + 86_000_000  # still there a day after it is due


async def test_a_raw_job_id_enqueued_again_after_its_job_ended_is_a_new_request_and_a_redelivery_is_not(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # arq takes a new job under a job id whose job has ended (a _job_id reused for uniqueness). The gate took any run
    # of that job id and identity for the job's own: every later one was already_completed, and never ran again.
    redis = rt.require_redis()
    job_id = f"{settings.queue_name}:nightly-report"  # arq's job keys are global: this test's, cleaned up with it

    async def enqueue() -> None:
        job = await redis.enqueue_job(EFFECT_TYPE, tenant_id=tenant, inputs={"tag": "nightly"},
                                      _job_id=job_id, _queue_name=settings.queue_name)
        assert job is not None  # taken: the job of that id has ended

    no_cooldown = settings.model_copy(update={"dedupe_cooldown_s": 0.0})
    await enqueue()
    saved = await redis.get(f"arq:job:{job_id}")  # the job as queued, to deliver it again below
    assert saved is not None
    await drain(no_cooldown)
    await enqueue()
    await drain(no_cooldown)
    first, second = await runs(conn)
    assert [(r["outcome"], r["job_id"]) for r in (first, second)] == [("succeeded", job_id)] * 2
    # With the type's cooldown, a third is a visible skip of its own, pointing at the run that made it redundant.
    await enqueue()
    await drain(settings)
    skipped = (await runs(conn))[2]
    assert (skipped["outcome"], skipped["reason_code"], skipped["dedupe_of"]) == (
        "skipped", "dedupe.cooldown", second["id"])
    # A redelivery of the first job (a worker died after writing its outcome, before arq's acknowledgement) is that
    # job, enqueued before its run completed: already completed, no new run, whatever the cooldown.
    await redis.set(f"arq:job:{job_id}", saved)
    await redis.zadd(settings.queue_name, {job_id: int(time.time() * 1000)})
    with structlog.testing.capture_logs() as logs:
        await drain(no_cooldown)
    assert len(await runs(conn)) == 3
    assert [e["reason_code"] for e in logs if e["event"] == "run_skipped"] == ["dedupe.already_completed"]
    assert [e["tag"] for e in await effects(conn)] == ["nightly", "nightly"]


async def test_a_body_that_swallows_its_timeout_or_raises_lease_lost_itself_still_ends_its_run_failed(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # Swallowing the cancellation its deadline sent, the body returned and the run ended succeeded; raising
    # LeaseLost while it held its lease, it wrote nothing and the run stayed running until reconcile.
    swallowed = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"sleep_s": 5, "swallow_cancel": True})
    raised = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"raise_lease_lost": True})
    await drain(settings.model_copy(update={"job_timeout_s": 0.3}))
    rows = {r["id"]: r for r in await runs(conn)}
    assert (rows[swallowed.run_id]["outcome"], rows[swallowed.run_id]["reason_code"],
            rows[swallowed.run_id]["reason_message"]) == ("failed", "job.timeout", "the job exceeded its 0.3 s timeout")
    assert (rows[raised.run_id]["status"], rows[raised.run_id]["outcome"], rows[raised.run_id]["reason_code"]) == (
        "completed", "failed", "internal.unexpected")
    assert "raised LeaseLost" in rows[raised.run_id]["reason_message"]

async def test_retry_overwrites_counts_instead_of_adding(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"items": 5, "fail_items": 1, "fail_times": 2,
                                                            "throttle": True})
    worker = await drain(settings)
    [run] = await runs(conn)
    assert (run["outcome"], run["attempts"]) == ("partially_succeeded", 3)
    assert run["summary_counts"] == {"total": 5, "processed": 5, "failed": 1}
    assert [e["attempt"] for e in await effects(conn)] == [1, 2, 3]
    assert worker.jobs_retried == 2


async def test_transient_failures_past_max_attempts_end_the_run(
    settings: Settings, conn: asyncpg.Connection, tenant: str
) -> None:
    s = settings.model_copy(update={"max_attempts": 2})
    rt = await Runtime.start(s)
    try:
        await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"fail_times": 5, "throttle": True})
        await drain(s)
    finally:
        await rt.close()
    [run] = await runs(conn)
    assert (run["outcome"], run["reason_code"], run["attempts"]) == ("failed", "provider.throttled", 2)


async def test_cooldown_skips_then_lets_a_new_run_through_and_skips_do_not_extend_it(
    settings: Settings, conn: asyncpg.Connection, tenant: str
) -> None:
    # Timed by the ledger's own clock, with seconds of slack either side: a 1.5 s window with fixed sleeps failed on
    # a VM that stalled the drain for a second (the duplicate arrived after the window and ran).
    cooldown = 4.0
    s = settings.model_copy(update={"dedupe_cooldown_s": cooldown})
    rt = await Runtime.start(s)
    ledger = rt.ledger.scoped(Scope.operator())

    async def seconds_since(at: Any) -> float:
        return float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp() - $1::timestamptz)", at))

    try:
        first = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "c"})
        await drain(s)
        executed = await ledger.get(first.run_id)
        assert executed is not None and executed.completed_at is not None
        await asyncio.sleep(2.0)  # the skip comes well after the executed run, and well inside its window
        second = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "c"})
        await drain(s)
        skipped = await ledger.get(second.run_id)
        assert skipped is not None and skipped.completed_at is not None
        assert (skipped.outcome, skipped.reason_code, skipped.dedupe_of) == ("skipped", "dedupe.cooldown",
                                                                             first.run_id)
        assert skipped.summary_counts == {"total": 0, "processed": 0, "failed": 0}
        # Past the executed run's window, inside the window the skip would have opened: the skip did not extend it.
        await asyncio.sleep(max(0.0, cooldown + 0.2 - await seconds_since(executed.completed_at)))
        third = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "c"})
        await drain(s)
        ran = await ledger.get(third.run_id)
        assert ran is not None and ran.outcome == "succeeded" and ran.started_at is not None
        assert (ran.started_at - skipped.completed_at).total_seconds() < cooldown, "ran after the skip's window too"
    finally:
        await rt.close()
    assert [e["run_id"] for e in await effects(conn, "c")] == [first.run_id, third.run_id]


async def test_cooldown_is_per_job_type_and_zero_disables_it(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    job = get_job(EFFECT_TYPE)
    job_zero = type(job)(**{**job.__dict__, "cooldown_s": 0.0})
    for i in range(2):
        await execute(rt, job_zero, run_id=None, tenant=tenant, workspace_id=None, inputs={"tag": "z"},
                      job_id=f"raw-{i}")
    assert len(await effects(conn, "z")) == 2


async def test_raw_enqueue_without_run_id_is_tracked_and_deduplicated(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    redis = rt.require_redis()
    for _ in range(3):
        await redis.enqueue_job(EFFECT_TYPE, tenant_id=tenant, inputs={"tag": "raw", "items": 1},
                                _queue_name=settings.queue_name)
    await drain(settings)
    rows = await runs(conn)
    executed = [r for r in rows if r["outcome"] == "succeeded"]
    skipped = [r for r in rows if r["outcome"] == "skipped"]
    assert len(executed) == 1 and len(skipped) == 2
    assert all(r["reason_code"] in ("dedupe.non_canonical", "dedupe.cooldown") for r in skipped)
    assert all(r["dedupe_of"] == executed[0]["id"] for r in skipped)
    assert len(await effects(conn, "raw")) == 1


async def test_redelivery_of_a_completed_run_does_nothing(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "r"})
    await drain(settings)
    before = await runs(conn)
    outcome = await execute(rt, get_job(EFFECT_TYPE), run_id=result.run_id, tenant=tenant, workspace_id=None,
                            inputs={"tag": "r"}, job_id="redelivered")
    assert outcome["reason_code"] == "dedupe.already_completed"
    assert rt.metrics["skipped:dedupe.already_completed"] == 1
    assert await runs(conn) == before
    assert len(await effects(conn, "r")) == 1


async def test_a_reenqueue_whose_stored_inputs_cannot_be_read_hands_the_run_back_and_runs_on_redelivery(
    rt: Runtime, conn: asyncpg.Connection, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery without a payload (reconcile's re-enqueue) reads the run's stored inputs after its claim. The
    database dropping that one read used to leave the run running, held by nobody, until reconcile called it
    orphaned: its work was never done. It is handed back and the redelivery runs it."""
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "ctx", "items": 2})
    read = rt.ledger.context_of
    calls: list[int] = []

    async def dropped_once(run_id: int) -> dict[str, Any]:
        calls.append(run_id)
        if len(calls) == 1:  # the fault the driver reports when the connection is cut mid-read
            raise DbUnavailable("PostgreSQL unavailable: ConnectionDoesNotExistError: connection was closed")
        return await read(run_id)

    monkeypatch.setattr(rt.ledger, "context_of", dropped_once)
    job = get_job(EFFECT_TYPE)
    with pytest.raises(Retry):
        await execute(rt, job, run_id=result.run_id, tenant=tenant, workspace_id=None, inputs=None,
                      job_id="requeued")
    [handed_back] = await runs(conn)
    assert (handed_back["status"], handed_back["lease_owner"], handed_back["reason_code"]) == (
        "queued", None, "db.unavailable")
    assert await effects(conn, "ctx") == []

    outcome = await execute(rt, job, run_id=result.run_id, tenant=tenant, workspace_id=None, inputs=None,
                            job_id="requeued", job_try=2)
    assert outcome["outcome"] == "succeeded"
    [run] = await runs(conn)
    assert (run["status"], run["outcome"], run["summary_counts"]) == (
        "completed", "succeeded", {"total": 2, "processed": 2, "failed": 0})
    assert len(await effects(conn, "ctx")) == 1 and calls == [result.run_id] * 2


async def _hold_lease(rt: Runtime, run_id: int, tenant: str, owner: uuid.UUID, ttl: float) -> str:
    claim = await rt.ledger.claim(
        run_id=run_id, tenant=tenant, workspace_id=None, run_type=EFFECT_TYPE, fingerprint=None, context=None,
        job_id="holder", queue_name="q", lease_owner=owner, cooldown_s=900, lease_ttl_s=ttl)
    return claim.decision


async def test_overlap_with_a_live_lease_defers_until_it_could_be_stale_then_takes_over(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "o", "items": 2})
    assert await _hold_lease(rt, result.run_id, tenant, uuid.uuid4(), settings.lease_ttl_s) == "claimed"
    job = get_job(EFFECT_TYPE)
    with pytest.raises(Retry) as deferred:
        await execute(rt, job, run_id=result.run_id, tenant=tenant, workspace_id=None,
                      inputs={"tag": "o", "items": 2}, job_id="second")
    defer_s = (deferred.value.defer_score or 0) / 1000
    assert settings.lease_ttl_s - 1 < defer_s < settings.lease_ttl_s + 1
    assert len(await effects(conn, "o")) == 0
    # The holder dies (no heartbeat): once the lease is stale the next delivery takes the run over.
    await conn.execute("UPDATE operation_runs SET heartbeat_at = now() - interval '1 hour' WHERE id = $1",
                       result.run_id)
    outcome = await execute(rt, job, run_id=result.run_id, tenant=tenant, workspace_id=None,
                            inputs={"tag": "o", "items": 2}, job_id="third")
    assert outcome["outcome"] == "succeeded"
    [run] = await runs(conn)
    assert run["attempts"] == 2 and run["summary_counts"] == {"total": 2, "processed": 2, "failed": 0}


async def test_a_delivery_whose_lease_was_taken_over_writes_nothing(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "f"})
    old, new = uuid.uuid4(), uuid.uuid4()
    assert await _hold_lease(rt, result.run_id, tenant, old, 60) == "claimed"
    await conn.execute("UPDATE operation_runs SET heartbeat_at = now() - interval '2 minutes'")
    assert await _hold_lease(rt, result.run_id, tenant, new, 60) == "taken_over"
    assert await rt.ledger.heartbeat([(result.run_id, old)]) == set()
    assert not await rt.gate.complete(result.run_id, old, outcome="succeeded",
                                      counts={"total": 9, "processed": 9, "failed": 0},
                                      reason_code=None, reason_message=None)
    assert not await rt.ledger.release(result.run_id, old, reason_code="x", reason_message="y")
    [run] = await runs(conn)
    assert (run["status"], run["lease_owner"], run["attempts"], run["summary_counts"]) == ("running", new, 2, None)
    assert await rt.ledger.heartbeat([(result.run_id, new)]) == {(result.run_id, new)}


async def test_lease_keeper_cancels_a_body_whose_lease_was_taken_over(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "k", "sleep_s": 30})
    job = get_job(EFFECT_TYPE)
    task = asyncio.create_task(execute(rt, job, run_id=result.run_id, tenant=tenant, workspace_id=None,
                                       inputs={"tag": "k", "sleep_s": 30}, job_id="a"))

    async def started() -> bool:
        return bool(await effects(conn, "k"))

    from tests.conftest import wait_until
    await wait_until(started)
    await conn.execute("UPDATE operation_runs SET lease_owner = gen_random_uuid()")  # someone took it over
    await rt.leases.beat()
    outcome = await asyncio.wait_for(task, 5)
    assert outcome["decision"] == "lease_lost"
    [run] = await runs(conn)
    assert run["status"] == "running" and run["summary_counts"] is None


async def test_the_lease_keeper_tells_a_stale_delivery_from_its_takeover_in_the_same_process(
    rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "same"})
    stale, current = uuid.uuid4(), uuid.uuid4()
    await conn.execute("UPDATE operation_runs SET status = 'running', attempts = 2, lease_owner = $2, "
                       "heartbeat_at = now() WHERE id = $1", result.run_id, current)
    held = [rt.leases.hold(result.run_id, stale), rt.leases.hold(result.run_id, current)]
    try:
        await rt.leases.beat()
        assert [lease.lost for lease in held] == [True, False]
    finally:
        for lease in held:
            rt.leases.drop(lease)
    assert rt.leases.leases == {}


async def test_a_body_that_lost_its_lease_has_its_fenced_writes_refused_and_writes_nothing_more(
    rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    result = await dispatch(rt, FENCED_TYPE, tenant=tenant, inputs={"tag": "z"})
    FENCED_PAUSES["z"] = pause = asyncio.Event()
    try:
        zombie = asyncio.create_task(execute(rt, get_job(FENCED_TYPE), run_id=result.run_id, tenant=tenant,
                                             workspace_id=None, inputs={"tag": "z"}, job_id=result.job_id))

        async def paused() -> bool:
            return bool(await effects(conn, "z:before"))

        from tests.conftest import wait_until
        await wait_until(paused)
        # While it waits, its lease goes stale and another delivery takes the run over (what the gate writes).
        new_owner = uuid.uuid4()
        await conn.execute("UPDATE operation_runs SET lease_owner = $2, attempts = attempts + 1, heartbeat_at = now()"
                           " WHERE id = $1", result.run_id, new_owner)
        pause.set()
        outcome = await asyncio.wait_for(zombie, 5)
    finally:
        FENCED_PAUSES.pop("z", None)
    assert (outcome["decision"], outcome["reason_code"]) == ("lease_lost", "dedupe.overlap")
    assert [e["tag"] for e in await effects(conn)] == ["z:before"]  # the write after the takeover was refused
    [run] = await runs(conn)
    assert (run["status"], run["lease_owner"], run["summary_counts"]) == ("running", new_owner, None)
    # The delivery that holds the lease writes through the same fence.
    holder = RunContext(result.run_id, FENCED_TYPE, run["workspace_id"], run["tenant_id"], 2, {}, Counts(), rt,
                        result.job_id, None, lease_owner=new_owner)
    assert await holder.fenced(
        "INSERT INTO test_effects (run_id, attempt, tag, pid) VALUES ($1, 2, 'holder', 0)", result.run_id) == (
        "INSERT 0 1")


async def test_a_fenced_write_holds_off_a_takeover_until_it_commits(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    result = await dispatch(rt, FENCED_TYPE, tenant=tenant, inputs={"tag": "h"})
    owner = uuid.uuid4()
    # A running run whose lease has gone stale: a redelivery's claim takes it over.
    await conn.execute("UPDATE operation_runs SET status = 'running', attempts = 1, lease_owner = $2, "
                       "heartbeat_at = now() - interval '1 hour' WHERE id = $1", result.run_id, owner)
    [row] = await runs(conn)
    run = RunContext(result.run_id, FENCED_TYPE, row["workspace_id"], row["tenant_id"], 1, {}, Counts(), rt,
                     result.job_id, None, lease_owner=owner)
    # A slow fenced write (it sleeps inside its transaction); the takeover's claim comes while it runs.
    write = asyncio.create_task(run.fenced(
        "INSERT INTO test_effects (run_id, attempt, tag, pid) SELECT $1, 1, 'slow', (SELECT 0 FROM pg_sleep(1.5))",
        result.run_id))
    takeover = await asyncpg.connect(dsn=settings.database_url.get_secret_value().replace("+asyncpg", ""))
    try:
        async def sleeping() -> bool:
            return bool(await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO test_effects%pg_sleep%'"
                " AND state = 'active'"))

        from tests.conftest import wait_until
        await wait_until(sleeping, timeout_s=1.0, interval_s=0.01)
        taking_over = asyncio.create_task(takeover.fetchrow(
            "SELECT decision FROM opspolish_claim($1, $2, NULL, $3, NULL, NULL, $4, 'q', $5, 900, 5, NULL)",
            result.run_id, str(row["tenant_id"]), FENCED_TYPE, result.job_id, uuid.uuid4()))

        async def blocked() -> bool:
            return bool(await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%opspolish_claim%'"
                " AND wait_event_type = 'Lock'"))

        await wait_until(blocked, timeout_s=1.0, interval_s=0.01)  # it waits for the fenced write's row lock
        assert not write.done()
        claimed = await taking_over
        assert await write == "INSERT 0 1" and claimed is not None and claimed["decision"] == "taken_over"
    finally:
        await takeover.close()
    with pytest.raises(LeaseLost):
        await run.fenced("INSERT INTO test_effects (run_id, attempt, tag, pid) VALUES ($1, 1, 'late', 0)",
                         result.run_id)
    assert [e["tag"] for e in await effects(conn)] == ["slow"]



async def test_a_takeover_that_meets_a_fresh_heartbeat_under_the_row_lock_leaves_the_live_lease_alone(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # The claim read a stale lease, then waited for the row while the lease's heartbeat committed: v3 took the live
    # lease over anyway (its UPDATE checked only the id), and two deliveries ran the body at once.
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "live"})
    owner = uuid.uuid4()
    await conn.execute("UPDATE operation_runs SET status = 'running', attempts = 1, lease_owner = $2, "
                       "heartbeat_at = now() - interval '1 hour' WHERE id = $1", result.run_id, owner)
    tenant_id = str(await conn.fetchval("SELECT tenant_id FROM operation_runs WHERE id = $1", result.run_id))
    dsn = settings.database_url.get_secret_value().replace("+asyncpg", "")
    keeper, claimer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        beat = keeper.transaction()
        await beat.start()
        await keeper.execute("UPDATE operation_runs SET heartbeat_at = now() WHERE id = $1", result.run_id)
        claim = asyncio.create_task(claimer.fetchrow(
            "SELECT decision FROM opspolish_claim($1, $2, NULL, $3, NULL, NULL, $4, 'q', $5, 900, 5, NULL)",
            result.run_id, tenant_id, EFFECT_TYPE, result.job_id, uuid.uuid4()))

        async def waiting() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                            "'%opspolish_claim%' AND wait_event_type = 'Lock'"))

        await wait_until(waiting, timeout_s=5, interval_s=0.01)
        await beat.commit()
        decided = await asyncio.wait_for(claim, 5)
    finally:
        await keeper.close()
        await claimer.close()
    assert decided is not None and decided["decision"] == "busy"
    assert await conn.fetchval("SELECT lease_owner FROM operation_runs WHERE id = $1", result.run_id) == owner

async def test_a_live_lease_whose_row_an_operator_holds_locked_past_the_ttl_is_not_taken_over(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # The keeper skips a locked row (it never waits), so the row's heartbeat_at aged while its worker beat on: v4 saw
    # a stale lease, a redelivery waited for the lock and took the live run over, and two bodies ran at once.
    results = [await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": t}) for t in ("before", "during", "dead")]
    owners = [uuid.uuid4() for _ in results]
    for result, owner in zip(results, owners, strict=True):
        await conn.execute("UPDATE operation_runs SET status = 'running', attempts = 1, lease_owner = $2, "
                           "heartbeat_at = now() - interval '1 hour' WHERE id = $1", result.run_id, owner)
    tenant_id = str(await conn.fetchval("SELECT tenant_id FROM operation_runs WHERE id = $1", results[0].run_id))
    dsn = settings.database_url.get_secret_value().replace("+asyncpg", "")
    operator, claimer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)

    async def claim(i: int) -> asyncpg.Record | None:
        return await claimer.fetchrow(
            "SELECT decision FROM opspolish_claim($1, $2, NULL, $3, NULL, NULL, $4, 'q', $5, 900, 5, NULL)",
            results[i].run_id, tenant_id, EFFECT_TYPE, results[i].job_id, uuid.uuid4())

    async def waiting() -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                        "'%opspolish_claim%' AND wait_event_type = 'Lock'"))

    try:
        held = operator.transaction()
        await held.start()
        await operator.execute("SELECT 1 FROM operation_runs WHERE id = ANY($1::bigint[]) FOR SHARE",
                               [r.run_id for r in results])
        # 1. Beaten (beside the locked row) before the redelivery comes: it is deferred at once, like any live lease.
        assert await rt.ledger.heartbeat([(results[0].run_id, owners[0])]) == {(results[0].run_id, owners[0])}
        before = await asyncio.wait_for(claim(0), 5)
        # 2. The redelivery reads a stale row and waits for the lock; the beat lands meanwhile: it is answered busy.
        during = asyncio.create_task(claim(1))
        await wait_until(waiting, timeout_s=5, interval_s=0.01)
        assert await rt.ledger.heartbeat([(results[1].run_id, owners[1])]) == {(results[1].run_id, owners[1])}
        await held.commit()
        during_decided = await asyncio.wait_for(during, 5)
        # 3. A side beat older than the TTL is no sign of life: a dead worker's run is still taken over.
        await conn.execute("UPDATE operation_run_beats SET beat_at = now() - interval '1 hour' WHERE run_id = $1",
                           results[1].run_id)
        await conn.execute("INSERT INTO operation_run_beats (run_id, lease_owner, beat_at) "
                           "VALUES ($1, $2, now() - interval '1 hour')", results[2].run_id, owners[2])
        dead = await asyncio.wait_for(claim(2), 5)
    finally:
        await operator.close()
        await claimer.close()
    assert before is not None and before["decision"] == "overlap"
    assert during_decided is not None and during_decided["decision"] == "busy"
    assert dead is not None and dead["decision"] == "taken_over"
    owner_now = {r["id"]: r["lease_owner"] for r in await conn.fetch("SELECT id, lease_owner FROM operation_runs")}
    assert (owner_now[results[0].run_id], owner_now[results[1].run_id]) == (owners[0], owners[1])
    # Reconcile does not call the live ones orphaned either.
    scoped = rt.ledger.scoped(Scope(workspace_id=await conn.fetchval(
        "SELECT workspace_id FROM operation_runs WHERE id = $1", results[0].run_id)))
    await conn.execute("UPDATE operation_run_beats SET beat_at = now() WHERE run_id = $1", results[1].run_id)
    assert not await scoped.settle_orphaned(results[1].run_id, lease_ttl_s=5, message="stale")
    # The next beat that reaches the row itself drops its side beat.
    assert await rt.ledger.heartbeat([(results[0].run_id, owners[0])]) == {(results[0].run_id, owners[0])}
    assert not await conn.fetchval("SELECT count(*) FROM operation_run_beats WHERE run_id = $1", results[0].run_id)


async def test_heartbeats_go_on_beside_a_fenced_write_and_a_row_someone_holds(
    rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # A fenced write (FOR SHARE then) or an operator's lock on one run held up the beat of every lease of the worker:
    # their heartbeats aged past the TTL, and a redelivery could take a live run over.
    runs_held = []
    for tag in ("fenced", "locked", "free"):
        result = await dispatch(rt, FENCED_TYPE, tenant=tenant, inputs={"tag": tag})
        owner = uuid.uuid4()
        await conn.execute("UPDATE operation_runs SET status = 'running', attempts = 1, lease_owner = $2, "
                           "heartbeat_at = now() - interval '10 seconds' WHERE id = $1", result.run_id, owner)
        runs_held.append((result.run_id, owner))
    [row, *_] = await runs(conn)
    fenced = RunContext(runs_held[0][0], FENCED_TYPE, row["workspace_id"], row["tenant_id"], 1, {}, Counts(), rt,
                        "job", None, lease_owner=runs_held[0][1])
    write = asyncio.create_task(fenced.fenced("SELECT pg_sleep(2)"))
    operator = await asyncpg.connect(dsn=rt.settings.database_url.get_secret_value().replace("+asyncpg", ""))
    try:
        async with operator.transaction():
            await operator.execute("SELECT 1 FROM operation_runs WHERE id = $1 FOR UPDATE", runs_held[1][0])
            await asyncio.sleep(0.3)  # the fenced write holds its row
            started = time.monotonic()
            alive = await asyncio.wait_for(rt.ledger.heartbeat(runs_held), 5)  # it waited for the lock: for ever
            took = time.monotonic() - started
            assert not write.done()
        assert took < 1.0 and alive == set(runs_held)  # the locked run counted held this beat; nothing waited
        ages: dict[int, float] = {r[0]: float(r[1]) for r in await conn.fetch(
            "SELECT id, extract(epoch FROM now() - heartbeat_at) FROM operation_runs ORDER BY id")}
        assert ages[runs_held[0][0]] < 2 and ages[runs_held[2][0]] < 2  # beaten, the fenced one too
        assert ages[runs_held[1][0]] > 9  # skipped, not waited for
    finally:
        await operator.close()
    assert await write == "SELECT 1"


async def test_the_lease_keeper_outlives_a_beat_the_database_refuses(
    rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # Any refusal other than a lost connection (a statement_timeout, a deadlock; a trigger here) ended the keeper
    # for good: no beat again, every lease of the worker going stale, and nothing logged.
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "kept"})
    owner = uuid.uuid4()
    await conn.execute("UPDATE operation_runs SET status = 'running', attempts = 1, lease_owner = $2, "
                       "heartbeat_at = now() - interval '10 seconds' WHERE id = $1", result.run_id, owner)
    await conn.execute("""
        CREATE FUNCTION test_refuse_beats() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'beats refused for this test'; END $$;
        CREATE TRIGGER test_refuse_beats BEFORE UPDATE OF heartbeat_at ON operation_runs
        FOR EACH ROW EXECUTE FUNCTION test_refuse_beats();""")
    lease = rt.leases.hold(result.run_id, owner)
    rt.leases.start()
    try:
        with structlog.testing.capture_logs() as logs:
            await wait_until_logged(logs, "heartbeat_failed")
        [failed] = [e for e in logs if e["event"] == "heartbeat_failed"][:1]
        assert failed["reason_code"] == "internal.unexpected" and "beats refused" in failed["message"]
        await conn.execute("DROP TRIGGER test_refuse_beats ON operation_runs")

        async def beaten() -> bool:
            age = await conn.fetchval("SELECT extract(epoch FROM now() - heartbeat_at) FROM operation_runs "
                                      "WHERE id = $1", result.run_id)
            return bool(age < 2)

        await wait_until(beaten, timeout_s=10)
        assert not lease.lost
    finally:
        await conn.execute("DROP TRIGGER IF EXISTS test_refuse_beats ON operation_runs")
        rt.leases.drop(lease)
        with contextlib.suppress(Exception):  # a keeper that died re-raises its error here
            await rt.leases.stop()


async def wait_until_logged(logs: list[MutableMapping[str, Any]], event: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(e["event"] == event for e in logs):
        assert time.monotonic() < deadline, f"no {event} within {timeout_s} s"
        await asyncio.sleep(0.05)


async def test_a_run_id_delivery_carrying_other_inputs_than_its_runs_runs_nothing(
    rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "mine", "items": 2})
    before = await runs(conn)
    job = get_job(EFFECT_TYPE)
    forged = await execute(rt, job, run_id=result.run_id, tenant=tenant, workspace_id=None,
                           inputs={"tag": "theirs", "items": 2}, job_id=result.job_id)
    assert (forged["decision"], forged["reason_code"]) == ("inputs_mismatch", "input.invalid")
    assert await runs(conn) == before and await effects(conn) == []  # the run waits for its own delivery
    # The same inputs spelled another way (key order, 2.0 for 2) are the run's: it runs.
    own = await execute(rt, job, run_id=result.run_id, tenant=tenant, workspace_id=None,
                        inputs={"items": 2.0, "tag": "mine"}, job_id=result.job_id)
    assert own["outcome"] == "succeeded" and [e["tag"] for e in await effects(conn)] == ["mine"]


async def test_lock_contention_ending_in_rollback_does_not_lose_the_work(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "l"})
    identity = await conn.fetchval("SELECT run_identity_hash FROM operation_runs WHERE id = $1", result.run_id)
    holder = await asyncpg.connect(dsn=settings.database_url.get_secret_value().replace("+asyncpg", ""))
    try:
        tx = holder.transaction()
        await tx.start()
        assert await holder.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock_key(identity))
        with pytest.raises(Retry):
            await execute(rt, get_job(EFFECT_TYPE), run_id=result.run_id, tenant=tenant, workspace_id=None,
                          inputs={"tag": "l"}, job_id="busy")
        assert rt.metrics["deferred:busy"] == 1
        await tx.rollback()
    finally:
        await holder.close()
    await drain(settings)  # the queued arq job runs now that the lock is free
    [run] = await runs(conn)
    assert run["outcome"] == "succeeded" and len(await effects(conn, "l")) == 1


async def test_timeout_is_recorded_as_job_timeout(
    settings: Settings, conn: asyncpg.Connection, tenant: str
) -> None:
    s = settings.model_copy(update={"job_timeout_s": 0.3})
    rt = await Runtime.start(s)
    try:
        await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"sleep_s": 5, "items": 3})
        await drain(s)
    finally:
        await rt.close()
    [run] = await runs(conn)
    assert (run["outcome"], run["reason_code"]) == ("failed", "job.timeout")
    assert run["summary_counts"] == {"total": 3, "processed": 3, "failed": 0}


async def test_unexpected_errors_end_failed_with_a_sanitized_message(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"crash": True})
    await drain(settings)
    [run] = await runs(conn)
    assert (run["outcome"], run["reason_code"]) == ("failed", "internal.unexpected")
    assert "RuntimeError" in run["reason_message"]
    assert "s3cret" not in run["reason_message"] and "abc123def" not in run["reason_message"]
    assert "\n" not in run["reason_message"] and "Traceback" not in run["reason_message"]


async def test_worker_shutdown_hands_the_run_back_and_the_next_worker_finishes_it(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    from tests.conftest import make_worker, wait_until

    await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "s", "sleep_s": 30, "sleep_attempts": 1})
    worker = make_worker(settings, burst=False)
    task = asyncio.create_task(worker.main())

    async def started() -> bool:
        return bool(await effects(conn, "s"))

    await wait_until(started)
    task.cancel()  # what arq does to running jobs on shutdown
    with pytest.raises(asyncio.CancelledError):
        await task
    await worker.close()
    [run] = await runs(conn)
    assert (run["status"], run["reason_code"], run["lease_owner"]) == ("queued", "job.cancelled", None)
    await drain(settings)
    [run] = await runs(conn)
    assert (run["outcome"], run["attempts"]) == ("succeeded", 2)


async def test_tenant_scope_cannot_see_or_touch_another_tenants_runs(
    rt: Runtime, seeded: dict[str, Any]
) -> None:
    a, b = seeded["tenants"][0], seeded["tenants"][1]
    run_b = await dispatch(rt, EFFECT_TYPE, tenant=b["external_id"], inputs={})
    scope_a = rt.ledger.scoped(Scope(a["workspace_id"], a["id"]))
    assert await scope_a.get(run_b.run_id) is None
    assert await scope_a.list_runs() == []
    assert not await scope_a.update_context(run_b.run_id, {"x": 1})
    claim = await scope_a.claim(run_b.run_id, run_type=EFFECT_TYPE, job_id="j", queue_name="q",
                                lease_owner=uuid.uuid4(), cooldown_s=0, lease_ttl_s=60)
    assert claim.decision == "run_not_found"
    other_ws = next(t for t in seeded["tenants"] if t["workspace_id"] != b["workspace_id"])
    scope_ws = rt.ledger.scoped(Scope(other_ws["workspace_id"]))
    assert await scope_ws.get(run_b.run_id) is None
    scope_b = rt.ledger.scoped(Scope(b["workspace_id"], b["id"]))
    assert [r.id for r in await scope_b.list_runs()] == [run_b.run_id]
    # Its own scope writes it, held to the inputs' rules: the ledger's context never holds a secret (stored as given).
    assert await scope_b.update_context(run_b.run_id, {"password": "cnryCtx1", "src": "postgres://a:cnryCtx2@h/db"})
    written = await scope_b.get(run_b.run_id)
    assert written is not None and written.context == {"src": "postgres://a:[redacted]@h/db"}


async def test_a_busy_lock_still_records_skips_that_committed_facts_decide_but_never_claims(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    job = get_job(EFFECT_TYPE)
    identity = identity_hash(f"tenant:{await conn.fetchval('SELECT id FROM tenants WHERE external_id = $1', tenant)}",
                             EFFECT_TYPE, fingerprint({"tag": "busy"}))
    holder = await asyncpg.connect(dsn=settings.database_url.get_secret_value().replace("+asyncpg", ""))
    try:
        tx = holder.transaction()
        await tx.start()
        assert await holder.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock_key(identity))
        with structlog.testing.capture_logs() as events, pytest.raises(Retry):
            # nothing decided yet: the delivery is deferred and nothing is written
            await execute(rt, job, run_id=None, tenant=tenant, workspace_id=None, inputs={"tag": "busy"},
                          job_id="raw-1")
        assert await runs(conn) == []
        [deferred] = [e for e in events if e["event"] == "run_deferred"]  # a debug line, so a storm stays quiet
        assert (deferred["log_level"], deferred["decision"], deferred["job_id"]) == ("debug", "busy", "raw-1")
        assert 0 < deferred["defer_s"] < 1
        active = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "busy"})  # an active run now
        outcome = await execute(rt, job, run_id=None, tenant=tenant, workspace_id=None, inputs={"tag": "busy"},
                                job_id="raw-2")
        assert (outcome["reason_code"], outcome["dedupe_of"]) == ("dedupe.non_canonical", active.run_id)
        with pytest.raises(Retry):  # the active run itself is only ever claimed under the lock
            await execute(rt, job, run_id=active.run_id, tenant=tenant, workspace_id=None,
                          inputs={"tag": "busy"}, job_id=active.job_id)
        await tx.rollback()
    finally:
        await holder.close()
    rows = await runs(conn)
    assert [(r["status"], r["outcome"]) for r in rows] == [("queued", "pending"), ("completed", "skipped")]
    assert len(await effects(conn, "busy")) == 0
