#!/usr/bin/env python3
"""``make bench``: opspolish against bare arq and procrastinate, on this machine, in one run.

1. throughput of no-op jobs (one worker process, then two): bare arq, opspolish-tracked, procrastinate;
2. gate latency: the claim transaction and the completion write, p50 / p99;
3. duplicate storms: 1,000 deliveries of one identity across two worker processes, twice, each storm timed
   against as many distinct jobs (in the order storm, distinct, distinct, storm);
4. the gate with a large historical ledger against an empty one;
5. dispatch against a bare ``enqueue_job``;
6. the peak RSS of a tracked worker process.

Every worker is a real process (``scripts/bench_worker.py``) that builds its pools, waits at a start barrier
and then drains its queue; only the draining is timed. The benchmark uses its own databases
(``opspolish_bench_<tag>_*``) and queues (``opspolish-bench:<tag>:*``) and removes them when it ends, however
it ends. ``--quick`` runs a smaller version in well under a minute. Figures go to ``bench/results.json``.

The one-worker throughput runs come in back-to-back pairs, bare arq and tracked (``--repeats N``: N pairs, 2 by
default). Each drain reports the share of the cores the hypervisor took for other guests (steal, the usual
cause of noise on a shared cloud VM). When the pairs' ratios disagree by more than 15%, or one of their drains lost
more than 5% of the cores to steal, the run is UNSTEADY: the machine moved more than the code did, and the
throughput verdict says so instead of ok or MISS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from arq.connections import ArqRedis

from opspolish import db
from opspolish.batching import GateBatcher
from opspolish.dispatch import dispatch
from opspolish.fingerprint import canonical_inputs, fingerprint
from opspolish.ledger import ZERO_COUNTS, Claim, Dispatched
from opspolish.logs import configure_logging
from opspolish.runtime import Runtime, connect_redis
from opspolish.seed import seed
from opspolish.settings import Settings
from opspolish.tracking import execute

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the worker module is imported as scripts.bench_worker, as arq imports it
    sys.path.insert(0, str(ROOT))

from scripts import bench_worker as bw  # noqa: E402

RESULTS_PATH = ROOT / "bench" / "results.json"
READY_TIMEOUT_S = 90.0
TENANTS_PER_WORKSPACE = 5  # two workspaces: ten tenants
CONCURRENCY = 10  # arq max_jobs and procrastinate concurrency, for every contender
#: The one-worker ratio's back-to-back pairs may differ by this much (max / min - 1) for the run to be steady.
#: On the steadiest VM measured they agreed to the hundredth; on one that lost up to a quarter of its cores to
#: the hypervisor, three runs of five differed by 29%, 71% and 85% (docs/performance.md).
STEADY_SPREAD = 0.15
#: ... and none of their drains may lose more than this share of the cores to steal (see MachineCpu).
STEADY_MAX_STEAL = 0.05
GATE_PHASE = "2+4. gate latency, empty ledger vs large"
STORM_PHASE = "3. duplicate storm"
SERVER_CPU_PHASE = "2. server CPU per gate statement, one at a time"


class BenchError(Exception):
    """A benchmark step failed; the message says which and why."""


@dataclass(frozen=True)
class Plan:
    quick: bool
    jobs: int  # no-op jobs per throughput run
    storm: int  # deliveries in the duplicate storm (and distinct jobs it is compared with)
    history_rows: int  # historical runs in the "at scale" ledger
    gate_iterations: int  # claims (and completions) timed per path and per ledger
    dispatches: int  # dispatches timed (and as many bare enqueues)
    repeats: int  # one-worker throughput runs per contender (the best is reported; all are recorded)
    timeout_s: float  # the whole run

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:  # one worker only, no raw-enqueue run, smaller sizes: well under a minute on 2 cores
            return cls(True, jobs=600, storm=500, history_rows=30_000, gate_iterations=300, dispatches=400,
                       repeats=1, timeout_s=110.0)
        return cls(False, jobs=10_000, storm=1_000, history_rows=1_000_000, gate_iterations=2_000,
                   dispatches=3_000, repeats=2, timeout_s=2_400.0)


@dataclass(frozen=True)
class Tenant:
    id: str
    external_id: str


@dataclass
class Drain:
    """What the worker processes of one timed drain reported."""

    seconds: float
    startup_s: float  # from spawning the processes until all of them were ready (not in ``seconds``)
    machine_busy: float  # share of all cores busy while draining (workers, servers and anything else)
    steal: float  # share of all cores' time the hypervisor gave to other guests while draining (see MachineCpu)
    postgres_cpu_s: float  # CPU seconds of the PostgreSQL backends serving the drained databases
    reports: list[dict[str, Any]]

    def executions(self, key: str) -> int:
        return sum(int(r["executions"].get(key, 0)) for r in self.reports)

    def metrics(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.reports:
            total.update(r.get("metrics", {}))
        return total

    def gate_flushes(self) -> int:
        """Statements the tracked workers' gate batchers sent (claims and completions coalesced); 0 for others."""
        return sum(int(r.get("gate", {}).get("flushes", 0)) for r in self.reports)

    def rss_mb(self) -> float:
        return max(int(r["vm_hwm_kb"]) for r in self.reports) / 1024

    def worker_cpu_s(self) -> float:
        """CPU seconds the worker processes used while draining (all of them together)."""
        return sum(float(r["cpu_s"]) for r in self.reports)


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


class _Discard(io.StringIO):
    def write(self, s: str) -> int:
        return len(s)


def configure_bench_logging() -> None:
    """The library's JSON logging, rendered as in production but discarded (dispatch logs every run)."""
    configure_logging("json")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=_Discard()))
    logging.getLogger().setLevel(logging.WARNING)


async def wait_for(predicate: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str,
                   interval_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


class Bench:
    """One benchmark run: its names, its resources (always cleaned up) and its phases."""

    def __init__(self, plan: Plan, base: Settings, workdir: Path) -> None:
        self.plan = plan
        self.base = base
        self.workdir = workdir
        self.tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.db_prefix = f"opspolish_bench_{self.tag}"
        self.queue_prefix = f"opspolish-bench:{self.tag}"
        self.databases: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis: ArqRedis | None = None
        self.tenants: list[Tenant] = []
        self.results: dict[str, Any] = {}
        self.phase_s: dict[str, float] = {}
        self.phase_steal: dict[str, float] = {}  # share of the cores' time stolen by the hypervisor, per phase
        self._runs: Counter[str] = Counter()
        self.main_db = self.empty_db = self.scale_db = self.procrastinate_db = self.procrastinate_dsn = ""

    # --- names and resources -------------------------------------------------------------------------------

    def settings_for(self, database: str, queue: str | None = None) -> Settings:
        s = self.base.with_database(database)
        return s.model_copy(update={"queue_name": queue}) if queue else s

    def queue(self, name: str) -> str:
        return f"{self.queue_prefix}:{name}"

    def _new_database(self, suffix: str) -> str:
        """The name of a benchmark database (registered for cleanup); never one of the project's own."""
        name = f"{self.db_prefix}_{suffix}"
        if name in ("opspolish", "opspolish_demo") or not name.startswith("opspolish_bench_"):
            raise BenchError(f"refusing to use database {name!r}")
        self.databases.append(name)
        return name

    async def create_database(self, suffix: str, template: str | None = None) -> str:
        """A migrated ledger database, or a copy of ``template``."""
        name = self._new_database(suffix)
        if template is None:
            await db.upgrade(self.settings_for(name))
            return name
        async with self.connection("postgres") as conn:
            for attempt in range(50):  # the template's last connection may still be closing
                try:
                    await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                    break
                except asyncpg.ObjectInUseError:
                    if attempt == 49:
                        raise
                    await asyncio.sleep(0.1)
        return name

    async def create_database_plain(self, suffix: str) -> str:
        """An empty database (procrastinate installs its own schema)."""
        name = self._new_database(suffix)
        await self.execute("postgres", f'CREATE DATABASE "{name}"')
        return name

    @contextlib.asynccontextmanager
    async def connection(self, database: str) -> AsyncIterator[asyncpg.Connection]:
        """A short-lived connection to ``database``, closed on the way out."""
        conn = await db.connect(self.base, database)
        try:
            yield conn
        finally:
            await conn.close()

    async def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        errors: list[str] = []
        try:
            redis = self.redis or await connect_redis(self.base)
            try:
                batch: list[str | bytes] = []
                async for key in redis.scan_iter(match=f"*{self.queue_prefix}*", count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        await redis.delete(*batch)
                        batch = []
                if batch:
                    await redis.delete(*batch)
            finally:
                await redis.aclose()
                self.redis = None
        except Exception as exc:
            errors.append(f"Redis keys {self.queue_prefix}*: {type(exc).__name__}: {exc}")
        for name in reversed(self.databases):
            try:
                await db.drop_database(self.base, name)
            except Exception as exc:
                errors.append(f"database {name}: {type(exc).__name__}: {exc}")
        if errors:
            print("bench: cleanup incomplete: " + "; ".join(errors), file=sys.stderr)

    def require_redis(self) -> ArqRedis:
        if self.redis is None:
            raise BenchError("no Redis connection")
        return self.redis

    # --- worker processes ----------------------------------------------------------------------------------

    def worker_env(self, settings: Settings, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPOLISH_")}
        env.update({
            "OPSPOLISH_DATABASE_URL": settings.database_url.get_secret_value(),
            "OPSPOLISH_REDIS_URL": settings.redis_url.get_secret_value(),
            "OPSPOLISH_QUEUE_NAME": settings.queue_name,
            "OPSPOLISH_MAX_JOBS": str(CONCURRENCY),
            "OPSPOLISH_LOG_FORMAT": "json",
            **extra,
        })
        env.pop("PYTHONUNBUFFERED", None)  # every worker logs with Python's default buffering
        return env

    def arq_worker(self, kind: str, settings: Settings) -> tuple[list[str], dict[str, str]]:
        return ([sys.executable, "-m", "arq", f"scripts.bench_worker.{kind}WorkerSettings", "--burst"],
                self.worker_env(settings))

    def procrastinate_worker(self, dsn: str) -> tuple[list[str], dict[str, str]]:
        return ([sys.executable, str(ROOT / "scripts" / "bench_worker.py"), "procrastinate"],
                self.worker_env(self.base, BENCH_PROCRASTINATE_DSN=dsn, BENCH_CONCURRENCY=str(CONCURRENCY)))

    async def drain(self, label: str, specs: list[tuple[list[str], dict[str, str]]], *, jobs: int,
                    databases: tuple[str, ...] = ()) -> Drain:
        """Start the workers, wait until all are ready, say go, and time until the last one has drained."""
        sync = self.workdir / label
        sync.mkdir()
        started: list[tuple[subprocess.Popen[bytes], Path]] = []
        t_spawn = time.perf_counter()
        try:
            for i, (cmd, env) in enumerate(specs):
                log_path = sync / f"w{i}.log"
                with open(log_path, "wb") as out:  # the child keeps its own descriptor
                    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env={**env, "BENCH_SYNC_DIR": str(sync), "BENCH_WORKER_TAG": f"w{i}"},
                                            start_new_session=True)
                self.procs.append(proc)
                started.append((proc, log_path))

            async def all_ready() -> bool:
                self._check_alive(label, started)
                return all((sync / f"ready.w{i}").exists() for i in range(len(started)))

            await wait_for(all_ready, timeout_s=READY_TIMEOUT_S, what=f"{label} workers to start")
            startup_s = time.perf_counter() - t_spawn
            backends = BackendCpu(databases)
            backends.sample()
            at_go = set(backends.last)
            cpu_before = MachineCpu.read()
            t_go = time.time()
            (sync / "go").touch()
            drain_timeout = 60.0 + jobs / 50  # slower than 50 jobs/s is a failure, not a figure

            async def all_exited() -> bool:
                backends.sample()
                return all(p.poll() is not None for p, _ in started)

            await wait_for(all_exited, timeout_s=drain_timeout, what=f"{label} workers to drain", interval_s=0.05)
            cpu = MachineCpu.read() - cpu_before
            for proc, log_path in started:
                if proc.returncode != 0:
                    raise BenchError(f"{label}: a worker exited with {proc.returncode}:\n{_tail(log_path)}")
            reports = []
            for i, (_, log_path) in enumerate(started):
                path = sync / f"result.w{i}.json"
                if not path.exists():
                    raise BenchError(f"{label}: worker w{i} wrote no result:\n{_tail(log_path)}")
                reports.append(json.loads(path.read_text()))
            return Drain(max(float(r["t_end"]) for r in reports) - t_go, startup_s, cpu.busy_share, cpu.steal_share,
                         backends.seconds(new_from_zero=set(backends.last) - at_go), reports)
        finally:
            for proc, _ in started:
                if proc.poll() is None:
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                self.procs.remove(proc)

    @staticmethod
    def _check_alive(label: str, started: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
        for proc, log_path in started:
            if proc.poll() is not None:
                raise BenchError(f"{label}: a worker exited early ({proc.returncode}):\n{_tail(log_path)}")

    # --- setup ------------------------------------------------------------------------------------------------

    async def setup(self) -> None:
        self.redis = await connect_redis(self.base)
        template = await self.create_database("tmpl")
        async with self.connection(template) as conn:
            await seed(conn, tenants_per_workspace=TENANTS_PER_WORKSPACE, policies_per_tenant=0)
            rows = await conn.fetch("SELECT id, external_id FROM tenants ORDER BY external_id")
        self.tenants = [Tenant(str(r["id"]), str(r["external_id"])) for r in rows]
        self.main_db = await self.create_database("main", template)
        self.empty_db = await self.create_database("empty", template)
        self.scale_db = await self.create_database("scale", template)
        self.procrastinate_db = await self.create_database_plain("procr")
        self.procrastinate_dsn = db.asyncpg_dsn(self.base, self.procrastinate_db)
        bench = bw.procrastinate_app(self.procrastinate_dsn, pool_size=4)
        async with bench.app.open_async():
            await bench.app.schema_manager.apply_schema_async()

    # --- enqueueing -------------------------------------------------------------------------------------------

    async def enqueue_raw(self, queue: str, job_type: str, inputs: Callable[[int], dict[str, Any]], n: int,
                          *, with_run_id: bool = False) -> None:
        """``n`` raw arq jobs, the way a plain arq user enqueues them (``with_run_id``: job ``i`` names run ``i``)."""
        redis = self.require_redis()

        async def one(i: int) -> None:
            run: dict[str, Any] = {"run_id": i} if with_run_id else {}
            job = await redis.enqueue_job(job_type, tenant_id=self.tenants[i % len(self.tenants)].id,
                                          inputs=inputs(i), _job_id=f"{queue}:j{i}", _queue_name=queue, **run)
            if job is None:
                raise BenchError(f"enqueue of job {i} on {queue} was refused (job id exists)")

        for start in range(0, n, 200):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 200))))

    async def dispatch_many(self, settings: Settings, n: int, label: str) -> None:
        rt = await Runtime.start(settings, pool_size=20)
        try:
            async def one(i: int) -> None:
                await dispatch(rt, bw.NOOP_TYPE, tenant=self.tenants[i % len(self.tenants)].external_id,
                               inputs={"n": i, "run": label})

            for start in range(0, n, 16):
                await asyncio.gather(*(one(i) for i in range(start, min(n, start + 16))))
        finally:
            await rt.close()
        await self.analyze(db.database_name(settings), "operation_runs")

    async def defer_procrastinate(self, n: int) -> None:
        bench = bw.procrastinate_app(self.procrastinate_dsn, pool_size=4)
        async with bench.app.open_async():
            for start in range(0, n, 1000):
                await bench.task.batch_defer_async(*({"n": i} for i in range(start, min(n, start + 1000))))
        await self.analyze(self.procrastinate_db, "procrastinate_jobs")

    async def analyze(self, database: str, table: str) -> None:
        """Fresh planner statistics after a bulk load, as autovacuum gives a busy table in steady state. Without
        them procrastinate drained freshly deferred jobs at 160-340 jobs/s on this 2-core VM instead of ~420 (its
        planner statistics still described the table before the load), which flattered the tracked/procrastinate
        ratio. The ledger gets the same treatment before each tracked drain, for symmetry."""
        await self.execute(database, f"ANALYZE {table}")

    async def execute(self, database: str, *statements: str) -> None:
        """Statements, in order, on one short-lived connection to ``database``."""
        async with self.connection(database) as conn:
            for sql in statements:
                await conn.execute(sql)

    async def fetchval(self, database: str, sql: str, *args: Any) -> Any:
        """One statement on a short-lived connection to ``database``."""
        async with self.connection(database) as conn:
            return await conn.fetchval(sql, *args)

    async def queue_length(self, queue: str) -> int:
        return int(await self.require_redis().zcard(queue))

    async def ledger_summary(self, database: str, queue: str) -> dict[str, Any]:
        async with self.connection(database) as conn:
            row = await conn.fetchrow(
                """SELECT count(*) AS total,
                          count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded,
                          count(*) FILTER (WHERE outcome <> 'skipped') AS executed,
                          count(*) FILTER (WHERE status <> 'completed') AS active
                   FROM operation_runs WHERE queue_name = $1""", queue)
            reasons = await conn.fetch(
                """SELECT reason_code, count(*) AS n FROM operation_runs
                   WHERE queue_name = $1 AND outcome = 'skipped' GROUP BY reason_code""", queue)
        assert row is not None
        return {**dict(row), "skipped_by_reason": {str(r["reason_code"]): int(r["n"]) for r in reasons}}

    # --- 1. throughput ----------------------------------------------------------------------------------------

    def _label(self, base: str) -> str:
        self._runs[base] += 1
        return f"{base}-{self._runs[base]}"

    async def run_bare(self, workers: int) -> Drain:
        n, label = self.plan.jobs, self._label(f"bare{workers}")
        queue = self.queue(label)
        await self.enqueue_raw(queue, bw.NOOP_TYPE, lambda i: {"n": i}, n)
        settings = self.settings_for(self.main_db, queue)
        drained = await self.drain(label, [self.arq_worker("Bare", settings)] * workers, jobs=n)
        self._expect(f"bare arq ({label}) executions", drained.executions(bw.NOOP_TYPE), n)
        if await self.queue_length(queue):
            raise BenchError(f"bare arq left jobs in {queue}")
        return drained

    async def run_stub_gate(self, workers: int) -> Drain:
        """Diagnostic: dispatched runs drained by the tracked worker whose gate statements are ``SELECT 1``."""
        n, label = self.plan.jobs, self._label(f"stub{workers}")
        queue = self.queue(label)
        settings = self.settings_for(self.main_db, queue)
        await self.dispatch_many(settings, n, label)
        drained = await self.drain(label, [self.arq_worker("StubGate", settings)] * workers, jobs=n,
                                   databases=(self.main_db,))
        self._expect(f"stub gate ({label}) body executions", drained.executions(bw.NOOP_TYPE), n)
        return drained

    async def run_barebones(self, workers: int) -> Drain:
        """Diagnostic: bare arq plus two prepared UPDATEs per job on a minimal table (see bench_worker)."""
        n, label = self.plan.jobs, self._label(f"barebones{workers}")
        queue = self.queue(label)
        await self.execute(self.main_db, bw.BAREBONES_DDL, "TRUNCATE bench_barebones",
                           f"INSERT INTO bench_barebones (id) SELECT g FROM generate_series(0, {int(n) - 1}) g")
        await self.analyze(self.main_db, "bench_barebones")
        await self.enqueue_raw(queue, bw.NOOP_TYPE, lambda i: {"n": i}, n, with_run_id=True)
        settings = self.settings_for(self.main_db, queue)
        drained = await self.drain(label, [self.arq_worker("BareBones", settings)] * workers, jobs=n,
                                   databases=(self.main_db,))
        self._expect(f"bare-bones ({label}) executions", drained.executions(bw.NOOP_TYPE), n)
        done = await self.fetchval(self.main_db, "SELECT count(*) FROM bench_barebones WHERE status = 'completed'")
        self._expect(f"bare-bones ({label}) completed rows", int(done), n)
        return drained

    async def run_tracked(self, workers: int, *, raw: bool = False) -> Drain:
        n, label = self.plan.jobs, self._label(f"{'raw' if raw else 'tracked'}{workers}")
        queue = self.queue(label)
        settings = self.settings_for(self.main_db, queue)
        if raw:
            await self.enqueue_raw(queue, bw.NOOP_TYPE, lambda i: {"n": i, "run": label}, n)
        else:
            await self.dispatch_many(settings, n, label)
        drained = await self.drain(label, [self.arq_worker("Tracked", settings)] * workers, jobs=n,
                                   databases=(self.main_db,))
        self._expect(f"tracked ({label}) body executions", drained.executions(bw.NOOP_TYPE), n)
        ledger = await self.ledger_summary(self.main_db, queue)
        self._expect(f"tracked ({label}) succeeded runs in the ledger", int(ledger["succeeded"]), n)
        self._expect(f"tracked ({label}) runs in the ledger", int(ledger["total"]), n)
        return drained

    async def run_procrastinate(self, workers: int) -> Drain:
        n, label = self.plan.jobs, self._label(f"procrastinate{workers}")
        await self.defer_procrastinate(n)
        drained = await self.drain(label, [self.procrastinate_worker(self.procrastinate_dsn)] * workers, jobs=n,
                                   databases=(self.procrastinate_db,))
        self._expect(f"procrastinate ({label}) executions", drained.executions(bw.PROCRASTINATE_TASK), n)
        left = await self.fetchval(self.procrastinate_db,
                                   "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'")
        self._expect("procrastinate jobs not succeeded", int(left), 0)
        return drained

    @staticmethod
    def _expect(what: str, got: int, expected: int) -> None:
        if got != expected:
            raise BenchError(f"{what}: expected {expected}, got {got}")

    async def run_contender(self, name: str, workers: int) -> Drain:
        if name == "bare":
            return await self.run_bare(workers)
        if name == "tracked":
            return await self.run_tracked(workers)
        if name == "raw":
            return await self.run_tracked(workers, raw=True)
        if name == "stub":
            return await self.run_stub_gate(workers)
        if name == "barebones":
            return await self.run_barebones(workers)
        return await self.run_procrastinate(workers)

    async def throughput(self) -> None:
        """Each contender drains N no-op jobs; the best of ``repeats`` runs (alternating order) is reported."""
        n, r = self.plan.jobs, self.results
        runs: dict[str, list[Drain]] = {}
        contenders = ["bare", "tracked", "procrastinate"]
        schedule = [(name, 1) for rep in range(self.plan.repeats)
                    for name in (contenders if rep % 2 == 0 else contenders[::-1])]
        if not self.plan.quick:
            schedule += [(name, 2) for name in contenders] + [("raw", 1), ("stub", 1), ("barebones", 1)]
        for name, workers in schedule:
            drained = await self.run_contender(name, workers)
            runs.setdefault(f"{name}{workers}", []).append(drained)
            flushes = drained.gate_flushes()
            print(f"  {name}, {workers} worker(s): {n / drained.seconds:,.0f} jobs/s; CPU per job: worker "
                  f"{drained.worker_cpu_s() / n * 1000:.2f} ms, postgres {drained.postgres_cpu_s / n * 1000:.2f} ms;"
                  f" machine {drained.machine_busy:.0%} busy, {drained.steal:.0%} stolen"
                  + (f"; gate statements per job {flushes / n:.2f}" if flushes else ""), flush=True)

        def best(key: str) -> Drain:
            return min(runs[key], key=lambda d: d.seconds)

        r["throughput_samples_jobs_s"] = {k: [round(n / d.seconds, 1) for d in v] for k, v in runs.items()}
        r["worker_startup_s"] = {k: [round(d.startup_s, 2) for d in v] for k, v in runs.items()}
        r["worker_cpu_ms_per_job"] = {k: [round(d.worker_cpu_s() / n * 1000, 3) for d in v]
                                      for k, v in runs.items()}
        r["postgres_cpu_ms_per_job"] = {k: [round(d.postgres_cpu_s / n * 1000, 3) for d in v]
                                        for k, v in runs.items()}
        r["gate_statements_per_job"] = {k: [round(d.gate_flushes() / n, 3) for d in v]
                                        for k, v in runs.items() if any(d.gate_flushes() for d in v)}
        r["machine_busy_while_draining"] = {k: [round(d.machine_busy, 2) for d in v] for k, v in runs.items()}
        r["cpu_steal_while_draining"] = {k: [round(d.steal, 3) for d in v] for k, v in runs.items()}
        for workers, suffix in ((1, ""), (2, "_2w")):
            if f"bare{workers}" not in runs:
                continue
            bare, tracked, procr = best(f"bare{workers}"), best(f"tracked{workers}"), best(f"procrastinate{workers}")
            r[f"throughput_bare_jobs_s{suffix}"] = n / bare.seconds
            r[f"throughput_tracked_jobs_s{suffix}"] = n / tracked.seconds
            r[f"throughput_procrastinate_jobs_s{suffix}"] = n / procr.seconds
            r[f"throughput_ratio{suffix}"] = bare.seconds / tracked.seconds
            r[f"throughput_tracked_vs_procrastinate{suffix}"] = procr.seconds / tracked.seconds
            r[f"tracked_metrics{suffix}"] = dict(tracked.metrics())
        # Each repeat drains bare arq and tracked back to back (the order alternates), so each pair shares the
        # machine's phase: their ratios show how far the noise alone moves the headline ratio within one run.
        pairs = r["throughput_ratio_pairs"] = [b.seconds / t.seconds
                                               for b, t in zip(runs["bare1"], runs["tracked1"], strict=True)]
        r.update(steadiness(pairs, runs["bare1"] + runs["tracked1"]))
        r["worker_rss_mb"] = max(d.rss_mb() for d in runs["tracked1"])
        r["worker_rss_bare_mb"] = max(d.rss_mb() for d in runs["bare1"])
        r["worker_rss_procrastinate_mb"] = max(d.rss_mb() for d in runs["procrastinate1"])
        if "stub1" in runs:
            r["throughput_stub_gate_jobs_s"] = n / best("stub1").seconds
            r["throughput_stub_gate_ratio"] = r["throughput_stub_gate_jobs_s"] / r["throughput_bare_jobs_s"]
        if "barebones1" in runs:
            r["throughput_barebones_jobs_s"] = n / best("barebones1").seconds
            r["throughput_barebones_ratio"] = r["throughput_barebones_jobs_s"] / r["throughput_bare_jobs_s"]
        if "raw1" in runs:
            r["throughput_tracked_raw_jobs_s"] = n / best("raw1").seconds
            r["throughput_raw_ratio"] = r["throughput_tracked_raw_jobs_s"] / r["throughput_bare_jobs_s"]

    async def tracking_cpu(self) -> None:
        """Diagnostic: CPU per tracked no-op delivery spent in opspolish's own code, the gate answered in-process
        (``bench_worker.InstantGate``: no round trip at all), ``CONCURRENCY`` deliveries at a time, each in a task of
        its own as arq runs them. Set beside what tracking adds to a worker's CPU per job in the drains above, it
        tells the library's Python from the round trips (and the cores they share) that make up the rest."""
        n, r = self.plan.jobs, self.results
        rt = await Runtime.start(self.settings_for(self.main_db, self.queue("cpu")), connect_to_redis=False,
                                 pool_size=2)
        rt.gate = bw.InstantGate(rt.gate._connect, rt.ledger)
        tenant = self.tenants[0].id
        before = bw.EXECUTIONS[bw.NOOP_TYPE]

        async def one(i: int) -> None:
            await execute(rt, bw.noop, run_id=i + 1, tenant=tenant, workspace_id=None, inputs={"n": i},
                          job_id=f"{rt.settings.queue_name}:run:{i + 1}")

        try:
            t0 = time.process_time()
            for start in range(0, n, CONCURRENCY):
                await asyncio.gather(*(one(i) for i in range(start, min(n, start + CONCURRENCY))))
            cpu_s = time.process_time() - t0
        finally:
            await rt.close()
        self._expect("in-process tracked deliveries (body executions)", bw.EXECUTIONS[bw.NOOP_TYPE] - before, n)
        r["tracking_cpu_us_per_job"] = cpu_s / n * 1e6
        cpu = r["worker_cpu_ms_per_job"]
        r["tracked_added_worker_cpu_us_per_job"] = 1000 * (sum(cpu["tracked1"]) / len(cpu["tracked1"])
                                                          - sum(cpu["bare1"]) / len(cpu["bare1"]))
        print(f"  opspolish's own code: {r['tracking_cpu_us_per_job']:.0f} us of CPU per delivery; tracking adds "
              f"{r['tracked_added_worker_cpu_us_per_job']:.0f} us to a worker's CPU per job in the drains", flush=True)

    # --- 3. duplicate storm -----------------------------------------------------------------------------------

    async def storm(self) -> None:
        """Two storms of one identity each and two sets of distinct jobs, drained in the order storm, distinct,
        distinct, storm: a machine that slows down or speeds up during the phase moves both sides alike."""
        n = self.plan.storm
        first_storm, first_distinct = await self._storm_drain(1), await self._distinct_drain(1)
        second_distinct, second_storm = await self._distinct_drain(2), await self._storm_drain(2)
        storms, distincts = [first_storm, second_storm], [first_distinct, second_distinct]

        ledger = await self.ledger_summary(self.main_db, self.queue("storm1"))
        r = self.results
        each = [s.executions(bw.STORM_TYPE) for s in storms]
        r["storm_executions_each"] = each
        r["storm_executions"] = max(each, key=lambda e: (abs(e - 1), e))  # the storm furthest from one execution
        r["storm_ledger_executed_runs"] = int(ledger["executed"])  # the ledger keys describe the first storm
        r["storm_ledger_rows"] = int(ledger["total"])
        r["storm_ledger_active_rows"] = int(ledger["active"])
        r["storm_skipped_by_reason"] = ledger["skipped_by_reason"]
        r["storm_gate_metrics"] = dict(storms[0].metrics())
        r["storm_drain_s_each"] = [s.seconds for s in storms]
        r["storm_distinct_drain_s_each"] = [d.seconds for d in distincts]
        r["storm_drain_s"] = sum(s.seconds for s in storms) / len(storms)
        r["storm_distinct_drain_s"] = sum(d.seconds for d in distincts) / len(distincts)
        r["storm_drain_ratio"] = r["storm_drain_s"] / r["storm_distinct_drain_s"]
        print(f"  storm: {' and '.join(map(str, each))} execution(s), drained in "
              f"{' and '.join(f'{s.seconds:.2f}' for s in storms)} s ({n:,} distinct: "
              f"{' and '.join(f'{d.seconds:.2f}' for d in distincts)} s)", flush=True)

    async def _storm_drain(self, no: int) -> Drain:
        """``plan.storm`` raw deliveries of one identity (its own per storm), drained by two tracked workers."""
        n, queue = self.plan.storm, self.queue(f"storm{no}")
        identity = {"storm": self.tag, "no": no}
        redis = self.require_redis()
        for start in range(0, n, 200):
            await asyncio.gather(*(
                redis.enqueue_job(bw.STORM_TYPE, tenant_id=self.tenants[0].id, inputs=identity,
                                  _job_id=f"{queue}:s{i}", _queue_name=queue)
                for i in range(start, min(n, start + 200))))
        self._expect("storm deliveries queued", await self.queue_length(queue), n)
        settings = self.settings_for(self.main_db, queue)
        return await self.drain(f"storm{no}", [self.arq_worker("Tracked", settings)] * 2, jobs=n)

    async def _distinct_drain(self, no: int) -> Drain:
        """As many raw deliveries as a storm, every one a distinct identity, drained the same way."""
        n, queue = self.plan.storm, self.queue(f"distinct{no}")
        await self.enqueue_raw(queue, bw.STORM_TYPE, lambda i: {"distinct": i, "no": no}, n)
        settings = self.settings_for(self.main_db, queue)
        drained = await self.drain(f"distinct{no}", [self.arq_worker("Tracked", settings)] * 2, jobs=n)
        self._expect("distinct jobs executed", drained.executions(bw.STORM_TYPE), n)
        return drained

    # --- 5. dispatch --------------------------------------------------------------------------------------------

    async def dispatch_rate(self) -> None:
        n, rounds = self.plan.dispatches, 4
        per = n // rounds
        redis = self.require_redis()
        bare_q, disp_q = self.queue("enqueue"), self.queue("dispatch")
        rt = await Runtime.start(self.settings_for(self.main_db, disp_q), redis=redis, pool_size=4)
        t_enqueue = t_dispatch = 0.0
        try:
            for warm in range(20):  # connections, prepared statements
                await dispatch(rt, bw.NOOP_TYPE, tenant=self.tenants[0].external_id, inputs={"warm": warm})
                await redis.enqueue_job(bw.NOOP_TYPE, tenant_id=self.tenants[0].id, inputs={"warm": warm},
                                        _job_id=f"{bare_q}:w{warm}", _queue_name=bare_q)
            for r in range(rounds):  # interleaved, so drift on a shared machine hits both alike
                t0 = time.perf_counter()
                for i in range(r * per, (r + 1) * per):
                    await redis.enqueue_job(bw.NOOP_TYPE, tenant_id=self.tenants[i % len(self.tenants)].id,
                                            inputs={"d": i}, _job_id=f"{bare_q}:d{i}", _queue_name=bare_q)
                t1 = time.perf_counter()
                for i in range(r * per, (r + 1) * per):
                    await dispatch(rt, bw.NOOP_TYPE, tenant=self.tenants[i % len(self.tenants)].external_id,
                                   inputs={"d": i})
                t2 = time.perf_counter()
                t_enqueue += t1 - t0
                t_dispatch += t2 - t1
        finally:
            await rt.close()
        done = rounds * per
        self.results["dispatch_per_s"] = done / t_dispatch
        self.results["enqueue_per_s"] = done / t_enqueue
        self.results["dispatch_ratio"] = t_enqueue / t_dispatch
        self.results["dispatch_p_mean_ms"] = t_dispatch / done * 1000
        print(f"  dispatch {done / t_dispatch:,.0f}/s vs enqueue_job {done / t_enqueue:,.0f}/s", flush=True)

    # --- 2 and 4. gate latency, empty ledger vs a large one ---------------------------------------------------

    async def load_history(self) -> float:
        """``history_rows`` completed runs in the scale ledger, in SQL; returns the seconds it took."""
        t0 = time.perf_counter()
        total, chunk = self.plan.history_rows, 50_000
        chunks = [(lo, min(total, lo + chunk) - 1) for lo in range(0, total, chunk)]
        done = 0

        async def loader(mine: list[tuple[int, int]]) -> None:  # one per core: the insert is CPU-bound
            nonlocal done
            async with self.connection(self.scale_db) as conn:
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
        async with self.connection(self.scale_db) as conn:
            await conn.execute("VACUUM (ANALYZE) operation_runs", timeout=600)
            count = await conn.fetchval("SELECT count(*) FROM operation_runs")
            dangling = await conn.fetchval(
                """SELECT count(*) FROM operation_runs o
                   WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = o.tenant_id
                                     AND t.workspace_id = o.workspace_id)""", timeout=600)
        self._expect("historical runs", int(count), total)
        self._expect("historical runs without their tenant", int(dangling), 0)
        return time.perf_counter() - t0

    async def queue_run(self, rt: Runtime, i: int, data: dict[str, Any]) -> tuple[Tenant, Dispatched]:
        """A queued no-op run of tenant ``i`` (round robin) with inputs ``data``, dispatched as a caller would."""
        tenant = self.tenants[i % len(self.tenants)]
        queued = await rt.ledger.dispatch(tenant=tenant.id, workspace_id=None, run_type=bw.NOOP_TYPE,
                                          fingerprint=fingerprint(data), context=canonical_inputs(data),
                                          queue_name=rt.settings.queue_name)
        if queued is None or not queued.created:
            raise BenchError(f"could not queue run {data}")
        return tenant, queued

    @staticmethod
    async def claim_run(gate: GateBatcher, tenant: Tenant, queued: Dispatched, owner: uuid.UUID,
                        queue_name: str) -> Claim:
        """A worker's claim of a dispatched run, through ``gate``."""
        return await gate.claim(run_id=queued.run_id, tenant=tenant.id, workspace_id=None, run_type=bw.NOOP_TYPE,
                                fingerprint=None, context=None, job_id=queued.job_id, queue_name=queue_name,
                                lease_owner=owner, cooldown_s=900.0, lease_ttl_s=60.0)

    @staticmethod
    async def complete_run(gate: GateBatcher, run_id: int, owner: uuid.UUID) -> bool:
        """A worker's completion write of a no-op run, through ``gate``."""
        return await gate.complete(run_id, owner, outcome="succeeded", counts=ZERO_COUNTS, reason_code=None,
                                   reason_message=None)

    async def measure_gate(self, rt: Runtime, iterations: int, label: str) -> GateSamples:
        """Claims and completions, one at a time, as a worker makes them (through its gate batcher: the gate's
        own connection and prepared statement; a lone caller's operation is flushed on the next loop turn)."""
        out = GateSamples()
        queue = rt.settings.queue_name
        perf = time.perf_counter
        for i in range(iterations):
            tenant, queued = await self.queue_run(rt, i, {"gate": label, "i": i})
            owner = uuid.uuid4()
            t0 = perf()
            claim = await self.claim_run(rt.gate, tenant, queued, owner, queue)
            t1 = perf()
            done = await self.complete_run(rt.gate, queued.run_id, owner)
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
            done = await self.complete_run(rt.gate, claim.run_id, owner)
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

    async def seq_scans(self, database: str) -> int:
        value = await self.fetchval(database,
                                    "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'operation_runs'")
        return int(value or 0)

    async def gate(self) -> None:
        n, rounds = self.plan.gate_iterations, 4
        # Both ledgers run the same loop, floors included, so the scale/empty ratios compare like with like; only
        # the empty ledger's floors are reported.
        for database in (self.empty_db, self.scale_db):
            await self.execute(database, *DURABLE_FLOOR_DDL)
        per = max(1, n // rounds)
        empty_rt = await Runtime.start(self.settings_for(self.empty_db, self.queue("gate")), connect_to_redis=False,
                                       pool_size=2)
        scale_rt = await Runtime.start(self.settings_for(self.scale_db, self.queue("gate")), connect_to_redis=False,
                                       pool_size=2)
        empty, scale = GateSamples(), GateSamples()
        seq_before = await self.seq_scans(self.scale_db)
        try:
            await self.measure_gate(empty_rt, 50, "warm")
            await self.measure_gate(scale_rt, 50, "warm")
            for round_no in range(rounds):  # interleaved, alternating which ledger goes first
                pairs = [(empty_rt, empty), (scale_rt, scale)]
                for rt, samples in pairs if round_no % 2 == 0 else reversed(pairs):
                    samples.extend(await self.measure_gate(rt, per, f"r{round_no}"))
        finally:
            await empty_rt.close()
            await scale_rt.close()
        await asyncio.sleep(1.0)  # closed backends have flushed their table statistics by now
        seq_after = await self.seq_scans(self.scale_db)

        r = self.results
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
              f"{self.plan.history_rows:,} runs", flush=True)

    async def server_cpu(self) -> None:
        """Server CPU per gate statement: ``gate_iterations`` (at least 1,000) claims of dispatched runs, then
        their completions, one at a time through a gate batcher (a lone operation is one prepared statement and
        one commit, as in a worker whose jobs arrive one by one), and the two floors on a plain connection; each
        timed as the CPU its backend used, read from /proc. Unlike a drain, this moves little with the machine's
        other work (within 20% across runs on one VM, where bare arq's drains moved by 35%), so a change to the
        gate's SQL or to the ledger's schema can be weighed here when drains cannot resolve it. None when
        PostgreSQL's backends are not this host's processes (another host, a container).
        """
        # /proc counts CPU in clock ticks, sampled: 300 SELECT 1s (the quick plan's gate iterations) read as 0 us.
        n = max(self.plan.gate_iterations, 1_000)
        claim_s, complete_s = await self._server_cpu_gate(n)
        durable_s, select1_s = await self._server_cpu_floors(n)
        r = self.results
        r["server_cpu_statements_each"] = n
        for key, seconds in (("claim", claim_s), ("complete", complete_s), ("durable_floor", durable_s),
                             ("select1", select1_s)):
            r[f"server_cpu_{key}_us"] = None if seconds is None else seconds / n * 1e6
        if r["server_cpu_claim_us"] is None:
            print("  server CPU: PostgreSQL's backends are not this host's processes, not measured", flush=True)
        else:
            print(f"  server CPU per claim {r['server_cpu_claim_us']:.0f} us, per completion "
                  f"{r['server_cpu_complete_us']:.0f} us", flush=True)

    async def _server_cpu_gate(self, n: int) -> tuple[float | None, float | None]:
        """The gate backend's CPU seconds for ``n`` claims, then for their ``n`` completions."""
        settings = self.settings_for(self.empty_db, self.queue("server-cpu"))
        gate_pids: list[int] = []

        async def connect_gate() -> asyncpg.Connection:
            conn = await db.connect_gate(settings)
            gate_pids.append(int(await conn.fetchval("SELECT pg_backend_pid()")))
            return conn

        rt = await Runtime.start(settings, connect_to_redis=False, pool_size=2)
        gate = GateBatcher(connect_gate, rt.ledger)
        try:
            runs = [(*await self.queue_run(rt, i, {"server_cpu": i}), uuid.uuid4()) for i in range(n + 1)]

            async def claim_all(batch: list[tuple[Tenant, Dispatched, uuid.UUID]]) -> None:
                for tenant, queued, owner in batch:
                    claim = await self.claim_run(gate, tenant, queued, owner, settings.queue_name)
                    if claim.decision != "claimed":
                        raise BenchError(f"server CPU: run {queued.run_id} was {claim.decision}")

            async def complete_all(batch: list[tuple[Tenant, Dispatched, uuid.UUID]]) -> None:
                for _, queued, owner in batch:
                    if not await self.complete_run(gate, queued.run_id, owner):
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
        return _span(t0, t1), _span(t1, t2)

    async def _server_cpu_floors(self, n: int) -> tuple[float | None, float | None]:
        """A backend's CPU seconds for ``n`` committed one-row UPDATEs, then for ``n`` SELECT 1s."""
        async with self.connection(self.empty_db) as conn:
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
        return _span(t0, t1), _span(t1, t2)

    # --- the whole run ----------------------------------------------------------------------------------------

    async def phase(self, name: str, step: Callable[[], Awaitable[Any]]) -> None:
        print(f"== {name}", flush=True)
        t0, cpu0 = time.perf_counter(), MachineCpu.read()
        await step()
        self.phase_s[name] = round(time.perf_counter() - t0, 2)
        self.phase_steal[name] = round((MachineCpu.read() - cpu0).steal_share, 3)

    async def run(self) -> None:
        await self.phase("setup (databases, seed, procrastinate schema)", self.setup)
        await self.phase("1. throughput", self.throughput)
        await self.phase("1. tracking code's own CPU, no I/O (diagnostic)", self.tracking_cpu)
        await self.phase(STORM_PHASE, self.storm)
        await self.phase("5. dispatch", self.dispatch_rate)

        async def history() -> None:
            self.results["history_load_s"] = await self.load_history()

        await self.phase(f"4. loading {self.plan.history_rows:,} historical runs", history)
        await self.phase(GATE_PHASE, self.gate)
        await self.phase(SERVER_CPU_PHASE, self.server_cpu)


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


_TICK_S = 1 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def is_local_backend(pid: int) -> bool:
    """Whether ``pid`` (a ``pg_backend_pid()``) is a PostgreSQL process on this host: a server on another host, or
    in a container with its own process ids, names processes this host's /proc does not show, or shows as others."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"postgres")
    except OSError:
        return False


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used, from /proc; None if it is not readable here. In clock
    ticks (10 ms on Linux), so a figure resolves what it sums over many statements, not one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * _TICK_S
    except (OSError, IndexError, ValueError):
        return None


class BackendCpu:
    """CPU seconds used by the PostgreSQL backends serving some databases, sampled from /proc.

    Backends exit with their worker, so they are sampled while the workers drain; the last sample of each
    is what it used (at most one sampling interval is missed per backend).
    """

    def __init__(self, databases: tuple[str, ...]) -> None:
        self.databases = tuple(f" {name} " for name in databases)
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._ignored: set[int] = set()

    def sample(self) -> None:
        try:
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return
        for pid in pids:
            if pid in self._ignored:
                continue
            try:
                if pid not in self.last:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if not cmdline.startswith("postgres:") or not any(db in cmdline for db in self.databases):
                        self._ignored.add(pid)
                        continue
            except OSError:
                continue
            used = proc_cpu_s(pid)
            if used is None:
                continue
            self.first.setdefault(pid, used)
            self.last[pid] = used

    def seconds(self, *, new_from_zero: set[int]) -> float:
        return sum(self.last[pid] - (0.0 if pid in new_from_zero else self.first[pid]) for pid in self.last)


@dataclass(frozen=True)
class MachineCpu:
    """Jiffies of all cores from /proc/stat (zeros where there is none): busy, stolen, and all of them.

    ``steal`` is time a virtual machine's cores were ready to run but the hypervisor ran another guest: on a
    shared cloud VM it comes and goes with the neighbours, and a drain that lost a tenth of its cores to it is
    not a figure of the code. It is not counted as busy (the kernel counts it apart from user and system time).
    """

    busy: int = 0
    steal: int = 0
    total: int = 0

    @classmethod
    def read(cls) -> MachineCpu:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return cls()
        # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user time.
        fields = fields[:8]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        steal = fields[7] if len(fields) > 7 else 0
        return cls(sum(fields) - idle - steal, steal, sum(fields))

    def __sub__(self, other: MachineCpu) -> MachineCpu:
        return MachineCpu(self.busy - other.busy, self.steal - other.steal, self.total - other.total)

    @property
    def busy_share(self) -> float:
        return self.busy / max(self.total, 1)

    @property
    def steal_share(self) -> float:
        return self.steal / max(self.total, 1)


def steadiness(pairs: list[float], drains: list[Drain]) -> dict[str, Any]:
    """Whether the one-worker ratio is a figure of the code rather than of the machine's moment.

    Steady when the back-to-back pairs agree and none of their drains lost a noticeable share of the cores to the
    hypervisor. Both are needed: on one VM bare arq's two drains lost 24% and 30% of the cores and tracked's first
    23%, and the pairs still agreed (1.07 and 1.23), both wrong. With one pair and no steal there is nothing to
    compare, and no claim is made (no ``throughput_steady`` key).
    """
    out: dict[str, Any] = {}
    unsteady = []
    if len(pairs) > 1:
        spread = out["throughput_ratio_pair_spread"] = max(pairs) / min(pairs) - 1
        if spread > STEADY_SPREAD:
            unsteady.append(f"the pairs disagree by {spread:.0%}")
    steal = out["throughput_max_steal"] = max(d.steal for d in drains)
    if steal > STEADY_MAX_STEAL:
        unsteady.append(f"a drain lost {steal:.0%} of the cores to the hypervisor")
    if unsteady or len(pairs) > 1:
        out["throughput_steady"] = not unsteady
        out["throughput_unsteady_because"] = "; ".join(unsteady)
    return out


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# --- report --------------------------------------------------------------------------------------------------

def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def _throughput_verdict(r: dict[str, Any]) -> str:
    """A one-worker ratio from an unsteady run (see steadiness) is no verdict on the code: it says so instead."""
    if r.get("throughput_steady") is False:
        return "UNSTEADY: " + _verdict(r["throughput_ratio"] >= 0.6).lower() + " on this run, no verdict"
    return _verdict(r["throughput_ratio"] >= 0.6)


def _phase_steal_row(r: dict[str, Any], phase: str, what: str) -> list[tuple[str, str, str, str]]:
    """The row with the CPU the hypervisor stole during one phase of the run, if it was measured."""
    steal = r.get("phase_cpu_steal", {})
    return [(f"   CPU stolen by the hypervisor during {what}", f"{steal[phase]:.0%}", "", "")] if phase in steal else []


def _steal(r: dict[str, Any], workers: int) -> str:
    """The steal share of each drain of bare arq, then of tracked, with ``workers`` workers ("" if unknown)."""
    steal = r.get("cpu_steal_while_draining", {})
    if f"bare{workers}" not in steal:
        return ""
    return " / ".join(", ".join(f"{x:.0%}" for x in steal[f"{name}{workers}"]) for name in ("bare", "tracked"))


def _server_cpu_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    n = r.get("server_cpu_statements_each")
    if n is None:  # results written before this section existed
        return []
    title = f"   server CPU per statement, one at a time, empty ledger ({n:,} each; the backend's, from /proc)"
    if r["server_cpu_claim_us"] is None:
        return [(title, "n/a", "", "(PostgreSQL's backends are not this host's processes)")]
    return [
        (title, "", "", ""),
        ("     claim of a dispatched run / completion write",
         f"{r['server_cpu_claim_us']:,.0f} / {r['server_cpu_complete_us']:,.0f} us", "", ""),
        ("     floors: a one-row UPDATE, committed / SELECT 1",
         f"{r['server_cpu_durable_floor_us']:,.0f} / {r['server_cpu_select1_us']:,.0f} us", "", ""),
    ]


def table_rows(r: dict[str, Any], plan: Plan) -> list[tuple[str, str, str, str]]:
    """(metric, value, target, verdict) rows; a section header has empty value and target."""
    best = f"best of {plan.repeats} runs"
    rows: list[tuple[str, str, str, str]] = [
        (f"1. throughput, no-op jobs, N={plan.jobs:,} per run, max_jobs/concurrency={CONCURRENCY}", "", "", "")]
    for workers, suffix in ((1, ""), (2, "_2w")):
        if f"throughput_ratio{suffix}" not in r:
            rows.append((f"   {workers} worker processes: not run with --quick", "", "", ""))
            continue
        ratio = r[f"throughput_ratio{suffix}"]
        note = f" ({best})" if workers == 1 and plan.repeats > 1 else ""
        rows += [
            (f"   bare arq, {workers} worker(s){note}", f"{r[f'throughput_bare_jobs_s{suffix}']:,.0f} jobs/s",
             "ref ~3,200 (1 worker)" if workers == 1 else "", ""),
            (f"   opspolish tracked (dispatched), {workers} worker(s){note}",
             f"{r[f'throughput_tracked_jobs_s{suffix}']:,.0f} jobs/s", "", ""),
            (f"   procrastinate, {workers} worker(s){note}",
             f"{r[f'throughput_procrastinate_jobs_s{suffix}']:,.0f} jobs/s",
             "ref ~970 (1 worker)" if workers == 1 else "", ""),
            (f"   ratio tracked / bare, {workers} worker(s)", f"{ratio:.2f}", ">= 0.60",
             _throughput_verdict(r) if workers == 1 else _verdict(ratio >= 0.6)),
            *([("   ratio tracked / bare per back-to-back pair (the noise within this run)",
                " / ".join(f"{x:.2f}" for x in r["throughput_ratio_pairs"]),
                f"spread <= {STEADY_SPREAD:.0%}",
                ("ok" if r["throughput_ratio_pair_spread"] <= STEADY_SPREAD else "UNSTEADY")
                + f" ({r['throughput_ratio_pair_spread']:.0%})")]
              if workers == 1 and "throughput_ratio_pair_spread" in r else []),
            *([(f"   CPU stolen by the hypervisor while draining, bare / tracked, {workers} worker(s)",
                _steal(r, workers), f"<= {STEADY_MAX_STEAL:.0%} each" if workers == 1 else "",
                ("ok" if r["throughput_max_steal"] <= STEADY_MAX_STEAL else "UNSTEADY")
                if workers == 1 and "throughput_max_steal" in r else "")] if _steal(r, workers) else []),
            (f"   ratio tracked / procrastinate, {workers} worker(s)",
             f"{r[f'throughput_tracked_vs_procrastinate{suffix}']:.2f}", "", ""),
        ]
    if "throughput_tracked_raw_jobs_s" in r:
        rows.append(("   opspolish tracked (raw enqueue_job, the gate creates the run), 1 worker",
                     f"{r['throughput_tracked_raw_jobs_s']:,.0f} jobs/s", ">= 0.60 x bare",
                     _verdict(r["throughput_raw_ratio"] >= 0.6) + f" ({r['throughput_raw_ratio']:.2f})"))
    if "throughput_stub_gate_jobs_s" in r:
        rows.append(("   diagnostic: tracked, every gate statement a SELECT 1 (no ledger work), 1 worker",
                     f"{r['throughput_stub_gate_jobs_s']:,.0f} jobs/s", "", f"({r['throughput_stub_gate_ratio']:.2f}"
                     " x bare)"))
    if "throughput_barebones_jobs_s" in r:
        rows.append(("   diagnostic: bare arq + 2 prepared UPDATEs per job, minimal table, no gate, 1 worker",
                     f"{r['throughput_barebones_jobs_s']:,.0f} jobs/s", "ref 0.59 x bare",
                     f"({r['throughput_barebones_ratio']:.2f} x bare)"))
    rows.append(("   diagnostic: opspolish's own code per delivery, gate answered in-process (no I/O)",
                 f"{r['tracking_cpu_us_per_job']:,.0f} us CPU", "",
                 f"(tracking adds {r['tracked_added_worker_cpu_us_per_job']:,.0f} us per job to a worker's CPU)"))
    samples = r["gate_samples_per_path"]
    rows += [
        (f"2. gate latency, empty ledger, one caller, via the gate batcher like a worker ({samples:,} per path)",
         "", "", ""),
        ("   claim p50 (worse path)", f"{r['gate_p50_ms']:.3f} ms", "<= 1.0 ms", _verdict(r["gate_p50_ms"] <= 1.0)),
        ("   claim p99 (worse path)", f"{r['gate_p99_ms']:.3f} ms", "<= 5.0 ms", _verdict(r["gate_p99_ms"] <= 5.0)),
        ("   claim of a dispatched run p50 / p99",
         f"{r['gate_dispatched_p50_ms']:.3f} / {r['gate_dispatched_p99_ms']:.3f} ms", "", ""),
        ("   claim of a raw delivery (creates the run) p50 / p99",
         f"{r['gate_raw_p50_ms']:.3f} / {r['gate_raw_p99_ms']:.3f} ms", "", ""),
        ("   completion write p50 / p99", f"{r['complete_p50_ms']:.3f} / {r['complete_p99_ms']:.3f} ms",
         "", ""),
        ("   floor: SELECT 1 through the worker pool p50 / p99",
         f"{r['pool_round_trip_p50_ms']:.3f} / {r['pool_round_trip_p99_ms']:.3f} ms", "", ""),
        ("   floor: a one-row UPDATE, committed (round trip + WAL flush) p50 / p99",
         f"{r['durable_write_p50_ms']:.3f} / {r['durable_write_p99_ms']:.3f} ms", "", ""),
        *_phase_steal_row(r, GATE_PHASE, "the gate runs (this section and 4.)"),
        *_server_cpu_rows(r),
        (f"3. duplicate storm, {plan.storm:,} deliveries of one identity, 2 workers (two storms)", "", "", ""),
        ("   executions, each storm", " and ".join(map(str, r["storm_executions_each"])), "= 1",
         _verdict(r["storm_executions"] == 1)),
        ("   ledger rows, first storm (executed + skipped)", f"{r['storm_ledger_executed_runs']} + "
         f"{r['storm_ledger_rows'] - r['storm_ledger_executed_runs']}", f"1 + {plan.storm - 1}",
         _verdict(r["storm_ledger_rows"] == plan.storm and r["storm_ledger_executed_runs"] == 1)),
        (f"   drain time: storm vs {plan.storm:,} distinct jobs (means; storm, distinct, distinct, storm)",
         f"{r['storm_drain_s']:.2f} s vs {r['storm_distinct_drain_s']:.2f} s", "storm <= distinct",
         _verdict(r["storm_drain_s"] <= r["storm_distinct_drain_s"]) + f" ({r['storm_drain_ratio']:.2f}x)"),
        ("   busy-lock deferrals during the first storm", f"{r['storm_gate_metrics'].get('deferred:busy', 0):,}", "",
         ""),
        *_phase_steal_row(r, STORM_PHASE, "the storms and the distinct jobs"),
        (f"4. ledger at scale: {plan.history_rows:,} historical runs vs empty", "", "", ""),
        ("   claim p50 / p99 at scale (worse path)",
         f"{r['scale_gate_p50_ms']:.3f} / {r['scale_gate_p99_ms']:.3f} ms", "", ""),
        ("   claim p50 ratio, scale / empty (worse path)", f"{r['scale_gate_p50_ratio']:.2f}", "<= 1.25",
         _verdict(r["scale_gate_p50_ratio"] <= 1.25)),
        ("   claim p99 ratio, scale / empty", f"{r['scale_gate_p99_ratio']:.2f}", "", ""),
        ("   completion p50 ratio, scale / empty", f"{r['scale_complete_p50_ratio']:.2f}", "", ""),
        ("   sequential scans of operation_runs during the gate runs", f"{r['scale_seq_scans_during_gate']}",
         "0", _verdict(r["scale_seq_scans_during_gate"] == 0)),
        ("5. dispatch, one caller", "", "", ""),
        ("   dispatch() vs bare enqueue_job", f"{r['dispatch_per_s']:,.0f}/s vs {r['enqueue_per_s']:,.0f}/s", "", ""),
        ("   dispatch ratio (dispatch / enqueue_job)", f"{r['dispatch_ratio']:.2f}", "", ""),
        ("6. memory", "", "", ""),
        ("   peak RSS, tracked worker (1 worker run)", f"{r['worker_rss_mb']:.1f} MB", "", ""),
        ("   peak RSS, bare arq / procrastinate worker",
         f"{r['worker_rss_bare_mb']:.1f} / {r['worker_rss_procrastinate_mb']:.1f} MB", "", ""),
    ]
    return rows


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    w_metric = max(len(r[0]) for r in rows if r[1] or r[2])
    w_value = max(len("value"), *(len(r[1]) for r in rows))
    w_target = max(len("target"), *(len(r[2]) for r in rows))
    line = f"{'metric':<{w_metric}}  {'value':>{w_value}}  {'target':<{w_target}}  verdict"
    print(line)
    print("-" * len(line))
    for metric, value, target, verdict in rows:
        if not value and not target:
            print(metric)
        else:
            print(f"{metric:<{w_metric}}  {value:>{w_value}}  {target:<{w_target}}  {verdict}".rstrip())


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


async def _main(plan: Plan, out: Path = RESULTS_PATH) -> int:
    load_start = os.getloadavg()
    cpus = os.cpu_count() or 1
    configure_bench_logging()
    try:
        base = Settings(log_format="json", max_jobs=CONCURRENCY)
    except Exception as exc:
        raise BenchError(f"settings: {exc}") from exc
    started = time.perf_counter()
    print(f"opspolish bench ({'quick' if plan.quick else 'full'}): load average at start "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} on {cpus} cores", flush=True)
    if load_start[0] > cpus * 0.75:
        print(f"bench: warning: the machine is busy (load {load_start[0]:.2f} on {cpus} cores); "
              "figures will be noisy", flush=True)
    with tempfile.TemporaryDirectory(prefix="opspolish-bench-") as tmp:
        bench = Bench(plan, base, Path(tmp))
        try:
            await asyncio.wait_for(bench.run(), plan.timeout_s)
        except TimeoutError:
            raise BenchError(f"the benchmark did not finish within {plan.timeout_s:g} s") from None
        finally:
            await bench.cleanup()
    total_s = time.perf_counter() - started
    r = bench.results
    r.update({
        "quick": plan.quick,
        "jobs_per_throughput_run": plan.jobs,
        "storm_deliveries": plan.storm,
        "history_rows": plan.history_rows,
        "dispatches_timed": (plan.dispatches // 4) * 4,
        "arq_settings": bw.arq_settings_summary(),
        "procrastinate_concurrency": CONCURRENCY,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "cpu_count": cpus,
        "python": platform.python_version(),
        "phase_seconds": bench.phase_s,
        "phase_cpu_steal": bench.phase_steal,
        "total_seconds": round(total_s, 2),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    r["targets_met"] = {
        # Never met on an unsteady run (see steadiness): best against best there is not a figure of the code.
        "throughput_ratio": r["throughput_ratio"] >= 0.6 and r.get("throughput_steady") is not False,
        "gate_p50_ms": r["gate_p50_ms"] <= 1.0,
        "gate_p99_ms": r["gate_p99_ms"] <= 5.0,
        "storm_executions": r["storm_executions"] == 1,
        "storm_drain": r["storm_drain_s"] <= r["storm_distinct_drain_s"],
        "scale_gate_p50_ratio": r["scale_gate_p50_ratio"] <= 1.25,
    }
    print()
    print_table(table_rows(r, plan))
    print("\nphases: " + ", ".join(f"{k} {v:.1f} s ({bench.phase_steal[k]:.0%} stolen)"
                                  for k, v in bench.phase_s.items()))
    print(f"total {total_s:.1f} s; load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_rounded(r), indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    if r["storm_executions"] != 1:
        print(f"bench: FAILED: a duplicate storm executed {r['storm_executions']} times (must be 1)",
              file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="one-worker throughput runs per contender, back-to-back pairs (default: 2, quick 1);"
                             " more pairs on a noisy machine")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH,
                        help=f"where to write the figures (default: {RESULTS_PATH.relative_to(ROOT)})")
    args = parser.parse_args()
    plan = Plan.make(args.quick)
    if args.repeats is not None:
        if not 1 <= args.repeats <= 10:
            parser.error(f"--repeats: {args.repeats} is not between 1 and 10")
        extra = max(0, args.repeats - plan.repeats) * 3  # drains, each allowed what drain() allows one
        plan = replace(plan, repeats=args.repeats, timeout_s=plan.timeout_s + extra * (60.0 + plan.jobs / 50))

    async def runner() -> int:
        task = asyncio.current_task()
        if task is not None:  # SIGTERM cleans up like Ctrl-C does
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await _main(plan, args.out)

    try:
        return asyncio.run(runner())
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; its databases and queues were removed", file=sys.stderr)
    except Exception as exc:
        print(f"bench: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
