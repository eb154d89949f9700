"""arq worker entry point: ``arq opspolish.worker.WorkerSettings``.

Startup builds the runtime (asyncpg pool, provider, lease keeper) from settings; shutdown disposes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog
from arq.cron import cron

from opspolish import db
from opspolish.logs import configure_logging, log_runs_once
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from opspolish.tracking import TIMEOUT_MARGIN_S, TrackedJob, load_jobs

log = structlog.get_logger("opspolish")


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["opspolish_settings"]
    # A worker on a database behind (or ahead of) its schema would fail every delivery on a driver error: it refuses
    # to start instead, saying what to do.
    await db.require_schema_head(settings)
    ctx["opspolish"] = await Runtime.start(settings, redis=ctx["redis"])
    log.info("worker_started", queue=settings.queue_name)


async def shutdown(ctx: dict[str, Any]) -> None:
    rt: Runtime | None = ctx.get("opspolish")
    if rt is not None:
        gate = rt.gate
        log.info("worker_stopped", metrics=dict(rt.metrics),
                 gate={"flushes": gate.flushes, "claims": gate.claims, "completions": gate.completions,
                       "replays": gate.replays})
        await rt.close()


async def _startup_with_logging(ctx: dict[str, Any]) -> None:
    configure_logging(ctx["opspolish_settings"].log_format)
    log_runs_once(ctx["opspolish_job_types"])
    await startup(ctx)


def worker_settings(
    settings: Settings | None = None, *, jobs: Iterable[TrackedJob] | None = None, with_cron: bool = True,
    configure_logs: bool = True,
) -> type:
    """A WorkerSettings class for ``settings`` and ``jobs`` (default: every registered job)."""
    from opspolish.jobs.reconcile import RECONCILE_TYPE, reconcile_cron

    settings = settings or Settings()
    registry = load_jobs(settings.job_modules)
    chosen = list(jobs) if jobs is not None else list(registry.values())
    tracked = [job for job in chosen if job.type != RECONCILE_TYPE]  # reconcile runs as a cron job instead
    functions = [job.arq_function(job.timeout_s or settings.job_timeout_s) for job in tracked]
    minutes = set(range(0, 60, settings.reconcile_interval_min))
    cron_jobs = [
        # arq's timeout is the tracked functions' (each workspace's run times itself out first); a pass over so many
        # workspaces that it outlasts it hands its current run back, and the next pass runs that run first.
        cron(reconcile_cron, name=RECONCILE_TYPE, minute=minutes, second=0, unique=True, max_tries=1,
             timeout=settings.job_timeout_s + TIMEOUT_MARGIN_S)
    ] if with_cron else []
    from opspolish.runtime import redis_settings

    return type("WorkerSettings", (), {
        "functions": functions,
        "cron_jobs": cron_jobs,
        "queue_name": settings.queue_name,
        "redis_settings": redis_settings(settings),
        "max_jobs": settings.max_jobs,
        "keep_result": 0,  # the ledger is the record of results
        "health_check_interval": settings.worker_health_s,  # what `opspolish doctor` reads (arq's default: an hour)
        "ctx": {"opspolish_settings": settings,
                "opspolish_job_types": tuple(job.type for job in tracked)},
        "on_startup": _startup_with_logging if configure_logs else startup,
        "on_shutdown": shutdown,
    })


def __getattr__(name: str) -> Any:
    # Built on first access, so importing this module reads no settings and connects to nothing.
    if name == "WorkerSettings":
        value = worker_settings()
        globals()[name] = value
        return value
    raise AttributeError(name)
