"""Sections 2 and 4 of ``make bench`` (``scripts/bench.py``): the gate's latency on an empty ledger and on one
with a large history, and the server CPU each gate statement costs.

Claims and completions go through a :class:`~opspolish.batching.GateBatcher` one at a time, as a worker whose jobs
arrive one by one makes them (the gate's own connection, one prepared statement, one commit each), beside two
floors: ``SELECT 1`` through the worker's pool and the cheapest durable write there is.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from scripts import bench_worker as bw
from scripts.bench_env import BenchEnv, BenchError, Tenant, expect
from scripts.bench_probes import is_local_backend, proc_cpu_s, span

from opspolish import db
from opspolish.batching import GateBatcher
from opspolish.fingerprint import canonical_inputs, fingerprint
from opspolish.ledger import ZERO_COUNTS, Claim, Dispatched
from opspolish.runtime import Runtime

#: The gate latency's second floor: the cheapest durable write, one tiny row updated and committed. Every claim
#: and completion commits (synchronous_commit stays on: a claim must survive a crash of the database before its
#: body runs), so none can be faster than this on the machine at hand; its p50 is mostly the disk's WAL flush.
DURABLE_FLOOR_DDL = ("CREATE TABLE IF NOT EXISTS bench_durable_floor (id int PRIMARY KEY, n bigint NOT NULL)",
                     "INSERT INTO bench_durable_floor VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
DURABLE_FLOOR_SQL = "UPDATE bench_durable_floor SET n = n + 1 WHERE id = 1"

#: Completed historical runs $1..$2 spread over the seeded tenants and the last 30 days: three job types,
#: one in ten skipped, every identity distinct. Holds to the CHECK constraints of operation_runs.
HISTORY_SQL = """
WITH t AS (SELECT array_agg(id ORDER BY id) AS ids, array_agg(workspace_id ORDER BY id) AS wss FROM tenants)
INSERT INTO operation_runs (workspace_id, tenant_id, type, status, outcome, run_identity_hash, fingerprint,
                            context, summary_counts, reason_code, reason_message, attempts, queue_name, job_id,
                            heartbeat_at, created_at, started_at, completed_at)
SELECT t.wss[1 + g % cardinality(t.ids)], t.ids[1 + g % cardinality(t.ids)],
       (ARRAY['bench.noop', 'assignments.fetch', 'assignments.restore'])[1 + g % 3],
       'completed', CASE WHEN g % 10 = 0 THEN 'skipped' ELSE 'succeeded' END,
       encode(sha256(convert_to('bench-history/identity/' || g, 'UTF8')), 'hex'),
       encode(sha256(convert_to('bench-history/fingerprint/' || g, 'UTF8')), 'hex'),
       jsonb_build_object('n', g),
       jsonb_build_object('total', 1 + g % 7, 'processed', 1 + g % 7, 'failed', g % 2),
       CASE WHEN g % 10 = 0 THEN 'dedupe.cooldown' END,
       CASE WHEN g % 10 = 0 THEN 'identity completed an earlier run within its cooldown' END,
       CASE WHEN g % 10 = 0 THEN 0 ELSE 1 END,
       'opspolish-bench:history', 'opspolish-bench:history:' || g,
       x.ts, x.ts - interval '2 seconds', x.ts - interval '2 seconds', x.ts
FROM t, generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT now() - make_interval(secs => (g % 2592000)::float8) AS ts) AS x
"""


@dataclass
class GateSamples:
    """Seconds per call: claims of dispatched runs, claims of raw deliveries, completion writes."""

    claim_dispatched: list[float] = field(default_factory=list)
    claim_raw: list[float] = field(default_factory=list)
    complete: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)  # SELECT 1 through the worker's pool: round trip + pool
    durable: list[float] = field(default_factory=list)  # a one-row UPDATE, committed: round trip + WAL flush

    def extend(self, other: GateSamples) -> None:
        self.claim_dispatched += other.claim_dispatched
        self.claim_raw += other.claim_raw
        self.complete += other.complete
        self.floor += other.floor
        self.durable += other.durable


def pct_ms(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) in milliseconds."""
    if not samples:
        raise BenchError("no latency samples")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index] * 1000


async def load_history(env: BenchEnv) -> float:
    """``history_rows`` completed runs in the scale ledger, in SQL; returns the seconds it took."""
    t0 = time.perf_counter()
    total, chunk = env.plan.history_rows, 50_000
    chunks = [(lo, min(total, lo + chunk) - 1) for lo in range(0, total, chunk)]
    done = 0

    async def loader(mine: list[tuple[int, int]]) -> None:  # one per core: the insert is CPU-bound
        nonlocal done
        async with env.connection(env.scale_db) as conn:
            await conn.execute("SET synchronous_commit = off")  # a bench database: nothing to lose
            # The rows reference tenants read from the table itself, so the per-row foreign-key triggers
            # (half the load time) are skipped, as pg_restore does; the references are checked below.
            await conn.execute("SET session_replication_role = replica")
            for lo, hi in mine:
                await conn.execute(HISTORY_SQL, lo, hi, timeout=600)
                done += hi - lo + 1
                if done % 250_000 < chunk:
                    print(f"    {done:,} historical runs", flush=True)

    await asyncio.gather(*(loader(chunks[k::2]) for k in range(2)))
    async with env.connection(env.scale_db) as conn:
        await conn.execute("VACUUM (ANALYZE) operation_runs", timeout=600)
        count = await conn.fetchval("SELECT count(*) FROM operation_runs")
        dangling = await conn.fetchval(
            """SELECT count(*) FROM operation_runs o
               WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = o.tenant_id
                                 AND t.workspace_id = o.workspace_id)""", timeout=600)
    expect("historical runs", int(count), total)
    expect("historical runs without their tenant", int(dangling), 0)
    return time.perf_counter() - t0

async def queue_run(env: BenchEnv, rt: Runtime, i: int, data: dict[str, Any]) -> tuple[Tenant, Dispatched]:
    """A queued no-op run of tenant ``i`` (round robin) with inputs ``data``, dispatched as a caller would."""
    tenant = env.tenants[i % len(env.tenants)]
    queued = await rt.ledger.dispatch(tenant=tenant.id, workspace_id=None, run_type=bw.NOOP_TYPE,
                                      fingerprint=fingerprint(data), context=canonical_inputs(data),
                                      queue_name=rt.settings.queue_name)
    if queued is None or not queued.created:
        raise BenchError(f"could not queue run {data}")
    return tenant, queued

async def claim_run(gate: GateBatcher, tenant: Tenant, queued: Dispatched, owner: uuid.UUID,
                    queue_name: str) -> Claim:
    """A worker's claim of a dispatched run, through ``gate``."""
    return await gate.claim(run_id=queued.run_id, tenant=tenant.id, workspace_id=None, run_type=bw.NOOP_TYPE,
                            fingerprint=None, context=None, job_id=queued.job_id, queue_name=queue_name,
                            lease_owner=owner, cooldown_s=900.0, lease_ttl_s=60.0)

async def complete_run(gate: GateBatcher, run_id: int, owner: uuid.UUID) -> bool:
    """A worker's completion write of a no-op run, through ``gate``."""
    return await gate.complete(run_id, owner, outcome="succeeded", counts=ZERO_COUNTS, reason_code=None,
                               reason_message=None)

async def measure_gate(env: BenchEnv, rt: Runtime, iterations: int, label: str) -> GateSamples:
    """Claims and completions, one at a time, as a worker makes them (through its gate batcher: the gate's
    own connection and prepared statement; a lone caller's operation is flushed on the next loop turn)."""
    out = GateSamples()
    queue = rt.settings.queue_name
    perf = time.perf_counter
    for i in range(iterations):
        tenant, queued = await queue_run(env, rt, i, {"gate": label, "i": i})
        owner = uuid.uuid4()
        t0 = perf()
        claim = await claim_run(rt.gate, tenant, queued, owner, queue)
        t1 = perf()
        done = await complete_run(rt.gate, queued.run_id, owner)
        t2 = perf()
        if claim.decision != "claimed" or not done:
            raise BenchError(f"gate: dispatched run {queued.run_id} was {claim.decision}, completed={done}")

        raw = {"gate": label, "i": i, "raw": True}
        owner = uuid.uuid4()
        t3 = perf()
        claim = await rt.gate.claim(run_id=None, tenant=tenant.id, workspace_id=None, run_type=bw.NOOP_TYPE,
                                      fingerprint=fingerprint(raw), context=canonical_inputs(raw),
                                      job_id=f"{queue}:raw:{label}:{i}", queue_name=queue, lease_owner=owner,
                                      cooldown_s=900.0, lease_ttl_s=60.0)
        t4 = perf()
        if claim.decision != "claimed" or claim.run_id is None:
            raise BenchError(f"gate: raw delivery {label}/{i} was {claim.decision}")
        done = await complete_run(rt.gate, claim.run_id, owner)
        t5 = perf()
        if not done:
            raise BenchError(f"gate: raw run {claim.run_id} was not completed")
        t6 = perf()
        await rt.pool.fetchval("SELECT 1")
        t7 = perf()
        await rt.pool.execute(DURABLE_FLOOR_SQL)
        out.durable.append(perf() - t7)
        out.floor.append(t7 - t6)
        out.claim_dispatched.append(t1 - t0)
        out.complete.append(t2 - t1)
        out.claim_raw.append(t4 - t3)
        out.complete.append(t5 - t4)
    return out

async def seq_scans(env: BenchEnv, database: str) -> int:
    value = await env.fetchval(database,
                                "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'operation_runs'")
    return int(value or 0)

async def gate_latency(env: BenchEnv) -> None:
    n, rounds = env.plan.gate_iterations, 4
    # Both ledgers run the same loop, floors included, so the scale/empty ratios compare like with like; only
    # the empty ledger's floors are reported.
    for database in (env.empty_db, env.scale_db):
        await env.execute(database, *DURABLE_FLOOR_DDL)
    per = max(1, n // rounds)
    empty_rt = await Runtime.start(env.settings_for(env.empty_db, env.queue("gate")), connect_to_redis=False,
                                   pool_size=2)
    scale_rt = await Runtime.start(env.settings_for(env.scale_db, env.queue("gate")), connect_to_redis=False,
                                   pool_size=2)
    empty, scale = GateSamples(), GateSamples()
    seq_before = await seq_scans(env, env.scale_db)
    try:
        await measure_gate(env, empty_rt, 50, "warm")
        await measure_gate(env, scale_rt, 50, "warm")
        for round_no in range(rounds):  # interleaved, alternating which ledger goes first
            pairs = [(empty_rt, empty), (scale_rt, scale)]
            for rt, samples in pairs if round_no % 2 == 0 else reversed(pairs):
                samples.extend(await measure_gate(env, rt, per, f"r{round_no}"))
    finally:
        await empty_rt.close()
        await scale_rt.close()
    await asyncio.sleep(1.0)  # closed backends have flushed their table statistics by now
    seq_after = await seq_scans(env, env.scale_db)

    r = env.results
    for name, samples in (("gate", empty), ("scale_gate", scale)):
        r[f"{name}_dispatched_p50_ms"] = pct_ms(samples.claim_dispatched, 50)
        r[f"{name}_dispatched_p99_ms"] = pct_ms(samples.claim_dispatched, 99)
        r[f"{name}_raw_p50_ms"] = pct_ms(samples.claim_raw, 50)
        r[f"{name}_raw_p99_ms"] = pct_ms(samples.claim_raw, 99)
        r[f"{name}_p50_ms"] = max(r[f"{name}_dispatched_p50_ms"], r[f"{name}_raw_p50_ms"])
        r[f"{name}_p99_ms"] = max(r[f"{name}_dispatched_p99_ms"], r[f"{name}_raw_p99_ms"])
    r["pool_round_trip_p50_ms"] = pct_ms(empty.floor, 50)
    r["pool_round_trip_p99_ms"] = pct_ms(empty.floor, 99)
    r["durable_write_p50_ms"] = pct_ms(empty.durable, 50)
    r["durable_write_p99_ms"] = pct_ms(empty.durable, 99)
    r["complete_p50_ms"] = pct_ms(empty.complete, 50)
    r["complete_p99_ms"] = pct_ms(empty.complete, 99)
    r["scale_complete_p50_ms"] = pct_ms(scale.complete, 50)
    r["scale_complete_p99_ms"] = pct_ms(scale.complete, 99)
    r["scale_gate_p50_ratio"] = max(r["scale_gate_dispatched_p50_ms"] / r["gate_dispatched_p50_ms"],
                                    r["scale_gate_raw_p50_ms"] / r["gate_raw_p50_ms"])
    r["scale_gate_p99_ratio"] = r["scale_gate_p99_ms"] / r["gate_p99_ms"]
    r["scale_complete_p50_ratio"] = r["scale_complete_p50_ms"] / r["complete_p50_ms"]
    r["scale_seq_scans_during_gate"] = seq_after - seq_before
    r["gate_samples_per_path"] = len(empty.claim_dispatched)
    print(f"  claim p50 {r['gate_p50_ms']:.3f} ms empty, {r['scale_gate_p50_ms']:.3f} ms with "
          f"{env.plan.history_rows:,} runs", flush=True)

async def server_cpu(env: BenchEnv) -> None:
    """Server CPU per gate statement: ``gate_iterations`` (at least 1,000) claims of dispatched runs, then
    their completions, one at a time through a gate batcher (a lone operation is one prepared statement and
    one commit, as in a worker whose jobs arrive one by one), and the two floors on a plain connection; each
    timed as the CPU its backend used, read from /proc. Unlike a drain, this moves little with the machine's
    other work (within 20% across runs on one VM, where bare arq's drains moved by 35%), so a change to the
    gate's SQL or to the ledger's schema can be weighed here when drains cannot resolve it. None when
    PostgreSQL's backends are not this host's processes (another host, a container).
    """
    # /proc counts CPU in clock ticks, sampled: 300 SELECT 1s (the quick plan's gate iterations) read as 0 us.
    n = max(env.plan.gate_iterations, 1_000)
    claim_s, complete_s = await _server_cpu_gate(env, n)
    durable_s, select1_s = await _server_cpu_floors(env, n)
    r = env.results
    r["server_cpu_statements_each"] = n
    for key, seconds in (("claim", claim_s), ("complete", complete_s), ("durable_floor", durable_s),
                         ("select1", select1_s)):
        r[f"server_cpu_{key}_us"] = None if seconds is None else seconds / n * 1e6
    if r["server_cpu_claim_us"] is None:
        print("  server CPU: PostgreSQL's backends are not this host's processes, not measured", flush=True)
    else:
        print(f"  server CPU per claim {r['server_cpu_claim_us']:.0f} us, per completion "
              f"{r['server_cpu_complete_us']:.0f} us", flush=True)

async def _server_cpu_gate(env: BenchEnv, n: int) -> tuple[float | None, float | None]:
    """The gate backend's CPU seconds for ``n`` claims, then for their ``n`` completions."""
    settings = env.settings_for(env.empty_db, env.queue("server-cpu"))
    gate_pids: list[int] = []

    async def connect_gate() -> asyncpg.Connection:
        conn = await db.connect_gate(settings)
        gate_pids.append(int(await conn.fetchval("SELECT pg_backend_pid()")))
        return conn

    rt = await Runtime.start(settings, connect_to_redis=False, pool_size=2)
    gate = GateBatcher(connect_gate, rt.ledger)
    try:
        runs = [(*await queue_run(env, rt, i, {"server_cpu": i}), uuid.uuid4()) for i in range(n + 1)]

        async def claim_all(batch: list[tuple[Tenant, Dispatched, uuid.UUID]]) -> None:
            for tenant, queued, owner in batch:
                claim = await claim_run(gate, tenant, queued, owner, settings.queue_name)
                if claim.decision != "claimed":
                    raise BenchError(f"server CPU: run {queued.run_id} was {claim.decision}")

        async def complete_all(batch: list[tuple[Tenant, Dispatched, uuid.UUID]]) -> None:
            for _, queued, owner in batch:
                if not await complete_run(gate, queued.run_id, owner):
                    raise BenchError(f"server CPU: run {queued.run_id} was not completed")

        # The first run opens the gate's connection and prepares its statements, untimed.
        await claim_all(runs[:1])
        await complete_all(runs[:1])
        if not is_local_backend(gate_pids[-1]):
            return None, None
        t0 = proc_cpu_s(gate_pids[-1])
        await claim_all(runs[1:])
        t1 = proc_cpu_s(gate_pids[-1])
        await complete_all(runs[1:])
        t2 = proc_cpu_s(gate_pids[-1])
        if len(gate_pids) != 1:
            raise BenchError("server CPU: the gate's connection was replaced while timed")
    finally:
        await gate.close()
        await rt.close()
    return span(t0, t1), span(t1, t2)

async def _server_cpu_floors(env: BenchEnv, n: int) -> tuple[float | None, float | None]:
    """A backend's CPU seconds for ``n`` committed one-row UPDATEs, then for ``n`` SELECT 1s."""
    async with env.connection(env.empty_db) as conn:
        for sql in DURABLE_FLOOR_DDL:
            await conn.execute(sql)
        pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        if not is_local_backend(pid):
            return None, None
        select1, durable = await conn.prepare("SELECT 1"), await conn.prepare(DURABLE_FLOOR_SQL)
        await select1.fetchval()
        await durable.fetch()
        t0 = proc_cpu_s(pid)
        for _ in range(n):
            await durable.fetch()
        t1 = proc_cpu_s(pid)
        for _ in range(n):
            await select1.fetchval()
        t2 = proc_cpu_s(pid)
    return span(t0, t1), span(t1, t2)
