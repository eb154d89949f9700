"""Postgres or Redis down when dispatching (the CLI as a subprocess, and the Python API): exit 1 with one line
naming the service, nothing queued without a ledger row, and no ledger row without a queued job or a reason."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.engine import make_url

import opspolish
from opspolish import runtime
from opspolish.errors import DbUnavailable, RedisUnavailable
from opspolish.jobs.assignments import FETCH_TYPE
from opspolish.settings import Settings
from tests.conftest import drain
from tests.reliability.faults import RedisServer, closed_port, queued_job_ids, run_cli, run_rows
from tests.support.jobs import EFFECT_TYPE

pytestmark = pytest.mark.timeout(90)

PG_CANARY = "cnryPgPassw0rd"
REDIS_CANARY = "cnryRedisPassw0rd"


async def assert_every_run_backed_or_explained(conn: asyncpg.Connection, settings: Settings) -> None:
    """Nothing queued without a ledger row; no ledger row without a queued job or a reason."""
    redis: Redis = Redis.from_url(settings.redis_url.get_secret_value())
    try:
        jobs = await queued_job_ids(redis, settings.queue_name)
    finally:
        await redis.aclose()
    rows = await run_rows(conn)
    assert jobs <= {r["job_id"] for r in rows}, "a queued job has no ledger row"
    for r in rows:
        if r["status"] == "queued":
            assert r["job_id"] in jobs, f"run {r['id']} is queued but the queue has no job for it"
        else:
            assert r["status"] == "completed" and r["reason_code"], f"run {r['id']} has neither a job nor a reason"


def _pg_down(settings: Settings) -> Settings:
    return settings.model_copy(update={"database_url": SecretStr(
        f"postgresql+asyncpg://postgres:{PG_CANARY}@127.0.0.1:{closed_port()}/opspolish")})


def _pg_no_database(settings: Settings) -> Settings:
    url = make_url(settings.database_url.get_secret_value()).set(
        database=f"opspolish_missing_{uuid.uuid4().hex[:8]}", password=PG_CANARY)
    return settings.model_copy(update={"database_url": SecretStr(url.render_as_string(hide_password=False))})


def _redis_down(settings: Settings) -> Settings:
    return settings.model_copy(update={"redis_url": SecretStr(f"redis://:{REDIS_CANARY}@127.0.0.1:{closed_port()}/0")})


@pytest.mark.parametrize(("fault", "code", "service"), [
    (_pg_down, "db.unavailable", "PostgreSQL"),
    (_pg_no_database, "db.unavailable", "PostgreSQL"),
    (_redis_down, "redis.unavailable", "Redis"),
])
async def test_cli_dispatch_with_a_service_down_exits_1_with_one_line_naming_it(
    settings: Settings, conn: asyncpg.Connection, tenant: str, fault: object, code: str, service: str,
) -> None:
    assert callable(fault)
    broken: Settings = fault(settings)
    plain, verbose = await asyncio.gather(
        run_cli(broken, "dispatch", FETCH_TYPE, "--tenant", tenant),
        run_cli(broken, "-v", "dispatch", FETCH_TYPE, "--tenant", tenant),
    )
    assert plain.code == 1, plain
    assert len(plain.lines) == 1, plain.stderr
    line = plain.lines[0]
    assert line.startswith(f"opspolish: {code}: ") and service in line, line
    assert "Traceback" not in plain.stderr and plain.stdout == ""
    # -v is how an operator asks for the traceback; secrets stay out of it too.
    assert verbose.code == 1 and "Traceback" in verbose.stderr
    for out in (plain, verbose):
        assert PG_CANARY not in out.stdout + out.stderr and REDIS_CANARY not in out.stdout + out.stderr
    assert await run_rows(conn) == []
    await assert_every_run_backed_or_explained(conn, settings)


async def test_cli_dispatch_with_both_services_up_is_backed_by_a_queued_job(
    settings: Settings, conn: asyncpg.Connection, tenant: str,
) -> None:
    ok = await run_cli(settings, "dispatch", FETCH_TYPE, "--tenant", tenant, "--json")
    assert ok.code == 0, ok
    [row] = await run_rows(conn)
    assert row["status"] == "queued"
    await assert_every_run_backed_or_explained(conn, settings)


async def test_python_dispatch_with_a_service_down_raises_the_services_error(
    settings: Settings, tenant: str,
) -> None:
    with pytest.raises(DbUnavailable) as pg:
        async with opspolish.connect(_pg_down(settings)):
            pass
    with pytest.raises(RedisUnavailable) as rd:
        async with opspolish.connect(_redis_down(settings)):
            pass
    assert "PostgreSQL" in pg.value.message and PG_CANARY not in pg.value.message
    assert "Redis" in rd.value.message and REDIS_CANARY not in rd.value.message


async def test_redis_dying_between_ledger_row_and_enqueue_leaves_a_failed_run_with_a_reason(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
) -> None:
    s = private_redis.settings_for(settings)
    async with opspolish.connect(s) as rt:
        kept = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "kept"})
        private_redis.stop()
        with pytest.raises(RedisUnavailable) as exc:
            await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "lost"})
        # Joining the active run of an identity while Redis is down changes nothing on that run.
        with pytest.raises(RedisUnavailable):
            await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "kept"})
    assert "Redis" in exc.value.message
    rows = {r["context"]["tag"]: r for r in await run_rows(conn)}
    assert set(rows) == {"kept", "lost"}
    lost = rows["lost"]
    assert (lost["status"], lost["outcome"], lost["reason_code"], lost["attempts"]) == (
        "completed", "failed", "redis.unavailable", 0)
    assert lost["summary_counts"] == {"total": 0, "processed": 0, "failed": 0}
    assert (rows["kept"]["id"], rows["kept"]["status"], rows["kept"]["reason_code"]) == (kept.run_id, "queued", None)


async def test_a_redis_refusal_at_enqueue_says_what_redis_said(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
) -> None:
    # Redis up, the queue's key holding a string: "could not enqueue run 1 to Redis: ResponseError", nothing more.
    s = private_redis.settings_for(settings)
    client = private_redis.client()
    try:
        await client.set(s.queue_name, "not a sorted set")
    finally:
        await client.aclose()
    async with opspolish.connect(s) as rt:
        with pytest.raises(RedisUnavailable) as exc:
            await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "refused"})
    assert "ResponseError" in exc.value.message and "WRONGTYPE" in exc.value.message, exc.value.message
    [row] = await run_rows(conn)
    assert (row["status"], row["outcome"], row["reason_code"]) == ("completed", "failed", "redis.unavailable")
    assert row["reason_message"] == exc.value.message


async def test_doctor_keeps_each_verdict_when_one_check_fails_oddly(
    settings: Settings, private_redis: RedisServer,
) -> None:
    # A Redis user allowed PING but not GET: doctor printed only "internal.unexpected: NoPermissionError" and lost
    # the Postgres and migrations verdicts.
    admin = private_redis.client()
    try:
        await admin.acl_setuser("mon", enabled=True, passwords=[f"+{REDIS_CANARY}"], commands=["+ping", "+hello"],
                                keys=["*"])
    finally:
        await admin.aclose()
    url = f"redis://mon:{REDIS_CANARY}@127.0.0.1:{private_redis.port}/0"
    out = await run_cli(settings, "doctor", "--json", OPSPOLISH_REDIS_URL=url)
    verdicts = {c["name"]: (c["verdict"], c["detail"]) for c in json.loads(out.stdout)}
    assert out.code == 1, out
    assert [verdicts[name][0] for name in ("postgres", "migrations", "redis", "worker")] == ["ok", "ok", "ok", "fail"]
    assert "NoPermissionError" in verdicts["worker"][1] and REDIS_CANARY not in out.stdout + out.stderr


async def test_doctor_names_a_postgres_port_that_never_answers(settings: Settings) -> None:
    # Something listening that never speaks PostgreSQL: "cannot connect to PostgreSQL:" with no reason, after 10 s.
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda reader, writer: accepted.append(writer), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        out = await run_cli(settings, "doctor", OPSPOLISH_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/x")
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert out.code == 1
    first = out.stdout.splitlines()[0].split()
    assert first[:2] == ["FAIL", "postgres"], out.stdout
    assert " ".join(first[2:]).startswith("cannot connect to PostgreSQL: no PostgreSQL answer within 10 s"), out.stdout


async def test_doctor_names_a_redis_port_that_never_answers(settings: Settings) -> None:
    # Something that accepts connections and never answers: doctor (and dispatch, reconcile) waited for ever.
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda reader, writer: accepted.append(writer), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        out = await run_cli(settings, "doctor", "--json", timeout_s=40, OPSPOLISH_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    verdicts = {c["name"]: (c["verdict"], c["detail"]) for c in json.loads(out.stdout)}
    assert out.code == 1, out
    assert verdicts["postgres"][0] == "ok" and verdicts["redis"][0] == "fail", verdicts
    assert "no answer within 10 s" in verdicts["redis"][1], verdicts


async def test_a_dispatch_to_a_redis_that_stops_answering_fails_in_bounded_time_with_its_run_recorded(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Redis frozen under an open client (SIGSTOP): the dispatch waited for ever, its run left queued with no job.
    monkeypatch.setattr(runtime, "REDIS_CLIENT_TIMEOUT_S", 0.5)
    s = private_redis.settings_for(settings)
    async with opspolish.connect(s) as rt:
        assert private_redis.proc is not None
        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(RedisUnavailable) as exc:
                await asyncio.wait_for(opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "frozen"}),
                                       15)
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)
    assert "Timeout" in exc.value.message, exc.value.message
    [row] = await run_rows(conn)
    assert (row["status"], row["outcome"], row["reason_code"]) == ("completed", "failed", "redis.unavailable")


async def test_a_dispatch_whose_enqueue_answer_was_lost_leaves_its_queued_run_to_run(
    settings: Settings, private_redis: RedisServer, conn: asyncpg.Connection, tenant: str,
) -> None:
    # Redis queued the job (this dispatch's, its answer lost; or a racing dispatch's that joined the run and was told
    # "joined"), and the dispatch recorded the run failed / redis.unavailable: its job then skipped it as
    # already_completed, and the work asked for never ran.
    s = private_redis.settings_for(settings)
    async with opspolish.connect(s) as rt:
        redis = rt.require_redis()
        real = redis.enqueue_job

        async def queued_then_cut(*args: Any, **kwargs: Any) -> Any:
            await real(*args, **kwargs)
            raise RedisConnectionError("Connection closed by server.")

        redis.enqueue_job = queued_then_cut  # type: ignore[method-assign]
        result = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "answer-lost"})
        redis.enqueue_job = real  # type: ignore[method-assign]
    assert result.created
    [row] = await run_rows(conn)
    assert (row["status"], row["reason_code"]) == ("queued", None), row
    await drain(s)
    [row] = await run_rows(conn)
    assert (row["outcome"], row["attempts"]) == ("succeeded", 1)
