"""Worker side of ``make bench`` (``scripts/bench.py``): the benchmark job types and the worker processes.

Every contender runs the same way, so only the work itself is timed: the process starts (imports, pools),
writes ``ready.<tag>`` in ``$BENCH_SYNC_DIR``, waits for the ``go`` file, drains its queue (arq ``--burst``,
procrastinate ``wait=False``) and writes ``result.<tag>.json``: when it finished, how many job bodies it
executed, its peak RSS (VmHWM) and, for the tracked worker, the gate's metrics and how many statements its
batcher sent (claims and completions of concurrent jobs share one).

- arq, bare and tracked: ``python -m arq scripts.bench_worker.BareWorkerSettings --burst`` (or
  ``TrackedWorkerSettings``), from the repository root, with ``OPSPOLISH_*`` set. Both classes carry the
  same arq settings (queue, Redis, ``max_jobs``, ``poll_delay``, ``queue_read_limit``, ``keep_result``):
  the bare one is the tracked one with the opspolish function, context and hooks swapped out.
- procrastinate: ``python scripts/bench_worker.py procrastinate`` with ``BENCH_PROCRASTINATE_DSN``.
- diagnostic, not a contender: ``StubGateWorkerSettings`` is the tracked worker whose gate sends ``SELECT 1`` for
  each flush and answers "claimed" / "written" itself. Same arq work, same tracking code, same round trips to
  Postgres; no ledger work on the server. It tells the tracking code's own cost from Postgres's CPU sharing the
  machine's cores with the worker and Redis.
- diagnostic, not a worker: ``InstantGate`` (StubGate's parent) answers every claim and completion in-process, with no
  I/O at all; ``scripts/bench.py`` drives tracked deliveries through it to time opspolish's own code alone.
- diagnostic, not a contender: ``InstantGateWorkerSettings`` is the tracked worker with that gate: arq's work and
  opspolish's code, no round trip to Postgres at all. Between bare arq and it lies what the worker's own code
  costs; between it and the tracked worker, what the gate's round trips to the ledger cost.
- diagnostic, not a contender: ``BareBonesWorkerSettings`` is bare arq plus the smallest claim and completion there
  is, the kind of figure the project's reference measured: two prepared UPDATEs per job (autocommit, one round trip
  each, nothing coalesced) on a minimal table, with no identity lock, cooldown, scope check, lease keeper, counts
  validation or log line: about the least two durable writes per job can cost on this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from arq.worker import func

from opspolish import db
from opspolish.batching import GateBatcher, _Claim, _Completion, _Lane
from opspolish.ledger import Claim
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from opspolish.tracking import RunContext, TrackedJob, tracked_job
from opspolish.worker import worker_settings

NOOP_TYPE = "bench.noop"
STORM_TYPE = "bench.storm"
PROCRASTINATE_TASK = "bench_noop"
#: arq polls every 0.5 s by default, which caps a burst worker at ``queue_read_limit`` jobs per poll; every
#: contender gets this shorter delay instead (the tests use 0.02 s).
POLL_DELAY_S = 0.01
QUEUE_READ_LIMIT = 100  # arq's default for max_jobs <= 20, spelled out so it is the same for everyone
GO_TIMEOUT_S = 120.0
GO_POLL_S = 0.002

#: Job bodies executed in this process, by job type. Skipped deliveries never reach a body.
EXECUTIONS: Counter[str] = Counter()

Hook = Callable[[dict[str, Any]], Awaitable[None]]


@tracked_job(NOOP_TYPE, cooldown_s=0.0)
async def noop(run: RunContext) -> None:
    """The throughput job: nothing but the tracking around it."""
    EXECUTIONS[NOOP_TYPE] += 1


@tracked_job(STORM_TYPE)  # the default cooldown: a duplicate arriving after the completion is skipped too
async def storm(run: RunContext) -> None:
    """The duplicate-storm job: counts its executions, which must be one per identity."""
    EXECUTIONS[STORM_TYPE] += 1


BAREBONES_DDL = """
CREATE TABLE IF NOT EXISTS bench_barebones (
    id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'queued', attempts integer NOT NULL DEFAULT 0,
    lease_owner uuid, heartbeat_at timestamptz, summary_counts jsonb, completed_at timestamptz
)"""
_BAREBONES_CLAIM = (
    "UPDATE bench_barebones SET status = 'running', attempts = attempts + 1, lease_owner = $2, heartbeat_at = now()"
    " WHERE id = $1 AND status = 'queued' RETURNING attempts"
)
_BAREBONES_COMPLETE = (
    "UPDATE bench_barebones SET status = 'completed', summary_counts = $3::jsonb, completed_at = now()"
    " WHERE id = $1 AND lease_owner = $2 AND status = 'running'"
)
_ZERO_COUNTS = {"total": 0, "processed": 0, "failed": 0}  # the pool's jsonb codec encodes it


async def barebones_noop(ctx: dict[str, Any], *, run_id: int, **kwargs: Any) -> None:
    """The bare-bones diagnostic: claim, body, completion; each write its own prepared statement and commit."""
    pool: asyncpg.Pool = ctx["bench_pool"]
    owner = uuid.uuid4()
    if await pool.fetchval(_BAREBONES_CLAIM, run_id, owner) is None:
        return  # not queued (a redelivery): nothing to run
    EXECUTIONS[NOOP_TYPE] += 1
    await pool.execute(_BAREBONES_COMPLETE, run_id, owner, _ZERO_COUNTS)


async def bare_noop(ctx: dict[str, Any], **kwargs: Any) -> None:
    """The bare arq contender: same name and arguments as the tracked job, no tracking."""
    EXECUTIONS[NOOP_TYPE] += 1


# --- start barrier and report ----------------------------------------------------------------------------

def _sync_path(name: str) -> Path:
    return Path(os.environ["BENCH_SYNC_DIR"]) / name


def _tag() -> str:
    return os.environ.get("BENCH_WORKER_TAG", str(os.getpid()))


async def wait_for_go() -> float:
    """Say ready, then wait for the go signal; returns when it was seen (epoch seconds)."""
    _sync_path(f"ready.{_tag()}").write_text(str(os.getpid()))
    go = _sync_path("go")
    deadline = time.monotonic() + GO_TIMEOUT_S
    while not go.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench worker {_tag()}: no go signal within {GO_TIMEOUT_S:g} s")
        await asyncio.sleep(GO_POLL_S)
    global _CPU_AT_GO
    _CPU_AT_GO = cpu_s()
    return time.time()


_CPU_AT_GO = 0.0


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_kb() -> int:
    """VmHWM (peak resident set) of this process in KiB; getrusage where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def write_report(t_go: float | None, **extra: Any) -> None:
    report = {"tag": _tag(), "pid": os.getpid(), "t_go": t_go, "t_end": time.time(),
              "cpu_s": cpu_s() - _CPU_AT_GO, "executions": dict(EXECUTIONS), "vm_hwm_kb": peak_rss_kb(), **extra}
    tmp = _sync_path(f"result.{_tag()}.json.tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(_sync_path(f"result.{_tag()}.json"))


# --- arq worker settings -----------------------------------------------------------------------------------

def _class_attrs(cls: type) -> dict[str, Any]:
    # arq reads a settings class through its own __dict__ only, so copy attributes instead of subclassing.
    return {k: v for k, v in vars(cls).items() if not k.startswith("__")}


def _tracked_attrs() -> dict[str, Any]:
    jobs: list[TrackedJob] = [noop, storm]
    base = _class_attrs(worker_settings(Settings(), jobs=jobs, with_cron=False, configure_logs=True))
    base.update(poll_delay=POLL_DELAY_S, queue_read_limit=QUEUE_READ_LIMIT)
    return base


def _tracked_settings() -> type:
    attrs = _tracked_attrs()
    startup: Hook = attrs["on_startup"]
    shutdown: Hook = attrs["on_shutdown"]

    async def on_startup(ctx: dict[str, Any]) -> None:
        await startup(ctx)  # the opspolish runtime (asyncpg pool, lease keeper) is built before the clock starts
        ctx["bench_t_go"] = await wait_for_go()

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        rt = ctx.get("opspolish")
        gate = {"flushes": rt.gate.flushes, "claims": rt.gate.claims, "completions": rt.gate.completions,
                "replays": rt.gate.replays} if rt is not None else {}
        write_report(ctx.get("bench_t_go"), metrics=dict(rt.metrics) if rt is not None else {}, gate=gate)
        await shutdown(ctx)

    attrs.update(on_startup=on_startup, on_shutdown=on_shutdown)
    return type("TrackedWorkerSettings", (), attrs)


class InstantGate(GateBatcher):
    """The gate batcher answering "claimed" / "written" itself, with no I/O at all (diagnostic): what a tracked
    delivery then costs is opspolish's own Python (``execute``, the batcher's futures and flush tasks, the log
    line), without the round trips."""

    _WORKSPACE = uuid.UUID(int=1)

    async def _flush(self, lane: _Lane, claims: list[_Claim], completions: list[_Completion]) -> None:
        self._answer(claims, completions)

    def _answer(self, claims: list[_Claim], completions: list[_Completion]) -> None:
        self.flushes += 1
        for c in completions:
            c.done.set_result(True)
        for op in claims:
            op.done.set_result(Claim("claimed", op.run_id, 1, None, None, 0.0, self._WORKSPACE, None))


class StubGate(InstantGate):
    """The gate batcher with the ledger work taken out: each flush is one ``SELECT 1`` round trip (diagnostic)."""

    async def _flush(self, lane: _Lane, claims: list[_Claim], completions: list[_Completion]) -> None:
        stmt = await lane.statement(self._connect, "SELECT 1")
        await stmt.fetch()
        self._answer(claims, completions)


def _gate_swapped_settings(gate: type[InstantGate], name: str) -> type:
    """The tracked worker with its gate batcher replaced by the diagnostic ``gate``."""
    attrs = _class_attrs(_tracked_settings())
    startup: Hook = attrs["on_startup"]

    async def on_startup(ctx: dict[str, Any]) -> None:
        await startup(ctx)
        rt: Runtime = ctx["opspolish"]
        rt.gate = gate(rt.gate._connect, rt.ledger)

    attrs["on_startup"] = on_startup
    return type(name, (), attrs)


def _stub_gate_settings() -> type:
    return _gate_swapped_settings(StubGate, "StubGateWorkerSettings")


def _instant_gate_settings() -> type:
    return _gate_swapped_settings(InstantGate, "InstantGateWorkerSettings")


def _bare_settings() -> type:
    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["bench_t_go"] = await wait_for_go()

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        write_report(ctx.get("bench_t_go"))

    attrs = _tracked_attrs()
    attrs.update(functions=[func(bare_noop, name=NOOP_TYPE)], ctx={}, cron_jobs=[], on_startup=on_startup,
                 on_shutdown=on_shutdown)
    return type("BareWorkerSettings", (), attrs)


def _barebones_settings() -> type:
    async def on_startup(ctx: dict[str, Any]) -> None:
        # The same pool opspolish's runtime builds: size max_jobs + 2, no reset query on release.
        settings = Settings()
        ctx["bench_pool"] = await db.create_pool(settings, min_size=1, max_size=settings.max_jobs + 2)
        ctx["bench_t_go"] = await wait_for_go()

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        write_report(ctx.get("bench_t_go"))
        await ctx["bench_pool"].close()

    attrs = _tracked_attrs()
    attrs.update(functions=[func(barebones_noop, name=NOOP_TYPE)], ctx={}, cron_jobs=[], on_startup=on_startup,
                 on_shutdown=on_shutdown)
    return type("BareBonesWorkerSettings", (), attrs)


def arq_settings_summary() -> dict[str, Any]:
    """The arq settings every arq contender shares (for the report)."""
    attrs = _tracked_attrs()
    return {key: attrs[key] for key in ("max_jobs", "poll_delay", "queue_read_limit", "keep_result")}


def __getattr__(name: str) -> Any:
    # Built on first access from OPSPOLISH_* (as opspolish.worker does): importing reads no settings.
    builders = {"TrackedWorkerSettings": _tracked_settings, "BareWorkerSettings": _bare_settings,
                "StubGateWorkerSettings": _stub_gate_settings, "InstantGateWorkerSettings": _instant_gate_settings,
                "BareBonesWorkerSettings": _barebones_settings}
    if name in builders:
        value = builders[name]()
        globals()[name] = value
        return value
    raise AttributeError(name)


# --- procrastinate ------------------------------------------------------------------------------------------

@dataclass
class ProcrastinateBench:
    app: Any  # procrastinate.App
    task: Any  # procrastinate.tasks.Task of the no-op


def procrastinate_app(conninfo: str, *, pool_size: int) -> ProcrastinateBench:
    """A procrastinate app on ``conninfo`` with the no-op task (same name in every process)."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=conninfo, min_size=pool_size, max_size=pool_size))

    @app.task(name=PROCRASTINATE_TASK)
    async def noop_task(n: int) -> None:
        EXECUTIONS[PROCRASTINATE_TASK] += 1

    return ProcrastinateBench(app, noop_task)


async def _procrastinate_worker(conninfo: str, concurrency: int) -> None:
    bench = procrastinate_app(conninfo, pool_size=concurrency + 2)
    async with bench.app.open_async():
        t_go = await wait_for_go()
        await bench.app.run_worker_async(concurrency=concurrency, wait=False, install_signal_handlers=False)
        write_report(t_go)


def main(argv: list[str]) -> int:
    if argv != ["procrastinate"]:
        print("usage: bench_worker.py procrastinate   (arq workers: python -m arq scripts.bench_worker.*)",
              file=sys.stderr)
        return 2
    concurrency = int(os.environ.get("BENCH_CONCURRENCY", "10"))
    asyncio.run(_procrastinate_worker(os.environ["BENCH_PROCRASTINATE_DSN"], concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
