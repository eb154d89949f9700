"""The ``opspolish`` command line, run as a real process against the test's database and queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pydantic
import pytest
from redis.asyncio import Redis

from opspolish import db
from opspolish.dispatch import dispatch
from opspolish.errors import SchemaMismatch
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from tests.conftest import ROOT, WorkerProcess, base_settings, make_worker, wait_until, worker_env

CLI = str(ROOT / ".venv/bin/opspolish")
UUID_V4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

pytestmark = pytest.mark.timeout(120)


async def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [CLI, *args], cwd=ROOT, env={**worker_env(settings), **env},
                                   capture_output=True, text=True, timeout=90)


@contextlib.asynccontextmanager
async def scratch_database(suffix: str = "") -> AsyncIterator[Settings]:
    """Settings naming a database of this test's own (``opspolish_cli_<random><suffix>``, not created yet); the
    database is dropped afterwards, whatever the test made of it."""
    name = f"opspolish_cli_{uuid.uuid4().hex[:10]}{suffix}"
    settings = base_settings().with_database(name)
    try:
        yield settings
    finally:
        await db.drop_database(settings, name)



@pytest.mark.parametrize(("scheme", "query"), [
    ("postgres", ""), ("postgresql", ""),
    # Given to SQLAlchemy's dialect, each parameter became a keyword of asyncpg.connect(): "unexpected keyword
    # argument 'sslmode'", internal.unexpected, while every other command took the URL.
    ("postgresql", "?sslmode=disable&application_name=opspolish-upgrade"),
])
async def test_db_upgrade_takes_every_accepted_url_scheme(scheme: str, query: str) -> None:
    # postgres:// passed the settings, and the CLI's asyncpg paths took it, but migrations went through SQLAlchemy:
    # "Can't load plugin: sqlalchemy.dialects:postgres".
    async with scratch_database() as settings:
        url = settings.database_url.get_secret_value().replace("postgresql+asyncpg://", f"{scheme}://") + query
        out = await cli(settings, "db", "upgrade", OPSPOLISH_DATABASE_URL=url)
        assert out.returncode == 0, out.stderr
        assert await db.current_revision(settings) == db.SCHEMA_HEAD

@pytest.mark.parametrize(("query", "says"), [
    ("?foo=bar", 'unrecognized configuration parameter "foo"'),  # was internal.unexpected: UndefinedObjectError
    ("?work_mem=lots", 'invalid value for parameter "work_mem"'),
    ("?sslmode=bogus", "`sslmode` parameter must be one of"),  # was db.unavailable: "cannot connect"
])
async def test_a_url_parameter_the_driver_or_server_refuses_is_bad_input_naming_the_variable(
    settings: Settings, query: str, says: str
) -> None:
    url = settings.database_url.get_secret_value() + query
    for args in (("runs", "list"), ("db", "upgrade")):
        out = await cli(settings, *args, OPSPOLISH_DATABASE_URL=url)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (args, out.stderr)
        assert out.stderr.startswith("opspolish: input.invalid: OPSPOLISH_DATABASE_URL: ") and says in out.stderr


async def test_reset_seed_works_on_a_missing_database_and_again_right_after() -> None:
    async with scratch_database() as settings:
        for _ in range(2):
            out = await cli(settings, "db", "reset", "--seed")
            assert out.returncode == 0, out.stderr
            assert "seeded: 2 workspaces, 6 tenants" in out.stdout
        conn = await db.connect(settings)
        try:
            rows = await conn.fetch("SELECT external_id, workspace_id FROM tenants")
            assert len(rows) == 6 and all(UUID_V4.match(r["external_id"]) and r["workspace_id"] for r in rows)
            assert await conn.fetchval("SELECT version_num FROM alembic_version") == db.head_revision()
        finally:
            await conn.close()


async def test_reset_takes_the_dropped_runs_jobs_out_of_its_queue_and_leaves_the_others() -> None:
    # Left queued, each was refused (its run gone), and the new ledger's runs, numbered from 1 again, found their
    # job ids taken: a dispatch right after `make reset-seed` failed queue.conflict (reported "queued", no job, before).
    async with scratch_database() as base:
        settings = base.model_copy(update={"queue_name": f"opspolish-test:reset:{uuid.uuid4().hex[:8]}"})
        redis: Redis = Redis.from_url(settings.redis_url.get_secret_value())

        async def first_tenant() -> str:  # looked up again after each reset
            conn = await db.connect(settings)
            try:
                return str(await conn.fetchval("SELECT external_id FROM tenants ORDER BY name LIMIT 1"))
            finally:
                await conn.close()

        try:
            assert (await cli(settings, "db", "reset", "--seed")).returncode == 0
            tenant = await first_tenant()
            out = await cli(settings, "dispatch", "test.effect", "--tenant", tenant, "--json")
            assert out.returncode == 0 and json.loads(out.stdout)["verdict"] == "queued", out.stderr
            # Not a job of the dropped ledger's runs, though named like one (another database's, sharing the queue).
            await redis.zadd(settings.queue_name, {"someone-elses-job": 1, f"{settings.queue_name}:run:999": 1})
            reset = await cli(settings, "db", "reset", "--seed", "--json")
            assert reset.returncode == 0 and json.loads(reset.stdout)["dropped_jobs"] == 1, reset.stderr
            assert sorted(m.decode() for m in await redis.zrange(settings.queue_name, 0, -1)) == [
                f"{settings.queue_name}:run:999", "someone-elses-job"]
            tenant = await first_tenant()
            again = await cli(settings, "dispatch", "test.effect", "--tenant", tenant, "--json")
            assert again.returncode == 0 and json.loads(again.stdout)["verdict"] == "queued", again.stderr
            text = await cli(settings, "db", "reset")
            assert "took 1 queued job of the dropped runs out of its queue" in text.stdout
        finally:
            keys = [k async for k in redis.scan_iter(match=f"arq:*{settings.queue_name}*")]
            await redis.delete(settings.queue_name, *keys)
            await redis.aclose()


async def test_reset_seed_and_doctor_work_on_a_database_whose_name_needs_quoting() -> None:
    async with scratch_database('_"quoted" name') as settings:
        name = db.database_name(settings)
        out = await cli(settings, "db", "reset", "--seed")
        assert out.returncode == 0 and f"database {name} reset to" in out.stdout, out.stderr
        doctor = await cli(settings, "doctor", "--json")
        assert {c["name"]: c["verdict"] for c in json.loads(doctor.stdout)}["migrations"] == "ok"
    conn = await db.connect(settings, "postgres")
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
    finally:
        await conn.close()


async def test_an_existing_database_is_upgraded_without_asking_the_servers_postgres_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A deployment's role may have no access to the maintenance database: an existing database is found by
    # connecting to it, and `postgres` is only asked for when there is a database to create.
    asked: list[str | None] = []
    real_connect = db.connect

    async def recording_connect(s: Settings, database: str | None = None) -> asyncpg.Connection:
        asked.append(database)
        return await real_connect(s, database)

    async with scratch_database() as settings:
        name = db.database_name(settings)
        try:
            await db.upgrade(settings)
            monkeypatch.setattr(db, "connect", recording_connect)
            assert await db.ensure_database(settings) is False
            await db.upgrade(settings)
            assert asked and "postgres" not in asked, asked
            await db.drop_database(settings, name)
            assert await db.ensure_database(settings) is True and "postgres" in asked  # only to create it
        finally:
            monkeypatch.undo()  # the real connect again, to drop the database


async def test_concurrent_upgrades_of_a_missing_database_all_succeed() -> None:
    async with scratch_database() as settings:
        name = db.database_name(settings)
        for _ in range(3):  # each round races the CREATE DATABASE and the first migration run
            await db.drop_database(settings, name)
            outs = await asyncio.gather(*(cli(settings, "db", "upgrade") for _ in range(3)))
            assert [o.returncode for o in outs] == [0, 0, 0], [o.stderr for o in outs]
            assert await db.current_revision(settings) == db.head_revision()


async def test_concurrent_resets_with_seed_run_one_after_the_other() -> None:
    async with scratch_database() as settings:
        await db.upgrade(settings)
        for _ in range(2):
            outs = await asyncio.gather(*(cli(settings, "db", "reset", "--seed") for _ in range(2)))
            assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]
            assert all("seeded: 2 workspaces, 6 tenants (6 new)" in o.stdout for o in outs)


def _one_reason_line(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    [reason] = [line for line in out.stderr.splitlines() if line.startswith("opspolish:")]
    return reason


async def _worker_refuses_to_start(settings: Settings, says: str) -> None:
    """A worker on this database raises SchemaMismatch (matching ``says``) from its start-up, before any job."""
    worker = make_worker(settings)
    try:
        with pytest.raises(SchemaMismatch, match=says):
            await asyncio.wait_for(worker.main(), 30)
    finally:
        await worker.close()


async def test_a_database_migrated_by_a_newer_version_is_refused_not_upgraded_or_reset(
        settings: Settings, conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO workspaces (slug, name) VALUES ('keep', 'Keep')")
    await conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    for args in (("db", "upgrade"), ("db", "reset"), ("db", "reset", "--seed"), ("seed",)):
        out = await cli(settings, *args)
        reason = _one_reason_line(out)
        assert out.returncode == 1 and reason.startswith("opspolish: db.schema_mismatch:"), (args, out.stderr)
        assert "9999_from_the_future" in reason and "does not know" in reason, reason
    assert await conn.fetchval("SELECT slug FROM workspaces") == "keep"  # nothing was dropped or seeded
    doctor = await cli(settings, "doctor", "--json")
    [migrations] = [c for c in json.loads(doctor.stdout) if c["name"] == "migrations"]
    assert doctor.returncode == 1 and migrations["verdict"] == "fail"
    assert "does not know" in migrations["detail"] and "db upgrade" not in migrations["detail"]
    await _worker_refuses_to_start(settings, r"at 9999_from_the_future, .*does not know.*upgrade opspolish")


async def test_commands_and_a_worker_on_a_database_never_migrated_say_to_upgrade() -> None:
    """Before: `runs list` said `internal.unexpected: UndefinedTableError ...`, dispatch the same of a function, and a
    worker started and then failed every delivery on a driver error."""
    async with scratch_database() as settings:
        await db.ensure_database(settings)  # created, never migrated
        for args in (("runs", "list"), ("runs", "show", "1"),
                     ("dispatch", "assignments.fetch", "--tenant", str(uuid.uuid4()))):
            out = await cli(settings, *args)
            reason = _one_reason_line(out)
            assert out.returncode == 1 and reason.startswith("opspolish: db.schema_mismatch:"), (args, out.stderr)
            assert "run `opspolish db upgrade`" in reason and "Traceback" not in out.stderr, reason
        await _worker_refuses_to_start(settings, r"at no revision, not at head .*run `opspolish db upgrade`")


async def test_reset_of_a_database_holding_someone_elses_tables_changes_nothing() -> None:
    async with scratch_database() as settings:
        await db.ensure_database(settings)
        conn = await db.connect(settings)
        try:
            await conn.execute("CREATE TABLE tenants (id int PRIMARY KEY, name text); "
                               "INSERT INTO tenants VALUES (1, 'theirs')")
            for args in (("db", "reset", "--seed"), ("db", "upgrade")):
                out = await cli(settings, *args)
                reason = _one_reason_line(out)
                assert out.returncode == 1 and reason.startswith("opspolish: db.schema_mismatch:"), out.stderr
                assert "tenants" in reason and "nothing was changed" in reason, reason
            doctor = await cli(settings, "doctor", "--json")
            [migrations] = [c for c in json.loads(doctor.stdout) if c["name"] == "migrations"]
            assert migrations["verdict"] == "fail" and "already holds tenants" in migrations["detail"], migrations
            assert "run `opspolish db upgrade`" not in migrations["detail"]  # it would refuse them
            assert await conn.fetchval("SELECT name FROM tenants") == "theirs"
            assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 1
        finally:
            await conn.close()


async def test_seed_of_a_database_not_at_head_says_to_upgrade_first() -> None:
    async with scratch_database() as settings:
        await db.ensure_database(settings)
        out = await cli(settings, "seed")
        reason = _one_reason_line(out)
        assert out.returncode == 1 and reason.startswith("opspolish: db.schema_mismatch:"), out.stderr
        assert "run `opspolish db upgrade` first" in reason, reason


async def test_schema_and_seed_commands_print_json_on_request() -> None:
    async with scratch_database() as settings:
        name = db.database_name(settings)
        head = db.head_revision()
        upgraded = await cli(settings, "db", "upgrade", "--json")
        assert upgraded.returncode == 0, upgraded.stderr
        # It says whether it created the database (db reset did, db upgrade did not), and where it stood before.
        assert json.loads(upgraded.stdout) == {"database": name, "created": True, "previous_revision": None,
                                               "revision": head}
        again = await cli(settings, "db", "upgrade", "--json")
        assert json.loads(again.stdout) == {"database": name, "created": False, "previous_revision": head,
                                            "revision": head}
        assert (await cli(settings, "db", "upgrade")).stdout == f"database {name} at {head}\n"
        reset = await cli(settings, "db", "reset", "--seed", "--tenants", "2", "--policies", "1", "--json")
        assert reset.returncode == 0, reset.stderr
        assert json.loads(reset.stdout) == {"database": name, "revision": db.head_revision(), "created": False,
                                            "dropped_revision": db.head_revision(), "dropped_jobs": 0, "seeded": {
            "workspaces": 2, "tenants": 4, "policies": 4, "created_tenants": 4}}
        seeded = await cli(settings, "seed", "--tenants", "3", "--policies", "1", "--json")
        assert seeded.returncode == 0, seeded.stderr
        assert json.loads(seeded.stdout) == {"workspaces": 2, "tenants": 6, "policies": 6, "created_tenants": 2}
        plain = await cli(settings, "db", "reset")
        assert plain.stdout == (f"database {name} reset to {head} "
                                f"(dropped its opspolish schema at {head} with all its rows)\n")
        await db.drop_database(settings, name)
        created = await cli(settings, "db", "reset")
        assert created.stdout == f"database {name} reset to {head} (created the database)\n"
        await db.drop_database(settings, name)
        assert (await cli(settings, "db", "upgrade")).stdout == f"database {name} created, at {head}\n"


async def test_reset_refuses_seed_options_without_seed_and_changes_nothing(
        settings: Settings, conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO workspaces (slug, name) VALUES ('keep', 'Keep')")
    for option in ("--tenants", "--policies"):
        out = await cli(settings, "db", "reset", option, "5")
        assert out.returncode == 2 and _one_reason_line(out) == (
            f"opspolish: input.invalid: {option}: only with --seed (db reset --seed {option} N)"), out.stderr
    assert await conn.fetchval("SELECT count(*) FROM workspaces") == 1


@pytest.mark.parametrize(("args", "says"), [
    (["runs", "list", "--limit", "0"], "input.invalid: Invalid value for '--limit': 0 is not in the range"),
    (["runs", "list", "--status", "bogus"], "input.invalid: Invalid value for '--status'"),
    (["runs", "show", "abc"], "input.invalid: Invalid value for 'RUN_ID'"),
    (["dispatch"], "input.invalid: Missing argument 'TYPE'. (see `opspolish dispatch --help`)"),
    (["runs", "list", "--bogus"], "input.invalid: No such option '--bogus'"),
    # click kept the last value without a word: the dispatch went to the second tenant.
    (["dispatch", "test.effect", "--tenant", "a", "--tenant=b"], "input.invalid: --tenant: given more than once"),
    (["dispatch", "test.effect", "--tenant", "a", "--inputs-json", "{}", "--inputs-json", "{}"],
     "input.invalid: --inputs-json: given more than once"),
    (["runs", "list", "--limit", "3", "--limit", "4"], "input.invalid: --limit: given more than once"),
    (["db", "reset", "--seed", "--tenants", "1", "--tenants", "2"], "input.invalid: --tenants: given more than once"),
    # A space for the "=": click quoted the stray value, a secret maybe, on the terminal.
    (["dispatch", "test.effect", "--tenant", "a", "--input", "password", "cnryStray7"],
     "input.invalid: 1 unexpected extra argument (not echoed: one may be a secret typed without its KEY=)"),
    (["runs", "list", "cnryA", "cnryB"], "input.invalid: unexpected extra arguments (not echoed"),
    (["runs", "list", "cnry A"], "input.invalid: 1 unexpected extra argument (not echoed"),  # one, with a space
])
async def test_usage_errors_are_one_line_naming_the_option_exit_2(
    settings: Settings, args: list[str], says: str
) -> None:
    # click's own block: "Usage: ...", "Try '... --help' for help.", a blank line and "Error: ...", four lines.
    out = await cli(settings, *args)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith("opspolish: ") and out.stderr.count("\n") == 1 and says in out.stderr, out.stderr
    assert "cnry" not in out.stderr


async def test_a_reader_that_goes_away_is_no_error_of_ours(
    settings: Settings, rt: Runtime, seeded: dict[str, Any]
) -> None:
    # `opspolish runs list | head -1` said internal.unexpected: BrokenPipeError, exit 1 (here the reader, `true`,
    # is gone before the command writes, so the write always meets the closed pipe).
    await dispatch(rt, "test.effect", tenant=seeded["tenants"][0]["external_id"], inputs={"items": 1})
    for args in ("runs list --json", "runs list", "doctor", "--help", "runs list --help"):
        command = f"{shlex.quote(CLI)} {args} | true; echo ${{PIPESTATUS[0]}}"
        piped = await asyncio.to_thread(subprocess.run, ["bash", "-c", command], cwd=ROOT, env=worker_env(settings),
                                        capture_output=True, text=True, timeout=90)
        assert (piped.stdout, piped.stderr) == ("141\n", ""), (args, piped)


async def test_output_to_an_ascii_stdout_is_written_not_an_encoding_error(
    settings: Settings, seeded: dict[str, Any]
) -> None:
    # PYTHONIOENCODING=ascii (or a C locale): "internal.unexpected: UnicodeEncodeError", exit 1, for a context
    # holding "ü" (click itself writes UTF-8 to such a stream).
    tenant = seeded["tenants"][0]["external_id"]
    out = await cli(settings, "dispatch", "test.echo", "--tenant", tenant, "--input", "city=Zürich", "--json")
    assert out.returncode == 0, out.stderr
    run_id = json.loads(out.stdout)["run_id"]
    for args in (["runs", "show", str(run_id)], ["runs", "show", str(run_id), "--json"]):
        shown = await asyncio.to_thread(subprocess.run, [CLI, *args], cwd=ROOT, capture_output=True, timeout=90,
                                        env={**worker_env(settings), "PYTHONIOENCODING": "ascii"})
        assert shown.returncode == 0, shown.stderr
        assert "Zürich".encode() in shown.stdout or b"Z\\u00fcrich" in shown.stdout, shown.stdout


async def test_a_reader_that_goes_away_midway_through_a_long_output_is_141_not_success(
    settings: Settings, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    # More than the pipe holds (64 KiB), the reader gone after 10 bytes: the output was cut short with exit 0.
    tenant = seeded["tenants"][0]
    await conn.execute(
        """INSERT INTO operation_runs (workspace_id, tenant_id, type, run_identity_hash, fingerprint, context, status,
                                       outcome, completed_at, summary_counts)
           SELECT $1, $2, 'test.effect', encode(sha256(convert_to(g::text, 'UTF8')), 'hex'), repeat('0', 64), '{}',
                  'completed', 'succeeded', now(), '{"total": 0, "processed": 0, "failed": 0}'
           FROM generate_series(1, 2000) g""", tenant["workspace_id"], tenant["id"])
    for args in ("runs list --json --limit 2000", "runs list --limit 2000"):
        whole = await cli(settings, *args.split())
        assert whole.returncode == 0 and len(whole.stdout) > 128 * 1024, (args, len(whole.stdout))
        command = f"{shlex.quote(CLI)} {args} | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}"
        piped = await asyncio.to_thread(subprocess.run, ["bash", "-c", command], cwd=ROOT, env=worker_env(settings),
                                        capture_output=True, text=True, timeout=90)
        assert (piped.stdout, piped.stderr) == ("141\n", ""), (args, piped)


async def test_seed_is_idempotent_and_scales(settings: Settings, conn: asyncpg.Connection) -> None:
    first = await cli(settings, "seed", "--tenants", "1500", "--policies", "1")
    second = await cli(settings, "seed", "--tenants", "1500", "--policies", "1")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "3000 tenants (3000 new)" in first.stdout
    assert "3000 tenants (0 new)" in second.stdout
    assert await conn.fetchval("SELECT count(*) FROM tenants") == 3000


async def test_dispatch_prints_the_run_and_whether_it_joined(
    settings: Settings, seeded: dict[str, Any]
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    first = await cli(settings, "dispatch", "test.effect", "--tenant", tenant, "--input", "items=2", "--json")
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["verdict"] == "queued" and data["run_id"] > 0
    again = await cli(settings, "dispatch", "test.effect", "--tenant", tenant, "--inputs-json", '{"items": 2.0}')
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"run {data['run_id']} joined (already queued)"
    listed = await cli(settings, "runs", "list", "--tenant", tenant, "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [data["run_id"]]
    shown = await cli(settings, "runs", "show", str(data["run_id"]), "--json")
    assert json.loads(shown.stdout)["context"] == {"items": 2}
    table = await cli(settings, "runs", "list")
    assert "test.effect" in table.stdout and "queued" in table.stdout


async def test_cli_numbers_past_a_floats_digits_are_other_identities_and_recorded_exactly(
    settings: Settings, seeded: dict[str, Any]
) -> None:
    # Parsed as floats, 0.10000000000000000001 was 0.1: the second dispatch joined the first's run.
    tenant = seeded["tenants"][0]["external_id"]
    ids = []
    for args in (["--inputs-json", '{"x": 0.1}'], ["--inputs-json", '{"x": 0.10000000000000000001}'],
                 ["--input", "x=0.10000000000000000001"]):
        out = await cli(settings, "dispatch", "test.echo", "--tenant", tenant, *args, "--json")
        assert out.returncode == 0, out.stderr
        ids.append(json.loads(out.stdout)["run_id"])
    assert ids[0] != ids[1] and ids[1] == ids[2], ids
    # Written as that exact JSON number (it was text, so the field's type changed with its value).
    for args in (["runs", "show", str(ids[1]), "--json"], ["runs", "list", "--json"]):
        shown = await cli(settings, *args)
        assert shown.returncode == 0, shown.stderr
        assert '"x": 0.10000000000000000001' in shown.stdout, shown.stdout
        data = json.loads(shown.stdout, parse_float=Decimal)
        runs = data if isinstance(data, list) else [data]
        assert {"x": Decimal("0.10000000000000000001")} in [r.get("context") for r in runs], runs


async def test_runs_show_text_writes_mappings_as_one_line_of_json_not_pythons_repr(
    settings: Settings, seeded: dict[str, Any]
) -> None:
    # It printed {'x': Decimal('0.10000000000000000001'), 'k': True, 'n': None}: Python, not what was dispatched.
    tenant = seeded["tenants"][0]["external_id"]
    out = await cli(settings, "dispatch", "test.echo", "--tenant", tenant, "--inputs-json",
                    '{"x": 0.10000000000000000001, "k": true, "n": null, "s": "caf\u00e9", "l": [1.5, 2]}', "--json")
    assert out.returncode == 0, out.stderr
    shown = await cli(settings, "runs", "show", str(json.loads(out.stdout)["run_id"]))
    assert shown.returncode == 0, shown.stderr
    lines = {k.strip(): v for k, _, v in (line.partition(": ") for line in shown.stdout.splitlines())}
    assert lines["context"] == '{"k": true, "l": [1.5, 2], "n": null, "s": "café", "x": 0.10000000000000000001}'
    # What a terminal would act on stays escaped, as repr() had it: a right-to-left override, a C1 control.
    odd = await cli(settings, "dispatch", "test.echo", "--tenant", tenant, "--inputs-json",
                    '{"t": "a\u202eb\u009bc"}', "--json")
    shown = await cli(settings, "runs", "show", str(json.loads(odd.stdout)["run_id"]))
    assert '"t": "a\\u202eb\\u009bc"' in shown.stdout and "\u202e" not in shown.stdout, shown.stdout
    assert lines["summary_counts"] == "-" and lines["reason_code"] == "-"
    assert json.loads(lines["context"], parse_float=Decimal)["x"] == Decimal("0.10000000000000000001")


@pytest.mark.parametrize(("args", "field"), [
    (["dispatch", "no.such.job", "--tenant", "x"], "type"),
    (["dispatch", "test.effect", "--tenant", str(uuid.uuid4())], "tenant"),
    (["dispatch", "test.effect", "--tenant", "'; DROP TABLE tenants; --"], "tenant"),
    (["dispatch", "test.effect", "--tenant", "T", "--input", "items=NaN"], "inputs.items"),
    (["dispatch", "test.effect", "--tenant", "T", "--input", "items=[1]"], "inputs.items"),
    (["dispatch", "test.effect", "--tenant", "T", "--input", "nope"], "--input"),
    (["dispatch", "test.effect", "--tenant", "T", "--inputs-json", "[1]"], "--inputs-json"),
    (["runs", "show", "999999"], "opspolish: run.not_found: RUN_ID: no run 999999"),
    # The workspace as typed, not its id.
    (["dispatch", "test.effect", "--tenant", "T", "--workspace", "globex"], "' in workspace 'globex'"),
    (["runs", "list", "--tenant", str(uuid.uuid4())], "--tenant"),
    # Each option within its range, but together two billion policies: refused before anything is written.
    (["seed", "--tenants", "1000000", "--policies", "1000"], "--policies: 1,000,000 tenants per workspace"),
    (["db", "reset", "--seed", "--tenants", "100000", "--policies", "51"], "would seed 10,200,000 policies"),
])
async def test_bad_input_exits_2_with_one_line_naming_the_field(
    settings: Settings, seeded: dict[str, Any], conn: asyncpg.Connection, args: list[str], field: str
) -> None:
    args = [seeded["tenants"][0]["external_id"] if a == "T" else a for a in args]
    out = await cli(settings, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.startswith("opspolish:")]
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in out.stderr
    assert await conn.fetchval("SELECT count(*) FROM operation_runs") == 0


async def test_an_unknown_setting_is_refused(settings: Settings) -> None:
    out = await cli(settings, "runs", "list", OPSPOLISH_DATABSE_URL="typo")
    assert out.returncode == 2 and "OPSPOLISH_DATABSE_URL" in out.stderr
    assert out.stderr.startswith("opspolish: settings: unknown setting(s)"), out.stderr  # not "settings: settings:"


_UNUSABLE_SETTINGS = [
    ("OPSPOLISH_DATABASE_URL", "not a url", "scheme must be one of"),
    ("OPSPOLISH_DATABASE_URL", "mysql://app:cnryUrlPw@db/x", "got 'mysql'"),
    ("OPSPOLISH_DATABASE_URL", "postgresql://app:cnryUrlPw@db:99999/x", "Port out of range"),
    ("OPSPOLISH_DATABASE_URL", "postgresql://app:cnryUrlPw@[::1/x", "Invalid IPv6 URL"),
    ("OPSPOLISH_DATABASE_URL", "postgresql://app:cnryUrlPw@127.0.0.1:5432", "names no database"),
    ("OPSPOLISH_DATABASE_URL", "postgresql://app:cnryUrlPw@127.0.0.1:5432/", "names no database"),
    # Sent to the server as a setting, refused on every connection: internal.unexpected from every command.
    ("OPSPOLISH_DATABASE_URL", "postgresql://app:cnryUrlPw@127.0.0.1:5432/x?connect_timeout=5",
     "?connect_timeout= is a libpq parameter"),
    ("OPSPOLISH_REDIS_URL", "http://:cnryUrlPw@x", "got 'http'"),
    ("OPSPOLISH_REDIS_URL", "redis://:cnryUrlPw@x:99999/0", "Port out of range"),
    ("OPSPOLISH_DEDUPE_COOLDOWN_S", "1e300", "less than or equal to"),  # the gate's interval would overflow
    ("OPSPOLISH_LEASE_TTL_S", "1e-300", "greater than or equal to"),
    ("OPSPOLISH_MAX_ATTEMPTS", "99999999999999999999999", "less than or equal to"),
    ("OPSPOLISH_RECONCILE_INTERVAL_MIN", "7", "must divide 60"),  # :56 then :00 again: uneven passes
    ("OPSPOLISH_WORKER_HEALTH_S", "0", "greater than or equal to 1"),
    ("OPSPOLISH_REDIS_RETRY_S", "nan", "finite number"),
    ("OPSPOLISH_REDIS_RETRY_S", "-1", "greater than or equal to 0"),
    ("OPSPOLISH_REDIS_URL", "redis://:cnryUrlPw@127.0.0.1:6379/abc", "must be a number"),  # was int() at connect
    ("OPSPOLISH_REDIS_URL", "redis://:cnryUrlPw@127.0.0.1:6379/0?db=x", "?db= must be a database number"),
]


@pytest.mark.parametrize(("env", "value", "says"), _UNUSABLE_SETTINGS)
async def test_an_unusable_setting_is_exit_2_naming_it_in_one_line(
    settings: Settings, env: str, value: str, says: str,
) -> None:
    out = await cli(settings, "runs", "list", **{env: value})
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.count("\n") == 1 and f"settings: {env}: " in out.stderr and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "cnryUrlPw" not in out.stderr


@pytest.mark.parametrize(("env", "value", "says"), _UNUSABLE_SETTINGS)
def test_an_unusable_setting_never_shows_its_value_outside_the_cli(env: str, value: str, says: str) -> None:
    # The CLI prints only each error's own message; the worker (arq's CLI) and library callers print the whole
    # ValidationError, whose text quoted the refused input: input_value='mysql://app:cnryUrlPw@db/x'.
    with pytest.raises(pydantic.ValidationError) as caught:
        Settings.model_validate({env.removeprefix("OPSPOLISH_").lower(): value})
    assert says in str(caught.value) and "cnryUrlPw" not in str(caught.value), str(caught.value)


async def test_a_provider_that_cannot_be_built_is_exit_2_naming_opspolish_provider(settings: Settings) -> None:
    """os:system was called with the runtime: internal.unexpected: TypeError at exit 1, for every command."""
    for spec, says in (("os:system", "could not be built from the runtime: TypeError"), ("os:sep", "is not callable")):
        out = await cli(settings, "runs", "list", OPSPOLISH_PROVIDER=spec)
        assert out.returncode == 2 and out.stderr.startswith(f"opspolish: input.invalid: OPSPOLISH_PROVIDER: '{spec}'")
        assert says in out.stderr and out.stderr.count("\n") == 1, out.stderr


async def test_a_job_module_in_the_current_directory_is_found_as_the_worker_finds_it(
    settings: Settings, seeded: dict[str, Any], tmp_path: Path,
) -> None:
    # The README's example: OPSPOLISH_JOB_MODULES=reports, run from the directory holding reports.py. `arq` and
    # `python -m opspolish` import it from there; the `opspolish` script said "No module named 'reports'".
    (tmp_path / "cwd_reports.py").write_text(
        "from pydantic import BaseModel\n"
        "import opspolish\n"
        "class Inputs(BaseModel):\n"
        "    day: str\n"
        "@opspolish.tracked_job('cwd.report', inputs=Inputs)\n"
        "async def report(run: opspolish.RunContext) -> None:\n"
        "    pass\n")
    env = {**worker_env(settings), "OPSPOLISH_JOB_MODULES": "cwd_reports"}
    env.pop("PYTHONPATH", None)
    out = await asyncio.to_thread(subprocess.run, [CLI, "dispatch", "cwd.report", "--tenant",
                                                   seeded["tenants"][0]["external_id"], "--input", "day=mon"],
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and "queued" in out.stdout, out.stderr


def test_the_cli_runs_from_a_current_directory_that_was_deleted(tmp_path: Path) -> None:
    # The current directory goes on sys.path (job modules beside the user); one deleted under the shell made every
    # command, --help included, a FileNotFoundError traceback.
    gone = tmp_path / "gone"
    gone.mkdir()
    command = f"cd {shlex.quote(str(gone))} && rmdir {shlex.quote(str(gone))} && {shlex.quote(CLI)} --help"
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "Usage" in out.stdout, out


async def test_an_error_no_layer_translated_is_one_line_and_exit_1_without_v(
    settings: Settings, tmp_path: Path,
) -> None:
    # A job author's validator raising what pydantic does not turn into a validation error: nobody's to translate.
    # (A module that raises at import was the example here; it is input.invalid naming OPSPOLISH_JOB_MODULES now.)
    (tmp_path / "exploding_jobs.py").write_text(
        "from typing import Any\n"
        "from pydantic import BaseModel, model_validator\n"
        "from opspolish import RunContext, tracked_job\n\n"
        "class Inputs(BaseModel):\n"
        "    @model_validator(mode='before')\n"
        "    @classmethod\n"
        "    def _explode(cls, data: Any) -> Any:\n"
        "        raise RuntimeError('validator exploded')\n\n"
        "@tracked_job('test.exploding', inputs=Inputs)\n"
        "async def exploding(run: RunContext) -> None:\n"
        "    pass\n")
    env = {"PYTHONPATH": str(tmp_path), "OPSPOLISH_JOB_MODULES": "exploding_jobs"}
    out = await cli(settings, "dispatch", "test.exploding", "--tenant", str(uuid.uuid4()), **env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr == ("opspolish: internal.unexpected: RuntimeError: validator exploded "
                          "(run with -v for the traceback)\n")
    verbose = await cli(settings, "-v", "dispatch", "test.exploding", "--tenant", str(uuid.uuid4()), **env)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


async def test_the_cli_logs_in_opspolish_log_format_and_refuses_a_bad_one(
    settings: Settings, seeded: dict[str, Any]
) -> None:
    tenant = seeded["tenants"][0]["external_id"]
    for log_format in ("console", "json"):  # stderr is no terminal here: json was the CLI's only choice
        out = await cli(settings, "dispatch", "test.effect", "--tenant", tenant, OPSPOLISH_LOG_FORMAT=log_format)
        assert out.returncode == 0, out.stderr
        [line] = [line for line in out.stderr.splitlines() if "run_dispatched" in line]
        if log_format == "json":
            assert json.loads(line)["event"] == "run_dispatched"
        else:
            assert not line.startswith("{") and re.search(r"\[info\s*\] run_dispatched", line), line
    bad = await cli(settings, "runs", "list", OPSPOLISH_LOG_FORMAT="xml")
    [reason] = [line for line in bad.stderr.splitlines() if line.startswith("opspolish:")]
    assert bad.returncode == 2 and "OPSPOLISH_LOG_FORMAT" in reason and "Traceback" not in bad.stderr


async def test_doctor_sees_a_killed_worker_as_gone_within_its_health_interval(settings: Settings) -> None:
    """A worker's health key lives OPSPOLISH_WORKER_HEALTH_S + 1 s: with arq's default (an hour), a SIGKILLed worker
    was reported ok by doctor for up to an hour."""
    env = {"OPSPOLISH_WORKER_HEALTH_S": "1"}

    async def worker_verdict() -> str:
        out = await cli(settings, "doctor", "--json", **env)
        return str({c["name"]: c for c in json.loads(out.stdout)}["worker"]["verdict"])

    assert await worker_verdict() == "warn"
    worker = WorkerProcess(settings, OPSPOLISH_WORKER_HEALTH_S="1")
    try:
        async def healthy() -> bool:
            return await worker_verdict() == "ok"

        await wait_until(healthy, timeout_s=30)
    finally:
        worker.kill()
        await worker.wait()

    async def gone() -> bool:
        return await worker_verdict() == "warn"

    await wait_until(gone, timeout_s=10)  # the key lives 2 s; doctor itself takes about a second
    out = await cli(settings, "doctor", **env)
    [line] = [line for line in out.stdout.splitlines() if "worker" in line]
    assert "in the last 2 s" in line and "make worker" in line, line


async def test_doctor_gives_a_verdict_per_service(settings: Settings) -> None:
    out = await cli(settings, "doctor", "--json")
    assert out.returncode == 0, out.stderr
    verdicts = {c["name"]: c["verdict"] for c in json.loads(out.stdout)}
    assert verdicts == {"config": "ok", "postgres": "ok", "migrations": "ok", "redis": "ok", "worker": "warn"}
    down = await cli(settings, "doctor", OPSPOLISH_DATABASE_URL="postgresql+asyncpg://postgres:pw@127.0.0.1:1/x")
    assert down.returncode == 1 and "FAIL  postgres" in down.stdout and "pw@" not in down.stdout
    assert "db upgrade" not in down.stdout  # nothing to create while the server is down
    # What the Redis client said, not only its exception's type; never the URL's password.
    redis_down = await cli(settings, "doctor", OPSPOLISH_REDIS_URL="redis://:Canary-pw-1@127.0.0.1:1/0")
    [redis] = [line for line in redis_down.stdout.splitlines() if "redis" in line]
    assert redis_down.returncode == 1 and redis.startswith("FAIL") and "127.0.0.1:1" in redis, redis
    assert "Canary-pw-1" not in redis_down.stdout + redis_down.stderr
    # Every check keeps its key in --json: the one a failed service could not run was missing altogether.
    for env, verdict in ((dict(OPSPOLISH_DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:1/x"),
                          {"config": "ok", "postgres": "fail", "migrations": "skip", "redis": "ok", "worker": "warn"}),
                         (dict(OPSPOLISH_REDIS_URL="redis://127.0.0.1:1/0"),
                          {"config": "ok", "postgres": "ok", "migrations": "ok", "redis": "fail", "worker": "skip"})):
        out = await cli(settings, "doctor", "--json", **env)
        assert out.returncode == 1 and {c["name"]: c["verdict"] for c in json.loads(out.stdout)} == verdict
    # What the worker imports at start: with a module it cannot import it exited with a traceback, while doctor said
    # every service was ok (exit 0).
    # A module that raises as it runs (here 1 / 0 at its top level) is named with its error too: it was reported as
    # internal.unexpected, "ZeroDivisionError: division by zero", naming neither the setting nor the module.
    broken = "tests.support.broken_module"
    raises = "(ZeroDivisionError: division by zero)"
    for env, says in ((dict(OPSPOLISH_JOB_MODULES="no_such_jobs_module"), "OPSPOLISH_JOB_MODULES: cannot import"),
                      (dict(OPSPOLISH_PROVIDER="no_such_module:Thing"), "OPSPOLISH_PROVIDER: cannot import"),
                      (dict(OPSPOLISH_JOB_MODULES=broken), f"OPSPOLISH_JOB_MODULES: cannot import '{broken}' {raises}"),
                      (dict(OPSPOLISH_PROVIDER=f"{broken}:Thing"),
                       f"OPSPOLISH_PROVIDER: cannot import '{broken}:Thing' {raises}")):
        out = await cli(settings, "doctor", "--json", **env)
        checks = {c["name"]: c for c in json.loads(out.stdout)}
        assert out.returncode == 1 and checks["config"]["verdict"] == "fail", out
        assert says in checks["config"]["detail"] and checks["postgres"]["verdict"] == "ok", checks["config"]
    out = await cli(settings, "dispatch", "assignments.fetch", "--tenant", "acme", OPSPOLISH_JOB_MODULES=broken)
    assert (out.returncode, out.stderr.strip()) == (
        2, f"opspolish: input.invalid: OPSPOLISH_JOB_MODULES: cannot import '{broken}' {raises}"), out
    missing = await cli(settings.with_database(f"opspolish_missing_{uuid.uuid4().hex[:8]}"), "doctor")
    [postgres] = [line for line in missing.stdout.splitlines() if "postgres" in line]
    assert missing.returncode == 1 and postgres.startswith("FAIL") and "does not exist" in postgres
    assert postgres.endswith("create it with `opspolish db upgrade`"), postgres


def test_python_dash_m_runs_the_same_cli() -> None:
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "opspolish", "--help"], capture_output=True,
                         text=True, check=False, env={**os.environ}, cwd=ROOT)
    assert out.returncode == 0 and "dispatch" in out.stdout


def test_the_readmes_reason_codes_are_the_librarys() -> None:
    """The README's table, REASON_CODES and the codes the error classes carry name the same codes."""
    import opspolish.errors as errors

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Reason codes"):]
    listed = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", table, flags=re.M))
    classes = {cls.reason_code for cls in vars(errors).values()
               if isinstance(cls, type) and issubclass(cls, errors.OpsPolishError) and cls is not errors.OpsPolishError}
    assert listed == set(errors.REASON_CODES)
    assert classes <= set(errors.REASON_CODES), classes - set(errors.REASON_CODES)
