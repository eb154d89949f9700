"""Server-side SQL of the execution gate and of dispatch (DESIGN §5), installed by migrations.

Why a PL/pgSQL function: the gate must take ``pg_try_advisory_xact_lock`` *first* and only then read the
ledger. In READ COMMITTED a single SQL statement's snapshot is taken before a lock acquired inside it,
so a one-statement "lock and check" CTE can miss a claim committed in between. Inside a VOLATILE
PL/pgSQL function every statement takes a fresh snapshot, so the checks below see everything committed
before the lock was granted - and the whole gate is still one round trip and one short transaction
(the xact-scoped lock ends at commit, which keeps it safe behind PgBouncer in transaction pooling).

Plans: PL/pgSQL caches them. A generic plan made while the ledger was empty (and freshly analyzed) can pick a
sequential scan that never goes away as the ledger grows. v1 avoided it with ``force_custom_plan`` (every
statement re-planned on every call); v2 (below, migration 0002) keeps generic plans and prices sequential scans
out of reach instead, which is half the server time per claim.

These texts are frozen per version: a migration imports the version it installs. Change the gate by
adding ``..._V2`` and a migration that installs it, never by editing a version already shipped.
"""

from __future__ import annotations

LOCK_KEY_V1 = r"""-- The signed 64-bit advisory-lock key of an identity hash: its first 8 bytes, big-endian.
-- Mirrors opspolish.fingerprint.lock_key (never a salted hash()).
CREATE OR REPLACE FUNCTION opspolish_lock_key(p_identity text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT ('x' || substr(p_identity, 1, 16))::bit(64)::bigint $$;
"""

IDENTITY_V1 = r"""-- The run identity hash; mirrors opspolish.fingerprint.identity_hash.
CREATE OR REPLACE FUNCTION opspolish_identity(p_scope text, p_type text, p_fingerprint text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT encode(sha256(convert_to(
        'opspolish.identity/v1' || E'\n' || p_scope || E'\n' || p_type || E'\n' || p_fingerprint, 'UTF8')), 'hex') $$;
"""

RESOLVE_TENANT_V1 = r"""-- A tenant by id or by external_id (both are UUID-shaped text).
CREATE OR REPLACE FUNCTION opspolish_resolve_tenant(p_tenant text, OUT tenant_id uuid, OUT workspace_id uuid)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_tenant !~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$' THEN
        RETURN;
    END IF;
    SELECT t.id, t.workspace_id INTO tenant_id, workspace_id FROM tenants t WHERE t.id = p_tenant::uuid;
    IF NOT FOUND THEN
        SELECT t.id, t.workspace_id INTO tenant_id, workspace_id
        FROM tenants t WHERE t.external_id = lower(p_tenant::uuid::text);
    END IF;
END $$;
"""

CLAIM_V1 = r"""
-- The execution gate (DESIGN §5). One call = one short transaction. Decisions:
--   claimed / taken_over   the caller holds the lease and runs the body
--   busy                   the identity's lock is held and nothing is decided yet: retry the delivery shortly
--   overlap                another delivery holds a live lease: defer by wait_s, then decide again
--   already_completed      redelivery of finished work: nothing done
--   skipped                recorded as skipped (reason_code dedupe.non_canonical / dedupe.cooldown)
--   run_not_found          no such run in the delivery's scope
--   tenant_not_found       unknown tenant
CREATE OR REPLACE FUNCTION opspolish_claim(
    p_run_id bigint,            -- the delivery's run id; NULL for a raw enqueue
    p_tenant text,              -- tenant id or external_id; NULL for workspace-scoped runs
    p_workspace_id uuid,        -- scope of a workspace-scoped run; NULL for tenant runs
    p_type text,
    p_fingerprint text,         -- raw enqueue only
    p_context jsonb,            -- raw enqueue only
    p_job_id text,
    p_queue_name text,
    p_lease_owner uuid,
    p_cooldown_s double precision,
    p_lease_ttl_s double precision
) RETURNS TABLE (decision text, run_id bigint, attempts integer, dedupe_of bigint, reason_code text,
                 wait_s double precision, workspace_id uuid, tenant_id uuid)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
AS $$
#variable_conflict use_column
DECLARE
    v_tenant uuid;
    v_ws uuid := p_workspace_id;
    v_identity text;
    v_other bigint;
    v_code text;
    v_locked boolean;
    r operation_runs%ROWTYPE;
    v_zero constant jsonb := '{"total": 0, "processed": 0, "failed": 0}';
BEGIN
    -- Each exit sets the OUT columns that differ from these defaults (the others start NULL), then RETURN NEXT.
    attempts := 0;
    wait_s := 0;

    -- 1. Resolve the run (by id) or the identity (raw enqueue), within the delivery's scope.
    IF p_run_id IS NOT NULL THEN
        SELECT * INTO r FROM operation_runs o WHERE o.id = p_run_id;
    END IF;
    IF p_tenant IS NOT NULL THEN
        IF r.tenant_id IS NOT NULL AND r.tenant_id::text = lower(p_tenant) THEN
            v_tenant := r.tenant_id;  -- dispatch names the tenant by id: no look-up needed
            v_ws := r.workspace_id;
        ELSE
            -- opspolish_resolve_tenant inlined: one statement on the hot path instead of a nested call.
            IF p_tenant ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$' THEN
                SELECT t.id, t.workspace_id INTO v_tenant, v_ws FROM tenants t WHERE t.id = p_tenant::uuid;
                IF v_tenant IS NULL THEN
                    SELECT t.id, t.workspace_id INTO v_tenant, v_ws
                    FROM tenants t WHERE t.external_id = lower(p_tenant::uuid::text);
                END IF;
            END IF;
        END IF;
        IF v_tenant IS NULL THEN
            decision := 'tenant_not_found';
            reason_code := 'tenant.not_found';
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    IF p_run_id IS NOT NULL THEN
        IF r.id IS NULL OR r.type <> p_type
           OR (p_tenant IS NOT NULL AND r.tenant_id IS DISTINCT FROM v_tenant)
           OR (p_tenant IS NULL AND v_ws IS NOT NULL AND (r.workspace_id <> v_ws OR r.tenant_id IS NOT NULL)) THEN
            decision := 'run_not_found';
            run_id := p_run_id;
            reason_code := 'run.not_found';
            RETURN NEXT;
            RETURN;
        END IF;
        v_identity := r.run_identity_hash;
    ELSE
        IF v_ws IS NULL THEN
            RAISE EXCEPTION 'opspolish_claim: a raw delivery needs a tenant or a workspace' USING ERRCODE = '22023';
        END IF;
        v_identity := opspolish_identity(
            CASE WHEN v_tenant IS NULL THEN 'workspace:' || v_ws ELSE 'tenant:' || v_tenant END,
            p_type, p_fingerprint);
    END IF;

    -- 2. The identity's lock, xact-scoped. Without it nothing is claimed: a busy delivery is retried by the
    --    caller (work is never dropped). It may only record what committed facts already decide (below).
    v_locked := pg_try_advisory_xact_lock(opspolish_lock_key(v_identity));

    -- 3. Checks, each a new statement (fresh snapshot) issued after the lock is held (or found busy).
    IF p_run_id IS NOT NULL THEN
        SELECT * INTO r FROM operation_runs o WHERE o.id = p_run_id;
    ELSE  -- a redelivery of a raw job we already recorded? (its active run first, if it has one)
        SELECT * INTO r FROM operation_runs o
        WHERE o.job_id = p_job_id AND o.run_identity_hash = v_identity
        ORDER BY o.status = 'completed', o.id DESC LIMIT 1;
    END IF;

    IF r.id IS NOT NULL THEN
        IF r.status = 'completed' THEN  -- final: true with or without the lock
            decision := 'already_completed';
            run_id := r.id;
            attempts := r.attempts;
            dedupe_of := r.dedupe_of;
            reason_code := 'dedupe.already_completed';
            workspace_id := r.workspace_id;
            tenant_id := r.tenant_id;
            RETURN NEXT;
            RETURN;
        END IF;
        IF NOT v_locked THEN
            decision := 'busy';
            run_id := r.id;
            workspace_id := v_ws;
            tenant_id := v_tenant;
            RETURN NEXT;
            RETURN;
        END IF;
        IF r.status = 'running' AND r.heartbeat_at > now() - make_interval(secs => p_lease_ttl_s) THEN
            decision := 'overlap';
            run_id := r.id;
            attempts := r.attempts;
            reason_code := 'dedupe.overlap';
            wait_s := GREATEST(extract(epoch FROM r.heartbeat_at - now())::float8 + p_lease_ttl_s, 0.1);
            workspace_id := r.workspace_id;
            tenant_id := r.tenant_id;
            RETURN NEXT;
            RETURN;
        END IF;
        IF r.status = 'queued' AND r.attempts = 0 THEN
            -- r is the identity's active run (partial unique index); only a recent completion can stop it.
            SELECT o.id INTO v_other FROM operation_runs o
            WHERE o.run_identity_hash = v_identity AND o.status = 'completed' AND o.outcome <> 'skipped'
              AND o.attempts > 0 AND o.completed_at > now() - make_interval(secs => p_cooldown_s)
            ORDER BY o.completed_at DESC LIMIT 1;
            IF v_other IS NOT NULL THEN
                UPDATE operation_runs o SET status = 'completed', outcome = 'skipped',
                       reason_code = 'dedupe.cooldown', dedupe_of = v_other, summary_counts = v_zero,
                       reason_message = 'identity completed run ' || v_other || ' within its cooldown',
                       completed_at = now(), job_id = coalesce(o.job_id, p_job_id)
                WHERE o.id = r.id;
                decision := 'skipped';
                run_id := r.id;
                dedupe_of := v_other;
                reason_code := 'dedupe.cooldown';
                workspace_id := r.workspace_id;
                tenant_id := r.tenant_id;
                RETURN NEXT;
                RETURN;
            END IF;
        END IF;
        -- Claim: a queued run, or a running run whose lease went stale (its worker died).
        UPDATE operation_runs o SET status = 'running', attempts = o.attempts + 1, lease_owner = p_lease_owner,
               heartbeat_at = now(), started_at = coalesce(o.started_at, now()),
               job_id = coalesce(o.job_id, p_job_id), queue_name = coalesce(o.queue_name, p_queue_name)
        WHERE o.id = r.id
        RETURNING o.attempts INTO r.attempts;
        decision := CASE WHEN r.status = 'running' THEN 'taken_over' ELSE 'claimed' END;
        run_id := r.id;
        attempts := r.attempts;
        workspace_id := r.workspace_id;
        tenant_id := r.tenant_id;
        RETURN NEXT;
        RETURN;
    END IF;

    -- A raw delivery seen for the first time: it becomes a run of its own (claimed or skipped).
    LOOP
        v_other := NULL;
        v_code := NULL;
        SELECT o.id INTO v_other FROM operation_runs o
        WHERE o.run_identity_hash = v_identity AND o.status IN ('queued', 'running');
        IF v_other IS NOT NULL THEN
            v_code := 'dedupe.non_canonical';
        ELSE
            SELECT o.id INTO v_other FROM operation_runs o
            WHERE o.run_identity_hash = v_identity AND o.status = 'completed' AND o.outcome <> 'skipped'
              AND o.attempts > 0 AND o.completed_at > now() - make_interval(secs => p_cooldown_s)
            ORDER BY o.completed_at DESC LIMIT 1;
            IF v_other IS NOT NULL THEN
                v_code := 'dedupe.cooldown';
            END IF;
        END IF;

        -- A skip rests on committed facts only (another run of the identity is active, or one executed within
        -- the cooldown) and never touches the active run, so it is recorded even while the lock is busy: a
        -- storm of duplicates is settled at once instead of queueing behind one lock.
        IF v_code IS NOT NULL THEN
            INSERT INTO operation_runs AS o (workspace_id, tenant_id, type, status, outcome, run_identity_hash,
                   fingerprint, context, summary_counts, reason_code, reason_message, dedupe_of, job_id,
                   queue_name, completed_at)
            VALUES (v_ws, v_tenant, p_type, 'completed', 'skipped', v_identity, p_fingerprint, p_context, v_zero,
                    v_code, CASE v_code WHEN 'dedupe.cooldown'
                                 THEN 'identity completed run ' || v_other || ' within its cooldown'
                                 ELSE 'run ' || v_other || ' of the same identity is active' END,
                    v_other, p_job_id, p_queue_name, now())
            RETURNING o.id INTO r.id;
            decision := 'skipped';
            run_id := r.id;
            dedupe_of := v_other;
            reason_code := v_code;
            workspace_id := v_ws;
            tenant_id := v_tenant;
            RETURN NEXT;
            RETURN;
        END IF;

        IF NOT v_locked THEN  -- nothing decided: only the lock holder may create and claim the run
            decision := 'busy';
            workspace_id := v_ws;
            tenant_id := v_tenant;
            RETURN NEXT;
            RETURN;
        END IF;
        INSERT INTO operation_runs AS o (workspace_id, tenant_id, type, status, run_identity_hash, fingerprint,
               context, attempts, lease_owner, heartbeat_at, started_at, job_id, queue_name)
        VALUES (v_ws, v_tenant, p_type, 'running', v_identity, p_fingerprint, p_context, 1, p_lease_owner,
                now(), now(), p_job_id, p_queue_name)
        ON CONFLICT (run_identity_hash) WHERE status IN ('queued', 'running') DO NOTHING
        RETURNING o.id INTO r.id;
        IF r.id IS NOT NULL THEN
            decision := 'claimed';
            run_id := r.id;
            attempts := 1;
            workspace_id := v_ws;
            tenant_id := v_tenant;
            RETURN NEXT;
            RETURN;
        END IF;
        -- A dispatch made an active run of this identity after our check: go round and skip against it.
    END LOOP;
END $$;
"""

DISPATCH_V1 = r"""
-- Dispatch: create a queued run, or join the identity's active run. Loops if the active run
-- completes between the insert attempt and the look-up.
CREATE OR REPLACE FUNCTION opspolish_dispatch(
    p_tenant text, p_workspace_id uuid, p_type text, p_fingerprint text, p_context jsonb, p_queue_name text
) RETURNS TABLE (run_id bigint, job_id text, created boolean, status text, workspace_id uuid, tenant_id uuid)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
AS $$
#variable_conflict use_column
DECLARE
    v_tenant uuid;
    v_ws uuid := p_workspace_id;
    v_identity text;
    v_id bigint;
    v_job text;
    v_status text;
BEGIN
    IF p_tenant IS NOT NULL THEN
        SELECT rt.tenant_id, rt.workspace_id INTO v_tenant, v_ws FROM opspolish_resolve_tenant(p_tenant) rt;
        IF v_tenant IS NULL THEN
            RETURN;  -- no row: tenant not found
        END IF;
    END IF;
    v_identity := opspolish_identity(
        CASE WHEN v_tenant IS NULL THEN 'workspace:' || v_ws ELSE 'tenant:' || v_tenant END, p_type, p_fingerprint);
    LOOP
        INSERT INTO operation_runs AS o (id, workspace_id, tenant_id, type, run_identity_hash, fingerprint, context,
                                         queue_name, job_id)
        SELECT s.n, v_ws, v_tenant, p_type, v_identity, p_fingerprint, p_context, p_queue_name,
               p_queue_name || ':run:' || s.n
        FROM (SELECT nextval('operation_runs_id_seq'::regclass) AS n) s
        ON CONFLICT (run_identity_hash) WHERE status IN ('queued', 'running') DO NOTHING
        RETURNING o.id, o.job_id INTO v_id, v_job;
        IF v_id IS NOT NULL THEN
            run_id := v_id;
            job_id := v_job;
            created := true;
            status := 'queued'::text;
            workspace_id := v_ws;
            tenant_id := v_tenant;
            RETURN NEXT;
            RETURN;
        END IF;
        SELECT o.id, o.job_id, o.status INTO v_id, v_job, v_status FROM operation_runs o
        WHERE o.run_identity_hash = v_identity AND o.status IN ('queued', 'running');
        IF v_id IS NOT NULL THEN
            run_id := v_id;
            job_id := v_job;
            created := false;
            status := v_status;
            workspace_id := v_ws;
            tenant_id := v_tenant;
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;
END $$;
"""

#: Statements (one each: asyncpg runs one statement per call) in install order.
INSTALL_V1 = (LOCK_KEY_V1, IDENTITY_V1, RESOLVE_TENANT_V1, CLAIM_V1, DISPATCH_V1)

# --- v2 (migration 0002): the same gate, planned once per connection ---------------------------------------
#
# v1 re-planned every statement of every call (force_custom_plan): about half of a claim's server time
# (165 -> 83 us per claim measured in the server, make bench has the end-to-end figures). v2 keeps one
# generic plan per statement and prices sequential scans out of reach (enable_seqscan = off) instead, which
# defuses the same trap - a plan made on an empty ledger - because every look-up here has an equality index
# path: the primary key, the job-id index, the active-identity and cooldown partial indexes (whose predicates
# the statements spell out). tests/test_plans.py reads the plans at a million runs after warming on an empty
# ledger and checks each statement's index. A cooldown of zero needs no look-up at all (nothing completes
# after now()), so v2 skips it.

_V1_PLANNING = "SET plan_cache_mode = force_custom_plan\n"
_V2_PLANNING = "SET plan_cache_mode = force_generic_plan\nSET enable_seqscan = off\n"


def _v2(v1: str) -> str:
    if _V1_PLANNING not in v1:
        raise AssertionError("v1 text changed: v2 is derived from it")
    return v1.replace(_V1_PLANNING, _V2_PLANNING)


_COOLDOWN_V1 = "        IF r.status = 'queued' AND r.attempts = 0 THEN\n"
_COOLDOWN_V2 = "        IF r.status = 'queued' AND r.attempts = 0 AND p_cooldown_s > 0 THEN\n"
_RAW_COOLDOWN_V1 = "        ELSE\n            SELECT o.id INTO v_other FROM operation_runs o\n"
_RAW_COOLDOWN_V2 = "        ELSIF p_cooldown_s > 0 THEN\n            SELECT o.id INTO v_other FROM operation_runs o\n"
if CLAIM_V1.count(_COOLDOWN_V1) != 1 or CLAIM_V1.count(_RAW_COOLDOWN_V1) != 1:
    raise AssertionError("v1 text changed: v2 is derived from it")
CLAIM_V2 = _v2(CLAIM_V1).replace(_COOLDOWN_V1, _COOLDOWN_V2).replace(_RAW_COOLDOWN_V1, _RAW_COOLDOWN_V2)
DISPATCH_V2 = _v2(DISPATCH_V1)

INSTALL_V2 = (CLAIM_V2, DISPATCH_V2)
#: Downgrading 0002 reinstalls v1 over v2 (same signatures).
UNINSTALL_V2 = (CLAIM_V1, DISPATCH_V1)

DROP_V1 = (
    "DROP FUNCTION IF EXISTS opspolish_dispatch(text, uuid, text, text, jsonb, text)",
    "DROP FUNCTION IF EXISTS opspolish_claim(bigint, text, uuid, text, text, jsonb, text, text, uuid, float8, float8)",
    "DROP FUNCTION IF EXISTS opspolish_resolve_tenant(text)",
    "DROP FUNCTION IF EXISTS opspolish_identity(text, text, text)",
    "DROP FUNCTION IF EXISTS opspolish_lock_key(text)",
)

# --- v3 (migration 0004): a delivery is held to its scope and to its run's inputs -----------------------------------
#
# Dispatch and the CLI already refuse a tenant of another workspace than the one named (tenant.not_found); v2's
# claim let the tenant's own workspace silently replace the one a raw delivery named. v3 answers such a delivery
# tenant_not_found, and a run-id delivery whose run lies in another workspace than the one it names run_not_found.
# A run-id delivery that carries inputs also carries their fingerprint: inputs other than the run's (a hand-made
# enqueue_job) are inputs_mismatch / input.invalid, and the run is left as it was, for its own delivery.

_TENANT_FOUND_V2 = """        IF v_tenant IS NULL THEN
            decision := 'tenant_not_found';"""
_TENANT_FOUND_V3 = """        IF v_tenant IS NULL
           OR (p_run_id IS NULL AND p_workspace_id IS NOT NULL AND v_ws <> p_workspace_id) THEN
            decision := 'tenant_not_found';"""
_RUN_FOUND_V2 = """        IF r.id IS NULL OR r.type <> p_type
"""
_RUN_FOUND_V3 = """        IF r.id IS NULL OR r.type <> p_type OR r.workspace_id <> p_workspace_id
"""
_RUN_INPUTS_V2 = """        v_identity := r.run_identity_hash;
    ELSE
"""
_RUN_INPUTS_V3 = """        IF p_fingerprint IS NOT NULL AND r.fingerprint <> p_fingerprint THEN
            decision := 'inputs_mismatch';
            run_id := p_run_id;
            reason_code := 'input.invalid';
            RETURN NEXT;
            RETURN;
        END IF;
        v_identity := r.run_identity_hash;
    ELSE
"""
if any(CLAIM_V2.count(old) != 1 for old in (_TENANT_FOUND_V2, _RUN_FOUND_V2, _RUN_INPUTS_V2)):
    raise AssertionError("v2 text changed: v3 is derived from it")
CLAIM_V3 = (CLAIM_V2.replace(_TENANT_FOUND_V2, _TENANT_FOUND_V3).replace(_RUN_FOUND_V2, _RUN_FOUND_V3)
            .replace(_RUN_INPUTS_V2, _RUN_INPUTS_V3))

# --- v4 (migration 0005): a job id reused by a later enqueue is a new job; a workspace must exist; claims re-check --
#
# A raw delivery's run is found again by its arq job id (a redelivery after a worker died), and v3 took any run with
# that job id and identity for this job's. But arq accepts a new job under an id whose job has ended (a
# `_job_id` reused for uniqueness, as arq suggests): v3 answered every later one already_completed, and the identity
# never ran again, whatever its cooldown. v4 is passed the time arq enqueued the job (`p_enqueued_at`, NULL when
# unknown) and takes a completed run for this job's only if it completed after this job was enqueued: a later
# enqueue of the same id goes through the identity's checks (active run, cooldown) like a new request.
# A raw workspace delivery naming a workspace that does not exist is answered workspace_not_found (input.invalid),
# where v3 failed on the ledger's foreign key.

_SIGNATURE_V3 = """    p_lease_ttl_s double precision
) RETURNS TABLE"""
_SIGNATURE_V4 = """    p_lease_ttl_s double precision,
    p_enqueued_at timestamptz   -- when arq enqueued the job (raw deliveries); NULL when unknown
) RETURNS TABLE"""
_RAW_MATCH_V3 = """        WHERE o.job_id = p_job_id AND o.run_identity_hash = v_identity
"""
_RAW_MATCH_V4 = """        WHERE o.job_id = p_job_id AND o.run_identity_hash = v_identity
          AND (o.status <> 'completed' OR p_enqueued_at IS NULL OR o.completed_at >= p_enqueued_at)
"""
_RAW_SCOPE_V3 = """        IF v_ws IS NULL THEN
            RAISE EXCEPTION 'opspolish_claim: a raw delivery needs a tenant or a workspace' USING ERRCODE = '22023';
        END IF;
"""
_RAW_SCOPE_V4 = _RAW_SCOPE_V3 + """\
        IF v_tenant IS NULL AND NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = v_ws) THEN
            decision := 'workspace_not_found';
            reason_code := 'input.invalid';
            RETURN NEXT;
            RETURN;
        END IF;
"""
# The claim's write re-checks, under the row's lock, what the decision read: another transaction may have changed
# the run in between (a heartbeat that commits while the takeover waits for the row: v3 took over a live lease, and
# two deliveries ran at once). Changed, the delivery is answered busy and decides again shortly. A takeover first
# locks the row FOR UPDATE: a fenced write holds it FOR KEY SHARE (which heartbeats, plain UPDATEs, do not wait for,
# so a long fenced write no longer stalls its lease), and the takeover must wait for that write to commit.
_TAKEOVER_V3 = """\
        UPDATE operation_runs o SET status = 'running', attempts = o.attempts + 1, lease_owner = p_lease_owner,
               heartbeat_at = now(), started_at = coalesce(o.started_at, now()),
               job_id = coalesce(o.job_id, p_job_id), queue_name = coalesce(o.queue_name, p_queue_name)
        WHERE o.id = r.id
        RETURNING o.attempts INTO r.attempts;
"""
_TAKEOVER_V4 = """        IF r.status = 'running' THEN
            PERFORM 1 FROM operation_runs o WHERE o.id = r.id FOR UPDATE;
        END IF;
        UPDATE operation_runs o SET status = 'running', attempts = o.attempts + 1, lease_owner = p_lease_owner,
               heartbeat_at = now(), started_at = coalesce(o.started_at, now()),
               job_id = coalesce(o.job_id, p_job_id), queue_name = coalesce(o.queue_name, p_queue_name)
        WHERE o.id = r.id AND o.status = r.status AND o.lease_owner IS NOT DISTINCT FROM r.lease_owner
          AND (o.status = 'queued' OR o.heartbeat_at <= now() - make_interval(secs => p_lease_ttl_s))
        RETURNING o.attempts INTO r.attempts;
        IF NOT FOUND THEN
            decision := 'busy';
            run_id := r.id;
            workspace_id := r.workspace_id;
            tenant_id := r.tenant_id;
            RETURN NEXT;
            RETURN;
        END IF;
"""
if any(CLAIM_V3.count(old) != 1 for old in (_SIGNATURE_V3, _RAW_MATCH_V3, _RAW_SCOPE_V3, _TAKEOVER_V3)):
    raise AssertionError("v3 text changed: v4 is derived from it")
CLAIM_V4 = (CLAIM_V3.replace(_SIGNATURE_V3, _SIGNATURE_V4).replace(_RAW_MATCH_V3, _RAW_MATCH_V4)
            .replace(_RAW_SCOPE_V3, _RAW_SCOPE_V4).replace(_TAKEOVER_V3, _TAKEOVER_V4))
#: v4 has one more argument: a new function beside v3's, which goes (two would make every call ambiguous).
DROP_CLAIM_V3 = (
    "DROP FUNCTION opspolish_claim(bigint, text, uuid, text, text, jsonb, text, text, uuid, float8, float8)")
DROP_CLAIM_V4 = (
    "DROP FUNCTION opspolish_claim(bigint, text, uuid, text, text, jsonb, text, text, uuid, float8, float8, "
    "timestamptz)")

# v5: a lease whose run row was locked by another transaction (an operator's open transaction) when its keeper beat
# was beaten beside the row, in operation_run_beats (the keeper never waits for a row lock). v4 judged a lease by
# heartbeat_at alone: a run locked for longer than the lease TTL looked stale although its worker was alive and
# beating, and a redelivery that waited for the lock took it over, and ran its body beside the live one.
_DECLARE_V4 = """    v_locked boolean;
"""
_DECLARE_V5 = """    v_locked boolean;
    v_beat timestamptz;
"""
_LIVE_V4 = """        IF r.status = 'running' AND r.heartbeat_at > now() - make_interval(secs => p_lease_ttl_s) THEN
            decision := 'overlap';
"""
_LIVE_V5 = """        IF r.status = 'running' AND r.heartbeat_at <= now() - make_interval(secs => p_lease_ttl_s) THEN
            -- Stale on the row, perhaps only because the row was locked when the keeper beat: its beat is beside it.
            SELECT b.beat_at INTO v_beat FROM operation_run_beats b
            WHERE b.run_id = r.id AND b.lease_owner = r.lease_owner;
            IF v_beat > r.heartbeat_at THEN
                r.heartbeat_at := v_beat;
            END IF;
        END IF;
""" + _LIVE_V4
_RECHECK_V4 = """          AND (o.status = 'queued' OR o.heartbeat_at <= now() - make_interval(secs => p_lease_ttl_s))
"""
# A new statement after the row lock (PERFORM ... FOR UPDATE) was granted: it sees the beats committed while waiting.
_RECHECK_V5 = """          AND (o.status = 'queued' OR (o.heartbeat_at <= now() - make_interval(secs => p_lease_ttl_s)
               AND NOT EXISTS (SELECT 1 FROM operation_run_beats b
                               WHERE b.run_id = o.id AND b.lease_owner = o.lease_owner
                                 AND b.beat_at > now() - make_interval(secs => p_lease_ttl_s))))
"""
if any(CLAIM_V4.count(old) != 1 for old in (_DECLARE_V4, _LIVE_V4, _RECHECK_V4)):
    raise AssertionError("v4 text changed: v5 is derived from it")
#: Same signature as v4: CREATE OR REPLACE swaps it in place.
CLAIM_V5 = CLAIM_V4.replace(_DECLARE_V4, _DECLARE_V5).replace(_LIVE_V4, _LIVE_V5).replace(_RECHECK_V4, _RECHECK_V5)
