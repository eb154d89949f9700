"""``assignments.fetch`` and ``assignments.restore`` (DESIGN §8): what the jobs do, nothing about how
they are deduplicated or recorded (that is tracking's job)."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field

from opspolish.errors import InputInvalid, ProviderRejected
from opspolish.ledger import translate_errors
from opspolish.provider import Assignment
from opspolish.tracking import RunContext, tracked_job

FETCH_TYPE = "assignments.fetch"
RESTORE_TYPE = "assignments.restore"


#: Policy ids one run may name: 1,500 of them (39 bytes each) fit the 64 KiB cap on canonical inputs, which 10,000
#: (the bound before) did not: past ~1,680 a dispatch failed on the size of "inputs" instead of naming the list.
#: To cover more policies, name none (the tenant's whole list is read) or dispatch several runs.
MAX_POLICY_IDS = 1_500


class FetchInputs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy_ids: list[uuid.UUID] | None = Field(default=None, max_length=MAX_POLICY_IDS)


class RestoreInputs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy_ids: list[uuid.UUID] | None = Field(default=None, max_length=MAX_POLICY_IDS)
    # Strict: in lax mode `source_run_id=true` was run 1, and the text "7" run 7.
    source_run_id: int | None = Field(default=None, gt=0, lt=2**63, strict=True)


@tracked_job(FETCH_TYPE, inputs=FetchInputs)
async def fetch_assignments(run: RunContext) -> None:
    """Read the tenant's policy assignments and store them as this run's snapshot."""
    inputs = FetchInputs.model_validate(run.inputs)
    assert run.tenant_id is not None
    provider = run.runtime.provider
    if inputs.policy_ids is not None:
        policy_ids = list(dict.fromkeys(inputs.policy_ids))
    else:
        policy_ids = [p.id for p in await provider.list_policies(run.tenant_id)]
    run.counts.add_total(len(policy_ids))
    # Every snapshot write is fenced on the lease: a delivery that lost the run writes nothing more.
    await run.fenced("DELETE FROM assignment_snapshots WHERE run_id = $1", run.run_id)  # an earlier attempt's
    for policy_id in policy_ids:
        try:
            assignments = await provider.get_assignments(run.tenant_id, policy_id)
        except ProviderRejected as exc:
            run.log.info("item_failed", policy_id=str(policy_id), reason_code=exc.reason_code, message=exc.message)
            run.counts.item_failed()
            continue
        await run.fenced(
            """INSERT INTO assignment_snapshots (run_id, policy_id, workspace_id, tenant_id, assignments)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (run_id, policy_id) DO UPDATE SET assignments = EXCLUDED.assignments""",
            run.run_id, policy_id, run.workspace_id, run.tenant_id, [a.as_json() for a in assignments],
        )
        run.counts.item_succeeded()


async def _source_snapshot(run: RunContext, source_run_id: int | None) -> tuple[int, dict[uuid.UUID, list[Assignment]]]:
    """The snapshot to restore, always looked up within the run's own tenant and workspace."""
    async with translate_errors():
        if source_run_id is None:
            source_run_id = await run.runtime.pool.fetchval(
                """SELECT id FROM operation_runs
                   WHERE tenant_id = $1 AND workspace_id = $2 AND type = $3
                     AND outcome IN ('succeeded', 'partially_succeeded')
                   ORDER BY id DESC LIMIT 1""",
                run.tenant_id, run.workspace_id, FETCH_TYPE,
            )
            if source_run_id is None:
                raise InputInvalid("inputs.source_run_id: this tenant has no completed fetch to restore",
                                   field="inputs.source_run_id")
        source = await run.runtime.pool.fetchrow(
            "SELECT status, outcome FROM operation_runs WHERE id = $1 AND tenant_id = $2 AND workspace_id = $3 "
            "AND type = $4", source_run_id, run.tenant_id, run.workspace_id, FETCH_TYPE,
        )
        if source is None:
            raise InputInvalid(f"inputs.source_run_id: run {source_run_id} is not a fetch of this tenant",
                               field="inputs.source_run_id")
        if source["outcome"] not in ("succeeded", "partially_succeeded"):
            # A failed fetch's snapshot is empty or partial, a queued or running one's not written yet: restoring from
            # it "succeeded" with nothing restored.
            raise InputInvalid(f"inputs.source_run_id: run {source_run_id} is no completed fetch to restore from "
                               f"(status {source['status']}, outcome {source['outcome']})",
                               field="inputs.source_run_id")
        rows = await run.runtime.pool.fetch(
            """SELECT policy_id, assignments FROM assignment_snapshots
               WHERE run_id = $1 AND tenant_id = $2 AND workspace_id = $3 ORDER BY policy_id""",
            source_run_id, run.tenant_id, run.workspace_id,
        )
    return source_run_id, {
        r[0]: [Assignment(a["target"], a["intent"]) for a in r[1]] for r in rows
    }


@tracked_job(RESTORE_TYPE, inputs=RestoreInputs)
async def restore_assignments(run: RunContext) -> None:
    """Re-apply a stored snapshot to the provider, idempotently."""
    inputs = RestoreInputs.model_validate(run.inputs)
    assert run.tenant_id is not None
    source_run_id, snapshot = await _source_snapshot(run, inputs.source_run_id)
    run.log = run.log.bind(source_run_id=source_run_id)
    wanted = list(dict.fromkeys(inputs.policy_ids)) if inputs.policy_ids is not None else list(snapshot)
    run.counts.add_total(len(wanted))
    for policy_id in wanted:
        if policy_id not in snapshot:
            run.log.info("item_failed", policy_id=str(policy_id), reason_code="input.invalid",
                         message="policy is not in the snapshot")
            run.counts.item_failed()
            continue
        try:
            await run.runtime.provider.apply(run.tenant_id, policy_id, snapshot[policy_id])
        except ProviderRejected as exc:
            run.log.info("item_failed", policy_id=str(policy_id), reason_code=exc.reason_code, message=exc.message)
            run.counts.item_failed()
            continue
        run.counts.item_succeeded()
