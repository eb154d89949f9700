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

This file holds sections 1, 3, 5 and 6 and the run as a whole. Beside it: ``bench_env.py`` (the run's databases,
queues, worker processes and timed drains), ``bench_gate.py`` (sections 2 and 4), ``bench_probes.py`` (what /proc
says: CPU, steal), ``bench_report.py`` (the plan, the verdicts and the table) and ``bench_worker.py`` (the workers).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from opspolish.dispatch import dispatch
from opspolish.logs import configure_logging
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from opspolish.tracking import execute

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the sibling modules are imported as scripts.*, as arq imports bench_worker
    sys.path.insert(0, str(ROOT))

from scripts import bench_worker as bw  # noqa: E402
from scripts.bench_env import BenchEnv, BenchError, expect  # noqa: E402
from scripts.bench_gate import gate_latency, load_history, server_cpu  # noqa: E402
from scripts.bench_probes import MachineCpu  # noqa: E402
from scripts.bench_report import (  # noqa: E402
    CONCURRENCY,
    GATE_PHASE,
    SERVER_CPU_PHASE,
    STORM_PHASE,
    Drain,
    Plan,
    print_table,
    rounded,
    steadiness,
    table_rows,
    targets_met,
)

RESULTS_PATH = ROOT / "bench" / "results.json"


class _Discard(io.StringIO):
    def write(self, s: str) -> int:
        return len(s)


def configure_bench_logging() -> None:
    """The library's JSON logging, rendered as in production but discarded (dispatch logs every run)."""
    configure_logging("json")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=_Discard()))
    logging.getLogger().setLevel(logging.WARNING)


class Bench(BenchEnv):
    """One benchmark run: the resources of :class:`BenchEnv` and the phases that measure with them."""

    # --- 1. throughput ----------------------------------------------------------------------------------------

    async def run_bare(self, workers: int) -> Drain:
        n, label = self.plan.jobs, self.label(f"bare{workers}")
        queue = self.queue(label)
        await self.enqueue_raw(queue, bw.NOOP_TYPE, lambda i: {"n": i}, n)
        settings = self.settings_for(self.main_db, queue)
        drained = await self.drain(label, [self.arq_worker("Bare", settings)] * workers, jobs=n)
        expect(f"bare arq ({label}) executions", drained.executions(bw.NOOP_TYPE), n)
        if await self.queue_length(queue):
            raise BenchError(f"bare arq left jobs in {queue}")
        return drained

    async def run_swapped_gate(self, kind: str, workers: int) -> Drain:
        """Diagnostic: dispatched runs drained by the tracked worker with a diagnostic gate: ``stub`` sends a
        ``SELECT 1`` for each flush, ``instant`` answers in-process with no I/O at all (bench_worker)."""
        n, label = self.plan.jobs, self.label(f"{kind}{workers}")
        queue = self.queue(label)
        settings = self.settings_for(self.main_db, queue)
        await self.dispatch_many(settings, n, label)
        settings_class = {"stub": "StubGate", "instant": "InstantGate"}[kind]
        drained = await self.drain(label, [self.arq_worker(settings_class, settings)] * workers, jobs=n,
                                   databases=(self.main_db,))
        expect(f"{kind} gate ({label}) body executions", drained.executions(bw.NOOP_TYPE), n)
        return drained

    async def run_barebones(self, workers: int) -> Drain:
        """Diagnostic: bare arq plus two prepared UPDATEs per job on a minimal table (see bench_worker)."""
        n, label = self.plan.jobs, self.label(f"barebones{workers}")
        queue = self.queue(label)
        await self.execute(self.main_db, bw.BAREBONES_DDL, "TRUNCATE bench_barebones",
                           f"INSERT INTO bench_barebones (id) SELECT g FROM generate_series(0, {int(n) - 1}) g")
        await self.analyze(self.main_db, "bench_barebones")
        await self.enqueue_raw(queue, bw.NOOP_TYPE, lambda i: {"n": i}, n, with_run_id=True)
        settings = self.settings_for(self.main_db, queue)
        drained = await self.drain(label, [self.arq_worker("BareBones", settings)] * workers, jobs=n,
                                   databases=(self.main_db,))
        expect(f"bare-bones ({label}) executions", drained.executions(bw.NOOP_TYPE), n)
        done = await self.fetchval(self.main_db, "SELECT count(*) FROM bench_barebones WHERE status = 'completed'")
        expect(f"bare-bones ({label}) completed rows", int(done), n)
        return drained

    async def run_tracked(self, workers: int, *, raw: bool = False) -> Drain:
        n, label = self.plan.jobs, self.label(f"{'raw' if raw else 'tracked'}{workers}")
        queue = self.queue(label)
        settings = self.settings_for(self.main_db, queue)
        if raw:
            await self.enqueue_raw(queue, bw.NOOP_TYPE, lambda i: {"n": i, "run": label}, n)
        else:
            await self.dispatch_many(settings, n, label)
        drained = await self.drain(label, [self.arq_worker("Tracked", settings)] * workers, jobs=n,
                                   databases=(self.main_db,))
        expect(f"tracked ({label}) body executions", drained.executions(bw.NOOP_TYPE), n)
        ledger = await self.ledger_summary(self.main_db, queue)
        expect(f"tracked ({label}) succeeded runs in the ledger", int(ledger["succeeded"]), n)
        expect(f"tracked ({label}) runs in the ledger", int(ledger["total"]), n)
        return drained

    async def run_procrastinate(self, workers: int) -> Drain:
        n, label = self.plan.jobs, self.label(f"procrastinate{workers}")
        await self.defer_procrastinate(n)
        drained = await self.drain(label, [self.procrastinate_worker(self.procrastinate_dsn)] * workers, jobs=n,
                                   databases=(self.procrastinate_db,))
        expect(f"procrastinate ({label}) executions", drained.executions(bw.PROCRASTINATE_TASK), n)
        left = await self.fetchval(self.procrastinate_db,
                                   "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'")
        expect("procrastinate jobs not succeeded", int(left), 0)
        return drained

    async def run_contender(self, name: str, workers: int) -> Drain:
        if name == "bare":
            return await self.run_bare(workers)
        if name == "tracked":
            return await self.run_tracked(workers)
        if name == "raw":
            return await self.run_tracked(workers, raw=True)
        if name in ("stub", "instant"):
            return await self.run_swapped_gate(name, workers)
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
            diagnostics = ["raw", "stub", "instant", "barebones"]
            schedule += [(name, 2) for name in contenders] + [(name, 1) for name in diagnostics]
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
        if "bare2" in runs:  # one drain each: only steal can make it unsteady (keys suffixed _2w)
            pairs_2w = [b.seconds / t.seconds for b, t in zip(runs["bare2"], runs["tracked2"], strict=True)]
            r.update({f"{k}_2w": v for k, v in steadiness(pairs_2w, runs["bare2"] + runs["tracked2"]).items()})
        r["worker_rss_mb"] = max(d.rss_mb() for d in runs["tracked1"])
        r["worker_rss_bare_mb"] = max(d.rss_mb() for d in runs["bare1"])
        r["worker_rss_procrastinate_mb"] = max(d.rss_mb() for d in runs["procrastinate1"])
        if "stub1" in runs:
            r["throughput_stub_gate_jobs_s"] = n / best("stub1").seconds
            r["throughput_stub_gate_ratio"] = r["throughput_stub_gate_jobs_s"] / r["throughput_bare_jobs_s"]
        if "instant1" in runs:
            r["throughput_instant_gate_jobs_s"] = n / best("instant1").seconds
            r["throughput_instant_gate_ratio"] = r["throughput_instant_gate_jobs_s"] / r["throughput_bare_jobs_s"]
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
        expect("in-process tracked deliveries (body executions)", bw.EXECUTIONS[bw.NOOP_TYPE] - before, n)
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
        expect("storm deliveries queued", await self.queue_length(queue), n)
        settings = self.settings_for(self.main_db, queue)
        return await self.drain(f"storm{no}", [self.arq_worker("Tracked", settings)] * 2, jobs=n)

    async def _distinct_drain(self, no: int) -> Drain:
        """As many raw deliveries as a storm, every one a distinct identity, drained the same way."""
        n, queue = self.plan.storm, self.queue(f"distinct{no}")
        await self.enqueue_raw(queue, bw.STORM_TYPE, lambda i: {"distinct": i, "no": no}, n)
        settings = self.settings_for(self.main_db, queue)
        drained = await self.drain(f"distinct{no}", [self.arq_worker("Tracked", settings)] * 2, jobs=n)
        expect("distinct jobs executed", drained.executions(bw.STORM_TYPE), n)
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
            self.results["history_load_s"] = await load_history(self)

        await self.phase(f"4. loading {self.plan.history_rows:,} historical runs", history)
        await self.phase(GATE_PHASE, lambda: gate_latency(self))
        await self.phase(SERVER_CPU_PHASE, lambda: server_cpu(self))


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
    r["targets_met"] = targets_met(r)
    print()
    print_table(table_rows(r, plan))
    print("\nphases: " + ", ".join(f"{k} {v:.1f} s ({bench.phase_steal[k]:.0%} stolen)"
                                  for k, v in bench.phase_s.items()))
    print(f"total {total_s:.1f} s; load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rounded(r), indent=2, sort_keys=True) + "\n")
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
