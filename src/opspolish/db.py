"""Engines, pools and database lifecycle, built from a :class:`Settings` (nothing connects at import)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from opspolish.errors import DbUnavailable, InputInvalid, SchemaMismatch
from opspolish.fingerprint import json_text, load_json
from opspolish.settings import Settings

#: Connection-level settings for the pool (cold paths, replays, heartbeats): custom plans, so a statement
#: prepared while the ledger was empty is re-planned with real values. The gate functions carry their own settings.
SERVER_SETTINGS = {"plan_cache_mode": "force_custom_plan", "application_name": "opspolish"}
#: The gate's own connections (opspolish.batching) run one prepared statement, over and over: planning it
#: once (a generic plan) saves ~0.15 ms of server CPU per flush, and with sequential scans priced out of reach
#: that plan stays on the indexes however small the ledger was when it was made (tests/test_plans.py).
#: A flush carries many deliveries, so it must not wait long on one row someone else holds locked (an operator's
#: open transaction): past GATE_LOCK_TIMEOUT it fails, and the batcher replays its operations one per statement
#: on the pool, where only the blocked one waits.
GATE_LOCK_TIMEOUT = "2s"
GATE_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off",
                        "lock_timeout": GATE_LOCK_TIMEOUT, "application_name": "opspolish"}
# In a wheel the migrations ship inside the package; in a checkout they live at the repository root.
_PACKAGED_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATIONS_DIR = (
    _PACKAGED_MIGRATIONS if _PACKAGED_MIGRATIONS.is_dir() else Path(__file__).resolve().parents[2] / "migrations"
)

#: asyncpg's errors for a session PostgreSQL closed or refused: none of them is raised by anything but the driver.
SESSION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    *SESSION_LOST,
    OSError,
    asyncpg.InterfaceError,
    # Raised when the server's "terminating connection" has arrived and the socket's close not yet (a pooled
    # connection after a backend was terminated, or PostgreSQL restarted): "cannot switch to state ...".
    asyncpg.InternalClientError,
    asyncio.TimeoutError,
)


def session_lost(exc: BaseException, *, errors: tuple[type[BaseException], ...] = SESSION_LOST) -> bool:
    """Whether ``exc`` says PostgreSQL went away: one of ``errors``, or a FATAL server error, which ends the session
    whatever its SQLSTATE. The library's own statements pass :data:`DRIVER_ERRORS` (their OSErrors and timeouts can
    only be the driver's); a job body's errors are held to :data:`SESSION_LOST` (its HTTP client raises OSError too)."""
    return isinstance(exc, errors) or getattr(exc, "severity_en", None) == "FATAL"
#: What the server answers when it refuses a new connection (no such database, bad credentials, too many
#: clients): as operational as a closed port, so it is DbUnavailable too, not a traceback.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    *DRIVER_ERRORS,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ObjectNotInPrerequisiteStateError,  # "database ... is not currently accepting connections"
)


def sqlalchemy_url(settings: Settings) -> URL:
    """The ledger's URL for SQLAlchemy, always with the asyncpg driver: ``postgres://`` (a name SQLAlchemy no longer
    knows) and ``postgresql://`` are accepted settings too."""
    return make_url(settings.database_url.get_secret_value()).set(drivername="postgresql+asyncpg")


def asyncpg_dsn(settings: Settings, database: str | None = None) -> str:
    """The DSN for asyncpg (no ``+asyncpg`` driver suffix)."""
    url = sqlalchemy_url(settings).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def database_name(settings: Settings) -> str:
    name = sqlalchemy_url(settings).database
    if not name:
        raise ValueError("OPSPOLISH_DATABASE_URL names no database")
    return name


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Literal secret values of the settings, for message sanitizing."""
    out = []
    for url in (settings.database_url.get_secret_value(), settings.redis_url.get_secret_value()):
        try:
            password = make_url(url).password
        except Exception:  # an unparsable URL has no password we can find
            password = None
        if password:
            out.append(str(password))
    return tuple(out)


def create_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    """SQLAlchemy engine for cold paths (migrations). Its connections are opened by :func:`connect`, so the URL's
    query parameters (``?sslmode=``, ``?application_name=``) mean what they mean everywhere else: given to
    SQLAlchemy's dialect, each became a keyword argument of ``asyncpg.connect()`` ("unexpected keyword argument
    'sslmode'"), and ``db upgrade`` failed on a URL every other command took."""
    return create_async_engine("postgresql+asyncpg://", async_creator=lambda: connect(settings), pool_pre_ping=True,
                               **kwargs)


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: jsonb travels as Python objects, its numbers exact (a Decimal both ways where a float
    would round it)."""
    await conn.set_type_codec("jsonb", encoder=json_text, decoder=load_json, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release hook: asyncpg still rolls back a stray transaction and drops listeners; we skip its reset query
    (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL): one round trip per acquire that nothing here needs, since
    the gate's advisory lock is transaction-scoped and no code sets session state on pooled connections."""


#: Refusals of the URL itself, met while connecting: a query parameter the driver rejects (``?sslmode=bogus``) or
#: one the server does not know or accepts no such value for (``?foo=bar``, ``?work_mem=lots``: parameters other
#: than asyncpg's go to the server as settings). They were "cannot connect" (db.unavailable, exit 1) or
#: internal.unexpected, where they are a setting to fix: input.invalid naming the variable (exit 2).
URL_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.ClientConfigurationError,
    asyncpg.UndefinedObjectError,
    asyncpg.InvalidParameterValueError,
    asyncpg.CantChangeRuntimeParamError,
)


def _url_refused(exc: BaseException) -> InputInvalid:
    return InputInvalid(f"OPSPOLISH_DATABASE_URL: {exc} (a query parameter of the URL)",
                        field="OPSPOLISH_DATABASE_URL")


def _unreachable(exc: BaseException) -> DbUnavailable:
    """``cannot connect to PostgreSQL: <why>``, with a why even for errors whose text is empty (a timeout)."""
    if isinstance(exc, TimeoutError):
        why = "no PostgreSQL answer within 10 s (is something else listening on that port?)"
    else:
        why = str(exc) or type(exc).__name__
    return DbUnavailable(f"cannot connect to PostgreSQL: {why}")

async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """asyncpg pool for the hot path (gate, heartbeat, completion)."""
    try:
        pool = await asyncpg.create_pool(
            asyncpg_dsn(settings), min_size=min_size, max_size=max_size,
            server_settings=SERVER_SETTINGS, timeout=10, init=init_connection,
            reset=_keep_session,
        )
    except URL_ERRORS as exc:
        raise _url_refused(exc) from exc
    except CONNECT_ERRORS as exc:
        raise _unreachable(exc) from exc
    assert pool is not None
    return pool


async def connect_gate(settings: Settings) -> asyncpg.Connection:
    """A dedicated connection for the gate's coalesced statements (see GATE_SERVER_SETTINGS)."""
    try:
        conn = await asyncpg.connect(asyncpg_dsn(settings), timeout=10, server_settings=GATE_SERVER_SETTINGS)
    except URL_ERRORS as exc:
        raise _url_refused(exc) from exc
    except CONNECT_ERRORS as exc:
        raise _unreachable(exc) from exc
    await init_connection(conn)
    return conn


async def connect(settings: Settings, database: str | None = None) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(asyncpg_dsn(settings, database), timeout=10,
                                     server_settings=SERVER_SETTINGS)
    except URL_ERRORS as exc:
        raise _url_refused(exc) from exc
    except CONNECT_ERRORS as exc:
        raise _unreachable(exc) from exc


def quote_ident(name: str) -> str:
    """``name`` as an SQL identifier, whatever it holds (a database name may contain a double quote)."""
    return '"' + name.replace('"', '""') + '"'


async def ensure_database(settings: Settings) -> bool:
    """Create the configured database if it does not exist. Returns True when it was created.

    An existing database is found by connecting to it: the server's ``postgres`` database, which CREATE DATABASE
    needs a connection to, is only asked for when there is something to create (a deployment's role may well have
    no access to it)."""
    name = database_name(settings)
    try:
        await (await connect(settings)).close()
        return False
    except DbUnavailable as exc:
        if not isinstance(exc.__cause__, asyncpg.InvalidCatalogNameError):  # the server itself is out of reach
            raise
    conn = await connect(settings, "postgres")
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        try:
            await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            # Another process created it between our look and our CREATE: two CREATEs racing each other
            # collide on pg_database's unique index (a UniqueViolation), not with DuplicateDatabase.
            return False
        return True
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def reset_lock(settings: Settings) -> AsyncIterator[None]:
    """Hold RESET_LOCK_KEY on the configured database for the block (released when the connection closes)."""
    conn = await connect(settings)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", RESET_LOCK_KEY)
        yield
    finally:
        await conn.close()


async def drop_database(settings: Settings, name: str) -> None:
    conn = await connect(settings, "postgres")
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


#: The session-independent advisory lock key every migration run takes first (pg_advisory_xact_lock, in
#: migrations/env.py), so two ``db upgrade`` / ``db reset`` processes on one database run one after the other
#: instead of both applying 0001 (one then fails on a table or function the other just made). A fixed 64-bit
#: constant: the gate's keys come from sha256 identity hashes, so a collision with one is as likely as with any.
MIGRATION_LOCK_KEY = 0x6F707370_6D696772  # "opspmigr"
#: Held (session-scoped) by ``db reset`` from its downgrade through its seed. A key of its own: the migration
#: runs inside it take MIGRATION_LOCK_KEY on their own connections, which must not wait on this session.
RESET_LOCK_KEY = 0x6F707370_72657374  # "opsprest"


def alembic_config(settings: Settings) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["opspolish_settings"] = settings
    return cfg


def _alembic(settings: Settings, command_name: str, revision: str) -> None:
    from alembic import command

    getattr(command, command_name)(alembic_config(settings), revision)


async def upgrade(settings: Settings, revision: str = "head") -> tuple[bool, str | None]:
    """Create the database if needed and upgrade it through alembic. Returns whether the database was created, and
    the revision it was at before (None: no opspolish schema yet)."""
    created = await ensure_database(settings)
    before = await check_schema_is_ours(settings)
    await asyncio.to_thread(_alembic, settings, "upgrade", revision)
    return created, before


async def downgrade(settings: Settings, revision: str = "base") -> None:
    await check_schema_is_ours(settings)
    await asyncio.to_thread(_alembic, settings, "downgrade", revision)


async def check_schema_is_ours(settings: Settings) -> str | None:
    """Refuse, before alembic touches anything, a database whose schema these migrations did not make: one at a
    revision they do not know (a newer opspolish migrated it, or another application's alembic did), or one with no
    opspolish revision that already holds tables of the same names (alembic would fail half-way on them). Returns
    the database's revision (None: no opspolish schema yet)."""
    from opspolish.models import Base

    name = database_name(settings)
    conn = await connect(settings)
    try:
        # One snapshot for both reads (a concurrent `db upgrade` commits its tables and its revision together):
        # read apart, a check could see no revision yet and then that upgrade's tables, and refuse them as foreign.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            clashes = await conn.fetchval(
                "SELECT string_agg(relname, ', ' ORDER BY relname) FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace AND relname = ANY($1::text[])",
                sorted(Base.metadata.tables))
            versioned = await conn.fetchval(
                "SELECT EXISTS (SELECT FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                "AND relname = 'alembic_version')")
            current = await conn.fetchval("SELECT version_num FROM alembic_version") if versioned else None
    finally:
        await conn.close()
    if current is not None:
        if current not in known_revisions():
            raise SchemaMismatch(
                f"database {name} is at revision {current}, which this version of opspolish does not know "
                f"(its head is {head_revision()}; a newer opspolish or another application migrated it): "
                "upgrade opspolish, or set OPSPOLISH_DATABASE_URL to another database")
        return str(current)
    if clashes:
        raise SchemaMismatch(
            f"database {name} has no opspolish revision but already holds {clashes}: nothing was changed; "
            "set OPSPOLISH_DATABASE_URL to a database of its own")
    return None


#: The newest migration's revision, for a worker to check its database against without loading alembic (its script
#: directory costs a worker process ~10 MB of memory). tests/test_schema.py holds it to the migrations' head.
SCHEMA_HEAD = "0007"


async def require_schema_head(settings: Settings) -> None:
    """A worker's start: refuse a database that is not at :data:`SCHEMA_HEAD`, saying what to do."""
    current = await current_revision(settings)
    if current == SCHEMA_HEAD:
        return
    advice = ("run `opspolish db upgrade` first" if current is None or current < SCHEMA_HEAD
              else "a revision this version does not know (a newer opspolish migrated it): upgrade opspolish")
    raise SchemaMismatch(f"database {database_name(settings)} is at {current or 'no revision'}, not at head "
                         f"{SCHEMA_HEAD}: {advice}")


async def require_head(settings: Settings) -> None:
    """Refuse a database that is not at this version's head (behind it, ahead of it, or someone else's), with what
    to do, rather than a driver error on the first table or function that is missing or different."""
    revision, head = await check_schema_is_ours(settings), head_revision()
    if revision != head:
        raise SchemaMismatch(f"database {database_name(settings)} is at {revision or 'no revision'}, not at head "
                             f"{head}: run `opspolish db upgrade` first")


async def current_revision(settings: Settings) -> str | None:
    conn = await connect(settings)
    try:
        exists = await conn.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL")
        if not exists:
            return None
        value = await conn.fetchval("SELECT version_num FROM alembic_version")
        return str(value) if value is not None else None
    finally:
        await conn.close()


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every revision the shipped migrations define."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(Settings()))
    return frozenset(rev.revision for rev in script.walk_revisions())


@functools.cache  # the shipped migrations do not change while the process runs
def head_revision() -> str:
    from alembic.script import ScriptDirectory

    cfg = alembic_config(Settings())
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head
