"""arq worker entry point: ``arq opspolish.worker.WorkerSettings``.

Startup builds the runtime (asyncpg pool, provider, lease keeper) from settings; shutdown disposes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterable
from functools import partial
from typing import Any

import structlog
from arq.cron import cron
from arq.worker import Worker

from opspolish import db
from opspolish.logs import configure_logging, log_runs_once, redact_job_arguments_before_arq_cuts_them
from opspolish.runtime import RideOutRetry, Runtime, watch_redis_replies
from opspolish.settings import Settings
from opspolish.tracking import TIMEOUT_MARGIN_S, TrackedJob, load_jobs

log = structlog.get_logger("opspolish")


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["opspolish_settings"]
    # A worker on a database behind (or ahead of) its schema would fail every delivery on a driver error: it refuses
    # to start instead, saying what to do.
    await db.require_schema_head(settings)
    ctx["opspolish"] = await Runtime.start(settings, redis=ctx["redis"])
    _stop_without_cancelling_arq(ctx, ctx["opspolish"])
    ctx["opspolish_redis_watch"] = asyncio.ensure_future(watch_redis_replies(ctx["redis"], settings))
    # Up: from here on, Redis being away is ridden out (OPSPOLISH_REDIS_RETRY_S), by this worker's pool alone.
    ctx["opspolish_ride_out"] = RideOutRetry.armed_for(ctx["redis"])
    log.info("worker_started", queue=settings.queue_name)


def _running_worker(ctx: dict[str, Any]) -> Worker | None:
    """The arq Worker whose ``main()`` is running this ``on_startup`` (the current task's coroutine), if any."""
    task = asyncio.current_task()
    frame = getattr(task.get_coro() if task is not None else None, "cr_frame", None)
    worker = frame.f_locals.get("self") if frame is not None else None
    return worker if isinstance(worker, Worker) and worker.ctx is ctx else None


def _stop_without_cancelling_arq(ctx: dict[str, Any], rt: Runtime) -> None:
    """Replace arq's SIGTERM/SIGINT handler with one that cancels the job tasks, not arq's ``run_job`` tasks.

    arq's ``handle_sig`` cancels every ``run_job`` task, and one cancelled outside the ``try`` that takes a job's
    cancellation (created in the same turn of the loop and not started yet, in its opening Redis pipeline, in
    ``on_job_start`` or in its shielded ``finish_job``) ends cancelled: ``Worker.close()`` gathers the tasks without
    ``return_exceptions``, re-raises that ``CancelledError`` before ``on_shutdown`` and the worker exits 1, with the
    other deliveries' hand-backs and acknowledgements cut off (runs left ``running``, arq's in-progress keys left to
    expire). Cancelling the job tasks (``Worker.job_tasks``) instead lets each ``run_job`` take its job's cancellation
    and finish; a delivery that starts after the signal goes back to the queue untouched (``Runtime.stopping``)."""
    worker = _running_worker(ctx)
    if worker is None or not getattr(worker, "_handle_signals", False) or getattr(worker, "_job_completion_wait", None):
        return  # not arq's own run loop, signals handled elsewhere, or arq's wait-for-completion mode: left alone
    main = worker.main_task or asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, partial(_on_stop_signal, worker, rt, main, sig))


def _disarm(ctx: dict[str, Any]) -> None:
    """Stopping: a Redis that is away is not waited for (by this worker; another in the process goes on)."""
    ride_out: RideOutRetry | None = ctx.get("opspolish_ride_out")
    if ride_out is not None:
        ride_out.armed = False


def _on_stop_signal(worker: Worker, rt: Runtime, main: asyncio.Task[Any] | None, sig: signal.Signals) -> None:
    repeated, rt.stopping = rt.stopping, True
    _disarm(worker.ctx)
    worker.allow_pick_jobs = False
    running = [task for task in worker.job_tasks.values() if not task.done()]
    log.info("worker_stopping", signal=sig.name, cancelling=len(running),
             starting=sum(not task.done() for task in worker.tasks.values()) - len(running))
    for task in running:
        if not task.cancelling():  # a second signal must not cut a hand-back in flight short (it goes on, unlogged)
            task.cancel()
    if repeated:
        # A body that swallowed the first cancellation is still in its body: cancelled again, so that a repeated
        # signal still stops the worker. Deliveries already handing their runs back (out of their bodies) go on.
        for lease in list(rt.leases.leases.values()):
            if lease.in_body and lease.task is not None and lease.task.cancelling():
                lease.task.cancel()
    if main is not None:
        main.cancel()
    if worker.on_stop is not None:
        worker.on_stop(sig)


async def shutdown(ctx: dict[str, Any]) -> None:
    _disarm(ctx)
    watch = ctx.pop("opspolish_redis_watch", None)
    if watch is not None:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch
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
    redact_job_arguments_before_arq_cuts_them()
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
        "redis_settings": redis_settings(settings, ride_out=True),
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
