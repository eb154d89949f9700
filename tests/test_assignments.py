"""assignments.fetch / assignments.restore (DESIGN §1.1, §8): durable summaries, partial failures,
retries counting the final attempt only, idempotent restore, tenant-scoped snapshots."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from opspolish.dispatch import dispatch
from opspolish.errors import InputInvalid, ProviderRejected, ProviderUnavailable
from opspolish.jobs.assignments import FETCH_TYPE, MAX_POLICY_IDS, RESTORE_TYPE
from opspolish.provider import Assignment, DirectoryProvider, PolicyRef
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from tests.conftest import make_worker


class FlakyProvider:
    """The directory, failing the first ``outages`` calls with a transient error and rejecting some policies."""

    def __init__(self, inner: DirectoryProvider, *, outages: int = 0, reject: set[uuid.UUID] | None = None) -> None:
        self.inner = inner
        self.outages = outages
        self.reject = reject or set()
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.outages > 0:
            self.outages -= 1
            raise ProviderUnavailable("directory timed out (Authorization: Bearer abc.def.ghi)")

    async def list_policies(self, tenant_id: uuid.UUID) -> list[PolicyRef]:
        self._maybe_fail()
        return await self.inner.list_policies(tenant_id)

    async def get_assignments(self, tenant_id: uuid.UUID, policy_id: uuid.UUID) -> list[Assignment]:
        if policy_id in self.reject:
            raise ProviderRejected("policy is not readable")
        got = await self.inner.get_assignments(tenant_id, policy_id)
        self._maybe_fail()
        return got

    async def apply(self, tenant_id: uuid.UUID, policy_id: uuid.UUID, assignments: list[Assignment]) -> None:
        self._maybe_fail()
        await self.inner.apply(tenant_id, policy_id, assignments)


async def run_worker(settings: Settings, provider: Any = None) -> None:
    worker = make_worker(settings)
    if provider is not None:
        original = worker.on_startup

        async def startup(ctx: dict[str, Any]) -> None:
            assert original is not None
            await original(ctx)
            ctx["opspolish"].provider = provider(ctx["opspolish"])

        worker.on_startup = startup
    try:
        await worker.main()
    finally:
        await worker.close()


async def directory(conn: asyncpg.Connection, tenant_id: uuid.UUID) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        """SELECT p.id, a.target, a.intent FROM directory_policies p JOIN directory_assignments a
           ON a.policy_id = p.id WHERE p.tenant_id = $1 ORDER BY 1, 2""", tenant_id)
    return [tuple(r) for r in rows]


@pytest.fixture
def tenant(seeded: dict[str, Any]) -> asyncpg.Record:
    t: asyncpg.Record = seeded["tenants"][0]
    return t


async def test_fetch_and_restore_end_with_non_null_counts_for_every_tenant(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    for t in seeded["tenants"]:
        await dispatch(rt, FETCH_TYPE, tenant=t["external_id"])
    await run_worker(settings)
    for t in seeded["tenants"]:
        await dispatch(rt, RESTORE_TYPE, tenant=t["external_id"])
    await run_worker(settings)
    rows = await conn.fetch("SELECT type, outcome, summary_counts FROM operation_runs")
    assert len(rows) == 2 * len(seeded["tenants"])
    for r in rows:
        assert r["outcome"] == "succeeded"
        assert r["summary_counts"] == {"total": 3, "processed": 3, "failed": 0}
    snapshots = await conn.fetchval("SELECT count(*) FROM assignment_snapshots")
    assert snapshots == 3 * len(seeded["tenants"])


async def test_a_fetch_retried_after_a_transient_failure_does_not_double_count(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: asyncpg.Record
) -> None:
    # Fails after reading the second policy on attempt 1, succeeds on attempt 2.
    result = await dispatch(rt, FETCH_TYPE, tenant=tenant["external_id"])
    calls = {"n": 0}

    def provider(runtime: Runtime) -> FlakyProvider:
        p = FlakyProvider(DirectoryProvider(runtime))
        original = p._maybe_fail

        def fail_third_call() -> None:
            calls["n"] += 1
            if calls["n"] == 3:
                p.outages = 1
            original()

        p._maybe_fail = fail_third_call  # type: ignore[method-assign]
        return p

    await run_worker(settings, provider)
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", result.run_id)
    assert run is not None
    assert (run["outcome"], run["attempts"]) == ("succeeded", 2)
    assert run["summary_counts"] == {"total": 3, "processed": 3, "failed": 0}
    assert await conn.fetchval("SELECT count(*) FROM assignment_snapshots WHERE run_id = $1", result.run_id) == 3


async def test_a_partial_failure_keeps_the_successes_and_counts_the_failures(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: asyncpg.Record
) -> None:
    policies = await conn.fetch("SELECT id FROM directory_policies WHERE tenant_id = $1 ORDER BY name", tenant["id"])
    rejected = {policies[1]["id"]}
    result = await dispatch(rt, FETCH_TYPE, tenant=tenant["external_id"])
    await run_worker(settings, lambda runtime: FlakyProvider(DirectoryProvider(runtime), reject=rejected))
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", result.run_id)
    assert run is not None
    assert (run["outcome"], run["reason_code"]) == ("partially_succeeded", "items.partially_failed")
    assert run["summary_counts"] == {"total": 3, "processed": 3, "failed": 1}
    kept = {r["policy_id"] for r in await conn.fetch(
        "SELECT policy_id FROM assignment_snapshots WHERE run_id = $1", result.run_id)}
    assert kept == {p["id"] for p in policies} - rejected


async def test_restore_of_a_locked_policy_is_a_partial_success(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: asyncpg.Record
) -> None:
    await dispatch(rt, FETCH_TYPE, tenant=tenant["external_id"])
    await run_worker(settings)
    await conn.execute("UPDATE directory_policies SET locked = true WHERE id = (SELECT id FROM directory_policies "
                       "WHERE tenant_id = $1 ORDER BY name LIMIT 1)", tenant["id"])
    result = await dispatch(rt, RESTORE_TYPE, tenant=tenant["external_id"])
    await run_worker(settings)
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", result.run_id)
    assert run is not None
    assert run["outcome"] == "partially_succeeded"
    assert run["summary_counts"] == {"total": 3, "processed": 3, "failed": 1}


async def test_restore_applied_twice_leaves_the_directory_as_after_the_first(
    settings: Settings, conn: asyncpg.Connection, tenant: asyncpg.Record
) -> None:
    s = settings.model_copy(update={"dedupe_cooldown_s": 0.0})
    rt = await Runtime.start(s)
    try:
        fetch = await dispatch(rt, FETCH_TYPE, tenant=tenant["external_id"])
        await run_worker(s)
        original = await directory(conn, tenant["id"])
        # Drift: change, add and remove assignments after the snapshot.
        await conn.execute("UPDATE directory_assignments SET intent = 'exclude' WHERE policy_id IN "
                           "(SELECT id FROM directory_policies WHERE tenant_id = $1)", tenant["id"])
        await conn.execute("INSERT INTO directory_assignments (policy_id, target, intent) SELECT id, 'drifted', "
                           "'include' FROM directory_policies WHERE tenant_id = $1", tenant["id"])
        assert await directory(conn, tenant["id"]) != original
        inputs = {"source_run_id": fetch.run_id}
        await dispatch(rt, RESTORE_TYPE, tenant=tenant["external_id"], inputs=inputs)
        await run_worker(s)
        after_first = await directory(conn, tenant["id"])
        await dispatch(rt, RESTORE_TYPE, tenant=tenant["external_id"], inputs=inputs)
        await run_worker(s)
        after_second = await directory(conn, tenant["id"])
    finally:
        await rt.close()
    assert after_first == original
    assert after_second == after_first
    outcomes = [r["outcome"] for r in await conn.fetch(
        "SELECT outcome FROM operation_runs WHERE type = $1 ORDER BY id", RESTORE_TYPE)]
    assert outcomes == ["succeeded", "succeeded"]


async def test_a_tenant_can_neither_read_nor_restore_another_tenants_snapshot(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, seeded: dict[str, Any]
) -> None:
    a = seeded["tenants"][0]
    b = next(t for t in seeded["tenants"] if t["workspace_id"] != a["workspace_id"])
    fetch_b = await dispatch(rt, FETCH_TYPE, tenant=b["external_id"])
    await run_worker(settings)
    before = await directory(conn, a["id"])
    steal = await dispatch(rt, RESTORE_TYPE, tenant=a["external_id"], inputs={"source_run_id": fetch_b.run_id})
    await run_worker(settings)
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", steal.run_id)
    assert run is not None
    assert (run["outcome"], run["reason_code"]) == ("failed", "input.invalid")
    assert "not a fetch of this tenant" in run["reason_message"]
    assert await directory(conn, a["id"]) == before
    # The provider itself is scoped too: B's policy ids are invisible through tenant A.
    provider = DirectoryProvider(rt)
    policy_b = await conn.fetchval("SELECT id FROM directory_policies WHERE tenant_id = $1 LIMIT 1", b["id"])
    with pytest.raises(ProviderRejected):
        await provider.get_assignments(a["id"], policy_b)
    with pytest.raises(ProviderRejected):
        await provider.apply(a["id"], policy_b, [])


async def test_restore_without_any_fetch_fails_with_a_clear_reason(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: asyncpg.Record
) -> None:
    result = await dispatch(rt, RESTORE_TYPE, tenant=tenant["external_id"])
    await run_worker(settings)
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", result.run_id)
    assert run is not None
    assert (run["outcome"], run["reason_code"]) == ("failed", "input.invalid")
    assert run["summary_counts"] == {"total": 0, "processed": 0, "failed": 0}


async def test_restore_from_a_fetch_that_failed_or_has_not_finished_is_refused_naming_its_state(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: asyncpg.Record
) -> None:
    # Each "succeeded" having restored nothing, counts 0/0/0: a failed fetch's snapshot is empty (or partial), a
    # queued or running one's is not written yet.
    failed = await dispatch(rt, FETCH_TYPE, tenant=tenant["external_id"], inputs={"policy_ids": [str(uuid.uuid4())]})
    await run_worker(settings)
    unfinished = await conn.fetchval(
        """INSERT INTO operation_runs (workspace_id, tenant_id, type, run_identity_hash, fingerprint, context)
           VALUES ($1, $2, $3, repeat('a', 64), repeat('0', 64), '{}') RETURNING id""",
        tenant["workspace_id"], tenant["id"], FETCH_TYPE)
    restores = [await dispatch(rt, RESTORE_TYPE, tenant=tenant["external_id"], inputs={"source_run_id": source})
                for source in (failed.run_id, unfinished)]
    before = await directory(conn, tenant["id"])
    await run_worker(settings)
    rows = {r["id"]: r for r in await conn.fetch("SELECT * FROM operation_runs WHERE type = $1", RESTORE_TYPE)}
    said = [(rows[r.run_id]["outcome"], rows[r.run_id]["reason_code"], rows[r.run_id]["reason_message"])
            for r in restores]
    assert said == [
        ("failed", "input.invalid", f"inputs.source_run_id: run {failed.run_id} is no completed fetch to restore "
                                    "from (status completed, outcome failed)"),
        ("failed", "input.invalid", f"inputs.source_run_id: run {unfinished} is no completed fetch to restore "
                                    "from (status queued, outcome pending)")]
    assert await directory(conn, tenant["id"]) == before


async def test_fetch_of_selected_policies_counts_only_those(
    settings: Settings, rt: Runtime, conn: asyncpg.Connection, tenant: asyncpg.Record
) -> None:
    policy = await conn.fetchval("SELECT id FROM directory_policies WHERE tenant_id = $1 LIMIT 1", tenant["id"])
    result = await dispatch(rt, FETCH_TYPE, tenant=tenant["external_id"],
                            inputs={"policy_ids": [str(policy), str(uuid.uuid4())]})
    await run_worker(settings)
    run = await conn.fetchrow("SELECT * FROM operation_runs WHERE id = $1", result.run_id)
    assert run is not None
    assert run["outcome"] == "partially_succeeded"  # the unknown policy is a rejected item
    assert run["summary_counts"] == {"total": 2, "processed": 2, "failed": 1}


@pytest.mark.parametrize("job_type", [FETCH_TYPE, RESTORE_TYPE])
async def test_the_most_policy_ids_a_run_takes_fit_the_input_cap_and_one_more_names_the_list(
    rt: Runtime, conn: asyncpg.Connection, tenant: asyncpg.Record, job_type: str
) -> None:
    """The models bound ``policy_ids`` to what fits the 64 KiB cap on canonical inputs. At the old bound of 10,000,
    1,700 ids were refused as "inputs: larger than 65536 bytes once canonical", naming no field."""
    ids = [str(uuid.uuid4()) for _ in range(MAX_POLICY_IDS + 1)]
    largest = await dispatch(rt, job_type, tenant=tenant["external_id"], inputs={"policy_ids": ids[:-1]})
    assert largest.created
    for too_many in (ids, ids * 4):  # one over the bound; and far over the byte cap too
        with pytest.raises(InputInvalid) as err:
            await dispatch(rt, job_type, tenant=tenant["external_id"], inputs={"policy_ids": too_many})
        assert err.value.field == "inputs.policy_ids"
        assert f"at most {MAX_POLICY_IDS} items" in err.value.message
    assert await conn.fetchval("SELECT count(*) FROM operation_runs") == 1


@pytest.mark.parametrize("source", [True, "7", 7.0, 7.5])
async def test_a_restore_source_that_is_no_whole_number_is_refused_not_coerced(
    rt: Runtime, seeded: dict[str, Any], conn: asyncpg.Connection, source: Any
) -> None:
    # pydantic's lax mode took `source_run_id=true` for run 1 (and the text "7" for run 7): a restore from a run the
    # operator never named.
    tenant = seeded["tenants"][0]
    with pytest.raises(InputInvalid) as err:
        await dispatch(rt, RESTORE_TYPE, tenant=tenant["external_id"], inputs={"source_run_id": source})
    assert err.value.field == "inputs.source_run_id", err.value
    assert await conn.fetchval("SELECT count(*) FROM operation_runs") == 0
    ok = await dispatch(rt, RESTORE_TYPE, tenant=tenant["external_id"], inputs={"source_run_id": 7})
    assert ok.created
