"""``opspolish doctor``: each service checked, each with a clear verdict."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from opspolish import db
from opspolish.errors import OpsPolishError, SchemaMismatch
from opspolish.sanitize import describe_exception, sanitize_message
from opspolish.settings import Settings


@dataclass
class Check:
    name: str
    verdict: str  # ok / warn / fail / skip (not checked: the service it depends on failed)
    detail: str


def _config_check(settings: Settings) -> Check:
    """What a worker imports before it starts: the job modules and the provider. Either failing, the worker exits
    with a traceback at start, while the services all answered ok here."""
    from opspolish.provider import provider_factory
    from opspolish.tracking import load_jobs

    try:
        jobs = load_jobs(settings.job_modules)
        provider_factory(settings.provider)
    except OpsPolishError as exc:
        return Check("config", "fail", exc.message)
    except Exception as exc:  # a job module that raises at import, say
        return Check("config", "fail", _unexpected(settings, exc))
    return Check("config", "ok", f"{len(jobs)} job types and the provider {settings.provider} import")


async def run_checks(settings: Settings) -> list[Check]:
    checks: list[Check] = []
    try:
        revision = await db.current_revision(settings)
        checks.append(Check("postgres", "ok", f"database {db.database_name(settings)} answers"))
        head = db.head_revision()
        if revision == head:
            checks.append(Check("migrations", "ok", f"at head {head}"))
        elif revision is not None and revision not in db.known_revisions():
            # Ahead of this version (or another application's alembic): `db upgrade` cannot help here.
            checks.append(Check("migrations", "fail", f"at {revision}, a revision this version of opspolish does "
                                f"not know (its head is {head}): a newer opspolish migrated this database, or "
                                "another application did"))
        else:
            try:  # tables of the same names with no opspolish revision: `db upgrade` would refuse them
                await db.check_schema_is_ours(settings)
                advice = "run `opspolish db upgrade`"
            except SchemaMismatch as exc:
                advice = exc.message
            checks.append(Check("migrations", "fail", f"at {revision or 'nothing'}, behind head {head}: {advice}"))
    except OpsPolishError as exc:
        missing = isinstance(exc.__cause__, asyncpg.InvalidCatalogNameError)  # the server answers; no database yet
        checks.append(Check("postgres", "fail", exc.message + (": create it with `opspolish db upgrade`"
                                                               if missing else "")))
    except Exception as exc:  # each check keeps its own verdict: one odd failure must not hide the others
        checks.append(Check("postgres", "fail", _unexpected(settings, exc)))
    _skipped_unless_checked(checks, "migrations", "PostgreSQL")
    try:
        from opspolish.runtime import connect_redis

        redis = await connect_redis(settings)
        try:
            await redis.ping()
            checks.append(Check("redis", "ok", "answers"))
            health = await redis.get(settings.queue_name + ":health-check")
            if health:
                checks.append(Check("worker", "ok", health.decode(errors="replace")))
            else:
                checks.append(Check("worker", "warn", f"no worker heartbeat on queue {settings.queue_name!r} in "
                                    f"the last {settings.worker_health_s + 1:g} s (OPSPOLISH_WORKER_HEALTH_S + 1): "
                                    "none is running, or it stopped; start one with `make worker`"))
        finally:
            await redis.aclose()
    except OpsPolishError as exc:
        checks.append(Check("redis", "fail", exc.message))
    except Exception as exc:  # a Redis user not allowed PING or GET, say
        # Which check it failed in: Redis itself, or (Redis answered) reading the worker's heartbeat.
        name = "worker" if any(c.name == "redis" for c in checks) else "redis"
        checks.append(Check(name, "fail", _unexpected(settings, exc)))
    _skipped_unless_checked(checks, "worker", "Redis")
    checks.append(_config_check(settings))
    return checks


def _skipped_unless_checked(checks: list[Check], name: str, service: str) -> None:
    """Every check has its verdict, in --json too: one that could not run (its service failed) says so."""
    if not any(c.name == name for c in checks):
        checks.append(Check(name, "skip", f"not checked: {service} failed above"))


def _unexpected(settings: Settings, exc: Exception) -> str:
    return sanitize_message(describe_exception(exc), extra_secrets=db.secrets_of(settings))
