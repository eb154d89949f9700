"""opspolish: tracked, deduplicated background operations on arq with a Postgres operations ledger."""

from opspolish.counts import Counts
from opspolish.dispatch import DispatchResult, dispatch
from opspolish.errors import (
    DbUnavailable,
    InputInvalid,
    InputTooLarge,
    ItemsAllFailed,
    JobCancelled,
    JobRetry,
    JobTimeout,
    LeaseLost,
    OpsPolishError,
    ProviderRejected,
    ProviderThrottled,
    ProviderUnavailable,
    QueueConflict,
    RedisUnavailable,
    RunNotFound,
    SchemaMismatch,
    TenantNotFound,
)
from opspolish.fingerprint import fingerprint
from opspolish.runtime import Runtime, connect
from opspolish.settings import Settings
from opspolish.tracking import RunContext, TrackedJob, tracked_job

__all__ = [
    "Counts",
    "DbUnavailable",
    "DispatchResult",
    "InputInvalid",
    "InputTooLarge",
    "ItemsAllFailed",
    "JobCancelled",
    "JobRetry",
    "JobTimeout",
    "LeaseLost",
    "OpsPolishError",
    "ProviderRejected",
    "ProviderThrottled",
    "ProviderUnavailable",
    "QueueConflict",
    "RedisUnavailable",
    "RunContext",
    "RunNotFound",
    "Runtime",
    "SchemaMismatch",
    "Settings",
    "TenantNotFound",
    "TrackedJob",
    "connect",
    "dispatch",
    "fingerprint",
    "tracked_job",
]
