"""Redis restarted or flushed mid-flight (a private redis-server): nothing is lost from the ledger, and every
queued run whose job vanished is re-enqueued once or ends ``failed`` / ``run.lost`` with its reason."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import opspolish
from opspolish import runtime
from opspolish.jobs.reconcile import RECONCILE_TYPE, reconcile_all
from opspolish.settings import Settings
from tests.conftest import WorkerProcess, drain, log_events, make_worker, wait_until
from tests.reliability.faults import (
    RedisServer,
    assert_ledger_settled,
    assert_never_concurrent,
    closed_port,
    effects,
    run_cli,
    run_rows,
)
from tests.support.jobs import EFFECT_TYPE

pytestmark = pytest.mark.timeout(90)


async def _flush(server: RedisServer) -> None:
    client = server.client()
    try:
        await client.flushall()  # the private server of this test, never the shared one
    finally:
        await client.aclose()


async def _up(worker: WorkerProcess) -> None:
    """Wait until the worker has started (its start-up hook logged worker_started)."""

    async def started() -> bool:
        return "worker_started" in worker.log()

    await wait_until(started)


async def test_a_flushed_queue_is_re_enqueued_once_and_the_runs_complete(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
) -> None:
    s = private_redis.settings_for(settings)
    async with opspolish.connect(s) as rt:
        runs = [await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": f"f{i}", "items": i})
                for i in range(3)]
        await _flush(private_redis)
        assert await private_redis.job_ids(s.queue_name) == set()
        results = await reconcile_all(rt)
        # Re-enqueued under the run's own job id, without the payload (the worker reads the ledger's context).
        assert await private_redis.job_ids(s.queue_name) == {r.job_id for r in runs}
        assert sum(r["outcome"] == "succeeded" for r in results) == len(results) == 2
        await drain(s)
    rows = {r["id"]: r for r in await assert_ledger_settled(conn)}
    for i, run in enumerate(runs):
        row = rows[run.run_id]
        assert (row["outcome"], row["requeues"], row["attempts"]) == ("succeeded", 1, 1)
        assert row["summary_counts"] == {"total": i, "processed": i, "failed": 0}
    assert sorted(e["tag"] for e in await effects(conn)) == ["f0", "f1", "f2"]
    passes = [r for r in rows.values() if r["type"] == RECONCILE_TYPE]
    assert sum(p["summary_counts"]["processed"] for p in passes) == 3
    assert sum(p["summary_counts"].get("requeued", 0) for p in passes) == 3


async def test_a_queue_lost_twice_or_too_old_is_explained_as_run_lost(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
) -> None:
    s = private_redis.settings_for(settings)
    async with opspolish.connect(s) as rt:
        twice = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "twice"})
        await _flush(private_redis)
        await reconcile_all(rt)
        assert await private_redis.job_ids(s.queue_name) == {twice.job_id}
        await _flush(private_redis)  # lost again: a second re-enqueue would just loop
        await reconcile_all(rt)
    async with opspolish.connect(s.model_copy(update={"reconcile_max_queued_age_s": 0.2})) as rt:
        old = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "old"})
        await _flush(private_redis)
        await asyncio.sleep(0.3)
        await reconcile_all(rt)
        assert await private_redis.job_ids(s.queue_name) == set()
    rows = {r["id"]: r for r in await assert_ledger_settled(conn)}
    assert (rows[twice.run_id]["outcome"], rows[twice.run_id]["reason_code"], rows[twice.run_id]["requeues"]) == (
        "failed", "run.lost", 1)
    assert "re-enqueued once already" in rows[twice.run_id]["reason_message"]
    assert (rows[old.run_id]["outcome"], rows[old.run_id]["reason_code"], rows[old.run_id]["requeues"]) == (
        "failed", "run.lost", 0)
    assert rows[old.run_id]["summary_counts"] == {"total": 0, "processed": 0, "failed": 0}
    assert await effects(conn) == []  # a lost run is explained, never silently run twice


async def test_redis_restarted_mid_run_loses_nothing_from_the_ledger(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    s = private_redis.settings_for(settings)
    async with opspolish.connect(s) as rt:
        busy = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant,
                                        inputs={"tag": "busy", "sleep_s": 2, "items": 5, "fail_items": 1})
        waiting = [await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": f"w{i}", "items": 1})
                   for i in range(2)]
    worker = WorkerProcess(s, log_path=tmp_path / "w1.log", OPSPOLISH_MAX_JOBS="1")
    worker_processes.append(worker)

    async def busy_started() -> bool:
        return bool(await effects(conn, "busy"))

    await wait_until(busy_started)
    await private_redis.restart()  # mid-run: the busy run's job and the two queued ones vanish

    async def busy_settled() -> bool:
        return bool(await conn.fetchval("SELECT status <> 'running' FROM operation_runs WHERE id = $1",
                                        busy.run_id))

    await wait_until(busy_settled, timeout_s=30)
    assert {r["id"] for r in await run_rows(conn)} == {busy.run_id, *(w.run_id for w in waiting)}
    async with opspolish.connect(s) as rt:
        await reconcile_all(rt)
    drainer = WorkerProcess(s, burst=True, log_path=tmp_path / "w2.log")
    worker_processes.append(drainer)
    assert await drainer.wait(60) == 0, drainer.log()[-3000:]
    worker.kill(signal.SIGTERM)
    await worker.wait(30)

    rows = {r["id"]: r for r in await assert_ledger_settled(conn)}
    assert rows[busy.run_id]["outcome"] == "partially_succeeded"
    assert rows[busy.run_id]["summary_counts"] == {"total": 5, "processed": 5, "failed": 1}
    for w in waiting:
        assert (rows[w.run_id]["outcome"], rows[w.run_id]["requeues"]) == ("succeeded", 1)
    executions = await effects(conn)
    assert_never_concurrent(executions)
    finished = [e for e in executions if e["finished_at"] is not None]
    assert sorted(e["run_id"] for e in finished) == sorted([busy.run_id, *(w.run_id for w in waiting)])


async def test_reconcile_with_redis_down_is_recorded_failed_and_settles_nothing(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
) -> None:
    s = private_redis.settings_for(settings)
    async with opspolish.connect(s) as rt:
        run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "down"})
    private_redis.stop()
    down = await run_cli(s, "reconcile", "--json")
    assert down.code == 1, down
    results = json.loads(down.stdout)
    assert {r["reason_code"] for r in results} == {"redis.unavailable"}
    assert len(down.lines) == 0 or all("Traceback" not in line for line in down.lines)
    passes = [r for r in await run_rows(conn) if r["type"] == RECONCILE_TYPE]
    assert len(passes) == 2
    assert all((p["outcome"], p["reason_code"]) == ("failed", "redis.unavailable") for p in passes)
    row = await conn.fetchrow("SELECT status, requeues FROM operation_runs WHERE id = $1", run.run_id)
    assert row is not None and (row["status"], row["requeues"]) == ("queued", 0)  # not settled on a guess

    await private_redis.start()  # back, and empty: the next pass re-enqueues the run
    up = await run_cli(s, "reconcile", "--json")
    assert up.code == 0, up
    assert await private_redis.job_ids(s.queue_name) == {run.job_id}


async def test_a_re_enqueue_redis_refused_is_not_counted_and_the_next_pass_re_enqueues(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
) -> None:
    # Marked before the enqueue, a refused enqueue used up the run's one re-enqueue: the next pass called it run.lost.
    s = private_redis.settings_for(settings)
    client = private_redis.client()
    try:
        async with opspolish.connect(s) as rt:
            run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "refused", "items": 1})
            await _flush(private_redis)
            # A replica of a primary that is not there (a failover gone wrong): reads answer, writes are refused.
            await client.replicaof("127.0.0.1", closed_port())
            [refused] = await reconcile_all(rt, workspace_slug=await _slug_of(conn, run.workspace_id))
            assert (refused["outcome"], refused["reason_code"]) == ("failed", "redis.unavailable"), refused
            row = await conn.fetchrow("SELECT status, requeues FROM operation_runs WHERE id = $1", run.run_id)
            assert row is not None and tuple(row) == ("queued", 0)
            await client.replicaof("NO", "ONE")
            [again] = await reconcile_all(rt, workspace_slug=await _slug_of(conn, run.workspace_id))
            assert again["outcome"] == "succeeded", again
            assert await private_redis.job_ids(s.queue_name) == {run.job_id}
            await drain(s)
    finally:
        await client.aclose()
    row = await conn.fetchrow("SELECT outcome, requeues, attempts FROM operation_runs WHERE id = $1", run.run_id)
    assert row is not None and tuple(row) == ("succeeded", 1, 1)


async def _slug_of(conn: asyncpg.Connection, workspace_id: object) -> str:
    return str(await conn.fetchval("SELECT slug FROM workspaces WHERE id = $1", workspace_id))


async def _dispatched_and_done(s: Settings, conn: asyncpg.Connection, tenant: str, tag: str) -> Any:
    """Dispatch an effect run and wait (30 s at most) until a worker has completed it."""
    async with opspolish.connect(s) as rt:
        run = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": tag})

    async def done() -> bool:
        return bool(await conn.fetchval("SELECT status = 'completed' FROM operation_runs WHERE id = $1", run.run_id))

    await wait_until(done, timeout_s=30)
    return run


async def test_a_worker_rides_out_redis_being_away_for_seconds_and_runs_what_is_queued_after(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    # arq's poll loop does not catch a Redis error: half a second without Redis and every worker exited (status 1),
    # the runs in its hands left running until reconcile called them orphaned.
    s = private_redis.settings_for(settings)
    async with opspolish.connect(s) as rt:
        busy = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "busy", "sleep_s": 1})
    worker = WorkerProcess(s, log_path=tmp_path / "w.log")
    worker_processes.append(worker)

    async def busy_started() -> bool:
        return bool(await effects(conn, "busy"))

    await wait_until(busy_started)
    private_redis.stop()
    await asyncio.sleep(4)
    assert worker.proc.poll() is None, "the worker exited while Redis was away:\n" + worker.log()[-3000:]
    await private_redis.start()  # empty: the busy run's job went with it
    after = await _dispatched_and_done(s, conn, tenant, "after")
    rows = {r["id"]: r for r in await run_rows(conn)}
    assert (rows[after.run_id]["outcome"], rows[busy.run_id]["outcome"]) == ("succeeded", "succeeded"), rows
    assert worker.proc.poll() is None, worker.log()[-3000:]
    worker.kill(signal.SIGTERM)
    assert await worker.wait(30) == 0, worker.log()[-3000:]
    executions = await effects(conn)
    assert sorted(e["tag"] for e in executions if e["finished_at"] is not None) == ["after", "busy"]
    events = [e["event"] for e in log_events([worker])]
    assert events.count("redis_away") == 1 and events.count("redis_back") >= 1, events


async def test_a_worker_gives_up_once_redis_has_been_away_longer_than_opspolish_redis_retry_s(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    s = private_redis.settings_for(settings)
    worker = WorkerProcess(s, log_path=tmp_path / "w.log", OPSPOLISH_REDIS_RETRY_S="1.5")
    worker_processes.append(worker)

    await _up(worker)
    private_redis.stop()
    stopped = time.monotonic()
    # Exits (a supervisor restarts it) within about the setting: retries nested in retries do not multiply it.
    assert await worker.wait(15) != 0
    assert time.monotonic() - stopped < 10
    assert "redis_away" in worker.log()


async def test_a_worker_started_without_redis_or_stopped_while_it_is_away_does_not_wait_for_it(
    settings: Settings, private_redis: RedisServer, tmp_path: Path, worker_processes: list[WorkerProcess],
) -> None:
    # Started with Redis down: arq's own start-up retries (about 5 s), not each of them ridden out for 60 s.
    private_redis.stop()
    s = private_redis.settings_for(settings)
    early = WorkerProcess(s, log_path=tmp_path / "early.log")
    worker_processes.append(early)
    started = time.monotonic()
    assert await early.wait(30) != 0
    assert time.monotonic() - started < 20, early.log()[-2000:]
    # Stopped (SIGTERM) while Redis is away: it exits at once rather than waiting out OPSPOLISH_REDIS_RETRY_S.
    await private_redis.start()
    worker = WorkerProcess(s, log_path=tmp_path / "w.log")
    worker_processes.append(worker)

    await _up(worker)
    private_redis.stop()

    async def away() -> bool:
        return "redis_away" in worker.log()

    await wait_until(away, timeout_s=10)
    worker.kill(signal.SIGTERM)
    stopping = time.monotonic()
    await worker.wait(30)
    assert time.monotonic() - stopping < 10, worker.log()[-2000:]


async def test_a_password_refused_while_the_worker_runs_is_not_ridden_out(
    settings: Settings, tmp_path: Path, worker_processes: list[WorkerProcess],
) -> None:
    # A refused password does not get better with time: the worker exits for its supervisor (and its operator)
    # rather than retrying for OPSPOLISH_REDIS_RETRY_S.
    server = RedisServer(tmp_path, password="first-pw")
    await server.start()
    try:
        worker = WorkerProcess(server.settings_for(settings), log_path=tmp_path / "w.log")
        worker_processes.append(worker)

        await _up(worker)
        client = server.client()
        try:
            await client.config_set("requirepass", "second-pw")  # rotated under the running worker
            with contextlib.suppress(Exception):  # its connections, and this client's own
                await client.client_kill_filter(_type="normal")
        finally:
            await client.aclose()
        changed = time.monotonic()
        assert await worker.wait(30) != 0
        assert time.monotonic() - changed < 10, worker.log()[-2000:]
        assert "AuthenticationError" in worker.log() or "invalid" in worker.log().lower()
    finally:
        server.stop()


async def test_a_worker_whose_redis_stops_answering_gives_up_in_bounded_time(
    settings: Settings, private_redis: RedisServer, tmp_path: Path, worker_processes: list[WorkerProcess],
) -> None:
    # A Redis that holds its connections open and never answers (here SIGSTOPped): with no read timeout, the worker
    # waited for ever, without a line, and deaf to SIGTERM.
    s = private_redis.settings_for(settings)
    worker = WorkerProcess(s, log_path=tmp_path / "w.log", OPSPOLISH_REDIS_RETRY_S="2")
    worker_processes.append(worker)

    await _up(worker)
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        assert await worker.wait(90) != 0
        assert time.monotonic() - frozen < 60, worker.log()[-2000:]
        assert "redis_not_answering" in worker.log() and "redis_away" in worker.log()
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)


async def test_two_workers_in_one_process_ride_out_apart_one_stopping_leaves_the_other_riding(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
) -> None:
    # The ride-out's "armed" and outage window were the class's: the first of two in-process workers to shut down
    # disarmed the other, which exited on the next Redis blip (arq's poll loop lets the error out).
    s = private_redis.settings_for(settings)
    staying, leaving = make_worker(s, burst=False), make_worker(s, burst=False)
    tasks = [asyncio.create_task(w.main()) for w in (staying, leaving)]
    try:
        async def both_up() -> bool:
            return all(w.ctx.get("opspolish") is not None for w in (staying, leaving))

        await wait_until(both_up)
        tasks[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[1]
        await leaving.close()  # its shutdown hook

        private_redis.stop()
        await asyncio.sleep(1.5)
        assert not tasks[0].done(), tasks[0].exception() if tasks[0].done() else None
        await private_redis.start()
        await _dispatched_and_done(s, conn, tenant, "after-blip")
        assert not tasks[0].done()
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await staying.close()


async def test_the_watchdogs_read_timeout_goes_once_a_silent_redis_answers_again(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Set while Redis is silent, the read timeout must go once it answers: kept, redis-py's timers cost a worker
    # 160 us of CPU per job for the rest of its life (the bench's 0.42 against 0.50).
    monkeypatch.setattr(runtime, "REDIS_WATCH_INTERVAL_S", 0.2)
    monkeypatch.setattr(runtime, "REDIS_READ_TIMEOUT_S", 1.0)
    s = private_redis.settings_for(settings).model_copy(update={"redis_retry_s": 30.0})
    worker = make_worker(s, burst=False)
    task = asyncio.create_task(worker.main())
    try:
        async def up() -> bool:
            return worker.ctx.get("opspolish") is not None

        await wait_until(up)
        kwargs = worker.pool.connection_pool.connection_kwargs
        assert kwargs.get("socket_timeout") is None
        assert private_redis.proc is not None
        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            async def timeout_set() -> bool:
                return kwargs.get("socket_timeout") == 1.0

            await wait_until(timeout_set, timeout_s=15)
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)

        async def timeout_gone() -> bool:
            return kwargs.get("socket_timeout") is None

        await wait_until(timeout_gone, timeout_s=15)
        await _dispatched_and_done(s, conn, tenant, "after-silence")
        assert not task.done(), task.exception() if task.done() else None
        pool = worker.pool.connection_pool
        connections = [*pool._available_connections, *pool._in_use_connections]
        assert connections and all(c.socket_timeout is None for c in connections)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await worker.close()
