"""Coalesced completion writes: the completions of concurrent jobs become one statement per flush.

Each job still awaits its own write, so its completion is committed before arq acknowledges the job; but
ten jobs finishing together cost one round trip and one commit (one WAL flush) instead of ten. There is no
timer: a flush starts on the next turn of the event loop after the first pending write, and whatever
arrives while a flush is in flight goes into the next one, so batches grow with load and a lone job waits
for nothing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

import asyncpg

from opspolish.ledger import translate_errors

# Fenced on lease_owner per row: a delivery that lost its lease is simply not among the returned ids.
_COMPLETE_MANY = """
UPDATE operation_runs o SET status = 'completed', outcome = c.outcome, summary_counts = c.counts::jsonb,
       reason_code = c.reason_code, reason_message = c.reason_message, completed_at = now(), heartbeat_at = now()
FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])
     AS c(id, owner, outcome, counts, reason_code, reason_message)
WHERE o.id = c.id AND o.lease_owner = c.owner AND o.status = 'running'
RETURNING o.id
"""


@dataclass(slots=True)
class _Completion:
    run_id: int
    owner: uuid.UUID
    outcome: str
    counts: str
    reason_code: str | None
    reason_message: str | None
    done: asyncio.Future[bool]


def _consume(future: asyncio.Future[bool]) -> None:
    # A waiter cancelled mid-flush never reads its future; reading it here keeps asyncio from warning.
    if not future.cancelled():
        future.exception()


class CompletionWriter:
    """Queue a fenced completion write and await whether it was written (False: the lease was lost)."""

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 200) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self._pending: list[_Completion] = []
        self._flusher: asyncio.Task[None] | None = None
        self.flushes = 0
        self.writes = 0

    async def complete(
        self, run_id: int, lease_owner: uuid.UUID, *, outcome: str, counts: dict[str, int],
        reason_code: str | None, reason_message: str | None,
    ) -> bool:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_consume)
        self._pending.append(_Completion(run_id, lease_owner, outcome, json.dumps(counts), reason_code,
                                         reason_message, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all(), name="opspolish-completion-writer")
        # The write goes ahead even if this job is cancelled meanwhile; it is fenced, so that is safe.
        return await asyncio.shield(done)

    async def _flush_all(self) -> None:
        await asyncio.sleep(0)  # let the jobs finishing in this turn of the loop join the batch
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            try:
                async with translate_errors():
                    rows = await self.pool.fetch(
                        _COMPLETE_MANY, [c.run_id for c in batch], [c.owner for c in batch],
                        [c.outcome for c in batch], [c.counts for c in batch], [c.reason_code for c in batch],
                        [c.reason_message for c in batch],
                    )
            except Exception as exc:  # every waiter learns it was not written
                for c in batch:
                    if not c.done.done():
                        c.done.set_exception(exc)
                continue
            written = {row[0] for row in rows}
            self.flushes += 1
            self.writes += len(batch)
            for c in batch:
                if not c.done.done():
                    c.done.set_result(c.run_id in written)

    async def close(self) -> None:
        """Wait for the writes already queued."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
