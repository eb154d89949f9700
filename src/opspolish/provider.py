"""Assignment providers (DESIGN §8): a small async protocol and the embedded database directory."""

from __future__ import annotations

import importlib
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from opspolish.errors import InputInvalid, OpsPolishError, ProviderRejected, ProviderUnavailable
from opspolish.ledger import translate_errors
from opspolish.sanitize import describe_exception

if TYPE_CHECKING:
    from opspolish.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Assignment:
    target: str
    intent: str

    def as_json(self) -> dict[str, str]:
        return {"target": self.target, "intent": self.intent}


@dataclass(frozen=True, slots=True)
class PolicyRef:
    id: uuid.UUID
    name: str


@runtime_checkable
class AssignmentProvider(Protocol):
    """Where a tenant's policy assignments live.

    Errors: :class:`ProviderUnavailable` / :class:`ProviderThrottled` (transient: the run is retried) and
    :class:`ProviderRejected` (permanent for that item: counted as a failed item).
    """

    async def list_policies(self, tenant_id: uuid.UUID) -> list[PolicyRef]: ...

    async def get_assignments(self, tenant_id: uuid.UUID, policy_id: uuid.UUID) -> list[Assignment]: ...

    async def apply(self, tenant_id: uuid.UUID, policy_id: uuid.UUID, assignments: list[Assignment]) -> None:
        """Make the policy's assignments exactly ``assignments`` (idempotent)."""
        ...


class DirectoryProvider:
    """The embedded provider: the ``directory_*`` tables seeded by ``make reset-seed``."""

    def __init__(self, runtime: Runtime) -> None:
        self.pool = runtime.pool

    async def list_policies(self, tenant_id: uuid.UUID) -> list[PolicyRef]:
        try:
            async with translate_errors():
                rows = await self.pool.fetch(
                    "SELECT id, name FROM directory_policies WHERE tenant_id = $1 ORDER BY name", tenant_id
                )
        except Exception as exc:
            raise ProviderUnavailable(f"directory unavailable: {type(exc).__name__}") from exc
        return [PolicyRef(r[0], r[1]) for r in rows]

    async def get_assignments(self, tenant_id: uuid.UUID, policy_id: uuid.UUID) -> list[Assignment]:
        try:
            async with translate_errors():
                rows = await self.pool.fetch(
                    """SELECT a.target, a.intent FROM directory_policies p
                       LEFT JOIN directory_assignments a ON a.policy_id = p.id
                       WHERE p.id = $1 AND p.tenant_id = $2 ORDER BY a.target""",
                    policy_id, tenant_id,
                )
        except Exception as exc:
            raise ProviderUnavailable(f"directory unavailable: {type(exc).__name__}") from exc
        if not rows:
            raise ProviderRejected(f"policy {policy_id} does not exist for this tenant")
        return [Assignment(r[0], r[1]) for r in rows if r[0] is not None]

    async def apply(self, tenant_id: uuid.UUID, policy_id: uuid.UUID, assignments: list[Assignment]) -> None:
        try:
            async with translate_errors(), self.pool.acquire() as conn, conn.transaction():
                locked = await conn.fetchval(
                    "SELECT locked FROM directory_policies WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
                    policy_id, tenant_id,
                )
                if locked is None:
                    raise ProviderRejected(f"policy {policy_id} does not exist for this tenant")
                if locked:
                    raise ProviderRejected(f"policy {policy_id} is locked")
                await conn.execute(
                    "DELETE FROM directory_assignments WHERE policy_id = $1 AND NOT (target = ANY($2::text[]))",
                    policy_id, [a.target for a in assignments],
                )
                await conn.executemany(
                    """INSERT INTO directory_assignments (policy_id, target, intent) VALUES ($1, $2, $3)
                       ON CONFLICT (policy_id, target) DO UPDATE SET intent = EXCLUDED.intent
                       WHERE directory_assignments.intent IS DISTINCT FROM EXCLUDED.intent""",
                    [(policy_id, a.target, a.intent) for a in assignments],
                )
        except ProviderRejected:
            raise
        except Exception as exc:
            raise ProviderUnavailable(f"directory unavailable: {type(exc).__name__}") from exc


def provider_factory(spec: str) -> Any:
    """The callable named ``module:Class`` in settings, imported but not called (``opspolish doctor`` checks it)."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise InputInvalid(f"OPSPOLISH_PROVIDER: cannot import {spec!r}", field="OPSPOLISH_PROVIDER") from exc
    except Exception as exc:  # the module raised as it ran: bad configuration (it was internal.unexpected, exit 1)
        raise InputInvalid(f"OPSPOLISH_PROVIDER: cannot import {spec!r} ({describe_exception(exc)})",
                           field="OPSPOLISH_PROVIDER") from exc
    if not callable(factory):
        raise InputInvalid(f"OPSPOLISH_PROVIDER: {spec!r} is not callable", field="OPSPOLISH_PROVIDER")
    return factory


def load_provider(spec: str, runtime: Runtime) -> Any:
    """Build the provider named ``module:Class`` in settings; it is called with the runtime."""
    factory = provider_factory(spec)
    try:
        return factory(runtime)
    except OpsPolishError:
        raise
    except Exception as exc:  # os:system and the like: a TypeError, reported as internal.unexpected at exit 1
        raise InputInvalid(f"OPSPOLISH_PROVIDER: {spec!r} could not be built from the runtime: "
                           f"{describe_exception(exc)}", field="OPSPOLISH_PROVIDER") from exc
