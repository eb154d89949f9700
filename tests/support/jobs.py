"""Job types used by the tests. Their side effects are rows in ``test_effects`` (the test database),
so executions are counted, not assumed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sqlalchemy.engine import make_url

from opspolish.errors import LeaseLost, ProviderRejected, ProviderThrottled, ProviderUnavailable
from opspolish.provider import Assignment, PolicyRef
from opspolish.tracking import RunContext, tracked_job

EFFECT_TYPE = "test.effect"
WORKSPACE_EFFECT_TYPE = "test.workspace_effect"
SECRETIVE_TYPE = "test.secretive"
FENCED_TYPE = "test.fenced"
ALIASED_TYPE = "test.aliased"
FREEFORM_TYPE = "test.freeform"
#: A tenant job with no inputs model that records the inputs its body got, as their repr.
ECHO_TYPE = "test.echo"
#: A fenced body waits here, by its tag, between its two writes (absent: it does not wait).
FENCED_PAUSES: dict[str, asyncio.Event] = {}

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
    retry_after_s: float = 0.05  # a throttled attempt's retry_after_s
    items: int = 0
    fail_items: int = 0
    unprocessed: int = 0  # items announced beyond those processed
    exit_code: int | None = None  # the body calls sys.exit(exit_code)
    inner_cancel: bool = False  # the body awaits a task that was cancelled (its own CancelledError)
    swallow_cancel: bool = False  # the body's sleep catches a cancellation (its deadline's) and returns
    wrap_cancel: bool = False  # the body's sleep turns a cancellation into RuntimeError, as client libraries do
    db_sleep_s: float = 0.0  # attempts up to sleep_attempts run SELECT pg_sleep(db_sleep_s) on the runtime's pool
    raise_lease_lost: bool = False  # the body raises LeaseLost itself, holding its lease
    crash: bool = False  # raise an unexpected error carrying a secret-looking text
    attempt_items: list[int] | None = None  # attempt n counts attempt_items[n-1] more succeeded items
    attempt_sleep_s: list[float] | None = None  # attempt n sleeps attempt_sleep_s[n-1] (instead of sleep_s)


async def _sleep(inputs: EffectInputs, attempt: int) -> None:
    if inputs.attempt_sleep_s:
        await asyncio.sleep(inputs.attempt_sleep_s[min(attempt, len(inputs.attempt_sleep_s)) - 1])
    elif inputs.sleep_s and attempt <= inputs.sleep_attempts:
        try:
            await asyncio.sleep(inputs.sleep_s)
        except asyncio.CancelledError:
            if inputs.wrap_cancel:
                raise RuntimeError("request interrupted") from None
            if not inputs.swallow_cancel:
                raise


async def _misbehave(inputs: EffectInputs) -> None:
    """The ways a body ends other than by its own errors: what the worker must survive and record."""
    if inputs.raise_lease_lost:
        raise LeaseLost()
    if inputs.exit_code is not None:
        sys.exit(inputs.exit_code)
    if inputs.inner_cancel:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner
    if inputs.crash:
        raise RuntimeError("boom: postgresql://user:s3cret@db/x token=abc123def")

async def effect(run: RunContext) -> None:
    inputs = EffectInputs.model_validate(run.inputs)
    pool = run.runtime.pool
    effect_id = await pool.fetchval(
        "INSERT INTO test_effects (run_id, attempt, tag, pid) VALUES ($1, $2, $3, $4) RETURNING id",
        run.run_id, run.attempt, inputs.tag, os.getpid(),
    )
    run.counts.add_total(inputs.items + inputs.unprocessed)
    for i in range(inputs.items):
        if i < inputs.fail_items:
            run.counts.item_failed()
        else:
            run.counts.item_succeeded()
    if inputs.attempt_items:
        n = inputs.attempt_items[min(run.attempt, len(inputs.attempt_items)) - 1]
        run.counts.add_total(n)
        run.counts.item_succeeded(n)
    await _sleep(inputs, run.attempt)
    if inputs.db_sleep_s and run.attempt <= inputs.sleep_attempts:
        await pool.execute("SELECT pg_sleep($1)", inputs.db_sleep_s)
    if run.attempt <= inputs.fail_times:
        if inputs.throttle:
            raise ProviderThrottled("slow down", retry_after_s=inputs.retry_after_s)
        raise ProviderUnavailable("provider down (password=hunter2)")
    await _misbehave(inputs)
    await pool.execute("UPDATE test_effects SET finished_at = clock_timestamp() WHERE id = $1", effect_id)


effect_job = tracked_job(EFFECT_TYPE, inputs=EffectInputs)(effect)
workspace_effect_job = tracked_job(WORKSPACE_EFFECT_TYPE, inputs=EffectInputs, scope="workspace")(effect)


class SecretiveInputs(BaseModel):
    """Inputs that carry secrets, as a ``SecretStr`` and under secret-named keys (also nested)."""

    model_config = ConfigDict(extra="forbid")

    # password first: arq logs a job's arguments cut at 80 characters, and this must be inside them.
    password: str | None = None
    tag: str = "s"
    api_token: SecretStr | None = None
    options: dict[str, Any] = {}
    # How the body fails, echoing every secret it knows verbatim (as careless SDKs and upstreams do).
    leak: Literal["none", "unexpected", "rejected", "transient"] = "none"


def _process_secrets(run: RunContext) -> list[str]:
    settings = run.runtime.settings
    out = []
    for dsn in (settings.database_url.get_secret_value(), settings.redis_url.get_secret_value()):
        out.append(dsn)
        password = make_url(dsn).password
        if password:
            out.append(f"raw password {password}")
    return out


async def secretive(run: RunContext) -> None:
    inputs = SecretiveInputs.model_validate(run.inputs)
    pool = run.runtime.pool
    effect_id = await pool.fetchval(
        "INSERT INTO test_effects (run_id, attempt, tag, pid) VALUES ($1, $2, $3, $4) RETURNING id",
        run.run_id, run.attempt, inputs.tag, os.getpid(),
    )
    echoed = [inputs.api_token.get_secret_value() if inputs.api_token else "", inputs.password or "",
              *(str(v) for v in inputs.options.values()), *_process_secrets(run),
              # the password alone, out of a DSN input: no shape left in the message to know it by
              "tried " + (urlsplit(str(inputs.options.get("source", ""))).password or "")]
    text = "upstream refused the credentials " + " ".join(echoed)
    # What bodies do: log their inputs, as a dict and as the model (its repr holds every field), and the errors
    # they catch (their text echoes the inputs).
    run.log.info("secretive_started", inputs=run.inputs, model=inputs,
                 caught=RuntimeError(f"upstream refused {inputs.options}"))
    if inputs.leak == "unexpected":
        raise RuntimeError(text)
    if inputs.leak == "rejected":
        raise ProviderRejected(text)
    if inputs.leak == "transient":
        raise ProviderUnavailable(text)
    await pool.execute("UPDATE test_effects SET finished_at = clock_timestamp() WHERE id = $1", effect_id)


secretive_job = tracked_job(SECRETIVE_TYPE, inputs=SecretiveInputs)(secretive)


class FencedInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tag: str = "f"


_FENCED_EFFECT = "INSERT INTO test_effects (run_id, attempt, tag, pid) VALUES ($1, $2, $3, $4)"


async def fenced(run: RunContext) -> None:
    """Two writes through ``RunContext.fenced``, ``<tag>:before`` and ``<tag>:after``, with a pause between."""
    tag = FencedInputs.model_validate(run.inputs).tag
    await run.fenced(_FENCED_EFFECT, run.run_id, run.attempt, f"{tag}:before", os.getpid())
    pause = FENCED_PAUSES.get(tag)
    if pause is not None:
        await pause.wait()
    await run.fenced(_FENCED_EFFECT, run.run_id, run.attempt, f"{tag}:after", os.getpid())


fenced_job = tracked_job(FENCED_TYPE, inputs=FencedInputs)(fenced)
TEST_JOBS = [effect_job, workspace_effect_job, secretive_job, fenced_job]

#: Credentials a leaky provider puts in its errors (the shapes real SDK errors carry).
PROVIDER_CANARIES = {
    "bearer": "cnryBearer0a1b2c3d4e5f",
    "api_key": "cnryApiKey9f8e7d6c5b4a",
    "client_secret": "cnryClientSecret1234abcd",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjbnJ5In0.cnryJwtSignature_x1y2z3",
    "github": "ghp_cnry0123456789abcdefABCDEF0123456789",
}


class LeakyProvider:
    """``OPSPOLISH_PROVIDER=tests.support.jobs:LeakyProvider``: every call fails with credentials in its text."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def _text(self, what: str) -> str:
        c = PROVIDER_CANARIES
        dsn = self.runtime.settings.database_url.get_secret_value()
        return (f"{what} failed: GET https://svc.example/v1?api_key={c['api_key']}&page=1 -> 401 "
                f"(Authorization: Bearer {c['bearer']}) id_token {c['jwt']} "
                f'{{"client_secret": "{c["client_secret"]}"}} {c["github"]} while connected to {dsn}')

    async def list_policies(self, tenant_id: uuid.UUID) -> list[PolicyRef]:
        raise ProviderUnavailable(self._text("list_policies"))

    async def get_assignments(self, tenant_id: uuid.UUID, policy_id: uuid.UUID) -> list[Assignment]:
        raise ProviderRejected(self._text("get_assignments"))

    async def apply(self, tenant_id: uuid.UUID, policy_id: uuid.UUID, assignments: list[Assignment]) -> None:
        raise ProviderRejected(self._text("apply"))


class AliasedInputs(BaseModel):
    """Inputs under an alias, with defaults: what the model writes must read back, given or left at a default."""

    model_config = ConfigDict(extra="forbid")

    day: str = Field("monday", alias="Day")
    n: int = 1


async def aliased(run: RunContext) -> None:
    inputs = AliasedInputs.model_validate(run.inputs)  # as a body gets every field
    await run.runtime.pool.execute(
        "INSERT INTO test_effects (run_id, attempt, tag, pid) VALUES ($1, $2, $3, $4)",
        run.run_id, run.attempt, f"{inputs.day}/{inputs.n} {json.dumps(run.inputs, sort_keys=True)}", os.getpid())


aliased_job = tracked_job(ALIASED_TYPE, inputs=AliasedInputs)(aliased)


async def freeform(run: RunContext) -> None:
    """A workspace job with no inputs model: any inputs the canonical form takes are its own."""


freeform_job = tracked_job(FREEFORM_TYPE, scope="workspace")(freeform)


async def echo(run: RunContext) -> None:
    await run.runtime.pool.execute(
        "INSERT INTO test_effects (run_id, attempt, tag, pid) VALUES ($1, $2, $3, $4)",
        run.run_id, run.attempt, repr(sorted(run.inputs.items())), os.getpid())


echo_job = tracked_job(ECHO_TYPE)(echo)
