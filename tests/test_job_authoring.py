"""What a job author meets when declaring and running a new job type with ``tracked_job`` (real Postgres, Redis
and in-process arq workers where a run is involved)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import asyncpg
import pytest
from arq import Retry
from hypothesis import given
from hypothesis import strategies as st
from pydantic import (
    AliasChoices,
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    IPvAnyAddress,
    IPvAnyNetwork,
    PostgresDsn,
    computed_field,
)

from opspolish.counts import MAX_COUNT, Counts
from opspolish.dispatch import dispatch
from opspolish.errors import InputInvalid, OpsPolishError, ProviderThrottled
from opspolish.fingerprint import fingerprint
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from opspolish.tracking import REGISTRY, RunContext, execute, get_job, tracked_job
from tests.conftest import drain
from tests.support.jobs import ALIASED_TYPE, WORKSPACE_EFFECT_TYPE


async def _body(run: RunContext) -> None:
    run.counts.add_total(1)
    run.counts.item_succeeded()


class _Inputs(BaseModel):
    day: str = "2026-11-26"


@pytest.mark.parametrize(("kwargs", "error", "names"), [
    ({"cooldown_s": -5}, ValueError, "cooldown_s"),
    ({"cooldown_s": math.nan}, ValueError, "cooldown_s"),  # failed every claim: the run stayed queued for ever
    ({"cooldown_s": math.inf}, ValueError, "cooldown_s"),
    ({"cooldown_s": "900"}, TypeError, "cooldown_s"),
    ({"timeout_s": 0}, ValueError, "timeout_s"),
    ({"timeout_s": -1}, ValueError, "timeout_s"),
    ({"timeout_s": math.nan}, ValueError, "timeout_s"),
    ({"timeout_s": 11 * 365 * 86_400}, ValueError, "timeout_s"),
    ({"max_attempts": 0}, ValueError, "max_attempts"),
    ({"max_attempts": 2.5}, TypeError, "max_attempts"),
    ({"max_attempts": True}, TypeError, "max_attempts"),
    ({"scope": "global"}, ValueError, "scope"),
    ({"inputs": dict}, TypeError, "inputs"),  # failed every dispatch with an AttributeError
    ({"inputs": _Inputs()}, TypeError, "inputs"),  # an instance, not the model class
])
def test_bad_decorator_arguments_raise_when_the_job_type_is_declared_naming_the_argument(
    kwargs: dict[str, Any], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=rf"tracked_job\('author\.bad'\): {names}: must"):
        tracked_job("author.bad", **kwargs)(_body)
    assert "author.bad" not in REGISTRY


def test_a_body_that_is_not_an_async_function_taking_the_run_is_refused_when_declared() -> None:
    def sync_body(run: RunContext) -> None:  # used to run (side effects and all), then fail with a TypeError
        pass

    async def no_argument() -> None:
        pass

    with pytest.raises(TypeError, match=r"tracked_job\('author\.sync'\): the job body must be an async function"):
        tracked_job("author.sync")(sync_body)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must take one argument, the RunContext"):
        tracked_job("author.sync")(no_argument)  # type: ignore[arg-type]
    assert "author.sync" not in REGISTRY


@pytest.mark.parametrize("run_type", ["", "  ", " author.padded", "author\x00nul"])
def test_a_run_type_that_is_no_usable_name_is_refused(run_type: str) -> None:
    with pytest.raises(ValueError, match="run_type: must be a non-empty name"):
        tracked_job(run_type)


def test_a_bare_decorator_without_the_run_type_says_how_to_call_it() -> None:
    with pytest.raises(TypeError, match=r"run_type: must be the job type's name"):
        tracked_job(_body)  # type: ignore[arg-type]


def test_boundary_values_are_accepted() -> None:
    try:
        job = tracked_job("author.bounds", inputs=_Inputs, scope="workspace", cooldown_s=0, timeout_s=0.5,
                          max_attempts=1)(_body)
        assert (job.cooldown_s, job.timeout_s, job.max_attempts, job.scope) == (0, 0.5, 1, "workspace")
    finally:  # every registered type is in a default worker: this one's timeout must not reach other tests' workers
        REGISTRY.pop("author.bounds", None)


@pytest.fixture
def tenant(seeded: dict[str, Any]) -> str:
    return str(seeded["tenants"][0]["external_id"])


async def runs(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch("SELECT * FROM operation_runs ORDER BY id")]


async def _client_timeout(run: RunContext) -> None:
    run.counts.add_total(2)
    run.counts.item_succeeded()
    raise TimeoutError("upstream read timed out after 5 s")


tracked_job("author.client_timeout")(_client_timeout)


async def _wraps_its_cancellation(run: RunContext) -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        raise RuntimeError("request interrupted") from None


async def test_a_body_that_turns_its_deadlines_cancellation_into_its_own_error_ends_job_timeout(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # Recorded as the body's own error: failed / internal.unexpected, "RuntimeError: request interrupted".
    # Declared here, not at import: a worker built from the whole registry elsewhere would carry its 0.2 s timeout.
    tracked_job("author.wraps_cancel", timeout_s=0.2, max_attempts=1)(_wraps_its_cancellation)
    try:
        await dispatch(rt, "author.wraps_cancel", tenant=tenant)
        await drain(settings)
    finally:
        REGISTRY.pop("author.wraps_cancel", None)
    [run] = await runs(conn)
    assert (run["outcome"], run["reason_code"]) == ("failed", "job.timeout"), run


async def test_a_timeout_error_raised_by_the_body_is_its_own_error_not_job_timeout(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    await dispatch(rt, "author.client_timeout", tenant=tenant)
    await drain(settings)
    [run] = await runs(conn)
    assert (run["outcome"], run["reason_code"]) == ("failed", "internal.unexpected")
    assert run["reason_message"] == "TimeoutError: upstream read timed out after 5 s"
    assert run["summary_counts"] == {"total": 2, "processed": 1, "failed": 0}


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


async def _raises_unprintable(run: RunContext) -> None:
    raise _Unprintable()


async def _raises_empty(run: RunContext) -> None:
    raise KeyError  # str() is '' for some exceptions: the type alone, not "KeyError: "


class _LibraryStop(BaseException):  # a library's own BaseException subclass (like gevent's or trio's)
    pass


async def _raises_base_exception(run: RunContext) -> None:
    raise _LibraryStop("stop everything")


async def _raises_keyboard_interrupt(run: RunContext) -> None:
    raise KeyboardInterrupt


class _NoInit(OpsPolishError):
    def __init__(self, detail: str) -> None:  # skips OpsPolishError.__init__: no .message
        self.detail = detail


class _NoInitTransient(_NoInit):
    transient = True
    retry_after_s = 0.0


async def _raises_no_init(run: RunContext) -> None:
    raise _NoInit("upstream said no")


async def _raises_no_init_transient(run: RunContext) -> None:
    run.counts.add_total(1)
    raise _NoInitTransient("upstream busy")


tracked_job("author.unprintable")(_raises_unprintable)
tracked_job("author.empty_error")(_raises_empty)
tracked_job("author.base_exception")(_raises_base_exception)
tracked_job("author.keyboard_interrupt")(_raises_keyboard_interrupt)
tracked_job("author.no_init")(_raises_no_init)
tracked_job("author.no_init_transient", max_attempts=2)(_raises_no_init_transient)


async def _bumps_a_nul_name(run: RunContext) -> None:
    run.counts.add_total(1)
    run.counts.bump("a\x00b")  # jsonb cannot hold it: the completion used to be refused and the run left running


tracked_job("author.nul_detail")(_bumps_a_nul_name)


@pytest.mark.parametrize(("run_type", "message"), [
    # The broken __str__ raised inside the body's error handling: the run stayed running until its lease went stale.
    ("author.unprintable", "_Unprintable: (its message could not be read: RuntimeError)"),
    ("author.empty_error", "KeyError"),
    # A BaseException other than SystemExit stopped the worker with its other jobs, and left the run running.
    ("author.base_exception", "_LibraryStop: stop everything"),
    ("author.keyboard_interrupt", "KeyboardInterrupt"),
    # An OpsPolishError subclass that skipped OpsPolishError.__init__ has no .message: reading it raised, run left
    # running. The retry path read it too, for a transient one.
    ("author.no_init", "_NoInit: upstream said no"),
    ("author.no_init_transient", "_NoInitTransient: upstream busy"),
    # A detail count the ledger cannot hold, refused by bump() before the completion.
    ("author.nul_detail", "ValueError: counts: bump('a\\x00b'): a name of 1 to 100 characters with no NUL"),
])
async def test_an_error_the_body_cannot_describe_or_the_ledger_cannot_hold_still_ends_the_run(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str, run_type: str, message: str
) -> None:
    await dispatch(rt, run_type, tenant=tenant)
    await drain(settings)
    [run] = await runs(conn)
    assert (run["status"], run["outcome"], run["reason_code"]) == ("completed", "failed", "internal.unexpected")
    assert run["reason_message"] == message


async def _bumps_refuse_me(run: RunContext) -> None:
    run.counts.add_total(2)
    run.counts.item_succeeded()
    run.counts.bump("refuse_me")


tracked_job("author.refused_outcome")(_bumps_refuse_me)


async def test_an_outcome_the_ledger_refuses_is_written_again_as_failed_not_left_running(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # Stands for any value the ledger cannot hold that no check caught first: the run used to stay running until its
    # lease went stale and reconcile called it orphaned, its body's outcome lost.
    await conn.execute("ALTER TABLE operation_runs ADD CONSTRAINT probe_refuse_me "
                       "CHECK (summary_counts IS NULL OR NOT summary_counts ? 'refuse_me') NOT VALID")
    await dispatch(rt, "author.refused_outcome", tenant=tenant)
    await drain(settings)
    [run] = await runs(conn)
    assert (run["status"], run["outcome"], run["reason_code"]) == ("completed", "failed", "internal.unexpected"), run
    assert run["reason_message"].startswith("the ledger refused this run's outcome: CheckViolationError"), run
    assert run["summary_counts"] == {"total": 2, "processed": 1, "failed": 0}  # the main counts, still the final ones


class _CountsInputs(BaseModel):
    calls: list[tuple[str, Any, int]]  # (method, key or None, n)


async def _counting(run: RunContext) -> None:
    for method, key, n in _CountsInputs.model_validate(run.inputs).calls:
        if method == "bump":
            run.counts.bump(key, n)
        else:
            getattr(run.counts, method)(n)


tracked_job("author.counting", inputs=_CountsInputs)(_counting)


@pytest.mark.parametrize(("calls", "message"), [
    # Used to complete "succeeded" with the detail count silently overwritten by the main one.
    ([("add_total", None, 2), ("item_succeeded", None, 2), ("bump", "failed", 1)],
     "ValueError: counts: bump('failed'): a detail count needs a name of its own"),
    # Used to fail the ledger's CHECK at completion: the run stayed running until its lease went stale.
    ([("add_total", None, 10**17)] * 10, f"ValueError: counts: total would exceed {MAX_COUNT}"),
    ([("item_succeeded", None, 10**18)], f"ValueError: counts: processed would exceed {MAX_COUNT}"),
    ([("bump", f"k{i}", 1) for i in range(101)], "ValueError: counts: bump('k100'): at most 100 detail counts per run"),
    ([("bump", "x" * 101, 1)], "ValueError: counts: bump('" + "x" * 100 + "'): a name of 1 to 100 characters"),
])
async def test_counts_the_ledger_cannot_hold_end_the_run_failed_with_a_message_naming_them(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str, calls: list[Any], message: str
) -> None:
    await dispatch(rt, "author.counting", tenant=tenant, inputs={"calls": calls})
    await drain(settings)
    [run] = await runs(conn)
    assert (run["status"], run["outcome"], run["reason_code"]) == ("completed", "failed", "internal.unexpected")
    assert run["reason_message"].startswith(message)


class _AssignInputs(BaseModel):
    field: str
    value: Any


async def _assigning(run: RunContext) -> None:
    run.counts.add_total(2)
    run.counts.item_succeeded()
    args = _AssignInputs.model_validate(run.inputs)
    if args.field == "extra":
        run.counts.extra["x"] = args.value  # type: ignore[index]
    else:
        setattr(run.counts, args.field, args.value)


tracked_job("author.assigning", inputs=_AssignInputs)(_assigning)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("failed", -1, "AttributeError: property 'failed' of 'Counts' object has no setter"),
    ("processed", 10**19, "AttributeError: property 'processed' of 'Counts' object has no setter"),
    ("total", "5", "AttributeError: property 'total' of 'Counts' object has no setter"),
    ("extra", -1, "TypeError: 'mappingproxy' object does not support item assignment"),
])
async def test_counts_assigned_directly_end_the_run_failed_not_running(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str, field: str, value: Any, message: str
) -> None:
    # Assigned, the counts skipped every check: the ledger refused the completion, the fallback write repeated the
    # same counts and failed too (a TypeError for text), and the run stayed running until reconcile called it
    # orphaned; a negative detail count was stored as it was.
    await dispatch(rt, "author.assigning", tenant=tenant, inputs={"field": field, "value": value})
    await drain(settings)
    [run] = await runs(conn)
    assert (run["status"], run["outcome"], run["reason_code"]) == ("completed", "failed", "internal.unexpected"), run
    assert run["reason_message"].startswith(message), run
    assert run["summary_counts"] == {"total": 2, "processed": 1, "failed": 0}


@given(st.lists(st.tuples(st.sampled_from(["add_total", "item_succeeded", "item_failed", "bump"]),
                          st.sampled_from(["total", "processed", "failed", "requeued"]),
                          st.integers(min_value=0, max_value=2 * MAX_COUNT)), max_size=12))
def test_any_sequence_of_count_calls_leaves_counts_the_ledger_accepts(calls: list[tuple[str, str, int]]) -> None:
    counts = Counts()
    for method, key, n in calls:
        with contextlib.suppress(ValueError):
            counts.bump(key, n) if method == "bump" else getattr(counts, method)(n)
    c = counts.as_dict()
    assert 0 <= c["failed"] <= c["processed"] <= c["total"] <= MAX_COUNT
    assert all(0 <= v <= MAX_COUNT for v in c.values())
    assert c.get("requeued", 0) == counts.extra.get("requeued", 0)


async def _throttled(run: RunContext) -> None:
    raise ProviderThrottled("slow down", retry_after_s=float(run.inputs["retry_after_s"]))


tracked_job("author.throttled", max_attempts=2)(_throttled)


@pytest.mark.parametrize("retry_after_s", ["nan", "inf", "1e300"])
async def test_a_retry_after_that_is_no_delay_falls_back_to_the_backoff_and_the_run_still_ends(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str, retry_after_s: str
) -> None:
    # A NaN, infinite or absurd retry_after_s reached arq as is: the retry never came and the run stayed queued.
    await dispatch(rt, "author.throttled", tenant=tenant, inputs={"retry_after_s": retry_after_s})
    await drain(settings, timeout_s=30)
    [run] = await runs(conn)
    assert (run["status"], run["outcome"], run["reason_code"], run["attempts"]) == (
        "completed", "failed", "provider.throttled", 2)


async def _asks_for_a_retry(run: RunContext) -> None:
    run.counts.add_total(3)
    run.counts.item_succeeded(run.attempt)
    if run.attempt == 1 or run.inputs.get("always"):
        raise Retry(defer=0.1)
    run.counts.item_succeeded(3 - run.attempt)


tracked_job("author.arq_retry", max_attempts=2)(_asks_for_a_retry)


async def test_arq_retry_raised_by_a_body_retries_the_run_and_its_counts_are_the_last_attempts(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # arq's own way to ask for a retry ended the run failed / internal.unexpected ("Retry: <Retry defer 0.10s>").
    await dispatch(rt, "author.arq_retry", tenant=tenant)
    await dispatch(rt, "author.arq_retry", tenant=tenant, inputs={"always": True})
    await drain(settings, timeout_s=30)
    retried, exhausted = await runs(conn)
    assert (retried["status"], retried["outcome"], retried["reason_code"], retried["attempts"]) == (
        "completed", "succeeded", None, 2)
    assert retried["summary_counts"] == {"total": 3, "processed": 3, "failed": 0}
    assert (exhausted["outcome"], exhausted["reason_code"], exhausted["attempts"]) == ("failed", "job.retry", 2)
    assert exhausted["reason_message"] == "the job body asked for a retry (Retry: <Retry defer 0.10s>)"
    assert exhausted["summary_counts"] == {"total": 3, "processed": 2, "failed": 0}


async def test_a_workspace_job_dispatched_with_a_tenant_is_refused_not_run_for_the_whole_workspace(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # The tenant used to be dropped silently: a workspace run (tenant_id NULL) of what was meant for one tenant.
    t = seeded["tenants"][0]
    with pytest.raises(InputInvalid, match=r"^tenant: 'test.workspace_effect' is a workspace job") as caught:
        await dispatch(rt, WORKSPACE_EFFECT_TYPE, tenant=str(t["external_id"]), workspace_id=t["workspace_id"])
    assert caught.value.field == "tenant"
    assert await runs(conn) == []
    assert await rt.require_redis().queued_jobs(queue_name=rt.settings.queue_name) == []


async def test_a_workspace_job_delivered_with_a_tenant_is_refused_by_the_worker_too(
    rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # A hand-made enqueue_job of a workspace job naming a tenant: the worker used to drop the tenant and run it for
    # the whole workspace, where dispatch refuses the same request.
    t = seeded["tenants"][0]
    result = await execute(rt, get_job(WORKSPACE_EFFECT_TYPE), run_id=None, tenant=str(t["external_id"]),
                           workspace_id=t["workspace_id"], inputs={}, job_id="raw:workspace-with-tenant")
    assert (result["decision"], result["reason_code"]) == ("rejected", "input.invalid"), result
    assert await runs(conn) == []
    control = await execute(rt, get_job(WORKSPACE_EFFECT_TYPE), run_id=None, tenant=None,
                            workspace_id=t["workspace_id"], inputs={}, job_id="raw:workspace")
    assert control["outcome"] == "succeeded", control



async def test_inputs_under_aliases_and_defaults_run_as_dispatched_and_are_one_identity(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # The worker validated the model's output again: under field names, an aliased field was "Field required" and
    # the run stayed queued. And inputs given at their defaults were another identity than inputs left out.
    tenant = str(seeded["tenants"][0]["external_id"])
    friday = await dispatch(rt, ALIASED_TYPE, tenant=tenant, inputs={"Day": "friday"})
    default = await dispatch(rt, ALIASED_TYPE, tenant=tenant)
    spelled_out = await dispatch(rt, ALIASED_TYPE, tenant=tenant, inputs={"Day": "monday", "n": 1})
    assert (default.created, spelled_out.created, spelled_out.run_id) == (True, False, default.run_id)
    assert fingerprint({"Day": "monday"}, job_type=ALIASED_TYPE) == fingerprint({}, job_type=ALIASED_TYPE)
    raw = await rt.require_redis().enqueue_job(ALIASED_TYPE, tenant_id=tenant, inputs={"Day": "sunday", "n": 2},
                                               _queue_name=settings.queue_name)
    assert raw is not None
    await drain(settings)
    rows = await conn.fetch("SELECT id, outcome, context FROM operation_runs ORDER BY id")
    assert [(r["outcome"], r["context"]) for r in rows] == [
        ("succeeded", {"Day": "friday"}), ("succeeded", {}), ("succeeded", {"Day": "sunday", "n": 2})]
    tags = await conn.fetch("SELECT run_id, tag FROM test_effects ORDER BY run_id")
    assert [(t["run_id"], t["tag"]) for t in tags] == [
        (friday.run_id, 'friday/1 {"Day": "friday"}'), (default.run_id, "monday/1 {}"),
        (rows[2]["id"], 'sunday/2 {"Day": "sunday", "n": 2}')]

class _RichInputs(BaseModel):
    url: HttpUrl
    ip: IPvAnyAddress
    net: IPvAnyNetwork
    path: Path
    every: dt.timedelta
    at: dt.time
    dsn: PostgresDsn | None = None


async def _reads_rich_inputs(run: RunContext) -> None:
    m = _RichInputs.model_validate(run.inputs)
    await run.runtime.pool.execute(
        "INSERT INTO test_effects (run_id, attempt, tag, pid) VALUES ($1, $2, $3, 0)", run.run_id, run.attempt,
        f"{m.url}|{m.ip}|{m.net}|{m.path}|{m.every.total_seconds()}|{m.at.isoformat()}|{m.dsn}")


tracked_job("author.rich_inputs", inputs=_RichInputs)(_reads_rich_inputs)


async def test_inputs_with_urls_addresses_paths_durations_and_times_dispatch_run_and_read_back(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    # Each was refused at dispatch as "unsupported type" (the model's output holds an HttpUrl, an IPv4Address...):
    # such a job type could be declared but never dispatched.
    as_text = {"url": "https://example.com/a?b=1", "ip": "10.0.0.7", "net": "10.0.0.0/8", "path": "/srv/in.csv",
               "every": "PT1H30M", "at": "10:05:00Z", "dsn": "postgres://app@h1:5432,h2:5432/db"}
    as_objects = {"url": HttpUrl("https://example.com/a?b=1"), "ip": ipaddress.ip_address("10.0.0.7"),
                  "net": ipaddress.ip_network("10.0.0.0/8"), "path": Path("/srv/in.csv"),
                  "every": dt.timedelta(hours=1, minutes=30), "at": dt.time(10, 5, tzinfo=dt.UTC),
                  "dsn": PostgresDsn("postgres://app@h1:5432,h2:5432/db")}
    assert fingerprint(as_text, job_type="author.rich_inputs") == fingerprint(as_objects, job_type="author.rich_inputs")
    first = await dispatch(rt, "author.rich_inputs", tenant=tenant, inputs=as_text)
    again = await dispatch(rt, "author.rich_inputs", tenant=tenant, inputs=as_objects)
    assert (first.verdict, again.verdict, again.run_id) == ("queued", "joined", first.run_id)
    await drain(settings)
    [run] = await runs(conn)
    assert (run["status"], run["outcome"]) == ("completed", "succeeded"), run
    assert run["context"] == {"url": "https://example.com/a?b=1", "ip": "10.0.0.7", "net": "10.0.0.0/8",
                              "path": "/srv/in.csv", "every": "PT1H30M", "at": "10:05:00Z",
                              "dsn": "postgres://app@h1:5432,h2:5432/db"}
    # The recorded context reads back as the same inputs: what a delivery without a payload (reconcile's
    # re-enqueue) hands the body.
    assert _RichInputs.model_validate(run["context"]) == _RichInputs.model_validate(as_objects)
    [effect] = await conn.fetch("SELECT tag FROM test_effects")
    assert effect["tag"] == ("https://example.com/a?b=1|10.0.0.7|10.0.0.0/8|/srv/in.csv|5400.0|10:05:00+00:00|"
                             "postgres://app@h1:5432,h2:5432/db")


def test_fingerprint_of_a_job_type_finds_it_through_opspolish_job_modules(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As dispatch does: before, ``fingerprint(..., job_type=...)`` of a type whose module nothing had imported yet
    was ``unknown job type`` even with the module in OPSPOLISH_JOB_MODULES."""
    (tmp_path / "fp_lookup_jobs.py").write_text(
        "from pydantic import BaseModel\n"
        "from opspolish import tracked_job\n"
        "class Day(BaseModel):\n"
        "    model_config = {'extra': 'forbid'}\n"
        "    day: str\n"
        "@tracked_job('fp.lookup', inputs=Day)\n"
        "async def build(run) -> None:\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OPSPOLISH_JOB_MODULES", "fp_lookup_jobs")
    try:
        assert "fp.lookup" not in REGISTRY
        assert fingerprint({"day": "2026-12-04"}, job_type="fp.lookup") == fingerprint({"day": "2026-12-04"})
        with pytest.raises(InputInvalid, match=r"inputs\.day"):
            fingerprint({"day": 5}, job_type="fp.lookup")
    finally:
        REGISTRY.pop("fp.lookup", None)
        sys.modules.pop("fp_lookup_jobs", None)


def test_every_error_the_library_raises_and_the_job_types_class_are_importable_from_opspolish() -> None:
    # dispatch documents DbUnavailable / RedisUnavailable, yet `except opspolish.DbUnavailable` was an AttributeError.
    import opspolish
    from opspolish import errors

    raised = {name for name, obj in vars(errors).items()
              if isinstance(obj, type) and issubclass(obj, errors.OpsPolishError)}
    assert raised | {"TrackedJob"} <= set(opspolish.__all__)
    assert all(getattr(opspolish, name) is getattr(errors, name) for name in raised)


def test_a_job_type_declared_again_with_other_settings_is_refused_naming_them() -> None:
    # The same body with another policy silently replaced the registered one.
    async def body(run: RunContext) -> None:
        return None

    first = tracked_job("author.declared_twice", cooldown_s=0, max_attempts=1)(body)
    try:
        assert tracked_job("author.declared_twice", cooldown_s=0, max_attempts=1)(body) == first  # a re-import
        with pytest.raises(ValueError, match=r"already registered with other settings \(cooldown_s, max_attempts\)"):
            tracked_job("author.declared_twice", cooldown_s=900, max_attempts=7)(body)
        assert get_job("author.declared_twice") == first
    finally:
        REGISTRY.pop("author.declared_twice", None)


class _ReadsBackNested(BaseModel):
    day: str = Field(alias="Day")


class _WrittenAsAnotherName(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    day: str = Field(serialization_alias="Day")


class _ReadUnderAnotherName(BaseModel):
    day: str = Field(validation_alias="d")


class _ReadUnderChoices(BaseModel):
    day: str = Field(validation_alias=AliasChoices("d", "dia"))


class _ReadUnderAPath(BaseModel):
    day: str = Field(validation_alias=AliasPath("when", "day"))


class _NotReadByAlias(BaseModel):
    model_config = ConfigDict(validate_by_alias=False, validate_by_name=True)
    day: str = Field(alias="Day")


class _Inner(BaseModel):
    day: str = Field(validation_alias="d")


class _NestedUnreadable(BaseModel):
    inner: list[_Inner] | None = None


@pytest.mark.parametrize(("model", "says"), [
    (_WrittenAsAnotherName, "inputs: field 'day' is written as 'Day' but read as 'day'"),
    (_ReadUnderAnotherName, "inputs: field 'day' is written as 'day' but read as 'd'"),
    # Not checked before: declared, then every run failed reading back its own inputs.
    (_ReadUnderChoices, "inputs: field 'day' is written as 'day' but read as 'd' or 'dia'"),
    (_ReadUnderAPath, "inputs: field 'day' is written as 'day' but read as no top-level name"),
    (_NotReadByAlias, "inputs: field 'day' is written as 'Day' but read as 'day'"),
    (_NestedUnreadable, "inputs.inner: field 'day' is written as 'day' but read as 'd'"),
])
def test_a_model_whose_output_it_cannot_read_back_is_refused_when_declared(model: type[BaseModel], says: str) -> None:
    # Its runs recorded {"Day": ...}, which the body's (and every redelivery's) validation refused: every run failed.
    with pytest.raises(ValueError, match=re.escape(f"tracked_job('author.unreadable'): {says}:")):
        tracked_job("author.unreadable", inputs=model)(_body)
    assert "author.unreadable" not in REGISTRY


class _Cat(BaseModel):
    kind: Literal["cat"] = "cat"
    name: str


class _Dog(BaseModel):
    kind: Literal["dog"] = "dog"
    name: str


class _TaggedDog(BaseModel):
    kind: Literal["dog"]
    name: str


class _TaggedCat(BaseModel):
    kind: Literal["cat"]
    name: str


class _DiscriminatedWithDefaults(BaseModel):
    pet: Annotated[_Cat | _Dog, Field(discriminator="kind")]


class _UnionWithDefaults(BaseModel):
    pets: list[_Cat | _Dog] = []


class _DiscriminatedRequired(BaseModel):
    pet: Annotated[_TaggedCat | _TaggedDog, Field(discriminator="kind")]
    other: _Cat | None = None  # one model and None: no member to tell apart, a default tag is harmless


@pytest.mark.parametrize("model", [_DiscriminatedWithDefaults, _UnionWithDefaults])
def test_a_union_whose_members_tags_have_defaults_is_refused_when_declared(model: type[BaseModel]) -> None:
    # The tag, at its default, was left out of the recorded output: the discriminated union failed every run
    # (union_tag_not_found) and the plain one read a dog back as a cat.
    with pytest.raises(ValueError, match=r"field 'kind' of _Cat, one of a union's members, has a default"):
        tracked_job("author.pets", inputs=model)(_body)
    assert "author.pets" not in REGISTRY


def test_a_union_with_required_tags_reads_back_the_member_dispatched() -> None:
    job = tracked_job("author.tagged_pets", inputs=_DiscriminatedRequired)(_body)
    try:
        valid, _ = job.canonical({"pet": {"kind": "dog", "name": "rex"}})
        assert valid == {"pet": {"kind": "dog", "name": "rex"}}
        assert isinstance(_DiscriminatedRequired.model_validate(valid).pet, _TaggedDog)
    finally:
        REGISTRY.pop("author.tagged_pets", None)


class _ExcludesARequiredField(BaseModel):
    day: str = Field(exclude=True)


class _ExcludesAnOptionalField(BaseModel):
    day: str = Field(default="monday", exclude=True)


@pytest.mark.parametrize("model", [_ExcludesARequiredField, _ExcludesAnOptionalField])
def test_a_model_that_leaves_a_field_out_of_its_output_is_refused_when_declared(model: type[BaseModel]) -> None:
    # The required one failed every run ("day: Field required" in the worker); the optional one ran every run with
    # its default, whatever was dispatched, and all dispatches were one identity.
    with pytest.raises(ValueError, match=r"inputs: field 'day' is excluded from the model's output"):
        tracked_job("author.excluding", inputs=model)(_body)
    assert "author.excluding" not in REGISTRY


class _ReadsBackEveryWay(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    a: str = Field(validation_alias=AliasChoices("a", "alpha"))
    b: str = Field(default="", validation_alias=AliasPath("b"))
    c: str = Field(default="", alias="C")
    inner: list[_ReadsBackNested] = []


def test_models_that_read_their_output_back_are_accepted() -> None:
    job = tracked_job("author.reads_back", inputs=_ReadsBackEveryWay)(_body)
    try:
        valid, _ = job.canonical({"alpha": "x", "b": "y", "C": "z", "inner": [{"Day": "friday"}]})
        assert _ReadsBackEveryWay.model_validate(valid) == _ReadsBackEveryWay.model_validate(
            {"a": "x", "b": "y", "C": "z", "inner": [{"Day": "friday"}]})
    finally:
        REGISTRY.pop("author.reads_back", None)


class _WithComputed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def doubled(self) -> int:
        return self.a * 2


async def _reads_its_model_back(run: RunContext) -> None:
    _WithComputed.model_validate(run.inputs)  # refused {"a": 1, "doubled": 2}: "Extra inputs are not permitted"
    run.counts.add_total(1)
    run.counts.item_succeeded()


tracked_job("author.computed", inputs=_WithComputed)(_reads_its_model_back)


async def test_a_models_computed_fields_are_not_recorded_so_the_body_reads_its_inputs_back(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str
) -> None:
    await dispatch(rt, "author.computed", tenant=tenant, inputs={"a": 1})
    await drain(settings)
    [run] = await runs(conn)
    assert (run["outcome"], run["context"]) == ("succeeded", {"a": 1}), run["reason_message"]
