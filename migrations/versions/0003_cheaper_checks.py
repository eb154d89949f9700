"""ledger CHECK constraints, same rules, cheaper per statement: summary counts checked in a function, hex by class

Every UPDATE of operation_runs re-checks every CHECK constraint, and PostgreSQL prepares each constraint's
expression once per statement: with the gate writing one row per statement, the summary-counts CASE (prepared
even when the counts are NULL, as on every claim) and the two counted-repetition regexes were ~20 of the ~44 us
the nine checks cost per write. Here the counts rule lives in an IMMUTABLE PL/pgSQL function (a single call
node to prepare, only evaluated when counts are present) and a 64-hex value is "64 characters, none outside
[0-9a-f]". The rules, and the constraint names a violation reports, are unchanged (tests/test_schema.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 17:30:00
"""

from __future__ import annotations

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# Frozen with this revision (the same rule as the 0001 CHECK expression, CASE keeps the casts guarded).
COUNTS_VALID_V1 = r"""
CREATE OR REPLACE FUNCTION opspolish_counts_valid(c jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
BEGIN
    RETURN CASE WHEN jsonb_typeof(c) = 'object' AND jsonb_typeof(c->'total') = 'number'
                 AND jsonb_typeof(c->'processed') = 'number' AND jsonb_typeof(c->'failed') = 'number'
                 AND (c->>'total') ~ '^[0-9]{1,18}$' AND (c->>'processed') ~ '^[0-9]{1,18}$'
                 AND (c->>'failed') ~ '^[0-9]{1,18}$'
           THEN (c->>'failed')::bigint <= (c->>'processed')::bigint
                AND (c->>'processed')::bigint <= (c->>'total')::bigint
           ELSE false END;
END $$;
"""

_OLD = {
    "summary_counts_valid": (
        "summary_counts IS NULL OR CASE WHEN jsonb_typeof(summary_counts) = 'object' AND "
        "jsonb_typeof(summary_counts->'total') = 'number' AND jsonb_typeof(summary_counts->'processed') = 'number' "
        "AND jsonb_typeof(summary_counts->'failed') = 'number' AND (summary_counts->>'total') ~ '^[0-9]{1,18}$' "
        "AND (summary_counts->>'processed') ~ '^[0-9]{1,18}$' AND (summary_counts->>'failed') ~ '^[0-9]{1,18}$' "
        "THEN (summary_counts->>'failed')::bigint <= (summary_counts->>'processed')::bigint AND "
        "(summary_counts->>'processed')::bigint <= (summary_counts->>'total')::bigint ELSE false END"),
    "identity_hash_hex64": "run_identity_hash ~ '^[0-9a-f]{64}$'",
    "fingerprint_hex64": "fingerprint ~ '^[0-9a-f]{64}$'",
}
_NEW = {
    "summary_counts_valid": "summary_counts IS NULL OR opspolish_counts_valid(summary_counts)",
    "identity_hash_hex64": "length(run_identity_hash) = 64 AND run_identity_hash !~ '[^0-9a-f]'",
    "fingerprint_hex64": "length(fingerprint) = 64 AND fingerprint !~ '[^0-9a-f]'",
}


def _replace(checks: dict[str, str]) -> None:
    for name, expression in checks.items():
        op.execute(f"ALTER TABLE operation_runs DROP CONSTRAINT ck_operation_runs_{name}")
        op.execute(f"ALTER TABLE operation_runs ADD CONSTRAINT ck_operation_runs_{name} CHECK ({expression})")


def upgrade() -> None:
    op.execute(COUNTS_VALID_V1)
    _replace(_NEW)


def downgrade() -> None:
    _replace(_OLD)
    op.execute("DROP FUNCTION opspolish_counts_valid(jsonb)")
