"""Coalesced gate traffic: the claims and completions of concurrent jobs share one statement per flush.

Each job still awaits its own outcome, so a claim is committed before its body runs and a completion is
committed before arq acknowledges the job; but jobs that reach the gate together cost one round trip and
one commit (one WAL flush) instead of one each. There is no fixed timer: a flush starts on the next turn of
the event loop after the first pending operation, and whatever arrives while a flush is in flight goes into
the next one, so batches grow with load and a lone job waits for nothing.

Semantics are those of the single statements, in order: completions first, then each claim through
``opspolish_claim`` in arrival order. Every function statement takes a fresh snapshot and sees the writes
made before it in the same transaction, so two deliveries of one identity in a batch are decided as if one
came after the other (the second sees the first's run: overlap or a recorded skip). The advisory locks the
claims take are held until the batch commits, a few hundred microseconds longer than alone.

A batch that fails as a whole for a reason other than the connection (a claim the database refuses, a
deadlock, a row locked by someone else for longer than the gate's ``lock_timeout``) is replayed one operation per
statement on the pool, all at once and beside the lane, so each error reaches the delivery that caused it and a
blocked operation holds up no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from opspolish.errors import DbUnavailable
from opspolish.fingerprint import json_text
from opspolish.ledger import Claim, Ledger, translate_errors

log = structlog.get_logger("opspolish")

# Completions first (fenced on lease_owner per row: a delivery that lost its lease is not among the returned
# (id, lease_owner) pairs), then the claims, one opspolish_claim call per element in order.
_FLUSH = """
WITH done AS (
    UPDATE operation_runs o SET status = 'completed', outcome = c.outcome, summary_counts = c.counts::jsonb,
           reason_code = c.reason_code, reason_message = c.reason_message, completed_at = now(),
           heartbeat_at = now()
    FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])
         AS c(id, owner, outcome, counts, reason_code, reason_message)
    -- NOT IN ('queued', 'completed') is status = 'running' (CHECK constraint) in a form no partial index on
    -- active runs matches: the plan, generic, has only the primary key to reach a row by (tests/test_plans.py).
    WHERE o.id = c.id AND o.lease_owner = c.owner AND o.status NOT IN ('queued', 'completed')
    RETURNING o.id, o.lease_owner
), claims AS (
    SELECT a.n, g.*
    FROM unnest($7::bigint[], $8::text[], $9::uuid[], $10::text[], $11::text[], $12::text[], $13::text[],
                $14::text[], $15::uuid[], $16::float8[], $17::float8[], $18::timestamptz[])
         WITH ORDINALITY AS a(run_id, tenant, workspace_id, type, fingerprint, context, job_id, queue_name,
                              lease_owner, cooldown_s, lease_ttl_s, enqueued_at, n)
    CROSS JOIN LATERAL opspolish_claim(a.run_id, a.tenant, a.workspace_id, a.type, a.fingerprint,
                                       a.context::jsonb, a.job_id, a.queue_name, a.lease_owner, a.cooldown_s,
                                       a.lease_ttl_s, a.enqueued_at) AS g
)
SELECT 0::bigint AS n, NULL::text AS decision, id AS run_id, NULL::integer AS attempts, NULL::bigint AS dedupe_of,
       NULL::text AS reason_code, NULL::float8 AS wait_s, NULL::uuid AS workspace_id, NULL::uuid AS tenant_id,
       lease_owner
FROM done
UNION ALL
SELECT n, decision, run_id, attempts, dedupe_of, reason_code, wait_s, workspace_id, tenant_id, NULL::uuid
FROM claims
"""

# A flush of one operation (most of them when jobs arrive one at a time) skips the batch machinery: scalar
# parameters, no array unnesting and no empty half (an UPDATE with nothing to update still opens every index of
# the ledger). Same rows as _FLUSH. Server CPU per statement, measured here (schema 0003), _FLUSH -> these: a lone
# claim ~220 -> ~190 us, a lone completion ~185 -> ~155 us; the client encodes 6 or 12 scalars instead of 18 arrays.
_CLAIM_ONE = """
SELECT 1::bigint AS n, decision, run_id, attempts, dedupe_of, reason_code, wait_s, workspace_id, tenant_id,
       NULL::uuid AS lease_owner
FROM opspolish_claim($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11, $12)
"""
_COMPLETE_ONE = """
UPDATE operation_runs o SET status = 'completed', outcome = $3, summary_counts = $4::text::jsonb, reason_code = $5,
       reason_message = $6, completed_at = now(), heartbeat_at = now()
-- The same fence and the same primary-key-only predicate as _FLUSH.
WHERE o.id = $1 AND o.lease_owner = $2 AND o.status NOT IN ('queued', 'completed')
RETURNING 0::bigint AS n, NULL::text AS decision, o.id AS run_id, NULL::integer AS attempts,
          NULL::bigint AS dedupe_of, NULL::text AS reason_code, NULL::float8 AS wait_s, NULL::uuid AS workspace_id,
          NULL::uuid AS tenant_id, o.lease_owner
"""


@dataclass(slots=True)
class _Completion:
    run_id: int
    owner: uuid.UUID
    outcome: str
    counts: dict[str, int]
    reason_code: str | None
    reason_message: str | None
    done: asyncio.Future[bool]


@dataclass(slots=True)
class _Claim:
    run_id: int | None
    tenant: str | None
    workspace_id: uuid.UUID | None
    run_type: str
    fingerprint: str | None
    context: dict[str, Any] | None
    job_id: str
    queue_name: str
    lease_owner: uuid.UUID
    cooldown_s: float
    lease_ttl_s: float
    enqueued_at: datetime | None
    done: asyncio.Future[Claim]



Connect = Callable[[], Awaitable[asyncpg.Connection]]


class _Lane:
    """One flush at a time on one dedicated connection, kept with its prepared statements between flushes."""

    def __init__(self) -> None:
        self.conn: asyncpg.Connection | None = None
        self.stmts: dict[str, asyncpg.prepared_stmt.PreparedStatement] = {}

    async def statement(self, connect: Connect, sql: str) -> asyncpg.prepared_stmt.PreparedStatement:
        if self.conn is None or self.conn.is_closed():
            await self.drop()
            self.conn = await connect()
        stmt = self.stmts.get(sql)
        if stmt is None:
            stmt = self.stmts[sql] = await self.conn.prepare(sql)
        return stmt

    async def drop(self) -> None:
        conn, self.conn, self.stmts = self.conn, None, {}
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection is simply abandoned
                await asyncio.wait_for(conn.close(), timeout=2)
            conn.terminate()


class GateBatcher:
    """Queue a claim or a fenced completion and await its outcome; concurrent ones share a flush.

    Flushes run on their own connections (``connect``, see :func:`opspolish.db.connect_gate`), up to ``lanes``
    at once: an operation only waits for a flush in flight when every lane is busy, and then joins the next
    batch. The pool (``ledger``) serves the rare one-by-one replays and hand-backs.
    """

    def __init__(self, connect: Connect, ledger: Ledger, *, lanes: int = 1, max_batch: int = 200) -> None:
        self._connect = connect
        self.ledger = ledger
        self.max_batch = max_batch
        self.lanes = lanes
        self._claims: list[_Claim] = []
        self._completions: list[_Completion] = []
        self._idle: list[_Lane] = []
        self._running: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self.flushes = 0
        self.claims = 0
        self.completions = 0
        self.replays = 0

    # --- public -------------------------------------------------------------------------------------------

    async def claim(
        self, *, run_id: int | None, tenant: str | None, workspace_id: uuid.UUID | None, run_type: str,
        fingerprint: str | None, context: dict[str, Any] | None, job_id: str, queue_name: str,
        lease_owner: uuid.UUID, cooldown_s: float, lease_ttl_s: float, enqueued_at: datetime | None = None,
    ) -> Claim:
        """The gate's decision for one delivery (see ``opspolish_claim``); ``enqueued_at``, when arq enqueued the
        job, tells a later job under a reused job id from a redelivery."""
        done: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        op = _Claim(run_id, tenant, workspace_id, run_type, fingerprint, context, job_id, queue_name, lease_owner,
                    cooldown_s, lease_ttl_s, enqueued_at, done)
        self._claims.append(op)
        self._kick()
        # The claim goes ahead even if this delivery is cancelled meanwhile (cancelling it cancels ``done``); a
        # lease it won is then handed back, here or by the flush.
        try:
            return await done
        except asyncio.CancelledError:
            if done.done() and not done.cancelled() and done.exception() is None:
                self._hand_back_if_won(op, done.result())
            raise

    async def complete(
        self, run_id: int, lease_owner: uuid.UUID, *, outcome: str, counts: dict[str, int],
        reason_code: str | None, reason_message: str | None,
    ) -> bool:
        """Write a run's outcome if ``lease_owner`` still holds it; False when the lease was lost."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._completions.append(_Completion(run_id, lease_owner, outcome, counts, reason_code, reason_message,
                                             done))
        self._kick()
        # The write goes ahead even if this job is cancelled meanwhile; it is fenced, so that is safe.
        return await done

    async def close(self) -> None:
        """Wait for the operations already queued (and any hand-back they caused); give the connections back."""
        while self._running or self._background:
            await asyncio.gather(*self._running, *self._background, return_exceptions=True)
        lanes, self._idle = self._idle, []
        for lane in lanes:
            await lane.drop()

    # --- flushing -----------------------------------------------------------------------------------------

    def _kick(self) -> None:
        if len(self._running) < self.lanes:
            lane = self._idle.pop() if self._idle else _Lane()
            task = asyncio.create_task(self._flush_all(lane), name="opspolish-gate-flush")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _flush_all(self, lane: _Lane) -> None:
        try:
            # No sleep(0) first: this task's first step already runs after every callback of the turn that queued
            # the first operation, so the jobs reaching the gate in that turn are in the batch. One more turn of
            # waiting cost a lone claim ~50 us (p50, 0.88 -> 0.83 ms here) and joined no more jobs in the drains.
            while self._claims or self._completions:
                completions = self._completions[: self.max_batch]
                del self._completions[: len(completions)]
                claims = self._claims[: self.max_batch - len(completions)]
                del self._claims[: len(claims)]
                await self._flush(lane, claims, completions)
        finally:
            self._idle.append(lane)
            # Leave the running set now, not in a done-callback a turn later: an operation queued in between
            # would otherwise find every lane "busy" and wait for a flush that never comes.
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)

    async def _flush(self, lane: _Lane, claims: list[_Claim], completions: list[_Completion]) -> None:
        try:
            sql, args = _statement(claims, completions)
            async with translate_errors():
                stmt = await lane.statement(self._connect, sql)
                rows = await stmt.fetch(*args)
        except DbUnavailable as exc:  # every waiter learns its operation was not done
            await lane.drop()
            _fail(exc, claims, completions)
            return
        except Exception:
            # Refused (a claim the function rejects, a deadlock) or held up past the gate's lock_timeout: each
            # operation is replayed alone on the pool, where its own error reaches it and a lock is waited for.
            self._spawn(self._replay_one_by_one(claims, completions))
            return
        self.flushes += 1
        self.claims += len(claims)
        self.completions += len(completions)
        self._settle(rows, claims, completions)

    def _settle(self, rows: Sequence[Any], claims: Sequence[_Claim], completions: Sequence[_Completion]) -> None:
        # A completion is written when its own (run, lease owner) pair came back: two completions of one run in a
        # batch (a stale delivery and the one that took its run over) are not settled by the run id alone.
        written = {(row[2], row[9]) for row in rows if row[0] == 0}
        decided = {row[0]: row for row in rows if row[0] != 0}
        for c in completions:
            if not c.done.done():
                c.done.set_result((c.run_id, c.owner) in written)
        for n, op in enumerate(claims, start=1):
            self._settle_claim(op, Claim(*decided[n][1:9]))

    async def _replay_one_by_one(self, claims: list[_Claim], completions: list[_Completion]) -> None:
        """Each operation in a statement of its own (the same statement, on the pool), all at once: one blocked
        on a lock (or refused) holds up or fails only itself. Runs beside the lane, which goes on flushing."""
        self.replays += 1
        await asyncio.gather(*(self._run_alone([], [c]) for c in completions),
                             *(self._run_alone([op], []) for op in claims))

    async def _run_alone(self, claims: list[_Claim], completions: list[_Completion]) -> None:
        try:
            async with translate_errors():
                sql, args = _statement(claims, completions)
                rows = await self.ledger.pool.fetch(sql, *args)
        except Exception as exc:
            _fail(exc, claims, completions)
            return
        self._settle(rows, claims, completions)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _settle_claim(self, op: _Claim, claim: Claim) -> None:
        if op.done.cancelled():  # its delivery was cancelled before the decision arrived
            self._hand_back_if_won(op, claim)
        elif not op.done.done():
            op.done.set_result(claim)

    def _hand_back_if_won(self, op: _Claim, claim: Claim) -> None:
        """The delivery was cancelled (worker shutdown) while its claim was in flight: a run it won goes back to
        the queue now rather than waiting for its lease to go stale."""
        if claim.decision in ("claimed", "taken_over") and claim.run_id is not None:
            self._spawn(self._hand_back(claim.run_id, op.lease_owner))

    async def _hand_back(self, run_id: int, owner: uuid.UUID) -> None:
        try:
            released = await self.ledger.release(run_id, owner, reason_code="job.cancelled",
                                                 reason_message="delivery cancelled while its claim was in flight")
        except DbUnavailable as exc:  # the lease goes stale and a redelivery takes the run over
            log.warning("hand_back_failed", run_id=run_id, reason_code=exc.reason_code, message=exc.message)
            return
        if released:  # the same line a delivery cancelled in its body logs: every hand-back is visible
            log.info("run_handed_back", run_id=run_id, reason_code="job.cancelled")


def _fail(exc: BaseException, claims: Sequence[_Claim], completions: Sequence[_Completion]) -> None:
    futures: list[asyncio.Future[Any]] = [op.done for op in claims] + [op.done for op in completions]
    for future in futures:
        if not future.done():
            future.set_exception(exc)


def _statement(claims: Sequence[_Claim], completions: Sequence[_Completion]) -> tuple[str, list[Any]]:
    """The statement for this batch and its parameters: scalars for a lone operation, one array per column else."""
    if not completions and len(claims) == 1:
        return _CLAIM_ONE, _claim_row(claims[0])
    if not claims and len(completions) == 1:
        return _COMPLETE_ONE, _completion_row(completions[0])
    return _FLUSH, [*_columns([_completion_row(c) for c in completions], 6),
                    *_columns([_claim_row(c) for c in claims], 12)]


def _completion_row(c: _Completion) -> list[Any]:
    return [c.run_id, c.owner, c.outcome, json.dumps(c.counts), c.reason_code, c.reason_message]


def _claim_row(c: _Claim) -> list[Any]:
    return [c.run_id, c.tenant, c.workspace_id, c.run_type, c.fingerprint,
            None if c.context is None else json_text(c.context), c.job_id, c.queue_name, c.lease_owner,
            c.cooldown_s, c.lease_ttl_s, c.enqueued_at]


def _columns(rows: list[list[Any]], width: int) -> list[list[Any]]:
    """Rows to columns (the arrays _FLUSH unnests); ``width`` columns even when there are no rows."""
    return [[row[i] for row in rows] for i in range(width)]
