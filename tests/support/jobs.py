"""Job types used by the tests. Their side effects are rows in ``test_effects`` (the test database),
so executions are counted, not assumed."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel, ConfigDict

from opspolish.errors import ProviderThrottled, ProviderUnavailable
from opspolish.tracking import RunContext, tracked_job

EFFECT_TYPE = "test.effect"
WORKSPACE_EFFECT_TYPE = "test.workspace_effect"

TEST_EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS test_effects (
    id bigserial PRIMARY KEY,
    run_id bigint NOT NULL,
    attempt int NOT NULL,
    tag text NOT NULL,
    pid int NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
)
"""


class EffectInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tag: str = "t"
    sleep_s: float = 0.0
    sleep_attempts: int = 1_000  # only attempts up to this one sleep
    fail_times: int = 0  # attempts 1..fail_times raise a transient error
    throttle: bool = False
    items: int = 0
    fail_items: int = 0
    crash: bool = False  # raise an unexpected error carrying a secret-looking text


async def effect(run: RunContext) -> None:
    inputs = EffectInputs.model_validate(run.inputs)
    pool = run.runtime.pool
    effect_id = await pool.fetchval(
        "INSERT INTO test_effects (run_id, attempt, tag, pid) VALUES ($1, $2, $3, $4) RETURNING id",
        run.run_id, run.attempt, inputs.tag, os.getpid(),
    )
    run.counts.add_total(inputs.items)
    for i in range(inputs.items):
        if i < inputs.fail_items:
            run.counts.item_failed()
        else:
            run.counts.item_succeeded()
    if inputs.sleep_s and run.attempt <= inputs.sleep_attempts:
        await asyncio.sleep(inputs.sleep_s)
    if run.attempt <= inputs.fail_times:
        if inputs.throttle:
            raise ProviderThrottled("slow down", retry_after_s=0.05)
        raise ProviderUnavailable("provider down (password=hunter2)")
    if inputs.crash:
        raise RuntimeError("boom: postgresql://user:s3cret@db/x token=abc123def")
    await pool.execute("UPDATE test_effects SET finished_at = clock_timestamp() WHERE id = $1", effect_id)


effect_job = tracked_job(EFFECT_TYPE, inputs=EffectInputs)(effect)
workspace_effect_job = tracked_job(WORKSPACE_EFFECT_TYPE, inputs=EffectInputs, scope="workspace")(effect)
TEST_JOBS = [effect_job, workspace_effect_job]
