"""Malformed input, table-driven and hypothesis-driven, through the Python API and the CLI: every one gets
``input.invalid`` or ``tenant.not_found`` naming the field (exit 2 at the CLI, one line) and leaves no state."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

import asyncpg
import pytest
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from redis.asyncio import Redis

import opspolish
from opspolish.cli import parse_inputs
from opspolish.errors import InputInvalid, OpsPolishError
from opspolish.jobs.assignments import FETCH_TYPE, RESTORE_TYPE
from opspolish.runtime import Runtime
from opspolish.sanitize import sanitize_message
from opspolish.settings import Settings
from opspolish.tracking import get_job
from tests.conftest import drain
from tests.reliability.faults import queued_job_ids, run_cli, run_rows
from tests.support.jobs import ECHO_TYPE, EFFECT_TYPE, WORKSPACE_EFFECT_TYPE

pytestmark = pytest.mark.timeout(120)

PWNED = Path("/tmp/opspolish-reliability-pwned")
SHELL = f"$(touch {PWNED}); `touch {PWNED}`; touch {PWNED} | cat && echo"
SQL = "x'); DROP TABLE tenants; --"
# Symbolic tenants and workspaces, resolved against the seeded data of each test.
TENANT_A, TENANT_OTHER_WS, WORKSPACE_A = "<tenant A>", "<tenant of the other workspace>", "<workspace A>"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"x": value}
    return value


@dataclass(frozen=True)
class Case:
    name: str
    run_type: str
    tenant: Any
    inputs: Any
    code: str
    field: str
    workspace: Any = None
    field_is_prefix: bool = False


class _Nul(enum.Enum):
    A = "a\x00b"


#: Values whose text the canonical form takes from an object (an enum's value, a path) or moves (a time in UTC): a NUL
#: there was a driver error (UntranslatableCharacterError), a year leaving the calendar an OverflowError, out of
#: dispatch and out of the worker (arq's traceback, no ledger row, no run_rejected line).
ODD_OBJECTS = {
    "NUL in a path": ({"p": PurePosixPath("a\x00b")}, "inputs.p"),
    "NUL in an enum's value": ({"e": [_Nul.A]}, "inputs.e[0]"),
    "aware datetime out of range in UTC": ({"at": dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))},
                                           "inputs.at"),
}

API_CASES = [
    *(Case(name, ECHO_TYPE, TENANT_A, inputs, "input.invalid", field)
      for name, (inputs, field) in ODD_OBJECTS.items()),
    Case("unknown tenant", EFFECT_TYPE, str(uuid.uuid4()), {}, "tenant.not_found", "tenant"),
    Case("unknown tenant as a UUID object", EFFECT_TYPE, uuid.uuid4(), {}, "tenant.not_found", "tenant"),
    Case("tenant that is not an id", EFFECT_TYPE, "not-a-tenant", {}, "tenant.not_found", "tenant"),
    Case("tenant of another workspace", EFFECT_TYPE, TENANT_OTHER_WS, {}, "tenant.not_found", "tenant",
         workspace=WORKSPACE_A),
    Case("workspace that is not a UUID", EFFECT_TYPE, TENANT_A, {}, "input.invalid", "workspace_id", workspace="acme"),
    Case("workspace job of an unknown workspace", WORKSPACE_EFFECT_TYPE, None, {}, "input.invalid", "workspace_id",
         workspace=uuid.uuid4()),
    Case("blank tenant", EFFECT_TYPE, "   ", {}, "input.invalid", "tenant"),
    Case("no tenant", EFFECT_TYPE, None, {}, "input.invalid", "tenant"),
    Case("tenant with a NUL byte", EFFECT_TYPE, "a\x00b", {}, "tenant.not_found", "tenant"),
    Case("tenant that is not UTF-8", EFFECT_TYPE, "\udcff\udcfe", {}, "tenant.not_found", "tenant"),
    Case("tenant with SQL metacharacters", EFFECT_TYPE, SQL, {}, "tenant.not_found", "tenant"),
    Case("tenant with shell metacharacters", EFFECT_TYPE, SHELL, {}, "tenant.not_found", "tenant"),
    Case("unknown job type", "nope.job", TENANT_A, {}, "input.invalid", "type"),
    Case("job type with SQL metacharacters", f"{FETCH_TYPE}{SQL}", TENANT_A, {}, "input.invalid", "type"),
    Case("inputs that are not a mapping", EFFECT_TYPE, TENANT_A, ["tag"], "input.invalid", "inputs"),
    Case("a secret as the whole input", EFFECT_TYPE, TENANT_A, SecretStr("x"), "input.invalid", "inputs"),
    Case("wrong type", EFFECT_TYPE, TENANT_A, {"sleep_s": "slow"}, "input.invalid", "inputs.sleep_s"),
    Case("wrong container type", FETCH_TYPE, TENANT_A, {"policy_ids": "abc"}, "input.invalid", "inputs.policy_ids"),
    Case("wrong item type", FETCH_TYPE, TENANT_A, {"policy_ids": ["not-a-uuid"]}, "input.invalid",
         "inputs.policy_ids.0"),
    Case("SQL in a typed field", FETCH_TYPE, TENANT_A, {"policy_ids": [SQL]}, "input.invalid", "inputs.policy_ids.0"),
    Case("unknown field", EFFECT_TYPE, TENANT_A, {"bogus": 1}, "input.invalid", "inputs.bogus"),
    Case("NaN", EFFECT_TYPE, TENANT_A, {"sleep_s": math.nan}, "input.invalid", "inputs.sleep_s"),
    Case("NaN spelled as text", EFFECT_TYPE, TENANT_A, {"sleep_s": "NaN"}, "input.invalid", "inputs.sleep_s"),
    Case("infinity", EFFECT_TYPE, TENANT_A, {"sleep_s": math.inf}, "input.invalid", "inputs.sleep_s"),
    Case("Decimal NaN", EFFECT_TYPE, TENANT_A, {"sleep_s": Decimal("NaN")}, "input.invalid", "inputs.sleep_s"),
    Case("-inf deep in a list", EFFECT_TYPE, TENANT_A, {"x": {"v": [1, -math.inf]}}, "input.invalid",
         "inputs.x.v[1]"),
    Case("NaN in a set", EFFECT_TYPE, TENANT_A, {"x": {math.nan}}, "input.invalid", "inputs.x[]"),
    Case("deep nesting", EFFECT_TYPE, TENANT_A, {"x": nested(40)}, "input.invalid", "inputs.x.x", field_is_prefix=True),
    Case("very deep nesting", EFFECT_TYPE, TENANT_A, {"x": nested(20_000)}, "input.invalid", "inputs.x.x",
         field_is_prefix=True),
    Case("1 MB payload", EFFECT_TYPE, TENANT_A, {"tag": "x" * 2**20}, "input.invalid", "inputs"),
    Case("1 MB over many keys", EFFECT_TYPE, TENANT_A, {f"k{i}": "y" * 2**16 for i in range(16)}, "input.invalid",
         "inputs"),
    Case("text that is not UTF-8", EFFECT_TYPE, TENANT_A, {"tag": "ok\udcff"}, "input.invalid", "inputs.tag"),
    Case("bytes", EFFECT_TYPE, TENANT_A, {"tag": b"\xff\xfe"}, "input.invalid", "inputs.tag"),
    Case("NUL in text", EFFECT_TYPE, TENANT_A, {"tag": "a\x00b"}, "input.invalid", "inputs.tag"),
    Case("NUL in a key", EFFECT_TYPE, TENANT_A, {"ta\x00g": "a"}, "input.invalid", 'inputs["ta\\u0000g"]'),
    Case("an unknown field named like a secret", FETCH_TYPE, TENANT_A, {"password": "hunter2"}, "input.invalid",
         'inputs["password"]'),
    Case("NaN under a key that reads like a secret's name", EFFECT_TYPE, TENANT_A, {"passenger": math.nan},
         "input.invalid", 'inputs["passenger"]'),
    Case("NaN under a key with a dot in it", EFFECT_TYPE, TENANT_A, {"a.b": {"c": math.nan}}, "input.invalid",
         'inputs["a.b"].c'),
    Case("a key that is not text", EFFECT_TYPE, TENANT_A, {1: "a"}, "input.invalid", "inputs"),
    Case("naive datetime", EFFECT_TYPE, TENANT_A, {"at": dt.datetime(2026, 1, 1)}, "input.invalid", "inputs.at"),
    Case("unsupported object", EFFECT_TYPE, TENANT_A, {"o": object()}, "input.invalid", "inputs.o"),
    Case("run id out of range", RESTORE_TYPE, TENANT_A, {"source_run_id": 2**63}, "input.invalid",
         "inputs.source_run_id"),
    Case("run id not positive", RESTORE_TYPE, TENANT_A, {"source_run_id": 0}, "input.invalid",
         "inputs.source_run_id"),
    Case("workspace job without a workspace", WORKSPACE_EFFECT_TYPE, None, {}, "input.invalid", "workspace_id"),
    Case("workspace job with SQL as workspace", WORKSPACE_EFFECT_TYPE, None, {}, "input.invalid", "workspace_id",
         workspace=SQL),
]


def _resolve(value: Any, seeded: dict[str, Any]) -> Any:
    a = seeded["tenants"][0]
    other = next(t for t in seeded["tenants"] if t["workspace_id"] != a["workspace_id"])
    return {TENANT_A: a["external_id"], TENANT_OTHER_WS: other["external_id"],
            WORKSPACE_A: a["workspace_id"]}.get(value, value) if isinstance(value, str) else value


def assert_names_the_field(exc: OpsPolishError, code: str, field: str, *, prefix: bool = False) -> None:
    assert exc.reason_code == code, (exc.reason_code, exc.message)
    assert exc.field is not None and (exc.field.startswith(field) if prefix else exc.field == field), exc.field
    assert exc.message.startswith(sanitize_message(exc.field)), exc.message
    assert "\n" not in exc.message and len(exc.message) <= 500
    # Every message is sanitized again on its way out (CLI, log lines): the reason must come through whole.
    assert sanitize_message(exc.message) == exc.message, exc.message


async def assert_no_state(conn: asyncpg.Connection, settings: Settings, tables: dict[str, int]) -> None:
    assert await run_rows(conn) == []
    redis: Redis = Redis.from_url(settings.redis_url.get_secret_value())
    try:
        assert await queued_job_ids(redis, settings.queue_name) == set()
    finally:
        await redis.aclose()
    assert await _table_counts(conn) == tables
    assert not PWNED.exists()


async def _table_counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t}")
            for t in ("workspaces", "tenants", "operation_runs", "assignment_snapshots", "directory_policies")}


async def test_malformed_python_dispatches_are_refused_naming_the_field_and_leave_no_state(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any], subtests: pytest.Subtests,
) -> None:
    tables = await _table_counts(conn)
    for case in API_CASES:
        with subtests.test(case.name):
            with pytest.raises(OpsPolishError) as exc:
                await opspolish.dispatch(rt, case.run_type, tenant=_resolve(case.tenant, seeded),
                                         workspace_id=_resolve(case.workspace, seeded), inputs=case.inputs)
            assert_names_the_field(exc.value, case.code, case.field, prefix=case.field_is_prefix)
    await assert_no_state(conn, settings, tables)
    # The control: the same tenant, workspace and job type are accepted when the input is well formed.
    a = seeded["tenants"][0]
    ok = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=a["external_id"], workspace_id=a["workspace_id"],
                                  inputs={"tag": SQL})
    assert ok.created and (await run_rows(conn))[0]["context"] == {"tag": SQL}


async def test_malformed_raw_enqueues_are_rejected_visibly_and_leave_no_state(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str,
) -> None:
    """``enqueue_job(type, tenant_id=..., inputs=...)`` straight through arq: the worker refuses each one with a
    reason (a log line and a metric), never a driver error, and the queue drains."""
    tables = await _table_counts(conn)
    redis = rt.require_redis()
    payloads: list[dict[str, Any]] = [
        {"tenant_id": "a\x00b", "inputs": {}}, {"tenant_id": "\udcff", "inputs": {}},
        {"tenant_id": SQL, "inputs": {}}, {"tenant_id": str(uuid.uuid4()), "inputs": {}},
        {"tenant_id": tenant, "inputs": {"tag": "a\x00b"}}, {"tenant_id": tenant, "inputs": {"sleep_s": math.nan}},
        {"tenant_id": tenant, "inputs": {"bogus": 1}}, {"tenant_id": None, "inputs": {}},
    ]
    for payload in payloads:
        await redis.enqueue_job(EFFECT_TYPE, _queue_name=settings.queue_name, **payload)
    with structlog.testing.capture_logs() as events:
        worker = await drain(settings)
    assert (worker.jobs_complete, worker.jobs_failed) == (len(payloads), 0)
    # Refused before the gate or by it (no tenant of that scope): one warning each, never an info-level skip.
    ends = sorted((e["event"], e["log_level"], e["reason_code"]) for e in events if e["event"].startswith("run_"))
    assert ends == [("run_rejected", "warning", "input.invalid")] * 4 + [
        ("run_rejected", "warning", "tenant.not_found")] * 4
    metrics = worker.ctx["opspolish"].metrics
    assert {k: n for k, n in metrics.items() if k.startswith(("rejected:", "skipped:"))} == {
        "rejected:tenant.not_found": 4, "rejected:input.invalid": 4}
    await assert_no_state(conn, settings, tables)


async def test_raw_enqueues_of_odd_objects_are_refused_naming_the_field(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str,
) -> None:
    tables = await _table_counts(conn)
    redis = rt.require_redis()
    for inputs, _ in ODD_OBJECTS.values():
        await redis.enqueue_job(ECHO_TYPE, _queue_name=settings.queue_name, tenant_id=tenant, inputs=inputs)
    with structlog.testing.capture_logs() as events:
        worker = await drain(settings)
    assert (worker.jobs_complete, worker.jobs_failed) == (len(ODD_OBJECTS), 0)
    rejected = [e for e in events if e["event"] == "run_rejected"]
    assert sorted(e["message"].split(":")[0] for e in rejected) == sorted(f for _, f in ODD_OBJECTS.values())
    assert {e["reason_code"] for e in rejected} == {"input.invalid"}
    await assert_no_state(conn, settings, tables)


async def test_raw_enqueues_of_the_wrong_types_are_refused_with_a_reason_not_a_traceback(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str,
) -> None:
    """A number, a list or a mapping where a tenant id belongs, a run id that is text or past 64 bits, inputs that are
    no mapping, a workspace that does not exist: each was a driver error (DataError, ForeignKeyViolationError) or a
    TypeError out of the job, which arq logged as a failed job with a traceback."""
    tables = await _table_counts(conn)
    redis = rt.require_redis()
    refused: list[tuple[str, dict[str, Any], str]] = [
        (EFFECT_TYPE, {"tenant_id": -5, "inputs": {}}, "tenant.not_found"),
        (EFFECT_TYPE, {"tenant_id": [tenant], "inputs": {}}, "tenant.not_found"),
        (EFFECT_TYPE, {"tenant_id": {"id": tenant}, "inputs": {}}, "tenant.not_found"),
        (EFFECT_TYPE, {"tenant_id": tenant, "run_id": "1", "inputs": {}}, "input.invalid"),
        (EFFECT_TYPE, {"tenant_id": tenant, "run_id": 2**70, "inputs": {}}, "input.invalid"),
        (EFFECT_TYPE, {"tenant_id": tenant, "inputs": [1, 2]}, "input.invalid"),
        (EFFECT_TYPE, {"tenant_id": tenant, "inputs": "tag=x"}, "input.invalid"),
        (WORKSPACE_EFFECT_TYPE, {"workspace_id": str(uuid.uuid4()), "inputs": {}}, "input.invalid"),
        # "badly formed hexadecimal UUID string" (uuid's words, no field named) before
        (WORKSPACE_EFFECT_TYPE, {"workspace_id": "nope", "inputs": {}}, "input.invalid"),
        (WORKSPACE_EFFECT_TYPE, {"workspace_id": [1], "inputs": {}}, "input.invalid"),
        (EFFECT_TYPE, {"tenant_id": tenant, "workspace_id": 12345, "inputs": {}}, "input.invalid"),
    ]
    for job_type, payload, _ in refused:
        await redis.enqueue_job(job_type, _queue_name=settings.queue_name, **payload)
    with structlog.testing.capture_logs() as events:
        worker = await drain(settings)
    assert (worker.jobs_complete, worker.jobs_failed) == (len(refused), 0)
    rejected = sorted(e["reason_code"] for e in events if e["event"] == "run_rejected")
    assert rejected == sorted(code for _, _, code in refused)
    messages = [e["message"] for e in events if e["event"] == "run_rejected"]
    assert messages.count("workspace_id: not a UUID") == 3, messages
    await assert_no_state(conn, settings, tables)
    # A tenant id given as a UUID object (what a Python caller holds) is a tenant id like its text.
    await redis.enqueue_job(EFFECT_TYPE, tenant_id=uuid.UUID(tenant), inputs={"tag": "uuid-object"},
                            _queue_name=settings.queue_name)
    worker = await drain(settings)
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    outcome = await conn.fetchval("SELECT outcome FROM operation_runs WHERE context->>'tag' = 'uuid-object'")
    assert outcome == "succeeded"


@dataclass(frozen=True)
class CliCase:
    name: str
    args: Callable[[dict[str, Any]], list[str | bytes]]
    code: str
    field: str


def _a(seeded: dict[str, Any]) -> str:
    return str(seeded["tenants"][0]["external_id"])


def _other(seeded: dict[str, Any]) -> str:
    a = seeded["tenants"][0]
    return str(next(t for t in seeded["tenants"] if t["workspace_id"] != a["workspace_id"])["external_id"])


def _fetch(*extra: str | bytes) -> Callable[[dict[str, Any]], list[str | bytes]]:
    return lambda s: ["dispatch", FETCH_TYPE, "--tenant", _a(s), *extra]


CLI_CASES = [
    CliCase("unknown tenant", lambda s: ["dispatch", FETCH_TYPE, "--tenant", str(uuid.uuid4())],
            "tenant.not_found", "--tenant"),
    CliCase("tenant of another workspace", lambda s: ["dispatch", FETCH_TYPE, "--tenant", _other(s),
                                                      "--workspace", "acme"], "tenant.not_found", "--tenant"),
    CliCase("unknown workspace", _fetch("--workspace", "nope"), "input.invalid", "--workspace"),
    CliCase("tenant with SQL metacharacters", lambda s: ["dispatch", FETCH_TYPE, "--tenant", SQL],
            "tenant.not_found", "--tenant"),
    CliCase("tenant with shell metacharacters", lambda s: ["dispatch", FETCH_TYPE, "--tenant", SHELL],
            "tenant.not_found", "--tenant"),
    CliCase("tenant that is not UTF-8", lambda s: ["dispatch", FETCH_TYPE, "--tenant", b"\xff\xfe"],
            "tenant.not_found", "--tenant"),
    CliCase("no tenant", lambda s: ["dispatch", FETCH_TYPE], "input.invalid", "--tenant"),
    CliCase("unknown job type", lambda s: ["dispatch", "nope.job", "--tenant", _a(s)], "input.invalid", "type"),
    CliCase("wrong type", _fetch("--input", "policy_ids=notalist"), "input.invalid", "inputs.policy_ids"),
    CliCase("wrong item type", _fetch("--input", 'policy_ids=["x"]'), "input.invalid", "inputs.policy_ids.0"),
    CliCase("unknown field", _fetch("--input", "bogus=1"), "input.invalid", "inputs.bogus"),
    CliCase("NaN", _fetch("--input", "policy_ids=NaN"), "input.invalid", "inputs.policy_ids"),
    CliCase("Infinity inside JSON", _fetch("--inputs-json", '{"policy_ids": [-Infinity]}'), "input.invalid",
            "--inputs-json"),
    CliCase("JSON that is not an object", _fetch("--inputs-json", "[1]"), "input.invalid", "--inputs-json"),
    CliCase("deep nesting", _fetch("--inputs-json", '{"x":' * 40 + "1" + "}" * 40), "input.invalid",
            "inputs.x.x.x"),
    # It said "not valid JSON (maximum recursion depth exceeded while decoding a JSON array from a unicode string)".
    CliCase("nesting deeper than the JSON parser", _fetch("--inputs-json", "[" * 50_000 + "]" * 50_000),
            "input.invalid", "--inputs-json: nested deeper than 32 levels"),
    CliCase("nesting deeper than the JSON parser, one input", _fetch("--input", "x=" + "[" * 50_000 + "]" * 50_000),
            "input.invalid", "inputs.x: nested deeper than 32 levels"),
    CliCase("1 MB payload", _fetch(*[a for i in range(10) for a in ("--input", f"k{i}={'z' * 100_000}")]),
            "input.invalid", "inputs"),
    CliCase("value that is not UTF-8", _fetch("--input", b"policy_ids=\xff\xfe"), "input.invalid",
            "inputs.policy_ids"),
    CliCase("KEY=VALUE without =", _fetch("--input", "policy_ids"), "input.invalid", "--input"),
    CliCase("a secret typed without its KEY=", _fetch("--input", "hunter2"), "input.invalid",
            "--input: expected KEY=VALUE (--input number 1 has no KEY"),
    # The sanitizer that every message passes through would read `inputs.password: Extra ...` as a secret's
    # value and print `inputs.password: [redacted] inputs are not permitted`: such keys are spelled ["key"].
    CliCase("an unknown field named like a secret", _fetch("--input", "password=hunter2"), "input.invalid",
            'inputs["password"]: Extra inputs are not permitted'),
    CliCase("an unknown field that reads like a secret's name", _fetch("--input", "passenger=hunter2"),
            "input.invalid", 'inputs["passenger"]: Extra inputs are not permitted'),
    CliCase("a secret-named key given twice", _fetch("--input", "api_key=hunter2", "--input", "api_key=hunter2"),
            "input.invalid", 'inputs["api_key"]: given more than once'),
    CliCase("one key given twice", _fetch("--input", "policy_ids=[]", "--input", "policy_ids=null"),
            "input.invalid", "inputs.policy_ids: given more than once"),
    CliCase("one key in --inputs-json and --input", _fetch("--inputs-json", '{"policy_ids": []}', "--input",
                                                           "policy_ids=null"),
            "input.invalid", "inputs.policy_ids: given more than once"),
    CliCase("a key repeated inside the JSON", _fetch("--inputs-json", '{"policy_ids": [], "policy_ids": null}'),
            "input.invalid", "--inputs-json: not valid JSON (key 'policy_ids' appears more than once"),
    CliCase("an integer too long to read", _fetch("--input", "policy_ids=" + "9" * 5_000), "input.invalid",
            "inputs.policy_ids: number has more than 4300 digits"),
    # Python's own words ended in "use sys.set_int_max_str_digits() to increase the limit".
    CliCase("an integer too long to read in --inputs-json", _fetch("--inputs-json", '{"x": ' + "9" * 5_000 + "}"),
            "input.invalid", "--inputs-json: a number has more than 4300 digits"),
    CliCase("a key that is not UTF-8", _fetch("--input", b"\xff=1"), "input.invalid", "inputs"),
    CliCase("a JSON key that is a lone surrogate", _fetch("--inputs-json", '{"\\ud800": 1}'), "input.invalid",
            "inputs"),
    CliCase("reconcile of a workspace with SQL", lambda s: ["reconcile", "--workspace", "acme' OR '1'='1"],
            "input.invalid", "--workspace"),
    CliCase("reconcile of a workspace that is not UTF-8", lambda s: ["reconcile", "--workspace", b"\xff"],
            "input.invalid", "--workspace"),
    CliCase("runs of an unknown tenant", lambda s: ["runs", "list", "--tenant", SHELL], "tenant.not_found",
            "--tenant"),
    CliCase("runs of a type that is not UTF-8", lambda s: ["runs", "list", "--type", b"\xfe"], "input.invalid",
            "--type"),
]


async def test_malformed_cli_commands_exit_2_with_one_line_naming_the_field_and_leave_no_state(
    settings: Settings, conn: asyncpg.Connection, seeded: dict[str, Any], subtests: pytest.Subtests,
) -> None:
    tables = await _table_counts(conn)
    gate = asyncio.Semaphore(3)

    async def run(case: CliCase) -> Any:
        async with gate:
            return await run_cli(settings, *case.args(seeded))

    results = await asyncio.gather(*[run(case) for case in CLI_CASES])
    for case, result in zip(CLI_CASES, results, strict=True):
        with subtests.test(case.name):
            assert result.code == 2, result
            assert "Traceback" not in result.stderr and result.stdout == ""
            assert len(result.lines) == 1, result.stderr[-2000:]
            assert result.lines[0].startswith(f"opspolish: {case.code}: {case.field}"), result.lines[0]
            assert "hunter2" not in result.stderr
    await assert_no_state(conn, settings, tables)


# --- hypothesis ---------------------------------------------------------------------------------------------

_BAD_SCALARS: list[Any] = [math.nan, math.inf, -math.inf, Decimal("NaN"), Decimal("-Infinity"), b"\x00\xff",
                           "\udcff", "a\x00", dt.datetime(2026, 1, 1), object(), complex(1, 2)]
_plain_key = st.text(alphabet="abdefgilmnqvxyz_", min_size=1, max_size=6)  # spells no secret word nor "eyJ"
#: Keys that are no secret (their values are inputs like any other) but that read like a secret's name to the
#: message sanitizer; a path through one names it as ["key"], so that the reason survives sanitizing.
_LOOKALIKE_KEYS = ("passenger", "author", "session", "sig_figs", "passage_count")
_key = st.one_of(_plain_key, st.sampled_from(_LOOKALIKE_KEYS))


def _segment(key: str) -> str:
    return f'["{key}"]' if key in _LOOKALIKE_KEYS else f".{key}"
_ok_scalar = st.one_of(st.integers(-5, 5), st.text(max_size=5).filter(lambda t: "\x00" not in t), st.booleans())


@st.composite
def _malformed(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """Inputs with one bad value somewhere, and the path the error must name."""
    value: Any = draw(st.sampled_from(_BAD_SCALARS))
    steps: list[str | int] = draw(st.lists(st.one_of(_key, st.integers(0, 2)), max_size=4))
    path = ""
    for step in reversed(steps):
        if isinstance(step, str):
            value, path = {step: value}, f"{_segment(step)}{path}"
        else:
            value, path = [*draw(st.lists(_ok_scalar, min_size=step, max_size=step)), value], f"[{step}]{path}"
    top = draw(_key)
    siblings = draw(st.dictionaries(_key.filter(lambda k: k != top), _ok_scalar, max_size=3))
    return {**siblings, top: value}, f"inputs{_segment(top)}{path}"


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_malformed())
async def test_generated_malformed_inputs_are_refused_at_the_path_of_the_bad_value(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str, case: tuple[dict[str, Any], str],
) -> None:
    inputs, path = case
    with pytest.raises(InputInvalid) as exc:
        await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs=inputs)
    assert_names_the_field(exc.value, "input.invalid", path)
    assert await conn.fetchval("SELECT count(*) FROM operation_runs") == 0


@settings(max_examples=200)
@given(pairs=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=40)), max_size=4),
       inputs_json=st.one_of(st.none(), st.text(max_size=60)))
def test_cli_input_parsing_accepts_or_names_the_field_and_never_crashes(
    pairs: list[tuple[str, str]], inputs_json: str | None,
) -> None:
    job = get_job(FETCH_TYPE)
    try:
        job.validate_inputs(parse_inputs(tuple(f"{k}={v}" for k, v in pairs), inputs_json))
    except InputInvalid as exc:
        assert exc.field is not None and re.match(r"(inputs|--input|--inputs-json)\b", exc.field), exc.field
        assert exc.message.startswith(sanitize_message(exc.field)) and "\n" not in exc.message


_hostile_text = st.text(alphabet=st.sampled_from(list("'\";-\\/*%_$`|&<>(){}[]!#~ \t\n\r\u2028é😀aZ0")),
                        min_size=1, max_size=40)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_hostile_text)
async def test_sql_and_shell_metacharacters_in_free_text_are_stored_verbatim_as_data(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: str, text: str,
) -> None:
    tables = await _table_counts(conn)
    result = await opspolish.dispatch(rt, EFFECT_TYPE, tenant=tenant, inputs={"tag": text})
    assert await conn.fetchval("SELECT context->>'tag' FROM operation_runs WHERE id = $1", result.run_id) == text
    after = await _table_counts(conn)
    assert {k: v for k, v in after.items() if k != "operation_runs"} == {
        k: v for k, v in tables.items() if k != "operation_runs"}
    assert not PWNED.exists()


@settings(max_examples=5, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(max_size=30).filter(lambda t: "\x00" not in t).map(lambda t: "x" + t))  # never JSON
async def test_generated_bad_cli_values_exit_2_naming_the_field(
    settings: Settings, conn: asyncpg.Connection, tenant: str, value: str,
) -> None:
    result = await run_cli(settings, "dispatch", FETCH_TYPE, "--tenant", tenant, "--input", f"policy_ids={value}")
    assert result.code == 2, result
    assert len(result.lines) == 1 and result.lines[0].startswith("opspolish: input.invalid: inputs.policy_ids")
    assert await conn.fetchval("SELECT count(*) FROM operation_runs") == 0
