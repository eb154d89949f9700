"""A worker's Postgres backends terminated (``pg_terminate_backend``, only in the test's own database) during
the body and during the completion write: the run ends consistently - retried, or failed with
``db.unavailable`` - and is never half-written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog.testing

import opspolish
from opspolish.jobs.assignments import FETCH_TYPE
from opspolish.jobs.reconcile import reconcile_all
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from tests.conftest import WorkerProcess, drain, log_events, wait_until
from tests.reliability.faults import (
    ReplyCutter,
    assert_ledger_settled,
    assert_never_concurrent,
    effects,
    run_rows,
    terminate_backends,
)
from tests.support.jobs import ECHO_TYPE, EFFECT_TYPE

pytestmark = pytest.mark.timeout(90)

_COMPLETION_WRITE = "%UPDATE operation_runs%SET status = 'completed'%"


async def _cut_when_blocked_on_the_row(conn: asyncpg.Connection, run_id: int, query_like: str) -> None:
    """Hold the run's row so the worker's statement like ``query_like`` blocks where it can be seen, then terminate
    its backend (and let the row go)."""
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("SELECT 1 FROM operation_runs WHERE id = $1 FOR UPDATE", run_id)

        async def blocked() -> list[int]:
            return await terminate_backends(conn, query_like=query_like, waiting_on_lock=True)

        assert await wait_until(blocked, timeout_s=20), f"no statement like {query_like!r} blocked on the row"
    finally:
        await tx.rollback()


async def test_backends_terminated_during_the_body_do_not_break_the_run(
    settings: Settings, conn: asyncpg.Connection, tenant: str, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    s = settings.model_copy(update={"lease_ttl_s": 1.5})  # a heartbeat every 0.5 s, so some are cut off
    async with opspolish.connect(s) as rt:
        run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant,
                                       inputs={"tag": "body", "sleep_s": 5, "items": 4, "fail_items": 1})
    worker = WorkerProcess(s, burst=True, log_path=tmp_path / "w.log")
    worker_processes.append(worker)

    async def started() -> bool:
        return bool(await effects(conn, "body"))

    await wait_until(started)
    # Every idle pool connection of the worker, then the heartbeat's (the one whose last statement was a beat).
    assert await terminate_backends(conn), "no worker backend was terminated: the fault was not injected"

    async def heartbeat_cut() -> list[int]:
        return await terminate_backends(conn, query_like="%SET heartbeat_at = now()%")

    assert await wait_until(heartbeat_cut, timeout_s=5)
    # The run's row locked by someone else for a while: the beats skip it rather than wait (they waited, and held
    # up every lease of the worker).
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("SELECT 1 FROM operation_runs WHERE id = $1 FOR UPDATE", run.run_id)
        for _ in range(10):
            await asyncio.sleep(0.1)
            assert not await terminate_backends(conn, query_like="%SET heartbeat_at = now()%",
                                                waiting_on_lock=True), "a heartbeat waited for the row lock"
    finally:
        await tx.rollback()
    faults_over = await conn.fetchval("SELECT clock_timestamp()")

    async def heartbeat_resumed() -> bool:  # the lease keeper survived the lost connections
        return bool(await conn.fetchval(
            "SELECT status = 'running' AND heartbeat_at > $1 FROM operation_runs", faults_over))

    await wait_until(heartbeat_resumed, timeout_s=2)
    assert await worker.wait(60) == 0, worker.log()[-3000:]

    [row] = await assert_ledger_settled(conn)
    assert (row["outcome"], row["reason_code"]) == ("partially_succeeded", "items.partially_failed")
    assert row["summary_counts"] == {"total": 4, "processed": 4, "failed": 1}
    executions = await effects(conn, "body")
    assert_never_concurrent(executions)
    assert executions[-1]["attempt"] == row["attempts"] and executions[-1]["finished_at"] is not None


async def test_backend_terminated_during_the_completion_write_is_written_again_by_the_same_delivery(
    settings: Settings, conn: asyncpg.Connection, tenant: str, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    s = settings.model_copy(update={"lease_ttl_s": 1.5})
    async with opspolish.connect(s) as rt:
        run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={
            "tag": "write", "sleep_s": 0.5, "sleep_attempts": 1, "attempt_items": [3, 7]})
    worker = WorkerProcess(s, burst=True, log_path=tmp_path / "w.log")
    worker_processes.append(worker)

    async def started() -> bool:
        return bool(await effects(conn, "write"))

    await wait_until(started)
    await _cut_when_blocked_on_the_row(conn, run.run_id, _COMPLETION_WRITE)
    # Written again by the delivery whose write was cut, with its own counts: left to a redelivery, the body ran a
    # second time (and on a run's last allowed attempt, the takeover ended it run.orphaned, its body finished).
    assert await worker.wait(60) == 0, worker.log()[-3000:]
    [row] = await assert_ledger_settled(conn)
    assert (row["outcome"], row["attempts"]) == ("succeeded", 1)
    assert row["summary_counts"] == {"total": 3, "processed": 3, "failed": 0}
    executions = await effects(conn, "write")
    assert [(e["attempt"], e["finished_at"] is not None) for e in executions] == [(1, True)]
    assert_never_concurrent(executions)
    events = [e for e in log_events([worker]) if e.get("run_id") == run.run_id]
    assert any(e["event"] == "run_completion_failed" and e["reason_code"] == "db.unavailable" for e in events)


async def test_a_bodys_own_query_on_a_terminated_backend_is_retried_as_db_unavailable(
    settings: Settings, conn: asyncpg.Connection, tenant: str, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    # The body's own statement on the runtime's pool (run.runtime.pool) met its backend terminated: the run ended
    # failed / internal.unexpected for good ("ConnectionDoesNotExistError"), where the library's own statements
    # meeting the same retry it as db.unavailable.
    async with opspolish.connect(settings) as rt:
        run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={
            "tag": "raw", "db_sleep_s": 30, "sleep_attempts": 1})
    worker = WorkerProcess(settings, burst=True, log_path=tmp_path / "w.log")
    worker_processes.append(worker)

    async def sleeping() -> list[int]:
        return await terminate_backends(conn, query_like="SELECT pg_sleep(%")

    assert await wait_until(sleeping, timeout_s=20), "the body's query was never seen, so never cut"
    assert await worker.wait(60) == 0, worker.log()[-3000:]
    [row] = await assert_ledger_settled(conn)
    assert (row["outcome"], row["attempts"]) == ("succeeded", 2), row
    executions = await effects(conn, "raw")
    assert [(e["attempt"], e["finished_at"] is not None) for e in executions] == [(1, False), (2, True)]
    events = [e for e in log_events([worker]) if e.get("run_id") == run.run_id and e["event"] == "run_retrying"]
    assert [e["reason_code"] for e in events] == ["db.unavailable"], events


async def test_backend_terminated_while_handing_a_run_back_for_its_retry_is_logged_and_the_retry_ends_it(
    settings: Settings, conn: asyncpg.Connection, tenant: str, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    s = settings.model_copy(update={"lease_ttl_s": 1.5})
    async with opspolish.connect(s) as rt:
        run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={
            "tag": "release", "fail_times": 1, "sleep_s": 1, "sleep_attempts": 1})
    worker = WorkerProcess(s, burst=True, log_path=tmp_path / "w.log")
    worker_processes.append(worker)

    async def started() -> bool:
        return bool(await effects(conn, "release"))

    await wait_until(started)
    await _cut_when_blocked_on_the_row(conn, run.run_id, "%SET status = 'queued', lease_owner = NULL%")
    assert await worker.wait(60) == 0, worker.log()[-3000:]
    [row] = await assert_ledger_settled(conn)
    assert (row["outcome"], row["attempts"]) == ("succeeded", 2)
    events = [e for e in log_events([worker]) if e.get("run_id") == run.run_id]
    [failed] = [e for e in events if e["event"] == "run_release_failed"]
    assert (failed["reason_code"], failed["error_code"], failed["attempt"]) == (
        "db.unavailable", "provider.unavailable", 1), failed
    assert "hunter2" not in worker.log()


@pytest.mark.parametrize(("max_attempts", "outcome"), [(1, "failed"), (2, "succeeded")])
async def test_backend_terminated_during_a_body_query_ends_retried_or_failed_with_db_unavailable(
    settings: Settings, conn: asyncpg.Connection, tenant: str, tmp_path: Path,
    worker_processes: list[WorkerProcess], max_attempts: int, outcome: str,
) -> None:
    policies = await conn.fetchval("SELECT count(*) FROM directory_policies p JOIN tenants t ON t.id = p.tenant_id "
                                   "WHERE t.external_id = $1", tenant)
    assert policies > 0
    async with opspolish.connect(settings) as rt:
        run = await opspolish.dispatch(rt, FETCH_TYPE, tenant=tenant, inputs={})
    tx = conn.transaction()
    await tx.start()
    try:
        # The fetch body's first write (replacing any earlier snapshot) waits on this lock; then it is cut off.
        await conn.execute("LOCK TABLE assignment_snapshots IN ACCESS EXCLUSIVE MODE")
        worker = WorkerProcess(settings, burst=True, log_path=tmp_path / "w.log",
                               OPSPOLISH_MAX_ATTEMPTS=str(max_attempts))
        worker_processes.append(worker)

        async def body_query_blocked() -> list[int]:
            return await terminate_backends(conn, query_like="%assignment_snapshots%", waiting_on_lock=True)

        assert await wait_until(body_query_blocked, timeout_s=30)
    finally:
        await tx.rollback()
    assert await worker.wait(60) == 0, worker.log()[-3000:]

    [row] = await assert_ledger_settled(conn)
    snapshot = await conn.fetchval("SELECT count(*) FROM assignment_snapshots WHERE run_id = $1", run.run_id)
    if outcome == "failed":
        assert (row["outcome"], row["reason_code"], row["attempts"]) == ("failed", "db.unavailable", 1)
        assert row["summary_counts"] == {"total": policies, "processed": 0, "failed": 0}
        assert "\n" not in row["reason_message"] and snapshot == 0
    else:
        assert (row["outcome"], row["reason_code"], row["attempts"]) == ("succeeded", None, 2)
        assert row["summary_counts"] == {"total": policies, "processed": policies, "failed": 0}
        assert snapshot == policies  # one snapshot, the final attempt's: nothing doubled


async def test_a_pooled_connection_whose_backend_was_just_terminated_is_db_unavailable_never_a_raw_driver_error(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    # Between the server's "terminating connection" message and the socket's close, asyncpg raised
    # InternalClientError ("cannot switch to state ..."), which nothing translated: a claim's delivery failed in arq
    # (its job deleted, the run left queued with nothing behind it) instead of being retried as db.unavailable.
    from opspolish import db
    from opspolish.errors import DbUnavailable
    from opspolish.ledger import translate_errors

    pool = await db.create_pool(settings, min_size=1, max_size=1)
    seen: set[str] = set()
    try:
        for i in range(60):
            async with pool.acquire() as held:
                pid = held.get_server_pid()
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep((i % 5) / 1000)
            try:
                async with translate_errors():
                    await pool.fetchval("SELECT 1")
                seen.add("answered")
            except DbUnavailable as exc:
                seen.add(type(exc.__cause__).__name__)
    finally:
        await pool.close()
    assert seen - {"answered"}, seen  # the race was met at least once


@pytest.fixture
async def cutter(settings: Settings) -> AsyncIterator[ReplyCutter]:
    proxy = ReplyCutter(settings)
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.mark.parametrize("dispatched", [True, False], ids=["dispatched", "raw"])
async def test_a_claim_whose_answer_was_lost_is_undone_and_runs_at_once_on_its_one_attempt(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str, cutter: ReplyCutter, dispatched: bool,
) -> None:
    # The claim committed and its answer was lost with the connection: the run sat running under a lease nobody
    # held, the retry waited out the TTL to take it over, and that counted a second attempt for a body that never
    # ran. With max_attempts=1 the run ended failed / run.orphaned, "its worker stopped mid-run", never run at all.
    s = (await cutter.start()).model_copy(update={"max_attempts": 1, "lease_ttl_s": 2.0})
    inputs = {"tag": "lost-answer", "items": 2}
    if dispatched:
        run_id = (await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs=inputs)).run_id
    else:
        await rt.require_redis().enqueue_job(EFFECT_TYPE, _queue_name=s.queue_name, tenant_id=tenant, inputs=inputs)
    cutter.cut_reply_containing(b"claimed")
    with structlog.testing.capture_logs() as events:
        await drain(s)
    assert cutter.cuts == 1
    [row] = await assert_ledger_settled(conn)
    if dispatched:
        assert row["id"] == run_id
    assert (row["outcome"], row["reason_code"], row["attempts"]) == ("succeeded", None, 1), row
    assert [e["attempt"] for e in await effects(conn, "lost-answer")] == [1]
    [unavailable] = [e for e in events if e["event"] == "gate_unavailable"]
    assert unavailable["claim_undone"] is True


async def test_a_completion_whose_answer_was_lost_is_logged_completed_not_lease_lost(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str, cutter: ReplyCutter,
) -> None:
    # The completion committed and its answer was lost: the try after it wrote nothing (the run had ended), and the
    # delivery logged run_abandoned "lease lost before completion", with no run_completed and no completed metric.
    s = await cutter.start()
    run = await opspolish.dispatch(rt, ECHO_TYPE, tenant=tenant, inputs={"x": 1})
    cutter.cut_reply_containing(b"UPDATE 1")
    with structlog.testing.capture_logs() as events:
        worker = await drain(s)
    assert cutter.cuts == 1
    [row] = await assert_ledger_settled(conn)
    assert (row["outcome"], row["attempts"]) == ("succeeded", 1)
    mine = [e["event"] for e in events if e.get("run_id") == run.run_id]
    assert "run_completion_failed" in mine and "run_completed" in mine and "run_abandoned" not in mine, mine
    assert worker.ctx["opspolish"].metrics["completed:succeeded"] == 1


async def test_a_reconcile_pass_whose_claims_answer_was_lost_leaves_its_run_for_the_next_pass_to_run(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any], cutter: ReplyCutter,
) -> None:
    # Reconcile runs are max_attempts=1: the next pass found the run running under nobody's lease, recorded a skip
    # (dedupe.non_canonical), took the run over and gave it up as failed / run.orphaned, reconciling nothing.
    s = await cutter.start()
    cutter.cut_reply_containing(b"claimed")
    async with opspolish.connect(s) as through_proxy:
        first = await reconcile_all(through_proxy)
    assert cutter.cuts == 1
    assert [r["reason_code"] for r in first].count("db.unavailable") == 1, first
    second = await reconcile_all(rt)
    assert all(r["outcome"] == "succeeded" for r in second), second
    rows = await run_rows(conn)
    # The lost pass's run was put back queued: the next pass records its skip of it and runs it, on its one attempt.
    ran = [r for r in rows if r["outcome"] != "skipped"]
    assert [(r["outcome"], r["reason_code"], r["attempts"]) for r in ran] == [("succeeded", None, 1)] * len(ran)
    assert len(ran) == len(first) + len(second) - 1, rows  # every pass but the cut one, which ran in the next
    assert [r["reason_code"] for r in rows if r["outcome"] == "skipped"] == ["dedupe.non_canonical"], rows


async def test_a_handed_back_run_whose_next_claims_answer_was_lost_still_runs(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str, cutter: ReplyCutter,
) -> None:
    # Undone as "running under a stale lease" (taken for a takeover), a run handed back at shutdown on its one allowed
    # attempt was taken over by its retry and given up failed / run.orphaned, its body never run.
    s = (await cutter.start()).model_copy(update={"max_attempts": 1, "lease_ttl_s": 1.0})
    run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "handed-back"})
    # What a hand-back at shutdown leaves: queued again, its interrupted attempt counted.
    await conn.execute("UPDATE operation_runs SET attempts = 1, reason_code = 'job.cancelled' WHERE id = $1",
                       run.run_id)
    cutter.cut_reply_containing(b"claimed")
    with structlog.testing.capture_logs() as events:
        await drain(s)
    assert cutter.cuts == 1
    [row] = await assert_ledger_settled(conn)
    assert (row["outcome"], row["attempts"]) == ("succeeded", 2), row
    assert len(await effects(conn, "handed-back")) == 1
    assert [e["claim_undone"] for e in events if e["event"] == "gate_unavailable"] == [True]
