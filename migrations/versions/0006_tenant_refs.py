"""tenants: no tenant's id is another tenant's external_id (a tenant reference names one tenant only)

A tenant is named by its id or by its external_id (both UUID-shaped), looked up by id first. A tenant whose
external_id was another tenant's id could not be reached by its own external_id at all: a dispatch, a raw delivery or
a `runs list --tenant` naming it reached the other tenant. This trigger refuses such a row (unique_violation); rows
written before it are left as they are.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 18:15:00
"""

from __future__ import annotations

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_FUNCTION = r"""
CREATE FUNCTION opspolish_tenant_refs_disjoint() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_as_id uuid;
BEGIN
    -- One writer at a time: two concurrent rows could otherwise each miss the other. Tenants are written rarely.
    PERFORM pg_advisory_xact_lock(7305812003925617411);
    IF NEW.external_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        v_as_id := NEW.external_id::uuid;  -- the CHECK on its form runs after this trigger
    END IF;
    IF EXISTS (SELECT 1 FROM tenants t WHERE t.id = v_as_id AND t.id <> NEW.id)
       OR EXISTS (SELECT 1 FROM tenants t WHERE t.external_id = NEW.id::text AND t.id <> NEW.id) THEN
        RAISE EXCEPTION 'tenant %: its id or external_id is another tenant''s external_id or id', NEW.id
            USING ERRCODE = '23505', CONSTRAINT = 'tenants_refs_disjoint';
    END IF;
    RETURN NEW;
END $$;
"""
_TRIGGER = """
CREATE TRIGGER tenants_refs_disjoint BEFORE INSERT OR UPDATE OF id, external_id ON tenants
FOR EACH ROW EXECUTE FUNCTION opspolish_tenant_refs_disjoint()
"""


def upgrade() -> None:
    op.execute(_FUNCTION)
    op.execute(_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER tenants_refs_disjoint ON tenants")
    op.execute("DROP FUNCTION opspolish_tenant_refs_disjoint()")
