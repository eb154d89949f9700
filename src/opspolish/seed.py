"""Seed workspaces, tenants and the embedded assignment directory. Idempotent: a second run adds nothing."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from opspolish.ledger import translate_errors

DEFAULT_WORKSPACES = (("acme", "Acme Corp"), ("globex", "Globex Inc"))
TARGETS = ("all-users", "all-devices", "finance", "engineering", "sales", "contractors")
INTENTS = ("include", "exclude")
#: Seeded ids are derived from names, so seeding twice (or on two machines) gives the same rows.
_NAMESPACE = uuid.UUID("5d0c2a5e-7a8e-4f4e-9b7e-0b1d6e7c9a11")


def stable_uuid4(*parts: str) -> uuid.UUID:
    """A UUID with version-4 layout derived deterministically from ``parts``."""
    raw = bytearray(uuid.uuid5(_NAMESPACE, "/".join(parts)).bytes)
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return uuid.UUID(bytes=bytes(raw))


@dataclass(frozen=True)
class SeedReport:
    workspaces: int
    tenants: int
    policies: int
    created_tenants: int


async def seed(
    conn: asyncpg.Connection, *, tenants_per_workspace: int = 3, policies_per_tenant: int = 3,
    workspaces: tuple[tuple[str, str], ...] = DEFAULT_WORKSPACES, progress: Callable[[int], None] | None = None,
) -> SeedReport:
    """Insert what is missing; existing rows are left as they are."""
    created = 0
    async with translate_errors():
        for slug, name in workspaces:
            ws_id = await conn.fetchval(
                """INSERT INTO workspaces (id, slug, name) VALUES ($1, $2, $3)
                   ON CONFLICT (slug) DO UPDATE SET name = workspaces.name RETURNING id""",
                stable_uuid4("workspace", slug), slug, name,
            )
            batch = 500
            for start in range(0, tenants_per_workspace, batch):
                rows = []
                for i in range(start, min(start + batch, tenants_per_workspace)):
                    rows.append((stable_uuid4("tenant", slug, str(i)), ws_id,
                                 str(stable_uuid4("tenant-external", slug, str(i))), f"{name} tenant {i + 1}"))
                async with conn.transaction():
                    result = await conn.fetch(
                        """INSERT INTO tenants (id, workspace_id, external_id, name)
                           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[])
                           ON CONFLICT DO NOTHING RETURNING id""",
                        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                    )
                    created += len(result)
                    await _seed_directory(conn, ws_id, [r[0] for r in rows], slug, policies_per_tenant)
                if progress is not None:
                    progress(len(rows))
        counts = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM workspaces), (SELECT count(*) FROM tenants),
                      (SELECT count(*) FROM directory_policies)"""
        )
    assert counts is not None
    return SeedReport(counts[0], counts[1], counts[2], created)


async def _seed_directory(conn: asyncpg.Connection, ws_id: uuid.UUID, tenant_ids: list[uuid.UUID], slug: str,
                          policies_per_tenant: int) -> None:
    policies, assignments = [], []
    for t_index, tenant_id in enumerate(tenant_ids):
        for p in range(policies_per_tenant):
            policy_id = stable_uuid4("policy", str(tenant_id), str(p))
            policies.append((policy_id, ws_id, tenant_id, f"policy-{p + 1:03d}"))
            for k in range(1 + (p + t_index) % 3):
                assignments.append((policy_id, TARGETS[(p + k + t_index) % len(TARGETS)], INTENTS[(p + k) % 2]))
    if not policies:
        return
    await conn.execute(
        """INSERT INTO directory_policies (id, workspace_id, tenant_id, name)
           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[]) ON CONFLICT DO NOTHING""",
        [p[0] for p in policies], [p[1] for p in policies], [p[2] for p in policies], [p[3] for p in policies],
    )
    await conn.execute(
        """INSERT INTO directory_assignments (policy_id, target, intent)
           SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING""",
        [a[0] for a in assignments], [a[1] for a in assignments], [a[2] for a in assignments],
    )
