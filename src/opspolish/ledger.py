"""The ledger repository: the statements on ``operation_runs``.

Hot-path statements (claim, heartbeat, hand-back) go straight to asyncpg, which prepares each constant statement
once per connection; the workers' claims and completions travel coalesced, in the one statement of
:mod:`opspolish.batching`. Cold paths (listing, reconcile) are scoped: a
:class:`ScopedLedger` only ever sees the runs of its workspace (and tenant).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from opspolish.db import DRIVER_ERRORS, session_lost
from opspolish.errors import DbUnavailable, InputInvalid

ZERO_COUNTS = {"total": 0, "processed": 0, "failed": 0}


@asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Driver connection errors become :class:`DbUnavailable`, chained."""
    try:
        yield
    except Exception as exc:
        # A FATAL server error ends the session too, whatever its SQLSTATE: a new pooled connection refused because
        # the database does not accept connections (ObjectNotInPrerequisiteStateError) was internal.unexpected.
        if not session_lost(exc, errors=DRIVER_ERRORS):
            raise
        raise DbUnavailable(f"PostgreSQL unavailable: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose runs a repository sees. ``tenant_id`` None with a workspace = the workspace's runs.

    Every workspace is :meth:`operator`, asked for by name: ``Scope(None)`` (a look-up that found no workspace, say)
    is refused rather than read as every workspace."""

    workspace_id: uuid.UUID | None
    tenant_id: uuid.UUID | None = None
    every_workspace: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.workspace_id is None and self.tenant_id is None and not self.every_workspace:
            raise ValueError("Scope: no workspace and no tenant; Scope.operator() is the view of every workspace")

    @classmethod
    def operator(cls) -> Scope:
        """Every workspace: the operator's view (CLI listing). Never handed to job code."""
        return cls(None, None, every_workspace=True)


@dataclass(frozen=True, slots=True)
class Claim:
    decision: str
    run_id: int | None
    attempts: int
    dedupe_of: int | None
    reason_code: str | None
    wait_s: float
    workspace_id: uuid.UUID | None
    tenant_id: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class Dispatched:
    run_id: int
    job_id: str
    created: bool
    status: str
    workspace_id: uuid.UUID
    tenant_id: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class Run:
    id: int
    workspace_id: uuid.UUID
    tenant_id: uuid.UUID | None
    type: str
    status: str
    outcome: str
    run_identity_hash: str
    fingerprint: str
    context: dict[str, Any]
    summary_counts: dict[str, Any] | None
    reason_code: str | None
    reason_message: str | None
    dedupe_of: int | None
    attempts: int
    requeues: int
    queue_name: str | None
    job_id: str | None
    lease_owner: uuid.UUID | None
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Run:
        return cls(**dict(record))

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.__slots__:
            value = getattr(self, key)
            out[key] = value.isoformat() if isinstance(value, datetime) else (
                str(value) if isinstance(value, uuid.UUID) else value
            )
        return out


RUN_COLUMNS = ", ".join(Run.__slots__)

# --- hot path -------------------------------------------------------------------------------------------

_CLAIM = "SELECT * FROM opspolish_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"

# A transient failure or a worker shutdown hands the run back to the queue (running -> queued).
_RELEASE = """
UPDATE operation_runs SET status = 'queued', lease_owner = NULL, reason_code = $3, reason_message = $4
WHERE id = $1 AND lease_owner = $2 AND status = 'running'
"""

# One statement refreshes every lease this process holds; the ids it does not return were lost.
# Never waits for a row lock: a row someone holds (an operator's open transaction, a takeover being decided) is skipped
# and its lease counted as still held this beat; the next beat tells. Waiting, one locked row held up every lease of
# the worker (and the beat could deadlock with the gate's batched completions, which lock rows in their own order).
# A skipped row's lease, still this owner's as last committed, is beaten beside it (operation_run_beats, read by a
# takeover and by reconcile): counted alive by the worker but never beaten, a run locked for longer than the TTL
# looked stale to the database, and a redelivery took the live run over. A row beaten again drops its side beat.
_HEARTBEAT = """
WITH free AS (
    SELECT o.id FROM operation_runs o WHERE o.id = ANY($1::bigint[]) ORDER BY o.id FOR NO KEY UPDATE SKIP LOCKED
), beat AS (
    UPDATE operation_runs o SET heartbeat_at = now()
    FROM unnest($1::bigint[], $2::uuid[]) AS l(id, owner)
    WHERE o.id = l.id AND o.id IN (SELECT id FROM free) AND o.lease_owner = l.owner AND o.status = 'running'
    RETURNING o.id, o.lease_owner
), beside AS (
    INSERT INTO operation_run_beats AS b (run_id, lease_owner, beat_at)
    SELECT o.id, o.lease_owner, now()
    FROM unnest($1::bigint[], $2::uuid[]) AS l(id, owner) JOIN operation_runs o ON o.id = l.id
    WHERE l.id NOT IN (SELECT id FROM free) AND o.lease_owner = l.owner AND o.status = 'running'
    ON CONFLICT (run_id) DO UPDATE SET lease_owner = excluded.lease_owner, beat_at = excluded.beat_at
), dropped AS (
    DELETE FROM operation_run_beats b WHERE b.run_id IN (SELECT id FROM beat)
)
SELECT id, lease_owner FROM beat
UNION ALL
SELECT l.id, l.owner FROM unnest($1::bigint[], $2::uuid[]) AS l(id, owner)
WHERE l.id NOT IN (SELECT id FROM free) AND EXISTS (SELECT 1 FROM operation_runs o WHERE o.id = l.id)
"""

#: A fenced write's guard (RunContext.fenced): the lease still held, and the row locked FOR KEY SHARE, so that no
#: takeover (which locks it FOR UPDATE first, gate v4) commits until the write does, while the lease keeper's beats
#: (plain UPDATEs) go on: FOR SHARE held them up, and a fenced write longer than the lease let the lease go stale.
HOLDS_LEASE = """
SELECT true FROM operation_runs WHERE id = $1 AND lease_owner = $2 AND status = 'running' FOR KEY SHARE
"""

_DISPATCH = "SELECT * FROM opspolish_dispatch($1, $2, $3, $4, $5, $6)"

# A dispatched run whose queue job could not be enqueued ends with a reason instead of lingering.
_FAIL_UNSTARTED = """
UPDATE operation_runs SET status = 'completed', outcome = 'failed', reason_code = $2, reason_message = $3,
       summary_counts = coalesce(summary_counts, $4), completed_at = now()
WHERE id = $1 AND status = 'queued' AND attempts = 0
"""


class Ledger:
    """Unscoped entry to the ledger: the gate's statements and scoped views."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def scoped(self, scope: Scope) -> ScopedLedger:
        return ScopedLedger(self.pool, scope)

    async def claim(
        self, *, run_id: int | None, tenant: str | None, workspace_id: uuid.UUID | None, run_type: str,
        fingerprint: str | None, context: dict[str, Any] | None, job_id: str, queue_name: str,
        lease_owner: uuid.UUID, cooldown_s: float, lease_ttl_s: float, enqueued_at: datetime | None = None,
    ) -> Claim:
        async with translate_errors():
            row = await self.pool.fetchrow(
                _CLAIM, run_id, tenant, workspace_id, run_type, fingerprint, context, job_id, queue_name,
                lease_owner, cooldown_s, lease_ttl_s, enqueued_at,
            )
        assert row is not None
        return Claim(*row)

    async def release(self, run_id: int, lease_owner: uuid.UUID, *, reason_code: str, reason_message: str) -> bool:
        async with translate_errors():
            status = await self.pool.execute(_RELEASE, run_id, lease_owner, reason_code, reason_message)
        return status.endswith(" 1")

    async def prune_side_beats(self) -> int:
        """Drop the side beats (operation_run_beats) no lease needs: their run ended, was handed back or changed
        hands while its row was locked, and no later beat reached the row to drop them. Reconcile's pass calls it."""
        async with translate_errors():
            status = await self.pool.execute(
                """DELETE FROM operation_run_beats b WHERE NOT EXISTS (
                       SELECT 1 FROM operation_runs o
                       WHERE o.id = b.run_id AND o.status = 'running' AND o.lease_owner = b.lease_owner)""")
        return int(status.split()[-1])

    async def heartbeat(self, leases: Sequence[tuple[int, uuid.UUID]]) -> set[tuple[int, uuid.UUID]]:
        """Refresh leases; returns the ``(run_id, owner)`` pairs whose lease is still held."""
        if not leases:
            return set()
        async with translate_errors():
            rows = await self.pool.fetch(_HEARTBEAT, [r for r, _ in leases], [o for _, o in leases])
        return {(row[0], row[1]) for row in rows}

    async def dispatch(
        self, *, tenant: str | None, workspace_id: uuid.UUID | None, run_type: str, fingerprint: str,
        context: dict[str, Any], queue_name: str,
    ) -> Dispatched | None:
        """Create a queued run or join the identity's active one; None when the tenant is unknown."""
        try:
            async with translate_errors():
                row = await self.pool.fetchrow(_DISPATCH, tenant, workspace_id, run_type, fingerprint, context,
                                               queue_name)
        except asyncpg.ForeignKeyViolationError:  # only a workspace run names its workspace itself
            raise InputInvalid(f"workspace_id: no workspace {workspace_id}", field="workspace_id") from None
        return Dispatched(*row) if row is not None else None

    async def context_of(self, run_id: int) -> dict[str, Any]:
        """The stored (non-secret) inputs of a run the caller has just claimed."""
        async with translate_errors():
            value = await self.pool.fetchval("SELECT context FROM operation_runs WHERE id = $1", run_id)
        return dict(value or {})

    async def undo_claim(self, run_id: int | None, job_id: str, lease_owner: uuid.UUID) -> bool:
        """Undo a claim whose answer never came back (the connection was lost under it), if it committed: its run goes
        back to ``queued``, the attempt it counted taken back, for the delivery's retry to claim at once. Found by
        ``lease_owner``, the claim's own fresh id: a claim that never committed matches nothing. Whether one was undone.

        A run the lost claim had taken over (its worker dead) comes back ``queued`` too, so that its retry is a fresh
        claim: on the run's last allowed attempt it runs once more instead of being given up (Known limits). Left
        ``running`` under a stale lease instead, a run handed back at shutdown was given up ``run.orphaned`` unrun."""
        where = "id = $1" if run_id is not None else "job_id = $1"
        async with translate_errors():
            status = await self.pool.execute(
                f"""UPDATE operation_runs SET status = 'queued', lease_owner = NULL, attempts = attempts - 1,
                           started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END
                    WHERE {where} AND lease_owner = $2 AND status = 'running'""",
                run_id if run_id is not None else job_id, lease_owner,
            )
        return status.endswith(" 1")

    async def ended_by(self, run_id: int, lease_owner: uuid.UUID) -> tuple[str, str | None] | None:
        """The outcome and reason code of a run ``lease_owner`` completed (None: not completed by it)."""
        async with translate_errors():
            row = await self.pool.fetchrow(
                "SELECT outcome, reason_code FROM operation_runs WHERE id = $1 AND lease_owner = $2 "
                "AND status = 'completed'", run_id, lease_owner)
        return None if row is None else (row["outcome"], row["reason_code"])

    async def give_up(self, run_id: int, lease_owner: uuid.UUID, *, message: str) -> bool:
        """End a run this caller has just taken over, past its attempts, without running it: failed / run.orphaned,
        its attempts those that ran (the takeover's own is not one)."""
        async with translate_errors():
            status = await self.pool.execute(
                """UPDATE operation_runs SET status = 'completed', outcome = 'failed', reason_code = 'run.orphaned',
                          reason_message = $3, attempts = attempts - 1, summary_counts = coalesce(summary_counts, $4),
                          completed_at = now(), heartbeat_at = now()
                   WHERE id = $1 AND lease_owner = $2 AND status NOT IN ('queued', 'completed')""",
                run_id, lease_owner, message, ZERO_COUNTS,
            )
        return status.endswith(" 1")

    async def fail_unstarted(self, run_id: int, *, reason_code: str, reason_message: str) -> bool:
        async with translate_errors():
            status = await self.pool.execute(_FAIL_UNSTARTED, run_id, reason_code, reason_message, ZERO_COUNTS)
        return status.endswith(" 1")


class ScopedLedger:
    """The runs of one scope. Every statement carries the scope in its WHERE clause."""

    _SCOPE = "($1::uuid IS NULL OR workspace_id = $1) AND ($2::uuid IS NULL OR tenant_id = $2)"

    def __init__(self, pool: asyncpg.Pool, scope: Scope) -> None:
        self.pool = pool
        self.scope = scope

    @property
    def _args(self) -> tuple[uuid.UUID | None, uuid.UUID | None]:
        return self.scope.workspace_id, self.scope.tenant_id

    async def get(self, run_id: int) -> Run | None:
        async with translate_errors():
            row = await self.pool.fetchrow(
                f"SELECT {RUN_COLUMNS} FROM operation_runs WHERE {self._SCOPE} AND id = $3", *self._args, run_id
            )
        return Run.from_record(row) if row else None

    async def list_runs(
        self, *, run_type: str | None = None, status: str | None = None, outcome: str | None = None,
        limit: int = 50,
    ) -> list[Run]:
        async with translate_errors():
            rows = await self.pool.fetch(
                f"""SELECT {RUN_COLUMNS} FROM operation_runs
                    WHERE {self._SCOPE} AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR status = $4)
                      AND ($5::text IS NULL OR outcome = $5)
                    ORDER BY id DESC LIMIT $6""",
                *self._args, run_type, status, outcome, limit,
            )
        return [Run.from_record(row) for row in rows]

    async def update_context(self, run_id: int, context: dict[str, Any]) -> bool:
        """Replace a run's operator context (used by tools; scoped like every write). Held to the inputs' rules: its
        secrets left out and credentials redacted (``InputInvalid`` for what inputs may not hold), as the ledger's
        context never holds a secret; it was stored as given."""
        from opspolish.fingerprint import canonical_inputs

        clean = canonical_inputs(context)
        async with translate_errors():
            status = await self.pool.execute(
                f"UPDATE operation_runs SET context = $4 WHERE {self._SCOPE} AND id = $3",
                *self._args, run_id, clean,
            )
        return status.endswith(" 1")

    async def claim(self, run_id: int, *, run_type: str, job_id: str, queue_name: str, lease_owner: uuid.UUID,
                    cooldown_s: float, lease_ttl_s: float) -> Claim:
        """Claim a run of this scope through the gate; a run of another scope is ``run_not_found``."""
        if self.scope.tenant_id is not None and self.scope.workspace_id is not None:
            # The gate scopes by tenant alone: a scope whose tenant is not of its workspace reaches no run.
            async with translate_errors():
                consistent = await self.pool.fetchval(
                    "SELECT true FROM tenants WHERE id = $1 AND workspace_id = $2", self.scope.tenant_id,
                    self.scope.workspace_id)
            if not consistent:
                return Claim("run_not_found", run_id, 0, None, "run.not_found", 0.0, None, None)
        return await Ledger(self.pool).claim(
            run_id=run_id, tenant=str(self.scope.tenant_id) if self.scope.tenant_id else None,
            workspace_id=None if self.scope.tenant_id else self.scope.workspace_id, run_type=run_type,
            fingerprint=None, context=None, job_id=job_id, queue_name=queue_name, lease_owner=lease_owner,
            cooldown_s=cooldown_s, lease_ttl_s=lease_ttl_s,
        )

    # --- reconcile ---------------------------------------------------------------------------------------

    #: A run the queue may no longer back: a running one whose lease is stale ($2 s), a queued one past the grace
    #: age ($3 s). $1 is the workspace, $4 the tenant (or NULL), $5 the run id bound.
    _UNBACKED = """workspace_id = $1 AND status IN ('queued', 'running')
                   AND ((status = 'running' AND heartbeat_at < now() - make_interval(secs => $2))
                     OR (status = 'queued' AND created_at < now() - make_interval(secs => $3)))
                   AND ($4::uuid IS NULL OR tenant_id = $4)"""

    async def unbacked_candidates(
        self, *, lease_ttl_s: float, min_age_s: float, after_id: int = 0, limit: int = 500
    ) -> list[Run]:
        """Active runs the queue may no longer back: stale running leases and queued runs past a grace age.

        Keyset-paged by id (``after_id``), served by the partial index on active runs."""
        async with translate_errors():
            rows = await self.pool.fetch(
                f"""SELECT {RUN_COLUMNS} FROM operation_runs WHERE {self._UNBACKED} AND id > $5
                    ORDER BY id LIMIT $6""",
                self.scope.workspace_id, lease_ttl_s, min_age_s, self.scope.tenant_id, after_id, limit,
            )
        return [Run.from_record(row) for row in rows]

    async def unbacked_candidate(self, run_id: int, *, lease_ttl_s: float, min_age_s: float) -> Run | None:
        """The run as it is now, if it is still one :meth:`unbacked_candidates` would return; else None (claimed,
        ended or beaten since the page that listed it was read)."""
        async with translate_errors():
            row = await self.pool.fetchrow(
                f"SELECT {RUN_COLUMNS} FROM operation_runs WHERE {self._UNBACKED} AND id = $5",
                self.scope.workspace_id, lease_ttl_s, min_age_s, self.scope.tenant_id, run_id,
            )
        return None if row is None else Run.from_record(row)

    async def settle_orphaned(self, run_id: int, *, lease_ttl_s: float, message: str) -> bool:
        async with translate_errors():
            status = await self.pool.execute(
                """UPDATE operation_runs SET status = 'completed', outcome = 'failed', reason_code = 'run.orphaned',
                          reason_message = $4, summary_counts = coalesce(summary_counts, $5), completed_at = now()
                   WHERE workspace_id = $1 AND id = $2 AND status = 'running'
                     AND heartbeat_at < now() - make_interval(secs => $3) AND ($6::uuid IS NULL OR tenant_id = $6)
                     AND NOT EXISTS (SELECT 1 FROM operation_run_beats b  -- beaten beside its locked row
                                     WHERE b.run_id = operation_runs.id AND b.lease_owner = operation_runs.lease_owner
                                       AND b.beat_at >= now() - make_interval(secs => $3))""",
                self.scope.workspace_id, run_id, lease_ttl_s, message, ZERO_COUNTS, self.scope.tenant_id,
            )
        return status.endswith(" 1")

    async def mark_requeued(self, run_id: int) -> bool:
        """Count a re-enqueue; only a queued run that was never re-enqueued before qualifies."""
        async with translate_errors():
            status = await self.pool.execute(
                """UPDATE operation_runs SET requeues = requeues + 1
                   WHERE workspace_id = $1 AND id = $2 AND status = 'queued' AND requeues = 0
                     AND ($3::uuid IS NULL OR tenant_id = $3)""",
                self.scope.workspace_id, run_id, self.scope.tenant_id,
            )
        return status.endswith(" 1")

    async def settle_lost(self, run_id: int, *, message: str) -> bool:
        async with translate_errors():
            status = await self.pool.execute(
                """UPDATE operation_runs SET status = 'completed', outcome = 'failed', reason_code = 'run.lost',
                          reason_message = $3, summary_counts = coalesce(summary_counts, $4), completed_at = now()
                   WHERE workspace_id = $1 AND id = $2 AND status = 'queued'
                     AND ($5::uuid IS NULL OR tenant_id = $5)""",
                self.scope.workspace_id, run_id, message, ZERO_COUNTS, self.scope.tenant_id,
            )
        return status.endswith(" 1")
