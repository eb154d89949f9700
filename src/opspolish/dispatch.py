"""Dispatch: record a queued run (or join the identity's active one) and enqueue its arq job."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.jobs import DeserializationError, Job, SerializationError

from opspolish.errors import InputInvalid, QueueConflict, RedisUnavailable, TenantNotFound
from opspolish.fingerprint import canonical_json, context_and_fingerprint_of
from opspolish.ledger import Dispatched, translate_errors
from opspolish.runtime import Runtime, is_redis_error
from opspolish.sanitize import describe_exception, sanitize_message
from opspolish.tracking import get_job, workspace_uuid

log = structlog.get_logger("opspolish")


@dataclass(frozen=True, slots=True)
class DispatchResult:
    run_id: int
    job_id: str
    created: bool  # False: joined the identity's already active run
    status: str
    workspace_id: uuid.UUID
    tenant_id: uuid.UUID | None

    @property
    def verdict(self) -> str:
        return "queued" if self.created else "joined"


def tenant_ref(tenant: str | uuid.UUID) -> str:
    """A tenant reference as the ledger resolves it: the tenant's id or external_id, both UUID-shaped.

    Anything else (garbage, NUL bytes, text that is not UTF-8) names no tenant: :class:`TenantNotFound`
    before any query, rather than a driver error from the database.
    """
    text = str(tenant).strip()
    try:
        uuid.UUID(text)
    except ValueError:
        raise TenantNotFound(f"tenant: no tenant with id or external_id {text!r}", field="tenant") from None
    return text


async def _check_tenant_workspace(rt: Runtime, tenant: str, workspace_id: str | uuid.UUID) -> None:
    expected = workspace_uuid(workspace_id)
    async with translate_errors():
        actual = await rt.pool.fetchval("SELECT workspace_id FROM opspolish_resolve_tenant($1)", tenant)
    if actual != expected:
        # Named by its slug, as people know it (the error path only pays for the look-up).
        async with translate_errors():
            slug = await rt.pool.fetchval("SELECT slug FROM workspaces WHERE id = $1", expected)
        where = repr(slug) if slug is not None else str(expected)
        raise TenantNotFound(f"tenant: no tenant {tenant!r} in workspace {where}", field="tenant")


async def _held_by_this_run(rt: Runtime, redis: ArqRedis, run_type: str, result: Dispatched,
                            data: dict[str, Any]) -> bool | None:
    """Whether the job queued under the run's job id is this run's own: True, False, or None (it is gone).

    Two dispatches of one identity race: the one that joins the run enqueues its job id too (idempotent, it covers a
    creator that died before enqueueing), and may do so first. That job carries this run's id, type and scope; a job
    left by another database (or by the ledger before a reset) names another tenant, workspace or type.
    """
    try:
        held = await Job(result.job_id, redis, _queue_name=rt.settings.queue_name).info()
    except DeserializationError:  # not a job this code wrote
        return False
    if held is None:
        return None
    tenant_id = str(result.tenant_id) if result.tenant_id else None
    if not (held.function == run_type and held.kwargs.get("run_id") == result.run_id
            and held.kwargs.get("workspace_id") == str(result.workspace_id)
            and held.kwargs.get("tenant_id") == tenant_id):
        return False
    # And the same inputs, secrets aside: after a ledger reset, run ids and a seed's workspaces and tenants come back
    # the same, and a job left queued from before matched on all of the above (its delivery then refused as other
    # inputs than the run's, the new run left queued with no job of its own).
    try:
        return bool(canonical_json(held.kwargs.get("inputs")) == canonical_json(data))
    except Exception:  # inputs this code would not have queued
        return False


#: How long a dispatch whose enqueue met a Redis error looks for its run's job before recording the run failed.
QUEUED_CHECK_S = 1.0


async def _queued_after_all(rt: Runtime, redis: ArqRedis, run_type: str, result: Dispatched,
                            data: dict[str, Any]) -> bool:
    """Whether the run's job is in the queue though this dispatch's enqueue failed: a concurrent dispatch that joined
    the run enqueued it (and was told "joined"), or Redis applied this enqueue and its answer was lost. Recorded
    ``failed`` then, the run was skipped ``dedupe.already_completed`` when its job came, and never ran."""
    try:
        async with asyncio.timeout(QUEUED_CHECK_S):
            return await _held_by_this_run(rt, redis, run_type, result, data) is True
    except Exception as exc:  # Redis still away (or silent): the run is recorded failed
        if not (is_redis_error(exc) or isinstance(exc, TimeoutError)):
            raise
        return False


async def _enqueue(rt: Runtime, redis: ArqRedis, run_type: str, result: Dispatched, data: dict[str, Any]) -> None:
    """Enqueue the run's job. A new run whose job cannot be enqueued is recorded ``failed`` with the reason."""
    for _ in range(3):
        try:
            job = await redis.enqueue_job(
                run_type, run_id=result.run_id, tenant_id=str(result.tenant_id) if result.tenant_id else None,
                workspace_id=str(result.workspace_id), inputs=data, _job_id=result.job_id,
                _queue_name=rt.settings.queue_name,
            )
            # None: the job id is queued already. Joining a run, that is its own job (idempotent). For a run just
            # created it is its own when a concurrent dispatch that joined it enqueued first; otherwise it is
            # another's: run ids start again after a ledger reset (or another database shares the queue), and this
            # run had no job of its own (the other one's delivery is refused as run.not_found).
            if job is not None or not result.created:
                return
            ours = await _held_by_this_run(rt, redis, run_type, result, data)
        except SerializationError as exc:  # arq cannot pickle the inputs (a local class, a lambda, nesting too deep)
            said = describe_exception(exc.__cause__ or exc)
            bad = InputInvalid(f"inputs: cannot be queued ({said})", field="inputs")
            if result.created:  # no row left queued without a job
                await rt.ledger.fail_unstarted(result.run_id, reason_code=bad.reason_code,
                                               reason_message=sanitize_message(bad.message))
            raise bad from exc
        except Exception as exc:
            if not is_redis_error(exc):
                raise
            # What Redis said (a WRONGTYPE reply to a key the queue's name collides with, a refusal...), not only the
            # exception's type: "ResponseError" alone sent the operator looking for a server that was up.
            said = sanitize_message(describe_exception(exc), extra_secrets=rt.secrets)
            err = RedisUnavailable(f"could not enqueue run {result.run_id} to Redis: {said}")
            if result.created:
                if await _queued_after_all(rt, redis, run_type, result, data):
                    return
                await rt.ledger.fail_unstarted(result.run_id, reason_code=err.reason_code, reason_message=err.message)
            raise err from exc
        if ours:
            return
        if ours is False:
            break
        # None: the job holding the id finished between the two reads; enqueue again.
    conflict = QueueConflict(
        f"queue: job id {result.job_id!r} is already taken in Redis by another job (a database sharing the queue "
        f"{rt.settings.queue_name!r}, or a ledger reset while its jobs stayed queued); run {result.run_id} "
        "recorded failed, the other job left alone")
    await rt.ledger.fail_unstarted(result.run_id, reason_code=conflict.reason_code, reason_message=conflict.message)
    raise conflict


async def dispatch(
    rt: Runtime, run_type: str, *, tenant: str | uuid.UUID | None = None,
    workspace_id: str | uuid.UUID | None = None, inputs: Mapping[str, Any] | None = None,
) -> DispatchResult:
    """Create a queued run of ``run_type`` for a tenant (id or external_id), or join the active one.

    A ``workspace_id`` given with a tenant job scopes the tenant look-up: a tenant of another workspace
    is :class:`TenantNotFound`, never a run in the other workspace.

    Raises :class:`InputInvalid` (unknown type, bad inputs), :class:`TenantNotFound`,
    :class:`DbUnavailable`, :class:`RedisUnavailable` or :class:`QueueConflict` (the new run's job id is taken in
    Redis by another job). A run whose job cannot be enqueued is recorded ``failed`` with that reason: no ledger row
    is left without a job or a reason.
    """
    job = get_job(run_type, rt.settings.job_modules)
    data, text = job.canonical(inputs)
    if job.scope == "tenant":
        if tenant is None or not str(tenant).strip():
            raise InputInvalid("tenant: required for this job type", field="tenant")
        ref = tenant_ref(tenant)
        if workspace_id is not None:  # the caller's workspace: the tenant must belong to it
            await _check_tenant_workspace(rt, ref, workspace_id)
        tenant_text: str | None = ref
        ws = None
    else:
        if tenant is not None:  # dropped, it made a workspace run of what the caller meant for one tenant
            raise InputInvalid(f"tenant: {run_type!r} is a workspace job (scope='workspace'): it takes workspace_id, "
                               "not a tenant", field="tenant")
        if workspace_id is None:
            raise InputInvalid("workspace_id: required for this job type", field="workspace_id")
        ws = workspace_uuid(workspace_id)
        tenant_text = None
    redis = rt.require_redis()
    context, fp = context_and_fingerprint_of(text)
    result = await rt.ledger.dispatch(
        tenant=tenant_text, workspace_id=ws, run_type=run_type, fingerprint=fp, context=context,
        queue_name=rt.settings.queue_name,
    )
    if result is None:
        raise TenantNotFound(f"tenant: no tenant with id or external_id {tenant_text!r}", field="tenant")
    await _enqueue(rt, redis, run_type, result, data)
    log.info("run_dispatched", run_id=result.run_id, type=run_type,
             tenant_id=str(result.tenant_id) if result.tenant_id else None,
             verdict="queued" if result.created else "joined")
    return DispatchResult(result.run_id, result.job_id, result.created, result.status, result.workspace_id,
                          result.tenant_id)
