"""``ops.reconcile_adapter_runs`` (DESIGN §7): settle ledger runs the arq queue no longer backs.

One tracked, workspace-scoped run per workspace per pass; no overlap (the gate) and no cooldown.
It asks arq about each candidate by job id and queue name; it never scans Redis keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from arq import Retry
from arq.constants import job_key_prefix, retry_key_prefix
from arq.jobs import Job, JobStatus
from pydantic import BaseModel, ConfigDict

from opspolish.errors import DbUnavailable, RedisUnavailable
from opspolish.ledger import Run, Scope, translate_errors
from opspolish.runtime import Runtime, connect_redis, is_redis_error
from opspolish.tracking import RunContext, execute, put_back_untouched, tracked_job

RECONCILE_TYPE = "ops.reconcile_adapter_runs"
#: How long one workspace's pass keeps retrying a busy gate before it reports the workspace as skipped.
BUSY_DEADLINE_S = 30.0

#: Detail counts beside total / processed / failed in each pass's summary_counts.
DETAIL_COUNTS = ("checked", "left_to_queue", "requeued", "orphaned", "lost")

log = structlog.get_logger("opspolish")
_BACKED = {JobStatus.queued, JobStatus.deferred, JobStatus.in_progress}


def _job_id_of(rt: Runtime, run: Run) -> str:
    return run.job_id or f"{run.queue_name or rt.settings.queue_name}:run:{run.id}"


async def _job_status(rt: Runtime, redis: Any, run: Run) -> JobStatus:
    job_id = _job_id_of(rt, run)
    try:
        return await Job(job_id, redis, _queue_name=run.queue_name or rt.settings.queue_name).status()
    except Exception as exc:
        if is_redis_error(exc):
            raise RedisUnavailable(f"Redis unavailable while checking job {job_id}: {type(exc).__name__}") from exc
        raise


async def _settle(rt: Runtime, redis: Any, run: Run, scoped: Any, ctx: RunContext) -> bool:
    """Settle one unbacked run; False when it changed under us (someone else settled or claimed it)."""
    if run.status == "running":
        ok: bool = await scoped.settle_orphaned(
            run.id, lease_ttl_s=rt.settings.lease_ttl_s,
            message=f"lease stale since {run.heartbeat_at:%Y-%m-%dT%H:%M:%SZ} and the queue no longer holds the job",
        )
        if ok:
            ctx.counts.bump("orphaned")
        return ok
    age_s = (datetime.now(UTC) - run.created_at).total_seconds()
    if run.requeues == 0 and age_s < rt.settings.reconcile_max_queued_age_s:
        # The job first, then the mark: marked first, a failed enqueue (Redis refusing writes, the pass cut short
        # in between) used up the run's one re-enqueue, and the next pass called it lost. Enqueued but not marked
        # (the pass died in between), the run is backed again, and could at worst be re-enqueued once more. The
        # job id is the run's: never two jobs for it.
        job_id = _job_id_of(rt, run)

        async def enqueue() -> Any:
            return await redis.enqueue_job(
                run.type, run_id=run.id, tenant_id=str(run.tenant_id) if run.tenant_id else None,
                workspace_id=str(run.workspace_id), _job_id=job_id,
                _queue_name=run.queue_name or rt.settings.queue_name,
            )

        try:
            job = await enqueue()
            if job is None:
                # Its queue entry vanished but not its job key (a partial loss, an eviction): arq refuses a second job
                # under the id, and the run, marked requeued with no job, was called lost by the next pass. The key
                # backs nothing (the status above found no queue entry, no in-progress marker): it goes.
                await redis.delete(job_key_prefix + job_id, retry_key_prefix + job_id)
                job = await enqueue()
        except Exception as exc:
            if is_redis_error(exc):
                raise RedisUnavailable(f"Redis unavailable while re-enqueueing run {run.id}: "
                                       f"{type(exc).__name__}") from exc
            raise
        if job is None:  # enqueued under its id meanwhile (another pass): backed again, not ours to mark
            return False
        if not await scoped.mark_requeued(run.id):
            return False  # claimed or settled meanwhile: the gate decides what the job's delivery does
        ctx.counts.bump("requeued")
        return True
    why = "re-enqueued once already" if run.requeues else f"older than {rt.settings.reconcile_max_queued_age_s:g} s"
    ok = await scoped.settle_lost(run.id, message=f"queue job vanished ({why})")
    if ok:
        ctx.counts.bump("lost")
    return ok


class ReconcileInputs(BaseModel):
    """None: a pass is its workspace's, whatever asked for it. Inputs would make it another identity, with its own
    lock and active run, and two passes of one workspace could then run at once (and settle each other's work)."""

    model_config = ConfigDict(extra="forbid")


@tracked_job(RECONCILE_TYPE, inputs=ReconcileInputs, scope="workspace", cooldown_s=0.0, max_attempts=1)
async def reconcile_adapter_runs(run: RunContext) -> None:
    """One workspace's pass: every candidate is counted; settled ones are processed."""
    rt = run.runtime
    redis = rt.redis if rt.redis is not None else await connect_redis(rt.settings)
    try:
        for key in DETAIL_COUNTS:  # always present, so operators can rely on the keys
            run.counts.bump(key, 0)
        scoped = rt.ledger.scoped(Scope(run.workspace_id))
        after_id = 0
        while candidates := await scoped.unbacked_candidates(
            lease_ttl_s=rt.settings.lease_ttl_s, min_age_s=rt.settings.reconcile_grace_s, after_id=after_id
        ):
            after_id = candidates[-1].id
            run.counts.bump("checked", len(candidates))
            for listed in candidates:
                if await _job_status(rt, redis, listed) in _BACKED:
                    run.counts.bump("left_to_queue")
                    continue
                # The page may be stale by now: a run its worker claimed or ended since (its job then gone from
                # the queue) was re-enqueued from the page's "queued", a stray job for an ended run, and counted
                # failed when the mark found it no longer queued. Read after the queue's answer, the run's own
                # row tells: a worker ends the run in the ledger before arq drops the job.
                candidate = await scoped.unbacked_candidate(listed.id, lease_ttl_s=rt.settings.lease_ttl_s,
                                                            min_age_s=rt.settings.reconcile_grace_s)
                if candidate is None:  # moved on by its own worker: the queue's, as above
                    run.counts.bump("left_to_queue")
                    continue
                run.counts.add_total()
                if await _settle(rt, redis, candidate, scoped, run):
                    run.counts.item_succeeded()
                else:
                    run.counts.item_failed()
    finally:
        if redis is not rt.redis:
            await redis.aclose()


async def reconcile_workspace(
    rt: Runtime, workspace_id: uuid.UUID | str, *, job_id: str, run_id: int | None = None,
    inputs: dict[str, Any] | None = None, tenant: str | None = None,
) -> dict[str, Any]:
    """Run one tracked pass for a workspace in this process, waiting out a busy gate.

    With ``run_id`` (a delivery through the queue) the pass runs as that run. Without one, a pass that finds the
    workspace's reconcile identity held by another run records its skip, then delivers that run: a queued one
    (dispatched, or handed back by a worker that shut down mid-pass) runs now, as this pass, instead of holding
    the identity and skipping every later pass; a running one is another pass at work, and this one stops. A
    ``tenant`` (a delivery that named one) is refused by the gate's scope check, as for any workspace job."""
    from opspolish.tracking import get_job

    job = get_job(RECONCILE_TYPE)
    deadline = time.monotonic() + BUSY_DEADLINE_S
    skipped: dict[str, Any] | None = None
    while True:
        try:
            # A pass of its own has no inputs; a delivery of a run without a payload (reconcile's re-enqueue of a
            # dispatched reconcile run) runs the run's recorded inputs: {} there was refused as other inputs.
            result = await execute(rt, job, run_id=run_id, tenant=tenant, workspace_id=workspace_id,
                                   inputs={} if inputs is None and run_id is None else inputs, job_id=job_id)
        except Retry as retry:
            away = retry.__cause__
            if isinstance(away, DbUnavailable):
                # The database is away (the gate could not claim, or the pass's outcome could not be written): that,
                # not a busy gate, is what the pass reports, now (reconcile_all: reconcile_failed, db.unavailable).
                # Taken for a busy gate, it was retried for BUSY_DEADLINE_S, then reported as dedupe.overlap.
                raise away from away.__cause__  # its own cause, the driver's error
            if skipped is not None:  # the active run is running (or being claimed) elsewhere: never overlap it
                return skipped
            if time.monotonic() > deadline:
                log.warning("reconcile_gave_up", workspace_id=str(workspace_id), reason_code="dedupe.overlap")
                return {"decision": "busy", "run_id": None, "reason_code": "dedupe.overlap"}
            await asyncio.sleep(min((retry.defer_score or 50) / 1000, 1.0))
            continue
        if skipped is None and run_id is None and result["reason_code"] == "dedupe.non_canonical":
            skipped, run_id = result, result["dedupe_of"]
            continue
        if skipped is not None and result.get("decision") not in ("completed", "lease_lost"):
            # The run it went on to deliver was not this pass's to run (another pass ended it meanwhile): this pass's
            # own result is its recorded skip, not that run's ("already_completed", another pass's run id).
            return skipped
        return result


async def reconcile_all(
    rt: Runtime, *, workspace_slug: str | None = None, job_id: str | None = None
) -> list[dict[str, Any]]:
    """One pass over every workspace (or one, by slug). Returns one result per workspace."""
    job_id = job_id or f"reconcile:{uuid.uuid4().hex}"
    async with translate_errors():
        rows = await rt.pool.fetch(
            "SELECT id, slug FROM workspaces WHERE $1::text IS NULL OR slug = $1 ORDER BY slug", workspace_slug
        )
    with contextlib.suppress(DbUnavailable):  # housekeeping; each workspace's pass below reports the database away
        await rt.ledger.prune_side_beats()
    results = []
    for ws_id, slug in rows:
        try:
            result = await reconcile_workspace(rt, ws_id, job_id=f"{job_id}:{slug}")
        except DbUnavailable as exc:
            result = _failed(slug, None, exc)
        results.append({"workspace": slug, **result})
    return results


def _failed(workspace: str | None, run_id: int | None, exc: DbUnavailable) -> dict[str, Any]:
    """A workspace's pass that the database's absence stopped: logged, and reported as such."""
    log.error("reconcile_failed", workspace=workspace, reason_code=exc.reason_code, message=exc.message)
    return {"decision": "failed", "run_id": run_id, "reason_code": exc.reason_code}


async def reconcile_cron(
    ctx: dict[str, Any], *, run_id: int | None = None, tenant_id: str | None = None,
    workspace_id: str | None = None, inputs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The arq entry of the type: the cron's pass over every workspace, or, for a job enqueued with a run or a
    workspace (dispatch, reconcile's own re-enqueue), that workspace's pass. One that names a tenant is refused
    (``run_rejected``, ``input.invalid``) and runs nothing, as for any workspace job: it used to be ignored, and a
    delivery naming only a tenant ran the pass over every workspace."""
    rt: Runtime = ctx["opspolish"]
    if rt.stopping:  # started after the worker was told to stop: arq puts the job back, nothing claimed
        await put_back_untouched(ctx)
    job_id = str(ctx.get("job_id") or "cron")
    if run_id is None and workspace_id is None and tenant_id is None:
        return await reconcile_all(rt, job_id=job_id)
    try:
        result = await reconcile_workspace(rt, workspace_id or "", job_id=job_id, run_id=run_id, inputs=inputs,
                                           tenant=tenant_id)
    except DbUnavailable as exc:  # the run stays as it was (queued, or running until its lease is stale) for reconcile
        result = _failed(workspace_id, run_id, exc)
    return [{"workspace_id": workspace_id, **result}]
