"""What a worker process prints per tracked run: arq's start line, then one structured end-of-run event."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog.testing

import opspolish
from opspolish import db
from opspolish.ledger import Ledger
from opspolish.logs import (
    ARQ_DONE_FORMAT,
    MAX_LOG_DEPTH,
    TOO_DEEP,
    _JsonLine,
    _JsonRecords,
    _OneLinePerRun,
    _RedactRecords,
)
from opspolish.runtime import LeaseKeeper, Runtime
from opspolish.sanitize import redact_secrets
from opspolish.settings import Settings
from opspolish.tracking import execute, get_job
from tests.conftest import WorkerProcess, drain, log_events, wait_until
from tests.support.jobs import ECHO_TYPE, EFFECT_TYPE, WORKSPACE_EFFECT_TYPE

pytestmark = pytest.mark.timeout(90)


def _record(msg: str, args: tuple[Any, ...]) -> logging.LogRecord:
    return logging.LogRecord("arq.worker", logging.INFO, __file__, 1, msg, args, None)


def test_only_arqs_completion_line_of_a_tracked_type_is_dropped() -> None:
    one_line = _OneLinePerRun(["assignments.fetch", "test.effect"])
    assert not one_line.filter(_record(ARQ_DONE_FORMAT, (0.01, "q:run:7:assignments.fetch", "{}")))
    assert one_line.filter(_record(ARQ_DONE_FORMAT, (0.01, "q:run:7:someone.elses_job", "{}")))  # not ours
    assert one_line.filter(_record(ARQ_DONE_FORMAT, (0.01, "assignments.fetch.cron", "")))
    assert one_line.filter(_record("%6.2fs → %s(%s)%s", (0.01, "q:run:7:assignments.fetch", "", "")))
    assert one_line.filter(_record("%6.2fs ! %s failed, %s: %s", (0.01, "q:run:7:assignments.fetch", "X", "y")))
    assert _OneLinePerRun([]).filter(_record(ARQ_DONE_FORMAT, (0.01, "q:run:7:assignments.fetch", "{}")))


def test_a_json_line_has_level_utc_timestamp_and_scrubbed_values_in_the_order_they_were_given() -> None:
    render = _JsonLine()
    lines = []
    for method in ("info", "warn", "exception"):
        before = datetime.now(UTC)
        lines.append(json.loads(render(None, method, {
            "run_id": 7, "tenant_id": "t", "event": "run_completed", "counts": {"total": 1, "api_key": "k"},
            "note": "sent Bearer abcdef123456", "stamp": ("a", 1)})))
        after = datetime.now(UTC)
        stamp = lines[-1]["timestamp"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        # microseconds are truncated, so the stamp may sit up to 1 us before the clock read just ahead of it
        assert before - timedelta(microseconds=1) <= datetime.fromisoformat(stamp[:-1] + "+00:00") <= after
    assert [line["level"] for line in lines] == ["info", "warning", "error"]
    assert list(lines[0]) == ["run_id", "tenant_id", "event", "counts", "note", "stamp", "level", "timestamp"]
    assert lines[0]["counts"] == {"total": 1, "api_key": "[redacted]"}
    assert lines[0]["note"] == "sent Bearer [redacted]" and lines[0]["stamp"] == ["a", 1]


def test_a_value_that_contains_itself_is_logged_cut_off_instead_of_raising_out_of_the_log_call() -> None:
    looped: dict[str, Any] = {"token": "t0p-s3cret", "items": [1, 2]}
    looped["self"] = looped
    looped["items"].append(looped["items"])
    line = json.loads(_JsonLine()(None, "info", {"event": "body_state", "state": looped}))
    state = line["state"]
    assert state["token"] == "[redacted]" and state["items"][:2] == [1, 2]
    depth, inner = 0, state
    while isinstance(inner, dict):
        depth, inner = depth + 1, inner["self"]
    assert inner == TOO_DEEP and depth == MAX_LOG_DEPTH
    assert "t0p-s3cret" not in json.dumps(line)
    deep: list[Any] = []
    for _ in range(5):  # an ordinary nesting well within the bound comes out whole
        deep = [deep]
    assert json.loads(_JsonLine()(None, "info", {"event": "e", "deep": deep}))["deep"] == deep


async def test_a_tracked_run_prints_arqs_start_line_and_one_run_completed_event_not_arqs_end_line(
    settings: Settings, seeded: dict[str, Any], conn: asyncpg.Connection, tmp_path: Path,
    worker_processes: list[WorkerProcess],
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    async with opspolish.connect(settings) as rt:
        runs = [await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": f"log{i}", "items": 2})
                for i in range(3)]
    worker = WorkerProcess(settings, burst=True, log_path=tmp_path / "w.log")
    worker_processes.append(worker)
    assert await worker.wait() == 0
    text = worker.log()
    events = log_events([worker])
    completed = [e for e in events if e["event"] == "run_completed"]
    arq_lines = [e["event"] for e in events if e.get("logger", "").startswith("arq")]
    # From the worker's start-up hook on, arq's lines are JSON too (its first lines come before the hook runs).
    lines = text.splitlines()
    first_json = next(i for i, line in enumerate(lines) if line.startswith("{"))
    assert all(line.startswith("{") for line in lines[first_json:] if line.strip()), text
    for run in runs:
        ref = f"{run.job_id}:{EFFECT_TYPE}"
        assert any(f"→ {ref}(" in line for line in arq_lines), text  # arq's start line stays
        assert not any(f"← {ref}" in line for line in arq_lines), text  # its end line gives way to run_completed
        [event] = [e for e in completed if e["run_id"] == run.run_id]
        assert event["outcome"] == "succeeded" and event["counts"]["processed"] == 2
        assert event["job_id"] == run.job_id and isinstance(event["duration_s"], float)
    assert await conn.fetchval("SELECT count(*) FROM operation_runs WHERE outcome = 'succeeded'") == 3


async def test_run_dispatched_names_the_tenant_and_leaves_it_null_for_a_workspace_run(
    settings: Settings, seeded: dict[str, Any],
) -> None:
    tenant = seeded["tenants"][0]
    async with opspolish.connect(settings) as rt:
        with structlog.testing.capture_logs() as events:
            await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant["external_id"], inputs={"tag": "log"})
            await opspolish.dispatch(rt, WORKSPACE_EFFECT_TYPE, workspace_id=tenant["workspace_id"], inputs={})
    dispatched = [e for e in events if e["event"] == "run_dispatched"]
    assert [e["tenant_id"] for e in dispatched] == [str(tenant["id"]), None]  # never the text "None"


_END_OF_RUN = {"run_completed", "run_skipped", "run_abandoned", "run_retrying", "run_handed_back", "run_rejected"}


async def _started(conn: asyncpg.Connection, tag: str) -> None:
    async def found() -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM test_effects WHERE tag = $1", tag))

    await wait_until(found)


async def test_run_lease_lost_carries_the_runs_bound_fields_and_the_run_ends_in_one_line(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any],
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    result = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": "lost", "sleep_s": 30})
    with structlog.testing.capture_logs() as events:
        task = asyncio.create_task(execute(rt, get_job(EFFECT_TYPE), run_id=result.run_id, tenant=tenant,
                                           workspace_id=None, inputs={"tag": "lost", "sleep_s": 30},
                                           job_id=result.job_id, job_try=3))
        await _started(conn, "lost")
        await conn.execute("UPDATE operation_runs SET lease_owner = gen_random_uuid()")  # someone took it over
        await rt.leases.beat()
        assert (await asyncio.wait_for(task, 5))["decision"] == "lease_lost"
    [lost] = [e for e in events if e["event"] == "run_lease_lost"]
    assert {k: lost.get(k) for k in ("run_id", "type", "tenant_id", "job_id", "job_try")} == {
        "run_id": result.run_id, "type": EFFECT_TYPE, "tenant_id": str(result.tenant_id), "job_id": result.job_id,
        "job_try": 3}
    assert [e["event"] for e in events if e["event"] in _END_OF_RUN] == ["run_abandoned"]


async def test_a_failed_attempt_whose_lease_was_taken_before_its_retry_still_ends_in_one_line(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any],
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    inputs = {"tag": "gone", "sleep_s": 1.0, "fail_times": 1}
    result = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs=inputs)
    with structlog.testing.capture_logs() as events:
        task = asyncio.create_task(execute(rt, get_job(EFFECT_TYPE), run_id=result.run_id, tenant=tenant,
                                           workspace_id=None, inputs=inputs, job_id=result.job_id))
        await _started(conn, "gone")
        # Taken over while the body runs, before the lease keeper notices: the transient failure cannot hand it back.
        await conn.execute("UPDATE operation_runs SET lease_owner = gen_random_uuid()")
        assert (await asyncio.wait_for(task, 10))["decision"] == "lease_lost"
    ends = [e for e in events if e["event"] in _END_OF_RUN]
    assert [(e["event"], e["run_id"], e["job_id"]) for e in ends] == [("run_abandoned", result.run_id, result.job_id)]


async def test_a_failed_heartbeat_names_the_runs_whose_leases_it_could_not_extend(settings: Settings) -> None:
    pool = await db.create_pool(settings, min_size=1, max_size=1)
    keeper = LeaseKeeper(Ledger(pool), interval_s=0.02)
    keeper.hold(11, uuid.uuid4())
    keeper.hold(5, uuid.uuid4())
    await pool.close()  # every beat now fails, as when the database is away
    with structlog.testing.capture_logs() as events:
        keeper.start()

        async def failed() -> list[Any]:
            return [e for e in events if e["event"] == "heartbeat_failed"]

        first = (await wait_until(failed, timeout_s=10))[0]
        await keeper.stop()
    assert (first["log_level"], first["run_ids"], first["reason_code"]) == ("warning", [5, 11], "db.unavailable")


def test_an_arq_line_in_the_json_format_is_one_json_object_with_its_redacted_traceback() -> None:
    try:
        raise RuntimeError("provider said password=Tb-Canary-9")
    except RuntimeError:
        record = logging.LogRecord("arq.jobs", logging.ERROR, __file__, 1, "%6.2fs ! %s failed", (0.5, "q:run:7:x"),
                                   sys.exc_info())
    _RedactRecords().filter(record)
    line = _JsonRecords().format(record)
    assert "\n" not in line and "Tb-Canary-9" not in line
    event = json.loads(line)
    assert (event["logger"], event["level"]) == ("arq.jobs", "error")
    assert event["event"].startswith("  0.50s ! q:run:7:x failed\nTraceback (most recent call last):"), event


async def test_a_repeated_stop_signal_cancels_again_a_body_that_swallowed_the_first(rt: Runtime) -> None:
    # The stop handler skips tasks already being cancelled (a hand-back in flight must not be cut short), so a body
    # that caught the first cancellation and went on could no longer be stopped by any signal but SIGKILL.
    from types import SimpleNamespace

    from opspolish.worker import _on_stop_signal

    swallowed = asyncio.Event()

    async def stubborn_body() -> None:
        lease = rt.leases.hold(1, uuid.uuid4())
        lease.in_body = True
        try:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                swallowed.set()  # swallowed: the body goes on
            await asyncio.sleep(60)
        finally:
            rt.leases.drop(lease)

    await rt.leases.stop()  # no beat: its lease (of no real run) would be found lost, and its body cancelled
    task = asyncio.create_task(stubborn_body())
    await asyncio.sleep(0)
    worker: Any = SimpleNamespace(job_tasks={"job": task}, tasks={"job": task}, allow_pick_jobs=True, on_stop=None,
                                ctx={})
    try:
        _on_stop_signal(worker, rt, None, signal.SIGTERM)
        await asyncio.wait_for(swallowed.wait(), 5)
        await asyncio.sleep(0.05)
        assert not task.done() and rt.stopping and not worker.allow_pick_jobs
        _on_stop_signal(worker, rt, None, signal.SIGTERM)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    finally:
        rt.stopping = False
        task.cancel()


async def test_arqs_start_line_never_shows_a_credential_its_cut_to_80_characters_split(
    settings: Settings, seeded: dict[str, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    # arq cuts a job's arguments to 80 characters before any log filter sees its line: a URL's password cut before
    # its "@" had no shape redaction knew, and its first 40-odd characters were printed.
    tenant = seeded["tenants"][0]["external_id"]
    password = "cnryCutShort" + "x" * 60
    async with opspolish.connect(settings) as rt:
        await opspolish.dispatch(rt, ECHO_TYPE, tenant=tenant,
                                 inputs={"dsn": f"postgresql://reader:{password}@db.example/app"})
    with caplog.at_level(logging.INFO, logger="arq.worker"):
        await drain(settings)
    started = [r.getMessage() for r in caplog.records if "→" in r.getMessage()]
    assert len(started) == 1 and "test.echo(inputs={'dsn': 'postgresql://reader:" in started[0], started
    assert "cnry" not in started[0] and "[redacted]" in started[0] and started[0].endswith("…)"), started


_LOG_A_SECRET = """
import sys, structlog
from opspolish.logs import configure_logging
configure_logging(sys.argv[1])
log = structlog.get_logger("opspolish")
log.warning("retrying upstream postgres://app:cnryEvent1@db/prod", run_id=1)
try:
    raise RuntimeError("auth failed: " + "password=cnryTrace2")
except RuntimeError:
    log.exception("body_failed", run_id=1)
"""


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_an_event_built_from_secrets_and_a_logged_exception_are_redacted(log_format: str) -> None:
    # The event text was never sanitized (a body's f-string printed a URL's password), the console format printed a
    # logged exception's traceback raw, and the JSON format printed "exc_info": true and no exception at all.
    out = subprocess.run([sys.executable, "-c", _LOG_A_SECRET, log_format], capture_output=True, text=True,
                         timeout=60, check=True)
    text = out.stderr
    assert "cnry" not in text, text
    assert "postgres://app:[redacted]@db/prod" in text and "RuntimeError: auth failed: password=[redacted]" in text
    if log_format == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        assert lines[1]["event"] == "body_failed" and "exc_info" not in lines[1]
        assert lines[1]["exception"].startswith("Traceback (most recent call last):\n"), lines[1]
    else:
        assert "Traceback (most recent call last):\n" in text


def test_arqs_start_line_redacts_a_bounded_prefix_of_a_large_input(monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole of a large input was redacted for the 80 characters arq shows of it: 1,500 policy ids and a URL took
    # 48 ms of the worker's loop per job. What is redacted is bounded (a count of characters, not a timing).
    import arq.worker

    from opspolish import logs

    seen: list[int] = []

    def counting(text: str, **kwargs: Any) -> str:
        seen.append(len(text))
        return redact_secrets(text, **kwargs)

    monkeypatch.setattr(logs, "redact_secrets", counting)
    logs.redact_job_arguments_before_arq_cuts_them()
    big = {"dsn": "postgresql://reader:cnryBig1234567890@db/app", "ids": [str(uuid.uuid4()) for _ in range(1500)],
           "note": "see https://example.com/token"}
    line = arq.worker.args_to_string((), {"inputs": big})  # type: ignore[attr-defined]
    assert "cnry" not in line and line.endswith("…") and len(line) == 80, line
    assert seen == [logs.ARQ_ARGS_REDACTED_CHARS] and len(repr(big)) > 10 * logs.ARQ_ARGS_REDACTED_CHARS
