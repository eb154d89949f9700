"""The ``opspolish`` command line (click). Exit codes: 0 ok, 2 bad usage or input, 1 operational failure."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import asyncpg
import click
from pydantic import ValidationError

from opspolish import db
from opspolish.errors import InputInvalid, OpsPolishError, RunNotFound, TenantNotFound
from opspolish.fingerprint import MAX_DEPTH, MAX_DIGITS, exact_float, key_segment
from opspolish.logs import configure_logging
from opspolish.sanitize import sanitize_message
from opspolish.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from opspolish.seed import SeedReport

T = TypeVar("T")
BAD_INPUT = (InputInvalid, RunNotFound, TenantNotFound)


class Ctx:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = Settings()
            except ValidationError as exc:
                err = exc.errors()[0]
                msg = err["msg"].removeprefix("Value error, ")
                where = ".".join(str(p) for p in err["loc"])
                fail(2, f"settings: {ENV_PREFIX}{where.upper()}: {msg}" if where else f"settings: {msg}")
        return self._settings

    @property
    def log_format(self) -> str:
        """OPSPOLISH_LOG_FORMAT. While the settings are invalid it is the TTY default, so that the command can
        still log; the command then reads the settings and exits 2 naming the bad one."""
        if self._settings is None:
            try:
                self._settings = Settings()
            except ValidationError:
                return "console" if sys.stderr.isatty() else "json"
        return self._settings.log_format


def fail(code: int, message: str) -> NoReturn:
    click.echo(f"opspolish: {sanitize_message(message)}", err=True)
    sys.exit(code)


def _reader_gone() -> NoReturn:
    """The reader went away (`| head`): nothing more can be said to it, and it is no bug of ours. Exit as a process
    killed by SIGPIPE would, without Python's own complaint when it flushes stdout at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


def run_async(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async command; library errors become one line and an exit code (traceback only with -v)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        ctx = click.get_current_context().find_object(Ctx)
        verbose = bool(ctx and ctx.verbose)
        try:
            return asyncio.run(fn(*args, **kwargs))
        except BAD_INPUT as exc:
            # The library names its keyword (``tenant``); at the CLI the user typed the option.
            message = "--" + exc.message if exc.message.startswith("tenant:") else exc.message
            fail(2, f"{exc.reason_code}: {message}")
        except OpsPolishError as exc:
            if verbose:
                raise
            fail(1, f"{exc.reason_code}: {exc.message}")
        except KeyboardInterrupt:
            fail(1, "interrupted")
        except BrokenPipeError:
            _reader_gone()
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError, asyncpg.UndefinedColumnError) as exc:
            if verbose:
                raise
            # A database behind this version's schema (or never migrated): say what to do, not only what broke.
            fail(1, f"db.schema_mismatch: {exc} (the database is not at this version's schema: run "
                    "`opspolish db upgrade`; `opspolish doctor` says where it stands)")
        except Exception as exc:  # a bug or an error no layer translated: still one line, unless -v
            if verbose:
                raise
            fail(1, f"internal.unexpected: {type(exc).__name__}: {exc} (run with -v for the traceback)")

    return wrapper


#: Where a Decimal stands in the JSON text until it is written out (NUL: in no text the ledger or inputs hold).
_NUMBER_SLOT = re.compile(r'"\\u0000(\d+)\\u0000"')


def json_output(data: Any, *, indent: int | None = 2) -> str:
    """``--json`` text: indented, with a Decimal (a number the ledger holds that a float cannot, such as
    ``0.10000000000000000001`` in ``context``) as that exact JSON number, where it was printed as text (the field's
    type changed with its value); other values JSON cannot hold (datetimes, UUIDs) as text."""
    numbers: list[str] = []

    def slot(value: Any) -> Any:
        if isinstance(value, Decimal):
            numbers.append(format(value, "f"))
            return f"\0{len(numbers) - 1}\0"
        if isinstance(value, dict):
            return {key: slot(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [slot(item) for item in value]
        return value

    text = json.dumps(slot(data), default=str, indent=indent, ensure_ascii=indent is not None)
    return _NUMBER_SLOT.sub(lambda m: numbers[int(m[1])], text) if numbers else text


def emit(as_json: bool, data: Any, text: str) -> None:
    """Write a command's output to stdout. Straight to the descriptor, in a loop: through Python's stream, a reader
    that went away after the first 64 KiB (`runs list --json | head -c 10`) cut the output short with exit 0, the
    partial write counted as written; here the next write meets the closed pipe (BrokenPipeError: exit 141)."""
    out = (json_output(data) if as_json else text) + "\n"
    stream = sys.stdout
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (click's test runner, a caller's StringIO)
        click.echo(out, nl=False)
        return
    stream.flush()
    # As click does: UTF-8 where the stream says ASCII (a C locale, PYTHONIOENCODING=ascii), and a character the
    # stream's encoding cannot hold replaced, not a UnicodeEncodeError for the whole output.
    encoding = stream.encoding or "utf-8"
    if codecs.lookup(encoding).name == "ascii":
        encoding = "utf-8"
    rest = memoryview(out.encode(encoding, "replace"))
    while rest:
        rest = rest[os.write(fd, rest):]


class _Command(click.Command):
    """A command whose single-value options may be given once: click keeps the last of ``--tenant A --tenant B``
    without a word, and a dispatch went to the second tenant (of another workspace, maybe) while the user read the
    first. Given twice, it is a usage error naming the option, as a repeated ``--input`` key is."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        valued = {name: opt for opt in self.params if isinstance(opt, click.Option)
                  and not opt.is_flag and not opt.count for name in opt.opts}
        seen: set[str | None] = set()
        tokens = iter(args)
        for token in tokens:
            if token == "--":
                break
            name, has_value, _ = token.partition("=")
            option = valued.get(name)
            if option is None:
                continue
            if not option.multiple:
                if option.name in seen:
                    raise click.UsageError(f"{name}: given more than once (it takes one value)", ctx=ctx)
                seen.add(option.name)
            if not has_value:
                next(tokens, None)  # its value, whatever it reads like (`--input --tenant` is an input)
        return super().parse_args(ctx, args)


def _unechoed(message: str) -> str:
    """click's usage message, without the stray arguments it quotes: ``--input password hunter2`` (a space for the
    ``=``) printed ``Got unexpected extra argument (hunter2)``, the secret echoed on the terminal and in CI logs."""
    if message.startswith("Got unexpected extra argument"):  # click's own words say whether there were several
        several = message.startswith("Got unexpected extra arguments")
        return (f"{'unexpected extra arguments' if several else '1 unexpected extra argument'} (not echoed: one may be "
                "a secret typed without its KEY=)")
    return message


class _Main(click.Group):
    """The command group (and its subgroups, whose commands are _Command): click's usage errors (a bad option
    value, a missing argument) come out as one line, exit 2, like every other bad input, instead of click's usage
    block, hint and message on four lines."""

    command_class = _Command
    group_class = type  # subgroups (db, runs) are _Main too, so their commands are _Command

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        # OPSPOLISH_JOB_MODULES and OPSPOLISH_PROVIDER name modules as `arq` and `python -m opspolish` find them:
        # from the current directory too (the `opspolish` script's own path starts at its bin directory instead).
        with contextlib.suppress(OSError):  # a current directory deleted under the shell: nothing to add
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
        try:
            code = super().main(*args, **kwargs)
        except SystemExit as exc:
            # click answers a closed pipe under its own output (`opspolish --help | true`) with exit 1, its streams
            # wrapped in its (private) _PacifyFlushWrapper: the same reader gone as under a command's output.
            if exc.code == 1 and type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
                _reader_gone()
            raise
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare `opspolish` / `opspolish db`: the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            fail(2, f"input.invalid: {_unechoed(exc.format_message())}{where}")
        except click.Abort:
            fail(1, "interrupted")
        except click.ClickException as exc:
            fail(exc.exit_code, exc.format_message())
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Main)
@click.option("-v", "--verbose", is_flag=True, help="Debug logs and tracebacks.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """opspolish: tracked, deduplicated background operations on arq + Postgres."""
    ctx.obj = Ctx(verbose)
    configure_logging(ctx.obj.log_format, verbose=verbose)


pass_ctx = click.make_pass_decorator(Ctx)


@main.group("db")
def db_group() -> None:
    """Schema management (alembic)."""


@db_group.command("upgrade")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@run_async
async def db_upgrade(ctx: Ctx, as_json: bool) -> None:
    """Create the database if missing and upgrade it to the latest schema."""
    created, before = await db.upgrade(ctx.settings)
    name, head = db.database_name(ctx.settings), db.head_revision()
    text = f"database {name} {'created, ' if created else ''}at {head}" + (
        f" (was {before})" if before not in (None, head) else "")
    emit(as_json, {"database": name, "created": created, "previous_revision": before, "revision": head}, text)


@dataclasses.dataclass(frozen=True)
class ResetReport:
    created: bool  # the database did not exist and was created
    dropped_revision: str | None  # the opspolish schema (and its rows) taken down, None when there was none
    seeded: SeedReport | None
    #: Queued jobs of the dropped ledger's active runs taken out of their queues; None when Redis could not be reached.
    dropped_jobs: int | None = 0


async def _ledger_jobs(settings: Settings) -> list[tuple[str, str]]:
    """The arq jobs (job id, queue) of the ledger's active runs: what a reset leaves behind in Redis."""
    conn = await db.connect(settings)
    try:
        rows = await conn.fetch("SELECT job_id, queue_name FROM operation_runs "
                                "WHERE status <> 'completed' AND job_id IS NOT NULL")
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()
    return [(r["job_id"], r["queue_name"] or settings.queue_name) for r in rows]


async def _drop_ledger_jobs(settings: Settings, jobs: list[tuple[str, str]]) -> int | None:
    """Take the dropped ledger's jobs out of their queues. Left there, each was refused (its run gone), and the new
    ledger's runs, numbered from 1 again, found their job ids taken (``queue.conflict``). Jobs of no active run of
    the dropped ledger are left alone. None: Redis is away."""
    from arq.constants import job_key_prefix, retry_key_prefix

    from opspolish.errors import RedisUnavailable
    from opspolish.runtime import connect_redis, is_redis_error

    if not jobs:
        return 0
    try:
        redis = await connect_redis(settings)
    except RedisUnavailable:
        return None
    try:
        taken = 0
        for start in range(0, len(jobs), 500):
            chunk = jobs[start:start + 500]
            async with redis.pipeline(transaction=True) as pipe:
                for job_id, queue in chunk:
                    pipe.zrem(queue, job_id)
                pipe.delete(*(job_key_prefix + j for j, _ in chunk), *(retry_key_prefix + j for j, _ in chunk))
                answers = await pipe.execute()
            taken += sum(answers[:len(chunk)])
        return taken
    except Exception as exc:
        if not is_redis_error(exc):
            raise
        return None
    finally:
        await redis.aclose()


async def _reset(settings: Settings, tenants: int, policies: int, with_seed: bool) -> ResetReport:
    created = await db.ensure_database(settings)
    # Held from the downgrade through the seed: a second reset waits for the whole of this one, rather than
    # dropping the tables this one is about to seed (each alembic run also takes its own lock, see env.py).
    async with db.reset_lock(settings):
        dropped = await db.current_revision(settings)
        jobs: int | None = 0
        if dropped is not None:
            ledger_jobs = await _ledger_jobs(settings)
            await db.downgrade(settings, "base")
            # Before the new schema exists: no dispatch to the new ledger can have queued a job under these ids yet.
            jobs = await _drop_ledger_jobs(settings, ledger_jobs)
        await db.upgrade(settings)
        report = await _seed(settings, tenants, policies) if with_seed else None
    return ResetReport(created, dropped, report, jobs)


@db_group.command("reset")
@click.option("--seed", "with_seed", is_flag=True, help="Seed workspaces, tenants and the directory afterwards.")
@click.option("--tenants", type=click.IntRange(0, 1_000_000), default=3, show_default=True,
              help="With --seed: tenants per workspace.")
@click.option("--policies", type=click.IntRange(0, 1000), default=3, show_default=True,
              help="With --seed: policies per tenant.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@run_async
async def db_reset(ctx: Ctx, with_seed: bool, tenants: int, policies: int, as_json: bool) -> None:
    """Take the schema down to nothing and back up through alembic (optionally seed)."""
    if not with_seed:  # silently ignoring them would leave the operator expecting a seed that never happened
        for option in ("tenants", "policies"):
            if click.get_current_context().get_parameter_source(option) != click.core.ParameterSource.DEFAULT:
                raise InputInvalid(f"--{option}: only with --seed (db reset --seed --{option} N)",
                                   field=f"--{option}")
    if with_seed:
        _check_seed_size(tenants, policies)
    reset = await _reset(ctx.settings, tenants, policies, with_seed)
    name, head, report = db.database_name(ctx.settings), db.head_revision(), reset.seeded
    what = ("created the database" if reset.created else
            f"dropped its opspolish schema at {reset.dropped_revision} with all its rows"
            if reset.dropped_revision else "it had no opspolish schema to drop")
    lines = [f"database {name} reset to {head} ({what})", *([_seeded(report)] if report else [])]
    if reset.dropped_jobs is None:
        lines.append("queues not checked (Redis unavailable): jobs of the dropped runs may still be queued")
    elif reset.dropped_jobs:
        n = reset.dropped_jobs
        lines.append(f"took {n} queued job{'s' if n != 1 else ''} of the dropped runs out of "
                     f"{'their queues' if n != 1 else 'its queue'}")
    emit(as_json, {"database": name, "revision": head, "created": reset.created,
                   "dropped_revision": reset.dropped_revision, "dropped_jobs": reset.dropped_jobs,
                   "seeded": dataclasses.asdict(report) if report else None},
         "\n".join(lines))


#: The most policies one seed makes (both workspaces): each option alone is bounded, but 1,000,000 tenants times
#: 1,000 policies would be two billion rows, hours of writing and tens of GB, from one typo.
MAX_SEEDED_POLICIES = 10_000_000


def _check_seed_size(tenants: int, policies: int) -> None:
    from opspolish.seed import DEFAULT_WORKSPACES

    total = tenants * policies * len(DEFAULT_WORKSPACES)
    if total > MAX_SEEDED_POLICIES:
        raise InputInvalid(f"--policies: {tenants:,} tenants per workspace with {policies:,} policies each would seed "
                           f"{total:,} policies (at most {MAX_SEEDED_POLICIES:,}): fewer tenants or policies",
                           field="--policies")


async def _seed(settings: Settings, tenants: int, policies: int) -> SeedReport:
    from opspolish.seed import DEFAULT_WORKSPACES, seed

    conn = await db.connect(settings)
    try:
        total = tenants * len(DEFAULT_WORKSPACES)
        with click.progressbar(length=total, label="seeding tenants", file=sys.stderr) as bar:
            return await seed(conn, tenants_per_workspace=tenants, policies_per_tenant=policies,
                              progress=bar.update)
    finally:
        await conn.close()


def _seeded(report: SeedReport) -> str:
    return (f"seeded: {report.workspaces} workspaces, {report.tenants} tenants ({report.created_tenants} new), "
            f"{report.policies} policies")


@main.command("seed")
@click.option("--tenants", type=click.IntRange(0, 1_000_000), default=3, show_default=True,
              help="Tenants per workspace.")
@click.option("--policies", type=click.IntRange(0, 1000), default=3, show_default=True,
              help="Policies per tenant.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@run_async
async def seed_cmd(ctx: Ctx, tenants: int, policies: int, as_json: bool) -> None:
    """Seed workspaces, tenants and the assignment directory (idempotent)."""
    _check_seed_size(tenants, policies)
    await db.require_head(ctx.settings)
    report = await _seed(ctx.settings, tenants, policies)
    emit(as_json, dataclasses.asdict(report), _seeded(report))


def parse_inputs(pairs: tuple[str, ...], inputs_json: str | None) -> dict[str, Any]:
    """``--inputs-json`` then ``--input KEY=VALUE`` pairs; a VALUE that parses as JSON is taken as JSON."""
    inputs: dict[str, Any] = {}
    if inputs_json is not None:
        try:
            parsed = json.loads(inputs_json, parse_constant=_refuse_constant, parse_float=exact_float,
                                object_pairs_hook=_unique_keys)
        except RecursionError:  # "not valid JSON (maximum recursion depth exceeded...)": valid, only too deep
            raise InputInvalid(f"--inputs-json: nested deeper than {MAX_DEPTH} levels",
                               field="--inputs-json") from None
        except ValueError as exc:
            # Python's own words for a long integer end in advice for Python programmers (sys.set_int_max_str_digits)
            why = f"a number has more than {MAX_DIGITS} digits" if "digits" in str(exc) else f"not valid JSON ({exc})"
            raise InputInvalid(f"--inputs-json: {why}", field="--inputs-json") from None
        if not isinstance(parsed, dict):
            raise InputInvalid("--inputs-json: must be a JSON object", field="--inputs-json")
        inputs.update(parsed)
    for n, pair in enumerate(pairs, start=1):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            # Not echoed: a malformed pair may well be a secret typed without its "=".
            raise InputInvalid(f"--input: expected KEY=VALUE (--input number {n} has no KEY before an '=')",
                               field="--input")
        key = key.strip()
        path = "inputs" + key_segment(key)
        if key in inputs:  # a second value would silently replace the first
            raise InputInvalid(f"{path}: given more than once", field=path)
        try:
            inputs[key] = json.loads(raw, parse_constant=_refuse_constant, parse_float=exact_float,
                                     object_pairs_hook=_unique_keys)
        except ValueError as exc:
            # JSON that is refused, not text: a non-finite number, an integer too long to read, a repeated key
            why = f"number has more than {MAX_DIGITS} digits" if "digits" in str(exc) else str(exc)
            if "non-finite" in why or "digits" in why or "more than once" in why:
                raise InputInvalid(f"{path}: {why}", field=path) from None
            inputs[key] = raw
        except RecursionError:
            raise InputInvalid(f"{path}: nested deeper than {MAX_DEPTH} levels", field=path) from None
    return inputs


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json keeps the last of a repeated key, silently)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {key!r} appears more than once in one object")
        obj[key] = value
    return obj


def _utf8(value: str, option: str) -> str:
    """An option's text as the database will take it (argv bytes that are not UTF-8 arrive as surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputInvalid(f"{option}: not valid UTF-8", field=option) from None
    return value


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"non-finite number {name} is not allowed")


@main.command("dispatch")
@click.argument("run_type", metavar="TYPE")
@click.option("--tenant", "tenant", help="Tenant id or external_id (tenant jobs).")
@click.option("--workspace", "workspace",
              help="Workspace slug: required for workspace jobs; with a tenant job, the tenant must be in it.")
@click.option("--input", "pairs", multiple=True, metavar="KEY=VALUE", help="An input; VALUE may be JSON.")
@click.option("--inputs-json", help="All inputs as one JSON object.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
@run_async
async def dispatch_cmd(ctx: Ctx, run_type: str, tenant: str | None, workspace: str | None, pairs: tuple[str, ...],
                       inputs_json: str | None, as_json: bool) -> None:
    """Queue a run of TYPE (or join the identity's active run) and print its id."""
    from opspolish.dispatch import dispatch
    from opspolish.runtime import Runtime
    from opspolish.tracking import get_job, load_jobs

    load_jobs(ctx.settings.job_modules)
    job = get_job(run_type)
    inputs = parse_inputs(pairs, inputs_json)
    job.validate_inputs(inputs)
    settings = ctx.settings
    if job.scope == "workspace" and not workspace:
        raise InputInvalid("--workspace: required for this job type", field="--workspace")
    rt = await Runtime.start(settings, pool_size=2)
    try:
        workspace_id = None
        if workspace is not None:  # for a tenant job it scopes the tenant: one of another workspace is refused
            workspace_id = await rt.pool.fetchval("SELECT id FROM workspaces WHERE slug = $1",
                                                  _utf8(workspace, "--workspace"))
            if workspace_id is None:
                raise InputInvalid(f"--workspace: no workspace {workspace!r}", field="--workspace")
        result = await dispatch(rt, run_type, tenant=tenant, workspace_id=workspace_id, inputs=inputs)
    finally:
        await rt.close()
    emit(as_json, {"run_id": result.run_id, "job_id": result.job_id, "verdict": result.verdict,
                   "status": result.status, "tenant_id": result.tenant_id, "workspace_id": result.workspace_id},
         f"run {result.run_id} {result.verdict}" + ("" if result.created else f" (already {result.status})"))


@main.group("runs")
def runs_group() -> None:
    """Read the ledger."""


async def _scope_for(rt: Any, tenant: str | None) -> Any:
    from opspolish.ledger import Scope

    if tenant is None:
        return Scope.operator()
    from opspolish.dispatch import tenant_ref

    row = await rt.pool.fetchrow("SELECT * FROM opspolish_resolve_tenant($1)", tenant_ref(tenant))
    if row is None or row["tenant_id"] is None:
        raise TenantNotFound(f"--tenant: no tenant with id or external_id {tenant!r}", field="--tenant")
    return Scope(row["workspace_id"], row["tenant_id"])


def _counts_text(counts: dict[str, Any] | None) -> str:
    if not counts:
        return "-"
    return f"{counts.get('processed', 0)}/{counts.get('total', 0)} failed={counts.get('failed', 0)}"


@runs_group.command("list")
@click.option("--tenant", help="Only this tenant's runs (id or external_id).")
@click.option("--type", "run_type", help="Only runs of this type (assignments.fetch, ...).")
@click.option("--status", type=click.Choice(["queued", "running", "completed"]), help="Only runs in this status.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True,
              help="At most this many runs, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@pass_ctx
@run_async
async def runs_list(ctx: Ctx, tenant: str | None, run_type: str | None, status: str | None, limit: int,
                    as_json: bool) -> None:
    """List runs, newest first."""
    from opspolish.runtime import Runtime

    rt = await Runtime.start(ctx.settings, connect_to_redis=False, pool_size=2)
    try:
        runs = await rt.ledger.scoped(await _scope_for(rt, tenant)).list_runs(
            run_type=None if run_type is None else _utf8(run_type, "--type"), status=status, limit=limit)
    finally:
        await rt.close()
    lines = [f"{'ID':>8}  {'TYPE':<28} {'TENANT':<36} {'STATUS':<10} {'OUTCOME':<20} {'COUNTS':<18} REASON"]
    for r in runs:
        lines.append(f"{r.id:>8}  {r.type:<28} {r.tenant_id or '-'!s:<36} {r.status:<10} {r.outcome:<20} "
                     f"{_counts_text(r.summary_counts):<18} {r.reason_code or ''}")
    emit(as_json, [r.as_json() for r in runs], "\n".join(lines))


@runs_group.command("show")
@click.argument("run_id", type=click.IntRange(1, 2**63 - 1))
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@pass_ctx
@run_async
async def runs_show(ctx: Ctx, run_id: int, as_json: bool) -> None:
    """Show one run."""
    from opspolish.ledger import Scope
    from opspolish.runtime import Runtime

    rt = await Runtime.start(ctx.settings, connect_to_redis=False, pool_size=2)
    try:
        run = await rt.ledger.scoped(Scope.operator()).get(run_id)
    finally:
        await rt.close()
    if run is None:
        raise RunNotFound(f"RUN_ID: no run {run_id}", field="RUN_ID")
    data = run.as_json()
    emit(as_json, data, "\n".join(f"{k:>18}: {_shown(v)}" for k, v in data.items()))


def _shown(value: Any) -> str:
    """A field of ``runs show``'s text: ``-`` for none, a mapping or list as one line of JSON (it was Python's repr:
    ``{'x': Decimal('0.1...'), 'k': True}``), anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        # Readable text kept (café), but not what a terminal would act on: controls and format characters (a C1 CSI,
        # a right-to-left override) escaped, as repr() did.
        return _NOT_ASCII.sub(_escaped_unless_printable, json_output(value, indent=None))
    return str(value)


_NOT_ASCII = re.compile(r"[^\x20-\x7e]")


def _escaped_unless_printable(match: re.Match[str]) -> str:
    return match[0] if match[0].isprintable() else json.dumps(match[0])[1:-1]


@main.command("reconcile")
@click.option("--workspace", help="Only this workspace (slug).")
@click.option("--json", "as_json", is_flag=True, help="Print each workspace's result as JSON.")
@pass_ctx
@run_async
async def reconcile_cmd(ctx: Ctx, workspace: str | None, as_json: bool) -> None:
    """Run one reconcile pass now, tracked like the cron one."""
    from opspolish.jobs.reconcile import reconcile_all
    from opspolish.runtime import Runtime

    rt = await Runtime.start(ctx.settings, connect_to_redis=False, pool_size=3)
    try:
        if workspace is not None and not await rt.pool.fetchval("SELECT 1 FROM workspaces WHERE slug = $1",
                                                                _utf8(workspace, "--workspace")):
            raise InputInvalid(f"--workspace: no workspace {workspace!r}", field="--workspace")
        results = await reconcile_all(rt, workspace_slug=workspace)
    finally:
        await rt.close()
    emit(as_json, results, "\n".join(_reconcile_line(r) for r in results) or "no workspaces")
    # A pass that failed, or never ran (its workspace's gate stayed busy past the wait: no run recorded), is not
    # the pass the command was asked for.
    if any(r.get("outcome") == "failed" or r.get("decision") in ("failed", "busy") for r in results):
        sys.exit(1)


def _reconcile_line(result: dict[str, Any]) -> str:
    code = f" ({result['reason_code']})" if result.get("reason_code") else ""
    if result.get("run_id") is None:  # no run recorded: the gate stayed busy, or the database went away
        why = "its gate stayed busy, no pass ran" if result.get("decision") == "busy" else "no pass ran"
        return f"{result['workspace']}: {result.get('decision')}{code}: {why}"
    return f"{result['workspace']}: run {result['run_id']} {result.get('outcome') or result.get('decision')}{code}"


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@pass_ctx
@run_async
async def doctor_cmd(ctx: Ctx, as_json: bool) -> None:
    """Check the configuration (job modules, provider), Postgres, migrations, Redis and worker health."""
    from opspolish.doctor import run_checks

    checks = await run_checks(ctx.settings)
    emit(as_json, [c.__dict__ for c in checks],
         "\n".join(f"{c.verdict.upper():<5} {c.name:<11} {c.detail}" for c in checks))
    if any(c.verdict == "fail" for c in checks):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
