"""ops.reconcile_adapter_runs (DESIGN §1.3, §7): one tracked workspace-scoped run per workspace per pass."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import socket
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog.testing
from arq.cron import cron
from arq.worker import Worker, get_kwargs
from pydantic import SecretStr

import opspolish.jobs.reconcile as reconcile_module
from opspolish import db
from opspolish.db import quote_ident
from opspolish.dispatch import dispatch
from opspolish.errors import DbUnavailable, InputInvalid
from opspolish.fingerprint import context_and_fingerprint, fingerprint, identity_hash, lock_key
from opspolish.jobs.reconcile import RECONCILE_TYPE, reconcile_all, reconcile_cron
from opspolish.ledger import translate_errors
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from opspolish.tracking import get_job
from opspolish.worker import worker_settings
from tests.conftest import ROOT, WorkerProcess, drain, make_worker, wait_until, worker_env
from tests.support.jobs import ECHO_TYPE, EFFECT_TYPE, FREEFORM_TYPE

pytestmark = pytest.mark.timeout(120)


async def reconcile_runs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM operation_runs WHERE type = $1 ORDER BY id", RECONCILE_TYPE))


async def test_a_pass_records_a_succeeded_run_per_workspace_with_zero_counts_on_an_empty_ledger(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    results = await reconcile_all(rt)
    assert [r["workspace"] for r in results] == [w["slug"] for w in seeded["workspaces"]]
    runs = await reconcile_runs(conn)
    assert len(runs) == len(seeded["workspaces"])
    for run in runs:
        assert (run["status"], run["outcome"], run["tenant_id"]) == ("completed", "succeeded", None)
        assert run["summary_counts"] == {"total": 0, "processed": 0, "failed": 0, "checked": 0, "left_to_queue": 0,
                                         "requeued": 0, "orphaned": 0, "lost": 0}
    assert {r["workspace_id"] for r in runs} == {w["id"] for w in seeded["workspaces"]}
    # No cooldown for housekeeping: the next pass runs too.
    await reconcile_all(rt)
    assert len(await reconcile_runs(conn)) == 2 * len(seeded["workspaces"])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_redis_unreachable_records_failed_redis_unavailable_without_password_or_traceback(
    settings: Settings, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    password = "Canary-P4ssw0rd-" + uuid.uuid4().hex[:8]
    s = settings.model_copy(update={"redis_url": SecretStr(f"redis://:{password}@127.0.0.1:{closed_port()}/0")})
    rt = await Runtime.start(s, connect_to_redis=False)
    try:
        await dispatch_stale_queued(conn, seeded)  # a candidate, so the pass must ask Redis
        results = await reconcile_all(rt, workspace_slug="acme")
    finally:
        await rt.close()
    [run] = await reconcile_runs(conn)
    assert (run["outcome"], run["reason_code"]) == ("failed", "redis.unavailable")
    assert results[0]["reason_code"] == "redis.unavailable"
    text = json.dumps(dict(run), default=str)
    assert password not in text and "Traceback" not in text and "\n" not in run["reason_message"]


async def dispatch_stale_queued(conn: asyncpg.Connection, seeded: dict[str, Any], n: int = 1,
                                slug: str = "acme", requeues: int = 0, age_s: float = 60) -> list[int]:
    """Queued runs whose arq job never existed (as after a Redis flush)."""
    tenant = next(t for t in seeded["tenants"] if t["slug"] == slug)
    ids: list[int] = await conn.fetchval(
        """WITH ins AS (
             INSERT INTO operation_runs (workspace_id, tenant_id, type, run_identity_hash, fingerprint, context,
                                         requeues, created_at, queue_name)
             SELECT $1, $2, $3, encode(sha256(convert_to(g::text || gen_random_uuid()::text, 'UTF8')), 'hex'),
                    repeat('0', 64), jsonb_build_object('tag', 'stale'), $4, now() - make_interval(secs => $5), $6
             FROM generate_series(1, $7) g RETURNING id)
           SELECT array_agg(id ORDER BY id) FROM ins""",
        tenant["workspace_id"], tenant["id"], EFFECT_TYPE, requeues, age_s,
        (await conn.fetchval("SELECT current_database()")).replace("opspolish_t_", "opspolish-test:opspolish_t_"),
        n,
    )
    return ids


async def test_after_a_queue_flush_queued_runs_are_requeued_and_then_completed(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    results = [await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": f"q{i}"}) for i in range(3)]
    redis = rt.require_redis()
    # What FLUSHALL does to this queue (the shared Redis is not ours to flush; reliability tests flush a private one).
    await redis.delete(settings.queue_name, *[f"arq:job:{r.job_id}" for r in results])
    await reconcile_all(rt)
    acme = next(r for r in await reconcile_runs(conn) if r["workspace_id"] == seeded["tenants"][0]["workspace_id"])
    assert acme["summary_counts"]["requeued"] == 3 and acme["summary_counts"]["processed"] == 3
    await drain(settings)
    outcomes = await conn.fetch("SELECT outcome, requeues FROM operation_runs WHERE type = $1", EFFECT_TYPE)
    assert [(o["outcome"], o["requeues"]) for o in outcomes] == [("succeeded", 1)] * 3
    assert await conn.fetchval("SELECT count(*) FROM test_effects") == 3


async def test_a_run_its_worker_ends_after_the_pass_listed_it_is_left_alone_not_requeued_or_failed(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pass acted on its page as read: a run its worker ended in between (job gone from the queue) was re-enqueued
    # as "queued", a stray job for an ended run, and counted failed (the mark found it completed): the pass ended
    # failed / items.all_failed with nothing wrong.
    tenant = seeded["tenants"][0]["external_id"]
    results = [await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": f"ends-{i}"}) for i in range(3)]
    real_job_status = reconcile_module._job_status
    worked: list[bool] = []

    async def worker_runs_first(rt_: Runtime, redis: Any, run: Any) -> Any:
        if not worked:  # a real worker ends every listed run after the page was read, before the queue is asked
            worked.append(True)
            await drain(settings)
        return await real_job_status(rt_, redis, run)

    monkeypatch.setattr(reconcile_module, "_job_status", worker_runs_first)
    await reconcile_all(rt, workspace_slug="acme")
    [pass_run] = await reconcile_runs(conn)
    assert (pass_run["outcome"], pass_run["reason_code"]) == ("succeeded", None), pass_run
    assert pass_run["summary_counts"] == {"total": 0, "processed": 0, "failed": 0, "checked": 3, "left_to_queue": 3,
                                          "requeued": 0, "orphaned": 0, "lost": 0}
    rows = await conn.fetch("SELECT status, outcome, requeues FROM operation_runs WHERE type = $1", EFFECT_TYPE)
    assert [tuple(r) for r in rows] == [("completed", "succeeded", 0)] * 3
    redis = rt.require_redis()
    assert await redis.zcard(settings.queue_name) == 0, "a stray job was queued for a run that had ended"
    assert not await redis.exists(*[f"arq:job:{r.job_id}" for r in results])
    assert await conn.fetchval("SELECT count(*) FROM test_effects") == 3


async def test_a_re_enqueued_runs_body_gets_its_numbers_exactly_as_dispatched(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # Re-enqueued without a payload, the body gets the run's recorded context: read back through floats, a decimal
    # past a float's digits came back rounded (0.10000000000000000001 as 0.1, the body running on another number).
    tenant = seeded["tenants"][0]["external_id"]
    exact, plain = Decimal("0.10000000000000000001"), 0.1
    results = [await dispatch(rt, ECHO_TYPE, tenant=tenant, inputs={"x": x}) for x in (exact, plain)]
    assert results[0].run_id != results[1].run_id  # other numbers, other identities
    recorded = await conn.fetch("SELECT context::text AS text FROM operation_runs ORDER BY id")
    assert [r["text"] for r in recorded] == ['{"x": 0.10000000000000000001}', '{"x": 0.1}']
    redis = rt.require_redis()
    await redis.delete(settings.queue_name, *[f"arq:job:{r.job_id}" for r in results])  # as a queue flush does
    await reconcile_all(rt, workspace_slug=seeded["tenants"][0]["slug"])
    await drain(settings)
    tags = [r["tag"] for r in await conn.fetch("SELECT tag FROM test_effects ORDER BY run_id")]
    assert tags == ["[('x', Decimal('0.10000000000000000001'))]", "[('x', 0.1)]"]


async def test_a_queued_run_whose_queue_entry_vanished_but_not_its_job_key_is_requeued_and_runs(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # arq refuses a job under an id whose job key is still there: the re-enqueue returned None, the run was marked
    # requeued with no job, and the next pass called it lost.
    tenant = seeded["tenants"][0]["external_id"]
    result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "half-lost"})
    redis = rt.require_redis()
    assert await redis.zrem(settings.queue_name, result.job_id) == 1  # the queue entry only
    await reconcile_all(rt)
    assert await redis.zscore(settings.queue_name, result.job_id) is not None
    await drain(settings)
    row = await conn.fetchrow("SELECT outcome, requeues FROM operation_runs WHERE id = $1", result.run_id)
    assert row is not None and (row["outcome"], row["requeues"]) == ("succeeded", 1)


async def test_deliveries_starting_after_the_stop_signal_give_arq_its_try_back_and_claim_nothing(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # The reconcile cron has one try (max_tries=1): put back with its try counted, the next worker dropped it ("max
    # retries 1 exceeded"); a tracked job's put-back brought it one try nearer its own limit.
    redis = rt.require_redis()
    result = await dispatch(rt, EFFECT_TYPE, tenant=seeded["tenants"][0]["external_id"], inputs={"tag": "late"})
    entry = get_job(EFFECT_TYPE).arq_function(30).coroutine
    deliveries: list[tuple[Callable[..., Awaitable[Any]], str, dict[str, Any]]] = [
        (reconcile_cron, f"{settings.queue_name}:cron-late", {}),
                  (entry, result.job_id, {"run_id": result.run_id, "tenant_id": str(result.tenant_id)})]
    rt.stopping = True
    try:
        for function, job_id, kwargs in deliveries:
            await redis.set(f"arq:retry:{job_id}", 1)  # arq counts the try before the job starts
            with pytest.raises(asyncio.CancelledError):
                await function({"opspolish": rt, "redis": redis, "job_id": job_id, "job_try": 1}, **kwargs)
            assert await redis.get(f"arq:retry:{job_id}") == b"0", job_id
            await redis.delete(f"arq:retry:{job_id}")
    finally:
        rt.stopping = False
    row = await conn.fetchrow("SELECT status, attempts FROM operation_runs WHERE id = $1", result.run_id)
    assert row is not None and (row["status"], row["attempts"]) == ("queued", 0)
    assert not await reconcile_runs(conn)


async def test_a_pass_drops_the_side_beats_no_lease_needs(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # Written for a run whose row was locked at a beat (its own completion holding it, say), a side beat stayed when
    # no later beat reached the row: the table only grew.
    tenant = seeded["tenants"][0]["external_id"]
    ended, live = [await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": t}) for t in ("ended", "live")]
    owner = uuid.uuid4()
    await conn.execute("UPDATE operation_runs SET status = 'completed', outcome = 'succeeded', completed_at = now(), "
                       "summary_counts = '{\"total\": 0, \"processed\": 0, \"failed\": 0}', attempts = 1, "
                       "lease_owner = $2 WHERE id = $1", ended.run_id, uuid.uuid4())
    await conn.execute("UPDATE operation_runs SET status = 'running', attempts = 1, lease_owner = $2, "
                       "heartbeat_at = now() WHERE id = $1", live.run_id, owner)
    await conn.execute("INSERT INTO operation_run_beats (run_id, lease_owner, beat_at) VALUES ($1, $2, now()), "
                       "($3, $4, now()), (999999, $4, now())", ended.run_id, uuid.uuid4(), live.run_id, owner)
    await reconcile_all(rt)
    assert [r["run_id"] for r in await conn.fetch("SELECT run_id FROM operation_run_beats")] == [live.run_id]


async def test_a_run_whose_job_vanished_again_or_is_too_old_is_settled_as_lost(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    again = await dispatch_stale_queued(conn, seeded, requeues=1)
    too_old = await dispatch_stale_queued(conn, seeded, age_s=settings.reconcile_max_queued_age_s + 60)
    await reconcile_all(rt, workspace_slug="acme")
    for run_id in again + too_old:
        run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", run_id)
        assert run is not None
        assert (run["status"], run["outcome"], run["reason_code"]) == ("completed", "failed", "run.lost")
    [pass_run] = await reconcile_runs(conn)
    assert pass_run["summary_counts"] == {"total": 2, "processed": 2, "failed": 0, "checked": 2, "left_to_queue": 0,
                                          "requeued": 0, "orphaned": 0, "lost": 2}


async def test_two_concurrent_passes_on_one_workspace_execute_once_and_explain_the_other(
    settings: Settings, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    await dispatch_stale_queued(conn, seeded, n=1500)  # a pass that takes a while
    procs = [subprocess.Popen([str(ROOT / ".venv/bin/opspolish"), "reconcile", "--workspace", "acme", "--json"],
                              cwd=ROOT, env=worker_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outputs = [await asyncio.to_thread(p.communicate, timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outputs]
    runs = await reconcile_runs(conn)
    executed = [r for r in runs if r["outcome"] == "succeeded"]
    skipped = [r for r in runs if r["outcome"] == "skipped"]
    assert len(executed) == 1 and len(skipped) == 1
    assert (skipped[0]["reason_code"], skipped[0]["dedupe_of"]) == ("dedupe.non_canonical", executed[0]["id"])
    assert executed[0]["summary_counts"]["requeued"] == 1500


async def test_sigkilled_worker_run_is_left_while_arq_holds_it_and_orphaned_once_it_does_not(
    settings: Settings, conn: asyncpg.Connection, seeded: dict[str, Any], tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    s = settings.model_copy(update={"lease_ttl_s": 1.0})
    rt = await Runtime.start(s)
    try:
        result = await dispatch(rt, EFFECT_TYPE, tenant=seeded["tenants"][0]["external_id"],
                                inputs={"tag": "orphan", "sleep_s": 60})
        worker = WorkerProcess(s, log_path=tmp_path / "w.log")
        worker_processes.append(worker)

        async def started() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM test_effects WHERE tag = 'orphan'"))

        await wait_until(started)
        worker.kill(signal.SIGKILL)
        await worker.wait()
        await asyncio.sleep(1.2)  # the lease goes stale
        await reconcile_all(rt, workspace_slug="acme")
        run = await conn.fetchrow("SELECT status, outcome FROM operation_runs WHERE id = $1", result.run_id)
        assert run is not None and (run["status"], run["outcome"]) == ("running", "pending")  # arq still holds it
        [first] = await reconcile_runs(conn)
        assert first["summary_counts"]["left_to_queue"] == 1 and first["summary_counts"]["total"] == 0

        # arq gives up on the job (it expired): nothing will redeliver it any more.
        redis = rt.require_redis()
        await redis.delete(f"arq:in-progress:{result.job_id}", f"arq:job:{result.job_id}")
        await redis.zrem(s.queue_name, result.job_id)
        await reconcile_all(rt, workspace_slug="acme")
    finally:
        await rt.close()
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", result.run_id)
    assert run is not None
    assert (run["status"], run["outcome"], run["reason_code"]) == ("completed", "failed", "run.orphaned")
    second = (await reconcile_runs(conn))[-1]
    assert second["summary_counts"]["orphaned"] == 1 and second["summary_counts"]["processed"] == 1


async def test_the_worker_cron_runs_the_tracked_reconcile(
    settings: Settings, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    ws = worker_settings(settings.model_copy(update={"reconcile_interval_min": 15}))
    [job] = ws.cron_jobs  # type: ignore[attr-defined]
    assert job.name == RECONCILE_TYPE and job.minute == {0, 15, 30, 45}
    # README (OPSPOLISH_JOB_TIMEOUT_S): arq's timeout is ours plus the margin, the cron's included.
    timeouts = {f.timeout_s for f in ws.functions} | {job.timeout_s}  # type: ignore[attr-defined]
    assert timeouts == {settings.job_timeout_s + 30}
    # Only the startup run may happen here: a schedule twelve hours away cannot fire mid-test, where an
    # every-minute one could start a second run that close() would then cancel in flight.
    far_hour = (datetime.now().hour + 12) % 24
    worker = make_worker(settings, burst=False,
                         cron_jobs=[cron(reconcile_cron, name=RECONCILE_TYPE, hour=far_hour, minute=0,
                                         run_at_startup=True, max_tries=1)])
    task = asyncio.create_task(worker.main())
    try:
        async def recorded() -> bool:
            # The ledger rows are written inside the job, before arq finishes it: wait for the task too,
            # or close() cancels it mid-finish and its CancelledError skips the worker's shutdown hook.
            finished = worker.jobs_complete == 1 and all(t.done() for t in worker.tasks.values())
            return finished and len(await reconcile_runs(conn)) == len(seeded["workspaces"])

        await wait_until(recorded, timeout_s=20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()
    runs = await reconcile_runs(conn)
    assert len(runs) == len(seeded["workspaces"]) and worker.jobs_complete == 1
    assert all(r["outcome"] == "succeeded" for r in runs)


def real_worker(settings: Settings) -> Worker:
    """A burst worker with the production configuration: the built-in jobs and the reconcile cron, moved to half an
    hour from now (a pass it started at a five-minute mark was one more job in the test's counts)."""
    kwargs: dict[str, Any] = {**get_kwargs(worker_settings(settings, configure_logs=False)),
                              "burst": True, "poll_delay": 0.02, "handle_signals": False}
    far = (datetime.now().minute + 30) % 60
    kwargs["cron_jobs"] = [dataclasses.replace(job, minute={far}) for job in kwargs["cron_jobs"]]
    return Worker(**kwargs)


async def test_a_reconcile_delivery_naming_a_tenant_is_refused_and_runs_no_pass(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    """A workspace job takes no tenant (README, Python API). The reconcile entry ignored one: with a workspace it ran
    that workspace's pass, with a tenant alone the pass over every workspace."""
    acme, tenant = seeded["workspaces"][0], seeded["tenants"][0]["external_id"]
    redis = rt.require_redis()
    await redis.enqueue_job(RECONCILE_TYPE, tenant_id=tenant, workspace_id=str(acme["id"]),
                            _queue_name=settings.queue_name)
    await redis.enqueue_job(RECONCILE_TYPE, tenant_id=tenant, _queue_name=settings.queue_name)
    worker = real_worker(settings)
    with structlog.testing.capture_logs() as events:
        try:
            await asyncio.wait_for(worker.main(), 30)
        finally:
            await worker.close()
    assert (worker.jobs_complete, worker.jobs_failed) == (2, 0)
    assert await reconcile_runs(conn) == []
    rejected = [e for e in events if e["event"] == "run_rejected"]
    assert [(e["log_level"], e["reason_code"]) for e in rejected] == [("warning", "input.invalid")] * 2


async def test_a_reconcile_run_with_inputs_whose_job_vanished_is_requeued_and_runs(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    """Reconcile's re-enqueue carries no payload, so the run runs its recorded inputs. For a reconcile run, the
    delivery was given {} instead, refused as other inputs than the run's, and the run ended run.lost. Reconcile
    takes no inputs now; a run an earlier version queued with some (made here by hand) still runs."""
    globex = seeded["workspaces"][1]
    queued = await dispatch(rt, RECONCILE_TYPE, workspace_id=globex["id"])
    fp = fingerprint({"note": "nightly"})
    await conn.execute("UPDATE operation_runs SET context = $2::jsonb, fingerprint = $3, run_identity_hash = $4 "
                       "WHERE id = $1", queued.run_id, {"note": "nightly"}, fp,
                       identity_hash(f"workspace:{globex['id']}", RECONCILE_TYPE, fp))
    redis = rt.require_redis()
    await redis.delete(f"arq:job:{queued.job_id}")
    await redis.zrem(settings.queue_name, queued.job_id)
    await reconcile_all(rt, workspace_slug="acme")  # another workspace's pass, not globex's own identity
    await reconcile_all(rt, workspace_slug=globex["slug"])
    worker = real_worker(settings)
    try:
        await asyncio.wait_for(worker.main(), 30)
    finally:
        await worker.close()
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", queued.run_id)
    assert run is not None
    assert (run["status"], run["outcome"], run["requeues"]) == ("completed", "succeeded", 1), dict(run)



async def test_reconcile_takes_no_inputs_so_a_pass_with_some_cannot_run_beside_the_workspaces_own(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # Inputs made another identity, with a lock and an active run of its own: two passes of one workspace ran at
    # once, and one settled as run.lost a run the other had just re-enqueued.
    acme = seeded["workspaces"][0]
    with pytest.raises(InputInvalid, match=r"^inputs\.note: ") as caught:
        await dispatch(rt, RECONCILE_TYPE, workspace_id=acme["id"], inputs={"note": "x"})
    assert caught.value.field == "inputs.note"
    raw = await rt.require_redis().enqueue_job(RECONCILE_TYPE, workspace_id=str(acme["id"]), inputs={"note": "x"},
                                               _queue_name=settings.queue_name)
    assert raw is not None
    worker = real_worker(settings)
    with structlog.testing.capture_logs() as logs:
        try:
            await asyncio.wait_for(worker.main(), 30)
        finally:
            await worker.close()
    assert worker.jobs_complete == 1
    assert await reconcile_runs(conn) == []
    [rejected] = [e for e in logs if e["event"] == "run_rejected"]
    assert rejected["reason_code"] == "input.invalid" and "inputs.note" in rejected["message"]


async def test_inputs_arq_cannot_queue_are_input_invalid_and_leave_no_run_queued(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    """A value under a secret key is never canonicalized, so it reached arq's pickling: SerializationError came out
    raw (exit 1 at the CLI) and the run stayed queued with no job behind it."""
    acme = seeded["workspaces"][0]
    nested: list[Any] = []
    for _ in range(2_000):
        nested = [nested]
    for bad in (lambda: 1, nested):
        with pytest.raises(InputInvalid, match=r"^inputs: cannot be queued"):
            await dispatch(rt, FREEFORM_TYPE, workspace_id=acme["id"], inputs={"password": bad})
    rows = await conn.fetch("SELECT status, outcome, reason_code FROM operation_runs WHERE type = $1", FREEFORM_TYPE)
    assert [tuple(r) for r in rows] == [("completed", "failed", "input.invalid")] * 2  # none left queued


async def test_a_secret_input_that_contains_itself_runs_and_ends(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    """Collecting the inputs' secret values (for redaction) recursed into it after the claim: RecursionError, and
    the run stayed running."""
    cyclic: dict[str, Any] = {"key": "Cyclic-Canary-1"}
    cyclic["self"] = cyclic
    queued = await dispatch(rt, FREEFORM_TYPE, workspace_id=seeded["workspaces"][0]["id"],
                            inputs={"password": cyclic, "case": "x"})
    worker = real_worker(settings)
    try:
        await asyncio.wait_for(worker.main(), 30)
    finally:
        await worker.close()
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    run = await conn.fetchrow("SELECT status, outcome FROM operation_runs WHERE id = $1", queued.run_id)
    assert run is not None and tuple(run) == ("completed", "succeeded")


async def test_a_reconcile_enqueued_through_the_queue_runs_as_that_workspaces_pass(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    acme = seeded["workspaces"][0]
    queued = await dispatch(rt, RECONCILE_TYPE, workspace_id=acme["id"], inputs={})
    worker = real_worker(settings)
    try:
        await asyncio.wait_for(worker.main(), 30)
    finally:
        await worker.close()
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)  # the cron's function took the job's arguments
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", queued.run_id)
    assert run is not None
    assert (run["status"], run["outcome"], run["workspace_id"], run["tenant_id"]) == (
        "completed", "succeeded", acme["id"], None)
    # And the next pass of that workspace executes: nothing holds the identity.
    results = await reconcile_all(rt, workspace_slug=acme["slug"])
    assert [(r["decision"], r.get("outcome")) for r in results] == [("completed", "succeeded")]


async def test_a_reconcile_run_handed_back_or_left_queued_is_run_by_the_next_pass_instead_of_blocking_it(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    acme = seeded["workspaces"][0]
    # What a worker shutting down mid-pass leaves: the pass's run claimed, then handed back (queued, attempt 1).
    _, fingerprint = context_and_fingerprint({})
    owner = uuid.uuid4()
    claim = await rt.gate.claim(
        run_id=None, tenant=None, workspace_id=acme["id"], run_type=RECONCILE_TYPE, fingerprint=fingerprint,
        context={}, job_id="cron:handed-back:acme", queue_name=rt.settings.queue_name, lease_owner=owner,
        cooldown_s=0.0, lease_ttl_s=rt.settings.lease_ttl_s)
    assert claim.decision == "claimed" and claim.run_id is not None
    assert await rt.ledger.release(claim.run_id, owner, reason_code="job.cancelled", reason_message="shut down")
    # And what a dispatch no worker has taken yet leaves, in the other workspace.
    globex = seeded["workspaces"][1]
    queued = await dispatch(rt, RECONCILE_TYPE, workspace_id=globex["id"], inputs={})

    results = {r["workspace"]: r for r in await reconcile_all(rt)}
    assert (results["acme"]["run_id"], results["acme"]["outcome"]) == (claim.run_id, "succeeded")
    assert (results["globex"]["run_id"], results["globex"]["outcome"]) == (queued.run_id, "succeeded")
    handed_back = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", claim.run_id)
    assert handed_back is not None
    assert (handed_back["status"], handed_back["attempts"], handed_back["reason_code"]) == ("completed", 2, None)
    # Each pass that found the identity held left its skip, pointing at the run it then ran.
    skips = await conn.fetch("SELECT dedupe_of, reason_code FROM operation_runs WHERE outcome = 'skipped'")
    assert sorted((s["dedupe_of"], s["reason_code"]) for s in skips) == sorted(
        [(claim.run_id, "dedupe.non_canonical"), (queued.run_id, "dedupe.non_canonical")])
    # The passes after that run as usual.
    again = await reconcile_all(rt)
    assert [(r["decision"], r.get("outcome")) for r in again] == [("completed", "succeeded")] * 2


async def test_reconcile_cli_reports_each_workspace(settings: Settings, seeded: dict[str, Any]) -> None:
    out = await asyncio.to_thread(
        subprocess.run, [str(ROOT / ".venv/bin/opspolish"), "reconcile", "--json"], cwd=ROOT,
        env=worker_env(settings), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-500:]
    data = json.loads(out.stdout)
    assert [d["workspace"] for d in data] == ["acme", "globex"]
    assert all(d["outcome"] == "succeeded" for d in data)
    bad = await asyncio.to_thread(
        subprocess.run, [str(ROOT / ".venv/bin/opspolish"), "reconcile", "--workspace", "nope"], cwd=ROOT,
        env=worker_env(settings), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--workspace" in bad.stderr


async def test_reconcile_cli_whose_workspace_gate_stays_busy_exits_1_and_says_no_pass_ran(
    settings: Settings, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # It exited 0 and printed "acme: run None busy (dedupe.overlap)": no pass ran and no run was recorded.
    acme = seeded["workspaces"][0]
    key = lock_key(identity_hash(f"workspace:{acme['id']}", RECONCILE_TYPE, fingerprint({})))
    holder = await asyncpg.connect(dsn=settings.database_url.get_secret_value().replace("+asyncpg", ""))
    try:
        async with holder.transaction():
            assert await holder.fetchval("SELECT pg_try_advisory_xact_lock($1)", key)
            # The CLI's own entry, with the wait for a busy gate cut from 30 s to 1 s.
            code = ("import opspolish.jobs.reconcile as r; r.BUSY_DEADLINE_S = 1.0; from opspolish.cli import main; "
                    "main(prog_name='opspolish')")
            out = await asyncio.to_thread(
                subprocess.run, [str(ROOT / ".venv/bin/python"), "-c", code, "reconcile", "--workspace", "acme"],
                cwd=ROOT, env=worker_env(settings), capture_output=True, text=True, timeout=60)
    finally:
        await holder.close()
    assert out.returncode == 1, (out.stdout, out.stderr[-500:])
    assert out.stdout == "acme: busy (dedupe.overlap): its gate stayed busy, no pass ran\n"
    assert await conn.fetchval("SELECT count(*) FROM operation_runs") == 0


async def test_a_pass_whose_database_refuses_connections_reports_db_unavailable_not_a_busy_gate(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gate's DbUnavailable reached reconcile_workspace as arq's Retry, which it took for a busy gate: retries for
    # BUSY_DEADLINE_S (30 s) per workspace, then "busy (dedupe.overlap): its gate stayed busy" for a database that was
    # away. And a database refusing connections was no DbUnavailable at all: "internal.unexpected:
    # ObjectNotInPrerequisiteStateError", from every command.
    monkeypatch.setattr(reconcile_module, "BUSY_DEADLINE_S", 5.0)
    database = quote_ident(await conn.fetchval("SELECT current_database()"))
    acme = seeded["workspaces"][0]
    queued = await dispatch(rt, RECONCILE_TYPE, workspace_id=acme["id"])  # a delivery of a run, as the worker gets it
    await rt.pool.fetchval("SELECT 1")  # the pool's one connection is open; the gate's is opened by the first claim
    admin = await db.connect(settings, "postgres")
    await admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
    try:
        with structlog.testing.capture_logs() as events:
            results = await asyncio.wait_for(reconcile_all(rt), 4.0)  # well inside the busy gate's deadline
            delivered = await asyncio.wait_for(reconcile_cron(
                {"opspolish": rt, "job_id": queued.job_id}, run_id=queued.run_id, workspace_id=str(acme["id"])), 4.0)
        out = await asyncio.to_thread(
            subprocess.run, [str(ROOT / ".venv/bin/opspolish"), "runs", "list"], cwd=ROOT, env=worker_env(settings),
            capture_output=True, text=True, timeout=60)
        async with rt.pool.acquire():  # the pool's open connection held: the next statement opens a new one
            with pytest.raises(DbUnavailable, match="not currently accepting connections"):
                async with translate_errors():
                    await rt.pool.fetchval("SELECT 1")
    finally:
        await admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
        await admin.close()
    assert [(r["workspace"], r["decision"], r["reason_code"]) for r in results] == [
        ("acme", "failed", "db.unavailable"), ("globex", "failed", "db.unavailable")]
    assert delivered == [{"workspace_id": str(acme["id"]), "decision": "failed", "run_id": queued.run_id,
                          "reason_code": "db.unavailable"}]
    assert [e["reason_code"] for e in events if e["event"] == "reconcile_failed"] == ["db.unavailable"] * 3
    assert not [e for e in events if e["event"] == "reconcile_gave_up"]
    assert out.returncode == 1 and out.stderr.startswith("opspolish: db.unavailable: "), out.stderr
    assert "not currently accepting connections" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    [run] = await reconcile_runs(conn)  # untouched, for a later pass: nothing was claimed
    assert (run["id"], run["status"], run["attempts"]) == (queued.run_id, "queued", 0)


async def test_a_pass_reports_its_own_skip_when_the_run_it_went_on_to_deliver_was_ended_by_another(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A pass that recorded its skip (the identity held by a queued run) and went on to deliver that run, which another
    # pass ended in between, reported that run ("already_completed", the other pass's run id), not its own skip.
    from opspolish.jobs import reconcile

    ws = next(w for w in seeded["workspaces"] if w["slug"] == "acme")
    held = await dispatch(rt, RECONCILE_TYPE, workspace_id=ws["id"])
    real = reconcile.execute  # type: ignore[attr-defined]

    async def another_pass_ends_it_in_between(rt_: Runtime, job: Any, **kwargs: Any) -> dict[str, Any]:
        result = await real(rt_, job, **kwargs)
        if result.get("dedupe_of") == held.run_id:
            await real(rt_, job, **{**kwargs, "run_id": held.run_id, "inputs": None, "job_id": "another-pass"})
        return result

    monkeypatch.setattr(reconcile, "execute", another_pass_ends_it_in_between)
    [result] = await reconcile_all(rt, workspace_slug="acme")
    runs = {r["id"]: r for r in await reconcile_runs(conn)}
    assert runs[held.run_id]["outcome"] == "succeeded"
    assert result["run_id"] != held.run_id and result["reason_code"] == "dedupe.non_canonical", result
    own = runs[result["run_id"]]
    assert (own["outcome"], own["dedupe_of"]) == ("skipped", held.run_id)
