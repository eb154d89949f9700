#!/usr/bin/env python3
"""`make demo`: the main job end to end, through the real CLI and a real arq worker process.

Services answer (the Makefile made sure) -> schema reset and seed -> a fetch for every tenant (plus one
duplicate dispatch, which joins) -> a burst worker drains -> a restore for every tenant -> drained ->
the ledger, summarized. It uses its own database (``opspolish_demo``) and queue, never your data.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from opspolish import db
from opspolish.settings import Settings

BIN = Path(sys.executable).parent
DEMO_DB = "opspolish_demo"
DEMO_QUEUE = "opspolish:demo"


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(env: dict[str, str], *args: str, capture: bool = False) -> str:
    proc = subprocess.run(args, env=env, check=False, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        sys.exit(f"demo: `{' '.join(args[:3])} ...` failed with exit code {proc.returncode}")
    return proc.stdout or ""


def opspolish(env: dict[str, str], *args: str) -> str:
    return run(env, str(BIN / "opspolish"), *args, capture=True)


def drain(env: dict[str, str]) -> None:
    run(env, str(BIN / "arq"), "opspolish.worker.WorkerSettings", "--burst")


async def fetch_rows(settings: Settings, sql: str, *args: Any) -> list[Any]:
    conn = await db.connect(settings)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def main() -> None:
    base = Settings()
    settings = base.with_database(DEMO_DB)
    env = {**os.environ, "OPSPOLISH_DATABASE_URL": settings.database_url.get_secret_value(),
           "OPSPOLISH_QUEUE_NAME": DEMO_QUEUE, "OPSPOLISH_LOG_FORMAT": "json"}

    step(f"reset and seed database {DEMO_DB}")
    print(opspolish(env, "db", "reset", "--seed").strip())
    # One locked policy, so a restore shows a partial success without hiding the items that succeeded.
    asyncio.run(fetch_rows(settings, """UPDATE directory_policies SET locked = true WHERE id = (
        SELECT p.id FROM directory_policies p JOIN tenants t ON t.id = p.tenant_id
        JOIN workspaces w ON w.id = t.workspace_id WHERE w.slug = 'globex' ORDER BY t.name, p.name LIMIT 1)"""))
    tenants = asyncio.run(fetch_rows(settings, "SELECT external_id, name FROM tenants ORDER BY name"))

    step(f"dispatch assignments.fetch for {len(tenants)} tenants, and one duplicate")
    for t in tenants:
        out = json.loads(opspolish(env, "dispatch", "assignments.fetch", "--tenant", t["external_id"], "--json"))
        print(f"  {t['name']:<24} run {out['run_id']:>3} {out['verdict']}")
    dup = json.loads(opspolish(env, "dispatch", "assignments.fetch", "--tenant", tenants[0]["external_id"],
                               "--json"))
    print(f"  {tenants[0]['name']:<24} run {dup['run_id']:>3} {dup['verdict']}   <- duplicate dispatch joined")

    step("burst worker drains the queue")
    drain(env)

    step(f"dispatch assignments.restore for {len(tenants)} tenants (from their latest fetch)")
    for t in tenants:
        out = json.loads(opspolish(env, "dispatch", "assignments.restore", "--tenant", t["external_id"], "--json"))
        print(f"  {t['name']:<24} run {out['run_id']:>3} {out['verdict']}")
    drain(env)

    step("ledger")
    print(opspolish(env, "runs", "list", "--limit", "100").rstrip())
    rows = asyncio.run(fetch_rows(settings, """
        SELECT count(*) FILTER (WHERE summary_counts IS NOT NULL) AS with_counts, count(*) AS total,
               count(*) FILTER (WHERE outcome = 'succeeded') AS ok,
               count(*) FILTER (WHERE outcome = 'partially_succeeded') AS partial,
               count(*) FILTER (WHERE outcome NOT IN ('succeeded', 'partially_succeeded')) AS other
        FROM operation_runs WHERE type IN ('assignments.fetch', 'assignments.restore') AND status = 'completed'"""))
    r = rows[0]
    pending = asyncio.run(fetch_rows(settings, "SELECT count(*) FROM operation_runs WHERE status <> 'completed'"))
    step("summary")
    print(f"  completed fetch/restore runs: {r['total']} ({r['ok']} succeeded, {r['partial']} partially "
          f"succeeded, {r['other']} other); with summary counts: {r['with_counts']}/{r['total']}")
    print(f"  runs not completed: {pending[0][0]}")
    if r["total"] == 0 or r["with_counts"] != r["total"] or pending[0][0] or r["other"]:
        sys.exit("demo: the ledger is not as expected (see above)")
    print("\ndemo: ok")


if __name__ == "__main__":
    main()
