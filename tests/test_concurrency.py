"""Concurrency claims proven with concurrency: several worker processes, many connections, SIGKILL."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from opspolish.dispatch import dispatch
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from tests.conftest import WorkerProcess, log_events, wait_until
from tests.support.jobs import EFFECT_TYPE

pytestmark = pytest.mark.timeout(180)


async def test_duplicate_storm_runs_the_body_once_across_three_worker_processes(
    settings: Settings, seeded: dict[str, Any], conn: asyncpg.Connection, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    tenant = str(seeded["tenants"][0]["external_id"])
    inputs = {"tag": "storm", "sleep_s": 1.0, "items": 7, "fail_items": 2}
    rt = await Runtime.start(settings, pool_size=50)
    try:
        # 50 concurrent dispatches over up to 50 connections, and 20 raw enqueues of the same job.
        results = await asyncio.gather(*[dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs=inputs)
                                         for _ in range(50)])
        redis = rt.require_redis()
        for _ in range(20):
            await redis.enqueue_job(EFFECT_TYPE, tenant_id=tenant, inputs=inputs, _queue_name=settings.queue_name)
    finally:
        await rt.close()
    assert len({r.run_id for r in results}) == 1 and sum(r.created for r in results) == 1
    for i in range(3):
        worker_processes.append(WorkerProcess(settings, burst=True, log_path=tmp_path / f"w{i}.log"))
    for p in worker_processes:
        assert await p.wait(120) == 0, p.log()[-3000:]

    executions = await conn.fetch("SELECT * FROM test_effects WHERE tag = 'storm'")
    assert len(executions) == 1  # the body ran exactly once
    rows = await conn.fetch("SELECT * FROM operation_runs ORDER BY id")
    executed = [r for r in rows if r["outcome"] != "skipped"]
    skipped = [r for r in rows if r["outcome"] == "skipped"]
    assert len(executed) == 1 and executed[0]["id"] == results[0].run_id
    assert executed[0]["summary_counts"] == {"total": 7, "processed": 7, "failed": 2}
    # Every other delivery is explained: the 20 raw enqueues each left a skipped row pointing at the run.
    assert len(skipped) == 20
    assert {r["reason_code"] for r in skipped} <= {"dedupe.non_canonical", "dedupe.cooldown"}
    assert all(r["dedupe_of"] == executed[0]["id"] for r in skipped)
    assert all(r["status"] == "completed" for r in rows)
    pids = {e["pid"] for e in executions}
    assert len(pids) == 1


async def test_sigkilled_worker_run_is_taken_over_after_its_lease_goes_stale(
    settings: Settings, seeded: dict[str, Any], conn: asyncpg.Connection, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    s = settings.model_copy(update={"lease_ttl_s": 2.0})
    tenant = str(seeded["tenants"][0]["external_id"])
    inputs = {"tag": "crash", "sleep_s": 60, "sleep_attempts": 1, "items": 5, "fail_items": 1}
    rt = await Runtime.start(s)
    try:
        result = await dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs=inputs)
    finally:
        await rt.close()
    first = WorkerProcess(s, log_path=tmp_path / "first.log")
    worker_processes.append(first)

    async def body_started() -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM test_effects WHERE tag = 'crash'"))

    await wait_until(body_started, timeout_s=30)
    first.kill(signal.SIGKILL)
    await first.wait()
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", result.run_id)
    assert run is not None and (run["status"], run["attempts"]) == ("running", 1)

    # arq redelivers once its in-progress marker expires (job timeout + 10 s); expire it now instead of waiting.
    redis: Redis = Redis.from_url(s.redis_url.get_secret_value())
    try:
        assert await redis.delete(f"arq:in-progress:{result.job_id}") == 1
    finally:
        await redis.aclose()
    second = WorkerProcess(s, burst=True, log_path=tmp_path / "second.log")
    worker_processes.append(second)
    assert await second.wait(60) == 0, second.log()[-3000:]

    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", result.run_id)
    assert run is not None
    assert (run["status"], run["outcome"], run["attempts"]) == ("completed", "partially_succeeded", 2)
    assert run["summary_counts"] == {"total": 5, "processed": 5, "failed": 1}  # the dead attempt's not added
    attempts = await conn.fetch("SELECT attempt, finished_at FROM test_effects WHERE tag = 'crash' ORDER BY id")
    assert [(a["attempt"], a["finished_at"] is not None) for a in attempts] == [(1, False), (2, True)]
    events = [e for e in log_events([second]) if e.get("run_id") == result.run_id]
    # The redelivery came while the dead worker's lease was still live: it was deferred, not run twice at once.
    assert any(e["event"] == "run_deferred" and e["reason_code"] == "dedupe.overlap" for e in events)
