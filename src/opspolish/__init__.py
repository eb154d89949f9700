"""opspolish: tracked, deduplicated background operations on arq with a Postgres operations ledger."""

from opspolish.counts import Counts
from opspolish.dispatch import DispatchResult, dispatch
from opspolish.errors import (
    InputInvalid,
    LeaseLost,
    OpsPolishError,
    ProviderRejected,
    ProviderThrottled,
    ProviderUnavailable,
    TenantNotFound,
)
from opspolish.fingerprint import fingerprint
from opspolish.runtime import Runtime, connect
from opspolish.settings import Settings
from opspolish.tracking import RunContext, tracked_job

__all__ = [
    "Counts",
    "DispatchResult",
    "InputInvalid",
    "LeaseLost",
    "OpsPolishError",
    "ProviderRejected",
    "ProviderThrottled",
    "ProviderUnavailable",
    "RunContext",
    "Runtime",
    "Settings",
    "TenantNotFound",
    "connect",
    "dispatch",
    "fingerprint",
    "tracked_job",
]
