"""Tracked jobs: any arq coroutine gets the execution gate, a lease, summary counts and an outcome.

A new job type is one decorated function::

    @tracked_job("reports.build", inputs=ReportInputs)
    async def build_report(run: RunContext) -> None:
        run.counts.add_total(len(items))
        ...
        run.counts.item_succeeded()
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
import math
import random
import socket
import time
import types
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal, NoReturn

import asyncpg
import structlog
from arq import Retry
from arq.constants import job_key_prefix, retry_key_prefix
from arq.worker import Function, func
from pydantic import AliasChoices, AliasPath, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from opspolish.counts import Counts as Counts  # re-exported: it lived here before counts.py
from opspolish.db import session_lost
from opspolish.errors import (
    DbUnavailable,
    InputInvalid,
    InputTooLarge,
    JobRetry,
    JobTimeout,
    LeaseLost,
    OpsPolishError,
    TenantNotFound,
)
from opspolish.fingerprint import (
    canonical_json,
    context_and_fingerprint_of,
    fingerprint_of,
    key_segment,
    secret_values,
)
from opspolish.ledger import HOLDS_LEASE, Claim, translate_errors
from opspolish.runtime import Lease, Runtime, is_redis_error
from opspolish.sanitize import describe_exception, sanitize_message
from opspolish.settings import MAX_SECONDS

log = structlog.get_logger("opspolish")

#: arq counts every deferral as a try; the gate defers on busy locks and live leases, so arq's own limit
#: must never be what ends a run. Body retries are bounded by ``max_attempts`` on the ledger instead.
ARQ_MAX_TRIES = 1_000_000
#: arq's timeout exceeds ours by this margin, so our timeout fires first and is recorded as job.timeout.
TIMEOUT_MARGIN_S = 30.0
BUSY_RETRY_S = 0.05
#: In-process re-asks of a busy identity lock before the delivery is deferred through arq.
BUSY_SPINS = 3



@dataclass
class RunContext:
    """What a job body receives."""

    run_id: int
    type: str
    workspace_id: uuid.UUID
    tenant_id: uuid.UUID | None
    attempt: int
    inputs: dict[str, Any]
    counts: Counts
    runtime: Runtime
    job_id: str
    log: Any
    #: The delivery's lease: every ledger write of this delivery is fenced on it.
    lease_owner: uuid.UUID

    async def fenced(self, query: str, *args: Any) -> str:
        """Run a write on the ledger's database only while this delivery holds the run's lease.

        One transaction: the run's row is share-locked with the lease checked, then ``query`` runs, so a takeover
        either commits first (and this raises :class:`LeaseLost`, writing nothing) or waits until this write is
        committed. Use it for a body's own tables (snapshots, results) so that a delivery that lost its run (a
        paused worker that wakes up) cannot overwrite what the delivery that took it over wrote."""
        async with translate_errors(), self.runtime.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(HOLDS_LEASE, self.run_id, self.lease_owner):
                raise LeaseLost()
            status: str = await conn.execute(query, *args)
            return status


Body = Callable[[RunContext], Awaitable[None]]


@dataclass
class TrackedJob:
    """A registered job type: its body and its dedupe, retry and timeout policy."""

    type: str
    body: Body
    inputs_model: builtins.type[BaseModel] | None = None
    scope: Literal["tenant", "workspace"] = "tenant"
    cooldown_s: float | None = None  # None: the settings' OPSPOLISH_DEDUPE_COOLDOWN_S
    timeout_s: float | None = None  # None: the settings' OPSPOLISH_JOB_TIMEOUT_S
    max_attempts: int | None = None  # None: the settings' OPSPOLISH_MAX_ATTEMPTS

    def validate_inputs(self, inputs: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check inputs against the job's model; InputInvalid names the first bad field."""
        return self.canonical(inputs)[0]

    def canonical(self, inputs: Mapping[str, Any] | None, *, validate: bool = True) -> tuple[dict[str, Any], str]:
        """The validated inputs and their canonical JSON text (what the fingerprint and ``context`` come from).

        The model's output is what a run records and its body receives: under the fields' aliases (a model reads
        back what it wrote) and without the fields left at their defaults (inputs given with or without a default
        value are one identity). ``validate=False`` takes inputs that already are such an output as they are (a
        dispatched run's payload, which the gate holds to the run's fingerprint)."""
        if inputs is not None and not isinstance(inputs, Mapping):
            raise InputInvalid(f"inputs: must be a mapping, got {type(inputs).__name__}", field="inputs")
        data = dict(inputs or {})
        try:
            text = canonical_json(data)  # refuses NaN, naive datetimes, bytes, huge payloads... with the path
        except InputTooLarge:
            too_long = self._too_long(data)
            if too_long is not None:
                raise too_long from None
            raise
        if self.inputs_model is None or not validate:
            return data, text
        try:
            model = self.inputs_model.model_validate(data)
        except ValidationError as exc:
            raise _field_error(exc.errors()[0]) from None
        # Computed fields are outputs, not inputs: a model that forbids extras refused its own record back.
        valid = model.model_dump(mode="python", by_alias=True, exclude_defaults=True, exclude_computed_fields=True)
        return valid, canonical_json(valid)

    def _too_long(self, data: dict[str, Any]) -> InputInvalid | None:
        """Inputs too large as a whole: the model's own error for a field longer than it allows (a list's
        ``max_length``), which names the field that makes them so where "inputs: larger than ..." names none."""
        if self.inputs_model is None:
            return None
        try:
            self.inputs_model.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                if err["type"] in ("too_long", "string_too_long"):
                    return _field_error(err)
        return None

    def cooldown(self, rt: Runtime) -> float:
        return rt.settings.dedupe_cooldown_s if self.cooldown_s is None else self.cooldown_s

    def timeout(self, rt: Runtime) -> float:
        return rt.settings.job_timeout_s if self.timeout_s is None else self.timeout_s

    def attempts_allowed(self, rt: Runtime) -> int:
        return rt.settings.max_attempts if self.max_attempts is None else self.max_attempts

    def arq_function(self, timeout_s: float) -> Function:
        """The arq function for a worker: its name is the run type."""
        job = self

        async def entry(ctx: dict[str, Any], *, run_id: int | None = None, tenant_id: str | None = None,
                        workspace_id: str | None = None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
            rt: Runtime = ctx["opspolish"]
            if rt.stopping:  # started after the worker was told to stop: arq puts the job back, nothing claimed
                await put_back_untouched(ctx)
            return await execute(rt, job, run_id=run_id, tenant=tenant_id, workspace_id=workspace_id,
                                 inputs=inputs, job_id=ctx["job_id"], job_try=ctx.get("job_try", 1),
                                 enqueued_at=ctx.get("enqueue_time"))

        entry.__qualname__ = entry.__name__ = self.type
        return func(entry, name=self.type, max_tries=ARQ_MAX_TRIES, timeout=timeout_s + TIMEOUT_MARGIN_S)


async def put_back_untouched(ctx: dict[str, Any]) -> NoReturn:
    """A delivery that starts after its worker was told to stop (``Runtime.stopping``) claims nothing: the try arq
    counted for it is given back, then its CancelledError has arq put the job back in its queue. Counted, the try
    dropped a job with one try (the reconcile cron: "max retries 1 exceeded") and brought the others nearer theirs."""
    redis, job_id = ctx.get("redis"), ctx.get("job_id")
    if redis is not None and job_id:
        try:
            await redis.decr(retry_key_prefix + str(job_id))
        except Exception as exc:  # Redis away: the try stays counted, as it was
            if not is_redis_error(exc):
                raise
    raise asyncio.CancelledError()


def _field_error(err: Any) -> InputInvalid:
    """A pydantic error (one of ``ValidationError.errors()``) as InputInvalid naming its field."""
    path = "inputs" + "".join(f".{p}" if isinstance(p, int) else key_segment(str(p)) for p in err["loc"])
    return InputInvalid(f"{path}: {err['msg']}", field=path)


REGISTRY: dict[str, TrackedJob] = {}


def _check_seconds(where: str, name: str, value: float | None, *, zero_ok: bool) -> None:
    if value is None:
        return
    low = "0" if zero_ok else "more than 0"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{where}: {name}: must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok) or value > MAX_SECONDS:
        raise ValueError(f"{where}: {name}: must be a finite number of seconds from {low} to {MAX_SECONDS} "
                         f"(ten years), got {value!r}")


def _names_read(model: builtins.type[BaseModel], name: str, field: FieldInfo) -> set[str]:
    """The top-level keys under which ``model`` reads field ``name`` (an AliasPath deeper than one key reads none)."""
    config = model.model_config
    names = {name} if config.get("populate_by_name") or config.get("validate_by_name") else set()
    if config.get("validate_by_alias") is False:
        return names
    alias = field.validation_alias if field.validation_alias is not None else field.alias or name
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    for choice in choices:
        if isinstance(choice, AliasPath):
            if len(choice.path) == 1 and isinstance(choice.path[0], str):
                names.add(choice.path[0])
        elif isinstance(choice, str):
            names.add(choice)
    return names


def _check_reads_back(where: str, model: builtins.type[BaseModel], path: str = "inputs",
                      seen: set[builtins.type[BaseModel]] | None = None) -> None:
    """The run records the model's output under its fields' aliases, and the body and every redelivery read it back
    with the model: a field the model writes under a name it does not read (a ``serialization_alias`` of its own, a
    ``validation_alias``, ``AliasChoices`` or ``AliasPath`` without the name it writes, ``validate_by_alias=False``), or
    does not write at all (``Field(exclude=True)``), failed every run of the type, or ran it without the value, and on
    the worker's side only. Models nested in a field's type are held to the same."""
    seen = seen if seen is not None else set()
    if model in seen:
        return
    seen.add(model)
    for name, field in model.model_fields.items():
        if field.exclude is True:
            raise ValueError(f"{where}: {path}: field {name!r} is excluded from the model's output "
                             "(Field(exclude=True)): its runs would record, and their body receive, the inputs "
                             "without it (for a secret, use SecretStr: it travels with the job, never recorded)")
        written = field.serialization_alias or field.alias or name
        read = _names_read(model, name, field)
        if written not in read:
            said = " or ".join(repr(n) for n in sorted(read)) or "no top-level name"
            raise ValueError(f"{where}: {path}: field {name!r} is written as {written!r} but read as {said}: "
                             "the run's inputs could not be read back (give it one alias, or none)")
        for nested, in_union in _models_in(field.annotation):
            if in_union:
                _check_union_member(where, nested, f"{path}.{name}")
            _check_reads_back(where, nested, f"{path}.{name}", seen)


def _check_union_member(where: str, model: builtins.type[BaseModel], path: str) -> None:
    """A model among others in a union is told apart by its tag (``kind: Literal["dog"]``): a tag with a default is
    left out of the recorded output like any default, and the run's inputs then read back as another member (a dog as
    a cat) or as none (a discriminated union's ``union_tag_not_found``): every run of the type failed, or ran on
    another value than dispatched."""
    for name, field in model.model_fields.items():
        if typing.get_origin(field.annotation) is Literal and not field.is_required():
            raise ValueError(f"{where}: {path}: field {name!r} of {model.__name__}, one of a union's members, has a "
                             "default, which is not recorded: the union could not tell its members apart when the "
                             "run's inputs are read back (make the tag required)")


def _models_in(annotation: Any, in_union: bool = False) -> list[tuple[builtins.type[BaseModel], bool]]:
    """The pydantic models a field's type holds (``Inner``, ``list[Inner]``, ``Inner | None``, ``dict[str, Inner]``),
    each with whether it is one of several models of a union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, in_union)]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        in_union = sum(isinstance(a, type) and issubclass(a, BaseModel) for a in args) > 1
    return [m for arg in args for m in _models_in(arg, in_union)]


def _check_policy(run_type: str, inputs: object, scope: object, cooldown_s: float | None, timeout_s: float | None,
                  max_attempts: int | None) -> None:
    """Refuse, when the job type is declared, what would otherwise fail (or misbehave) at dispatch or in the worker:
    a NaN cooldown fails every claim, a negative timeout times out at once, a non-model ``inputs`` fails dispatch."""
    if callable(run_type) or not isinstance(run_type, str):
        raise TypeError("tracked_job: run_type: must be the job type's name, a string: "
                        "@tracked_job(\"reports.build\"), not a bare @tracked_job")
    if not run_type.strip() or run_type != run_type.strip() or not _sql_text(run_type):
        raise ValueError(f"tracked_job: run_type: must be a non-empty name without surrounding spaces, got "
                         f"{run_type!r}")
    where = f"tracked_job({run_type!r})"
    if inputs is not None and not (isinstance(inputs, type) and issubclass(inputs, BaseModel)):
        raise TypeError(f"{where}: inputs: must be a pydantic BaseModel subclass (or None), got {inputs!r}")
    if inputs is not None:
        _check_reads_back(where, inputs)
    if scope not in ("tenant", "workspace"):
        raise ValueError(f"{where}: scope: must be 'tenant' or 'workspace', got {scope!r}")
    _check_seconds(where, "cooldown_s", cooldown_s, zero_ok=True)
    _check_seconds(where, "timeout_s", timeout_s, zero_ok=False)
    if max_attempts is not None and (isinstance(max_attempts, bool) or not isinstance(max_attempts, int)):
        raise TypeError(f"{where}: max_attempts: must be an integer, got {type(max_attempts).__name__}")
    if max_attempts is not None and not 1 <= max_attempts <= 1_000:
        raise ValueError(f"{where}: max_attempts: must be from 1 to 1000 (executions of one run), got {max_attempts}")


def _check_body(run_type: str, body: object) -> None:
    where = f"tracked_job({run_type!r})"
    call = getattr(body, "__call__", None)  # noqa: B004 - an instance with an async __call__ is a body too
    if not (inspect.iscoroutinefunction(body) or inspect.iscoroutinefunction(call)):
        raise TypeError(f"{where}: the job body must be an async function (async def), got {body!r}")
    try:
        inspect.signature(body).bind(None)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{where}: the job body must take one argument, the RunContext: async def "
                        f"{getattr(body, '__name__', 'body')}(run: RunContext) -> None") from None
    except ValueError:  # no signature to read (a builtin): nothing to check
        pass


def tracked_job(
    run_type: str, *, inputs: type[BaseModel] | None = None, scope: Literal["tenant", "workspace"] = "tenant",
    cooldown_s: float | None = None, timeout_s: float | None = None, max_attempts: int | None = None,
) -> Callable[[Body], TrackedJob]:
    """Register ``body`` as the tracked job ``run_type`` (also its arq function name).

    Bad arguments raise here, when the job type is declared (``TypeError`` / ``ValueError`` naming the argument):
    ``inputs`` a pydantic model class, ``scope`` ``"tenant"`` or ``"workspace"``, ``cooldown_s`` from 0 and
    ``timeout_s`` above 0 (finite, at most ten years), ``max_attempts`` from 1 to 1000, and the body an
    ``async def`` taking the :class:`RunContext`."""
    _check_policy(run_type, inputs, scope, cooldown_s, timeout_s, max_attempts)

    def register(body: Body) -> TrackedJob:
        _check_body(run_type, body)
        existing = REGISTRY.get(run_type)
        job = TrackedJob(run_type, body, inputs, scope, cooldown_s, timeout_s, max_attempts)
        if existing is not None and existing.body is not body:
            raise ValueError(f"job type {run_type!r} is already registered")
        if existing is not None and existing != job:
            # The same body declared again (a module imported twice) is fine; with another policy it silently
            # replaced the first one's, while the object the first declaration returned still carried it.
            differ = [f.name for f in fields(job) if getattr(job, f.name) != getattr(existing, f.name)]
            raise ValueError(f"job type {run_type!r} is already registered with other settings "
                             f"({', '.join(differ)})")
        REGISTRY[run_type] = job
        return job

    return register


def load_jobs(module_names: str = "") -> dict[str, TrackedJob]:
    """Import the built-in jobs and the comma-separated ``module_names`` (OPSPOLISH_JOB_MODULES)."""
    import importlib

    for name in ["opspolish.jobs", *(m.strip() for m in module_names.split(",") if m.strip())]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise InputInvalid(f"OPSPOLISH_JOB_MODULES: cannot import {name!r}: {exc}",
                               field="OPSPOLISH_JOB_MODULES") from exc
        except Exception as exc:  # the module raised as it ran (a declaration refused, a bug at its top level)
            raise InputInvalid(f"OPSPOLISH_JOB_MODULES: cannot import {name!r} ({describe_exception(exc)})",
                               field="OPSPOLISH_JOB_MODULES") from exc
    return REGISTRY


def get_job(run_type: str, job_modules: str = "") -> TrackedJob:
    """The registered job type ``run_type``. A type not registered yet is looked for in the built-in jobs and in
    ``job_modules`` (OPSPOLISH_JOB_MODULES) first: a caller that imported only ``opspolish`` finds them too."""
    job = REGISTRY.get(run_type)
    if job is None:
        load_jobs(job_modules)  # imported here, not at import time: opspolish.jobs imports this module
        job = REGISTRY.get(run_type)
    if job is None:
        known = ", ".join(sorted(REGISTRY)) or "none"
        raise InputInvalid(f"type: unknown job type {run_type!r} (known: {known})", field="type")
    return job


def _sql_text(text: str) -> bool:
    """Whether PostgreSQL can take ``text`` as a parameter at all (valid UTF-8, no NUL)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _backoff_s(attempt: int) -> float:
    return min(2.0 ** attempt, 60.0) * random.uniform(0.5, 1.0)


def _retry_delay_s(error: OpsPolishError, attempt: int) -> float:
    """The error's ``retry_after_s`` when it is a usable delay (0 included: retry at once), else the backoff. A NaN
    or infinite one reached arq as is and the retry was never delivered: the run stayed queued."""
    after = getattr(error, "retry_after_s", None)
    if isinstance(after, int | float) and not isinstance(after, bool) and 0 <= after <= MAX_SECONDS:
        return float(after)
    return _backoff_s(attempt)


#: The gate's refusals: deliveries that name no run or tenant of their scope, or other inputs than their run's. They
#: leave no ledger row, so they are logged as ``run_rejected`` warnings (counted ``rejected:<code>``), like deliveries
#: refused before the gate, not as skips.
GATE_REFUSALS = {
    "tenant_not_found": "tenant_id: no such tenant in the delivery's scope",
    "run_not_found": "run_id: no such run in the delivery's scope",
    "inputs_mismatch": "inputs: not the inputs this run was dispatched with",
    "workspace_not_found": "workspace_id: no such workspace",
}


def _delivery_fields(run_id: Any, tenant: Any, inputs: Any) -> str | None:
    """A raw delivery's argument types, checked: a list, a number or a string where the gate takes another type was
    a driver error (DataError) or a TypeError out of the job, a traceback instead of a visible refusal. Returns the
    tenant reference as text (a UUID object is one)."""
    if run_id is not None and (isinstance(run_id, bool) or not isinstance(run_id, int) or not 0 < run_id < 2**63):
        raise InputInvalid("run_id: not a run id (a positive 64-bit integer)", field="run_id")
    if inputs is not None and not isinstance(inputs, Mapping):
        raise InputInvalid(f"inputs: must be a mapping, got {type(inputs).__name__}", field="inputs")
    if tenant is None or isinstance(tenant, str):
        return tenant
    if isinstance(tenant, uuid.UUID):
        return str(tenant)
    raise TenantNotFound(f"tenant_id: not a tenant id or external_id (got {type(tenant).__name__})",
                         field="tenant_id")


def workspace_uuid(workspace_id: object) -> uuid.UUID:
    """A workspace id (a UUID or its text), or ``input.invalid`` naming the field: uuid's own words ("badly formed
    hexadecimal UUID string") named none."""
    try:
        return uuid.UUID(str(workspace_id))
    except ValueError:
        raise InputInvalid("workspace_id: not a UUID", field="workspace_id") from None


def _checked_delivery(
    job: TrackedJob, run_id: Any, tenant: Any, workspace_id: Any, inputs: Any,
) -> tuple[str | None, dict[str, Any], str | None, dict[str, Any] | None, uuid.UUID | None]:
    """What the gate is asked with: the tenant reference, the inputs (canonical where given), their fingerprint and
    context, and the workspace. Raises InputInvalid / TenantNotFound / ValueError for a delivery to refuse."""
    tenant = _delivery_fields(run_id, tenant, inputs)
    data: dict[str, Any] = dict(inputs or {})
    fp: str | None = None
    context: dict[str, Any] | None = None
    _check_scope(job, tenant, workspace_id)
    if run_id is None:
        data, text = job.canonical(inputs)
        context, fp = context_and_fingerprint_of(text)
    elif inputs is not None:  # the gate holds them to the run's: a run runs the inputs it was dispatched with
        # Not validated again: dispatch validated them, and a payload whose fingerprint is the run's is that output.
        # (Validating the model's output again is not always a no-op: an alias, a computed or excluded field.)
        data, text = job.canonical(inputs, validate=False)
        fp = fingerprint_of(text)
    if tenant is not None and not _sql_text(tenant):  # a driver error otherwise, and no visible skip
        raise TenantNotFound("tenant_id: not a tenant id or external_id", field="tenant_id")
    return tenant, data, fp, context, workspace_uuid(workspace_id) if workspace_id else None


def _rejected(rt: Runtime, logger: Any, run_id: int | None, code: str, message: str,
              decision: str = "rejected") -> dict[str, Any]:
    """A delivery refused before the gate or by it: one ``run_rejected`` warning, a ``rejected:<code>`` count."""
    rt.metrics[f"rejected:{code}"] += 1
    logger.warning("run_rejected", reason_code=code, decision=decision,
                   message=sanitize_message(message, extra_secrets=rt.secrets))
    return _skip_result(decision, run_id, code, None)


def _refused(rt: Runtime, where: dict[str, Any], run_id: Any, exc: Exception) -> dict[str, Any]:
    """A delivery refused before the gate, for ``exc``."""
    code = exc.reason_code if isinstance(exc, OpsPolishError) else "input.invalid"
    return _rejected(rt, log.bind(**where, run_id=run_id), run_id if isinstance(run_id, int) else None, code,
                     str(exc))


def _skip_result(decision: str, run_id: int | None, reason_code: str | None, dedupe_of: int | None) -> dict[str, Any]:
    return {"decision": decision, "run_id": run_id, "reason_code": reason_code, "dedupe_of": dedupe_of}


async def _ask_gate(
    rt: Runtime, job: TrackedJob, *, run_id: int | None, tenant: str | None, workspace_id: uuid.UUID | None,
    fingerprint: str | None, context: dict[str, Any] | None, job_id: str, owner: uuid.UUID,
    enqueued_at: datetime | None,
) -> Claim:
    """The gate's decision. A busy identity lock is held for one short transaction, so it is asked again
    in a few ms here before the delivery is deferred through arq (what a duplicate storm would otherwise do)."""
    for spin in range(BUSY_SPINS + 1):
        claim = await rt.gate.claim(
            run_id=run_id, tenant=tenant, workspace_id=workspace_id, run_type=job.type, fingerprint=fingerprint,
            context=context, job_id=job_id, queue_name=rt.settings.queue_name, lease_owner=owner,
            cooldown_s=job.cooldown(rt), lease_ttl_s=rt.settings.lease_ttl_s, enqueued_at=enqueued_at,
        )
        if claim.decision != "busy" or spin == BUSY_SPINS:
            break
        await asyncio.sleep(random.uniform(0.002, 0.006) * (spin + 1))
    return claim


def _check_scope(job: TrackedJob, tenant: str | None, workspace_id: str | uuid.UUID | None) -> None:
    """Every delivery names its scope, a run id's too: the gate finds the run within that scope only, so a delivery
    that names none cannot reach a run of any tenant (dispatch and reconcile always name it)."""
    if job.scope == "tenant" and not tenant:
        raise InputInvalid("tenant_id: required for a tenant job", field="tenant_id")
    if job.scope == "workspace" and not workspace_id:
        raise InputInvalid("workspace_id: required for a workspace job", field="workspace_id")
    if job.scope == "workspace" and tenant:  # dropped, it would run for the whole workspace (dispatch refuses it)
        raise InputInvalid("tenant_id: a workspace job (scope='workspace') takes workspace_id, not a tenant",
                           field="tenant_id")


async def execute(
    rt: Runtime, job: TrackedJob, *, run_id: int | None, tenant: str | None, workspace_id: str | uuid.UUID | None,
    inputs: Mapping[str, Any] | None, job_id: str, job_try: int = 1, enqueued_at: datetime | None = None,
) -> dict[str, Any]:
    """Run one delivery of a tracked job through the gate. Returns a small summary for arq's result.

    ``enqueued_at`` (arq's ``enqueue_time``) tells a raw job enqueued again under a job id already used (after that
    job ended) from a redelivery of that job: the first is a new request of its identity, the second is not."""
    where = {"type": job.type, "job_id": job_id, "job_try": job_try, "tenant_id": tenant}
    try:
        tenant, data, fp, context, ws = _checked_delivery(job, run_id, tenant, workspace_id, inputs)
    except (InputInvalid, TenantNotFound, ValueError) as exc:
        return _refused(rt, where, run_id, exc)

    owner = uuid.uuid4()
    try:
        claim = await _ask_gate(rt, job, run_id=run_id, tenant=tenant if job.scope == "tenant" else None,
                                workspace_id=ws, fingerprint=fp, context=context, job_id=job_id, owner=owner,
                                enqueued_at=enqueued_at if run_id is None else None)
    except DbUnavailable as exc:
        undone = await _undo_unanswered_claim(rt, run_id, job_id, owner, exc)
        log.warning("gate_unavailable", **where, run_id=run_id, reason_code=exc.reason_code, message=exc.message,
                    claim_undone=undone)
        raise Retry(defer=_backoff_s(min(job_try, 5))) from exc

    if claim.tenant_id is not None:  # the tenant's id, as the ledger holds it (the delivery may name its external_id)
        where["tenant_id"] = str(claim.tenant_id)
    bound = log.bind(**where, run_id=claim.run_id)
    decision = claim.decision
    if decision == "busy":
        rt.metrics["deferred:busy"] += 1
        defer = BUSY_RETRY_S * random.uniform(1.0, 4.0)
        bound.debug("run_deferred", decision="busy", defer_s=round(defer, 3))  # a storm's many: debug only
        raise Retry(defer=defer)
    if decision == "overlap":
        rt.metrics["deferred:dedupe.overlap"] += 1
        bound.info("run_deferred", reason_code="dedupe.overlap", defer_s=round(claim.wait_s, 3))
        raise Retry(defer=claim.wait_s + random.uniform(0.05, 0.25))
    if decision in GATE_REFUSALS:  # no run of this scope to skip: refused like a malformed delivery, visibly
        return _rejected(rt, bound, claim.run_id, claim.reason_code or "input.invalid", GATE_REFUSALS[decision],
                         decision)
    if decision not in ("claimed", "taken_over"):
        rt.metrics[f"skipped:{claim.reason_code}"] += 1
        bound.info("run_skipped", reason_code=claim.reason_code, dedupe_of=claim.dedupe_of, decision=decision)
        return _skip_result(decision, claim.run_id, claim.reason_code, claim.dedupe_of)

    assert claim.run_id is not None and claim.workspace_id is not None
    if decision == "taken_over" and claim.attempts > job.attempts_allowed(rt):
        return await _give_up(rt, job, claim.run_id, owner, bound)
    if run_id is not None and inputs is None:  # a re-enqueue without a payload: the run's non-secret inputs
        try:
            data = await rt.ledger.context_of(claim.run_id)
        except DbUnavailable as exc:
            # Claimed but not held by the lease keeper yet: leaving now would strand the run as running until
            # reconcile called it orphaned, its work never done. Hand it back and come again; if the database is
            # still away, its lease goes stale and the redelivery takes it over.
            with contextlib.suppress(DbUnavailable):
                await rt.ledger.release(claim.run_id, owner, reason_code=exc.reason_code,
                                        reason_message="its inputs could not be read; handed back for redelivery")
            bound.warning("gate_unavailable", reason_code=exc.reason_code, message=exc.message)
            raise Retry(defer=_backoff_s(min(job_try, 5))) from exc
    bound.debug("run_claimed", attempt=claim.attempts, decision=decision)
    rt.metrics[decision] += 1
    lease = rt.leases.hold(claim.run_id, owner, bound)
    try:
        return await _run_body(rt, job, claim.run_id, claim.attempts, claim.workspace_id, claim.tenant_id,
                               data, job_id, lease, bound)
    finally:
        rt.leases.drop(lease)


#: Pauses between the tries to undo a claim whose answer was lost, and the time they may take in all (a try may wait
#: for a new connection: in a network partition, each delivery held its worker slot for its connect timeouts).
UNDO_CLAIM_PAUSES_S = (0.1, 0.4, 1.0)
UNDO_CLAIM_BUDGET_S = 3.0
#: Errors that say the claim never reached the server: nothing to undo.
_NEVER_SENT = (ConnectionRefusedError, socket.gaierror, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
               asyncpg.InvalidCatalogNameError, asyncpg.InvalidAuthorizationSpecificationError)


async def _undo_unanswered_claim(rt: Runtime, run_id: int | None, job_id: str, owner: uuid.UUID,
                                 error: DbUnavailable) -> bool | None:
    """A claim that met the database going away may have committed, its answer lost with the connection: the run then
    sat ``running`` under a lease nobody held, the retry waited out the lease's TTL to take it over, and that counted
    a second attempt for a body that never ran (with ``max_attempts=1``, ``run.orphaned``, never run at all). Undone
    here, tried again for up to :data:`UNDO_CLAIM_BUDGET_S`. True: one was undone; False: none had committed (or the
    claim never reached the server); None: the database is still away (then the takeover after the TTL stands)."""
    if isinstance(error.__cause__, _NEVER_SENT):
        return False
    try:
        async with asyncio.timeout(UNDO_CLAIM_BUDGET_S):
            for pause in (0.0, *UNDO_CLAIM_PAUSES_S):
                await asyncio.sleep(pause)
                try:
                    return await rt.ledger.undo_claim(run_id, job_id, owner)
                except DbUnavailable:
                    continue
    except TimeoutError:
        pass
    return None


async def _give_up(rt: Runtime, job: TrackedJob, run_id: int, owner: uuid.UUID, bound: Any) -> dict[str, Any]:
    """A run taken over from a worker that stopped mid-body (killed, out of memory, its process crashed) on its last
    allowed attempt ends failed / run.orphaned, not run again: max_attempts bounded only the errors a body raised, and
    a body that took its process down took down every worker its redelivery reached, for ever."""
    allowed = job.attempts_allowed(rt)
    message = (f"its last allowed attempt (max_attempts {allowed}) never ended: its worker stopped mid-run, or "
               "could not record the outcome; not run again")
    try:
        ended = await rt.ledger.give_up(run_id, owner, message=message)
    except DbUnavailable as exc:  # still ours, stale again soon: the next delivery decides anew
        bound.warning("gate_unavailable", reason_code=exc.reason_code, message=exc.message)
        raise Retry(defer=rt.settings.lease_ttl_s) from exc
    if not ended:
        bound.warning("run_abandoned", reason_code="dedupe.overlap", message="lease lost before giving up")
        return _skip_result("lease_lost", run_id, "dedupe.overlap", None)
    rt.metrics["completed:failed"] += 1
    bound.info("run_completed", outcome="failed", reason_code="run.orphaned", counts=None, attempt=allowed,
               duration_s=0.0, message=message)
    return {"decision": "completed", "run_id": run_id, "outcome": "failed", "reason_code": "run.orphaned"}


async def _body_error(rt: Runtime, job: TrackedJob, run: RunContext, secrets: tuple[str, ...]) -> OpsPolishError | None:
    """Run the body under the type's timeout: None, or the error it ends with. A cancellation of the delivery itself
    (worker shutdown, arq's timeout) propagates, whatever the body turned it into."""
    deadline = asyncio.timeout(job.timeout(rt))
    try:
        async with deadline:
            await job.body(run)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        # Raised inside the body (it awaited something cancelled): the body's error. Handed back as a shutdown, it
        # came straight back, again and again, past max_attempts.
        return OpsPolishError(sanitize_message(f"{describe_exception(exc)} raised inside the job body",
                                               extra_secrets=secrets))
    except BaseException as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # The delivery is being cancelled and the body turned the cancellation into an error of its own (a client
            # library wrapping it, "request interrupted"): recorded as the body's error, a worker's shutdown failed
            # the run for good instead of handing it back.
            raise asyncio.CancelledError() from exc
        if deadline.expired():  # likewise our deadline's cancellation, whatever the body made of it
            return JobTimeout(f"the job exceeded its {job.timeout(rt):g} s timeout")
        return _error_of_body(exc, secrets)
    if deadline.expired():  # the body caught the cancellation its deadline sent, and returned: still too late
        return JobTimeout(f"the job exceeded its {job.timeout(rt):g} s timeout")
    return None


def _error_of_body(exc: BaseException, secrets: tuple[str, ...]) -> OpsPolishError:
    """What the run records for an exception its body raised (not a cancellation, not our deadline)."""
    if isinstance(exc, OpsPolishError):
        return _readable(exc, secrets)
    if isinstance(exc, Retry):
        # arq's way for a job to ask for a retry: a transient error of the run (released to queued, attempts counted,
        # retried after its defer). Caught as any other exception, it ended the run failed / internal.unexpected.
        defer_ms = exc.defer_score
        return JobRetry(sanitize_message(f"the job body asked for a retry ({describe_exception(exc)})",
                                         extra_secrets=secrets),
                        retry_after_s=None if defer_ms is None else defer_ms / 1000)
    if session_lost(exc):
        # The body's own query on the runtime's pool met PostgreSQL going away (a backend terminated, a restart):
        # transient, as the same error is in the library's own statements. It ended the run failed for good.
        return DbUnavailable(sanitize_message(f"PostgreSQL unavailable: {describe_exception(exc)}",
                                              extra_secrets=secrets))
    # Any other exception, a TimeoutError of the body's own (an HTTP client's) included, and any BaseException: a
    # SystemExit (sys.exit() in a body, or in a library it calls), a KeyboardInterrupt or a BaseException subclass of
    # a library's own stopped the whole worker with its other jobs, and the run, left running, took down each worker
    # its redelivery reached.
    return OpsPolishError(sanitize_message(describe_exception(exc), extra_secrets=secrets))


def _readable(error: OpsPolishError, secrets: tuple[str, ...]) -> OpsPolishError:
    """The body's own error, with a ``message`` to record: a subclass whose ``__init__`` skipped OpsPolishError's
    has none (reading it raised AttributeError, and the run stayed running until reconcile called it orphaned)."""
    message = getattr(error, "message", None)
    if isinstance(message, str) and message.strip():
        return error
    described = sanitize_message(describe_exception(error), extra_secrets=secrets)
    try:
        error.message = described
    except AttributeError:  # a read-only message of its own: the run still ends, with what can be said of it
        return OpsPolishError(described)
    return error


async def _cancelled(rt: Runtime, run_id: int, lease: Lease, bound: Any,
                     cancel: asyncio.CancelledError) -> dict[str, Any]:
    """A delivery cancelled mid-body: hand its run back so the redelivery claims it at once, and re-raise."""
    if lease.lost:
        bound.warning("run_abandoned", reason_code="dedupe.overlap", message="lease taken over; wrote nothing")
        return _skip_result("lease_lost", run_id, "dedupe.overlap", None)
    # If the database is down too, the lease goes stale and the redelivery takes the run over.
    with contextlib.suppress(DbUnavailable):
        await asyncio.shield(rt.ledger.release(
            run_id, lease.owner, reason_code="job.cancelled",
            reason_message="worker shut down during the run; handed back for redelivery"))
    bound.info("run_handed_back", reason_code="job.cancelled")
    raise cancel

#: How long arq keeps a job's key past the time the job is due (``Worker.expires_extra_ms``, one day).
JOB_KEY_EXTRA_S = 86_400.0


async def _keep_job_for(rt: Runtime, job_id: str, delay_s: float) -> None:
    """Keep the job's key in Redis until a day past its retry's due time (never shorter than it is).

    arq sets the key to expire a day after the job was first due and a ``Retry`` does not renew it: a retry due
    later than that (a provider's ``retry_after_s`` of days, or retries that add up to more than a day) found its
    job gone, arq logged "job expired", and the run, queued with no job behind it, ended ``run.lost``."""
    if rt.redis is None:
        return
    key = job_key_prefix + job_id
    want_ms = int((delay_s + JOB_KEY_EXTRA_S) * 1000)
    try:
        ttl_ms = await rt.redis.pttl(key)
        if 0 <= ttl_ms < want_ms:
            await rt.redis.pexpire(key, want_ms)
    except Exception as exc:  # Redis away: arq's Retry will meet it too; reconcile is the net
        if not is_redis_error(exc):
            raise
        log.warning("job_key_not_extended", job_id=job_id, message=describe_exception(exc))

async def _run_body(
    rt: Runtime, job: TrackedJob, run_id: int, attempt: int, workspace_id: uuid.UUID, tenant_id: uuid.UUID | None,
    data: dict[str, Any], job_id: str, lease: Lease, bound: Any,
) -> dict[str, Any]:
    # Error texts may echo the inputs' secrets verbatim (an upstream quoting the token it refused): redact them
    # too. Collected before the body runs, which may change its inputs.
    secrets = (*rt.secrets, *secret_values(data))

    counts = Counts()
    run = RunContext(run_id, job.type, workspace_id, tenant_id, attempt, data, counts, rt, job_id, bound,
                     lease_owner=lease.owner)
    lease.in_body = True
    started = time.monotonic()
    try:
        error = await _body_error(rt, job, run, secrets)
    except asyncio.CancelledError as exc:  # this delivery is cancelled (worker shutdown, arq's timeout)
        lease.in_body = False
        return await _cancelled(rt, run_id, lease, bound, exc)
    finally:
        lease.in_body = False

    if lease.lost:
        bound.warning("run_abandoned", reason_code="dedupe.overlap", message="lease taken over; wrote nothing")
        return _skip_result("lease_lost", run_id, "dedupe.overlap", None)
    if isinstance(error, LeaseLost):
        # From run.fenced, which can meet a takeover before the keeper does: then the fenced completion below writes
        # nothing, and the run is abandoned. Raised by the body while the lease was still held, it used to be taken
        # at its word: nothing written, the run left running until reconcile called it orphaned.
        error = OpsPolishError("the job body raised LeaseLost while its delivery still held the run's lease")

    if error is not None and error.transient and attempt < job.attempts_allowed(rt):
        delay = _retry_delay_s(error, attempt)
        last_error = sanitize_message(error.message, extra_secrets=secrets)
        try:
            released = await rt.ledger.release(run_id, lease.owner, reason_code=error.reason_code,
                                               reason_message=last_error)
        except DbUnavailable as exc:
            # Not handed back: the run stays ours until its lease goes stale, and the retry then takes it over. Said
            # here, or the retry's only trace was arq's own line, with neither the run nor the reason.
            bound.warning("run_release_failed", reason_code=exc.reason_code, message=exc.message,
                          error_code=error.reason_code, attempt=attempt, defer_s=round(delay, 3))
            raise Retry(defer=delay) from exc
        if released:
            rt.metrics[f"retried:{error.reason_code}"] += 1
            bound.info("run_retrying", reason_code=error.reason_code, attempt=attempt, defer_s=round(delay, 3))
            await _keep_job_for(rt, job_id, delay)
            raise Retry(defer=delay)
        # Taken over before the keeper noticed: this end was silent (and the worker drops arq's own end line).
        bound.warning("run_abandoned", reason_code="dedupe.overlap", message="lease lost before the retry")
        return _skip_result("lease_lost", run_id, "dedupe.overlap", None)

    outcome, code, message = _outcome(counts, error, secrets)
    written, outcome, code, summary = await _write_outcome(rt, run_id, lease, outcome, code, message,
                                                           counts.as_dict(), secrets, bound)
    if not written:
        bound.warning("run_abandoned", reason_code="dedupe.overlap", message="lease lost before completion")
        return _skip_result("lease_lost", run_id, "dedupe.overlap", None)
    rt.metrics[f"completed:{outcome}"] += 1
    # The run's one end-of-run line: the worker drops arq's own "← job" line for tracked types (logs.log_runs_once).
    bound.info("run_completed", outcome=outcome, reason_code=code, counts=summary, attempt=attempt,
               duration_s=round(time.monotonic() - started, 3))
    return {"decision": "completed", "run_id": run_id, "outcome": outcome, "reason_code": code}


async def _write_outcome(
    rt: Runtime, run_id: int, lease: Lease, outcome: str, code: str | None, message: str | None,
    summary: dict[str, int], secrets: tuple[str, ...], bound: Any,
) -> tuple[bool, str, str | None, dict[str, int]]:
    """Write the run's outcome, fenced on the lease (see :func:`_complete`): whether it was written, and what was.

    Tried again while the lease is ours, for up to a lease's TTL: left to a redelivery, a blip under the write ran the
    body again, and on the run's last allowed attempt the takeover ended it run.orphaned though its body had
    finished. A try that met the database going away may have written it, its answer lost: a later try then finds
    the run ended by this delivery, and that is the outcome (it was logged ``run_abandoned``, "lease lost", with no
    ``run_completed``)."""
    give_up_at = time.monotonic() + rt.settings.lease_ttl_s
    tries = 0
    while True:
        try:
            written, outcome, code, summary = await _complete(rt, run_id, lease.owner, outcome, code, message,
                                                              summary, secrets)
            break
        except DbUnavailable as exc:
            tries += 1
            if tries == 1:
                bound.warning("run_completion_failed", reason_code=exc.reason_code, message=exc.message)
            if lease.lost or time.monotonic() >= give_up_at:
                # Not written: the run stays ours until the lease goes stale; a redelivery then takes it over.
                raise Retry(defer=rt.settings.lease_ttl_s) from exc
            await asyncio.sleep(min(0.1 * 2 ** tries, 1.0))
    if not written and tries:
        with contextlib.suppress(DbUnavailable):
            ended = await rt.ledger.ended_by(run_id, lease.owner)
            if ended is not None and ended in ((outcome, code), ("failed", "internal.unexpected")):
                return True, ended[0], ended[1], summary  # ours, or the one written when the ledger refused ours
    return written, outcome, code, summary


async def _complete(
    rt: Runtime, run_id: int, owner: uuid.UUID, outcome: str, code: str | None, message: str | None,
    summary: dict[str, int], secrets: tuple[str, ...],
) -> tuple[bool, str, str | None, dict[str, int]]:
    """Write the run's outcome (fenced on ``owner``): whether it was written, and the outcome, reason code and counts
    that were. One the ledger refuses itself (a value it cannot hold) would leave the run running until its lease went
    stale and reconcile called it orphaned: it is written again as failed, with the main counts only."""
    try:
        written = await rt.gate.complete(run_id, owner, outcome=outcome, counts=summary, reason_code=code,
                                         reason_message=message)
        return written, outcome, code, summary
    except DbUnavailable:
        raise
    except Exception as exc:
        summary = {k: summary[k] for k in ("total", "processed", "failed")}
        message = sanitize_message(f"the ledger refused this run's outcome: {describe_exception(exc)}",
                                   extra_secrets=secrets)
        written = await rt.gate.complete(run_id, owner, outcome="failed", counts=summary,
                                         reason_code="internal.unexpected", reason_message=message)
        return written, "failed", "internal.unexpected", summary


def _outcome(counts: Counts, error: OpsPolishError | None, secrets: tuple[str, ...],
             ) -> tuple[str, str | None, str | None]:
    if error is not None:
        return "failed", error.reason_code, sanitize_message(error.message, extra_secrets=secrets)
    processed, failed = counts.processed, counts.failed
    total = max(counts.total, processed)  # as summary_counts holds it
    unprocessed = total - processed  # announced with add_total, neither succeeded nor failed when the body returned
    if failed == 0 and unprocessed == 0:
        return "succeeded", None, None
    parts = []
    if failed:
        parts.append(f"all {failed} items failed" if failed == processed else f"{failed} of {processed} items failed")
    if unprocessed:
        parts.append(f"{unprocessed} of {total} announced items were not processed")
    code = "items.unprocessed" if failed == 0 else None
    if failed == processed:  # not one item succeeded
        return "failed", code or "items.all_failed", "; ".join(parts)
    return "partially_succeeded", code or "items.partially_failed", "; ".join(parts)
