"""The resources of one ``make bench`` run (``scripts/bench.py``): its databases, queues, worker processes and
the timed drains, always cleaned up however the run ends.

Names are the run's own: databases ``opspolish_bench_<tag>_*``, queues ``opspolish-bench:<tag>:*``. Every worker
is a real process (``scripts/bench_worker.py``) that builds its pools, waits at a start barrier and then drains
its queue; only the draining is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from arq.connections import ArqRedis
from scripts import bench_worker as bw
from scripts.bench_probes import BackendCpu, MachineCpu
from scripts.bench_report import CONCURRENCY, Drain, Plan

from opspolish import db
from opspolish.dispatch import dispatch
from opspolish.runtime import Runtime, connect_redis
from opspolish.seed import seed
from opspolish.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 90.0
TENANTS_PER_WORKSPACE = 5  # two workspaces: ten tenants


class BenchError(Exception):
    """A benchmark step failed; the message says which and why."""


@dataclass(frozen=True)
class Tenant:
    id: str
    external_id: str


async def wait_for(predicate: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str,
                   interval_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a worker's log, for an error message."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def expect(what: str, got: int, expected: int) -> None:
    """A count the benchmark relies on; a wrong one fails the run instead of printing a wrong figure."""
    if got != expected:
        raise BenchError(f"{what}: expected {expected}, got {got}")


class BenchEnv:
    """One benchmark run's names and resources (``cleanup`` removes them) and the figures it collects."""

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
                    raise BenchError(f"{label}: a worker exited with {proc.returncode}:\n{tail(log_path)}")
            reports = []
            for i, (_, log_path) in enumerate(started):
                path = sync / f"result.w{i}.json"
                if not path.exists():
                    raise BenchError(f"{label}: worker w{i} wrote no result:\n{tail(log_path)}")
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
                raise BenchError(f"{label}: a worker exited early ({proc.returncode}):\n{tail(log_path)}")

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

    def label(self, base: str) -> str:
        """``base-1``, ``base-2``...: a fresh name for each drain of the same kind (its queue and sync dir)."""
        self._runs[base] += 1
        return f"{base}-{self._runs[base]}"

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

