"""The one exception hierarchy. Each class carries a stable ``reason_code``; its docstring is the default message.

Callers branch on the type or on ``reason_code``, never on message text. Codes are public: never rename one.
"""

from __future__ import annotations

from typing import ClassVar

from opspolish.sanitize import sanitize_message


class OpsPolishError(Exception):
    """Unexpected internal error."""

    reason_code: ClassVar[str] = "internal.unexpected"
    #: A transient error is retried (the run goes back to ``queued``); a terminal one ends the run.
    transient: ClassVar[bool] = False

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        self.field = field
        text = message or (self.__doc__ or self.reason_code).strip().splitlines()[0]
        if field and field not in text:
            text = f"{field}: {text}"
        self.message = sanitize_message(text)
        super().__init__(self.message)


class InputInvalid(OpsPolishError):
    """Input is invalid."""

    reason_code = "input.invalid"


class InputTooLarge(InputInvalid):
    """Inputs are larger than the cap on their canonical form (``input.invalid`` like any other bad input)."""


class TenantNotFound(OpsPolishError):
    """Tenant not found."""

    reason_code = "tenant.not_found"


class RunNotFound(OpsPolishError):
    """Run not found in this scope."""

    reason_code = "run.not_found"


class DbUnavailable(OpsPolishError):
    """PostgreSQL is unavailable."""

    reason_code = "db.unavailable"
    transient = True


class SchemaMismatch(OpsPolishError):
    """The database's schema is not one this version of opspolish can work with."""

    reason_code = "db.schema_mismatch"


class RedisUnavailable(OpsPolishError):
    """Redis is unavailable."""

    reason_code = "redis.unavailable"
    transient = True


class QueueConflict(OpsPolishError):
    """The run's job id is already taken in Redis by another job."""

    reason_code = "queue.conflict"


class ProviderUnavailable(OpsPolishError):
    """The assignment provider is unavailable."""

    reason_code = "provider.unavailable"
    transient = True


class ProviderThrottled(OpsPolishError):
    """The assignment provider throttled the request."""

    reason_code = "provider.throttled"
    transient = True

    def __init__(self, message: str | None = None, *, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderRejected(OpsPolishError):
    """The assignment provider rejected the item."""

    reason_code = "provider.rejected"


class LeaseLost(OpsPolishError):
    """This delivery no longer holds the run's lease (another delivery took the run over): it writes nothing."""

    reason_code = "dedupe.overlap"


class JobTimeout(OpsPolishError):
    """The job exceeded its timeout."""

    reason_code = "job.timeout"


class JobRetry(OpsPolishError):
    """The job body asked for a retry (arq's Retry)."""

    reason_code = "job.retry"
    transient = True

    def __init__(self, message: str | None = None, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        #: arq's ``defer``, in seconds; None (no defer given) retries with the usual backoff.
        self.retry_after_s = retry_after_s


class JobCancelled(OpsPolishError):
    """The job was cancelled."""

    reason_code = "job.cancelled"


class ItemsAllFailed(OpsPolishError):
    """Every item failed."""

    reason_code = "items.all_failed"


#: Every stable reason code, with its meaning. The README's table lists the same codes, in words written for it
#: (tests/test_cli.py holds the two to each other and to every error class's code).
REASON_CODES: dict[str, str] = {
    "dedupe.already_completed": "a redelivery of a run that already ended; nothing was done (log line + metric)",
    "dedupe.overlap": (
        "the run is held by another delivery with a live lease; this delivery was deferred. Also logged by a "
        "worker that lost its lease and abandons the run without writing, and reported by a reconcile pass that "
        "gave up waiting (30 s) for a workspace's busy gate. Never stored on a run"
    ),
    "dedupe.non_canonical": "another run of the same identity was active; this one was skipped (dedupe_of)",
    "dedupe.cooldown": "the identity completed an executed run within its cooldown; skipped (dedupe_of)",
    "run.orphaned": "the worker died (lease stale) and the queue no longer holds the job",
    "run.lost": (
        "a queued run whose queue job vanished and that reconcile does not re-enqueue: it was re-enqueued "
        "once already, or it is older than OPSPOLISH_RECONCILE_MAX_QUEUED_AGE_S"
    ),
    "run.not_found": "a delivery named a run that does not exist in its scope",
    "job.timeout": "the job body exceeded its timeout",
    "job.cancelled": (
        "a delivery was cancelled mid-run (worker shutdown, or arq's timeout cutting a long reconcile cron pass) "
        "or while its claim was in flight, and handed its run back as queued for redelivery; the run carries the "
        "code until a later attempt ends it. No run ends cancelled: nothing writes that outcome"
    ),
    "job.retry": (
        "the job body raised arq's Retry: the run went back to queued and was retried after its defer (or the "
        "usual backoff), like any transient error; it ends failed with this code once its attempts run out"
    ),
    "items.all_failed": "every item of the run failed",
    "items.partially_failed": "some items failed (outcome partially_succeeded); the others succeeded",
    "items.unprocessed": (
        "the body returned without error, but some items it announced (add_total) neither succeeded nor failed: "
        "partially_succeeded if any succeeded, failed if none did"
    ),
    "queue.conflict": (
        "dispatch found the new run's arq job id already taken in Redis by another job (a database sharing the queue "
        "name, or a ledger reset while its jobs stayed queued): the run was recorded failed with this code, the "
        "other job left alone"
    ),
    "provider.unavailable": "the assignment provider could not be reached (retried)",
    "provider.throttled": "the assignment provider throttled us (retried after its retry-after)",
    "provider.rejected": "the assignment provider rejected an item (not retried)",
    "input.invalid": (
        "the inputs are malformed (the message names the field), or a delivery of a run carries other inputs "
        "than its run's (logged; the run waits for its own delivery)"
    ),
    "tenant.not_found": "no tenant with that id or external_id",
    "db.unavailable": "PostgreSQL could not be reached",
    "db.schema_mismatch": (
        "the database's schema is not one this version can work with (a revision it does not know, someone else's "
        "tables, or not at head where that is required); nothing was changed"
    ),
    "redis.unavailable": "Redis could not be reached",
    "internal.unexpected": "an unexpected error; the message is sanitized",
}
