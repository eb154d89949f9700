"""How big a ``make bench`` run is, what its drains report, and how its figures are judged and printed.

Nothing here touches a database or a process: ``scripts/bench.py`` measures, this module turns the figures into
verdicts (``targets_met``) and the table ``make bench`` prints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

CONCURRENCY = 10  # arq max_jobs and procrastinate concurrency, for every contender
#: The one-worker ratio's back-to-back pairs may differ by this much (max / min - 1) for the run to be steady.
#: On the steadiest VM measured they agreed to the hundredth; on one that lost up to a quarter of its cores to
#: the hypervisor, three runs of five differed by 29%, 71% and 85% (docs/performance.md).
STEADY_SPREAD = 0.15
#: ... and none of their drains may lose more than this share of the cores to steal (see bench_probes.MachineCpu).
STEADY_MAX_STEAL = 0.05
GATE_PHASE = "2+4. gate latency, empty ledger vs large"
STORM_PHASE = "3. duplicate storm"
SERVER_CPU_PHASE = "2. server CPU per gate statement, one at a time"


@dataclass(frozen=True)
class Plan:
    """How big a run is: ``make(quick=False)`` is the issue's, ``make(quick=True)`` fits in well under a minute."""

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


def steadiness(pairs: list[float], drains: list[Drain]) -> dict[str, Any]:
    """Whether a throughput ratio (one worker, or two) is a figure of the code rather than of the machine's moment.

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


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def _throughput_verdict(r: dict[str, Any], suffix: str = "") -> str:
    """A ratio from an unsteady run (see steadiness; ``suffix`` "_2w" for two workers) is no verdict on the code: it
    says so instead."""
    met = _verdict(r[f"throughput_ratio{suffix}"] >= 0.6)
    return f"UNSTEADY: {met.lower()} on this run, no verdict" if r.get(f"throughput_steady{suffix}") is False else met


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
             _throughput_verdict(r, suffix)),
            *([("   ratio tracked / bare per back-to-back pair (the noise within this run)",
                " / ".join(f"{x:.2f}" for x in r["throughput_ratio_pairs"]),
                f"spread <= {STEADY_SPREAD:.0%}",
                ("ok" if r["throughput_ratio_pair_spread"] <= STEADY_SPREAD else "UNSTEADY")
                + f" ({r['throughput_ratio_pair_spread']:.0%})")]
              if workers == 1 and "throughput_ratio_pair_spread" in r else []),
            *([(f"   CPU stolen by the hypervisor while draining, bare / tracked, {workers} worker(s)",
                _steal(r, workers), f"<= {STEADY_MAX_STEAL:.0%} each",
                ("ok" if r[f"throughput_max_steal{suffix}"] <= STEADY_MAX_STEAL else "UNSTEADY")
                if f"throughput_max_steal{suffix}" in r else "")] if _steal(r, workers) else []),
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
    if "throughput_instant_gate_jobs_s" in r:
        rows.append(("   diagnostic: tracked, the gate answered in-process (no round trip at all), 1 worker",
                     f"{r['throughput_instant_gate_jobs_s']:,.0f} jobs/s", "",
                     f"({r['throughput_instant_gate_ratio']:.2f} x bare)"))
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


def rounded(value: Any) -> Any:
    """Floats to 4 decimals, in nested dicts too: what results.json stores."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value

def targets_met(r: dict[str, Any]) -> dict[str, bool]:
    """Each target of the issue against this run's figures."""
    return {
        # Never met on an unsteady run (see steadiness): best against best there is not a figure of the code.
        "throughput_ratio": r["throughput_ratio"] >= 0.6 and r.get("throughput_steady") is not False,
        "gate_p50_ms": r["gate_p50_ms"] <= 1.0,
        "gate_p99_ms": r["gate_p99_ms"] <= 5.0,
        "storm_executions": r["storm_executions"] == 1,
        "storm_drain": r["storm_drain_s"] <= r["storm_distinct_drain_s"],
        "scale_gate_p50_ratio": r["scale_gate_p50_ratio"] <= 1.25,
    }
