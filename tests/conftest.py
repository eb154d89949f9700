"""Test infrastructure: real PostgreSQL and Redis.

A migrated template database is made once per session; every test gets its own clone
(``CREATE DATABASE ... TEMPLATE``) and its own arq queue name, and both are removed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq.worker import Worker, get_kwargs
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from redis.asyncio import Redis

from opspolish import db
from opspolish.runtime import Runtime
from opspolish.settings import Settings
from opspolish.worker import worker_settings
from tests.support.jobs import TEST_EFFECTS_DDL, TEST_JOBS

hypothesis_settings.register_profile(
    "opspolish", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
hypothesis_settings.load_profile("opspolish")

ROOT = Path(__file__).resolve().parents[1]
RUN_TAG = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"

for key in [k for k in os.environ if k.startswith("OPSPOLISH_")]:
    # Tests choose their own databases and queues; a developer's environment must not leak in.
    if key not in ("OPSPOLISH_DATABASE_URL", "OPSPOLISH_REDIS_URL"):
        del os.environ[key]


def base_settings() -> Settings:
    return Settings(log_format="json", lease_ttl_s=5.0, job_timeout_s=30.0, reconcile_grace_s=0.0)


@pytest.fixture(scope="session")
async def template_db() -> AsyncIterator[str]:
    name = f"opspolish_tmpl_{RUN_TAG}"
    settings = base_settings().with_database(name)
    await db.drop_database(settings, name)
    await db.upgrade(settings)
    conn = await db.connect(settings)
    try:
        await conn.execute(TEST_EFFECTS_DDL)
    finally:
        await conn.close()
    yield name
    await db.drop_database(settings, name)


async def clone_database(settings: Settings, template: str, name: str) -> None:
    conn = await db.connect(settings, "postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()


@pytest.fixture
async def settings(template_db: str) -> AsyncIterator[Settings]:
    """Settings pointing at a fresh clone of the template and a queue of this test's own."""
    name = f"opspolish_t_{uuid.uuid4().hex[:12]}"
    base = base_settings()
    await clone_database(base, template_db, name)
    s = base.with_database(name).model_copy(update={"queue_name": f"opspolish-test:{name}"})
    yield s
    await _clean_redis(s)
    await db.drop_database(s, name)


async def _clean_redis(settings: Settings) -> None:
    redis: Redis = Redis.from_url(settings.redis_url.get_secret_value())
    try:
        keys = [settings.queue_name, settings.queue_name + ":health-check"]
        async for key in redis.scan_iter(match=f"arq:*{settings.queue_name}*", count=1000):
            keys.append(key)
        await redis.delete(*keys)
    finally:
        await redis.aclose()


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    c = await db.connect(settings)
    await db.init_connection(c)
    yield c
    await c.close()


@pytest.fixture
async def seeded(conn: asyncpg.Connection) -> dict[str, Any]:
    """Two workspaces with three tenants each, plus the directory."""
    from opspolish.seed import seed

    await seed(conn)
    tenants = await conn.fetch("SELECT t.id, t.external_id, t.workspace_id, w.slug FROM tenants t "
                               "JOIN workspaces w ON w.id = t.workspace_id ORDER BY w.slug, t.name")
    workspaces = await conn.fetch("SELECT id, slug FROM workspaces ORDER BY slug")
    return {"tenants": tenants, "workspaces": workspaces}


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = await Runtime.start(settings)
    yield runtime
    await runtime.close()


def make_worker(settings: Settings, **overrides: Any) -> Worker:
    """An in-process arq worker with the built-in and test jobs, in burst mode by default."""
    import opspolish.jobs  # noqa: F401
    from opspolish.tracking import REGISTRY

    ws = worker_settings(settings, jobs=[*REGISTRY.values(), *TEST_JOBS], with_cron=False,
                         configure_logs=False)
    kwargs: dict[str, Any] = dict(get_kwargs(ws))
    kwargs.update({"burst": True, "poll_delay": 0.02, "handle_signals": False, **overrides})
    return Worker(**kwargs)


async def drain(settings: Settings, *, timeout_s: float = 60.0, **overrides: Any) -> Worker:
    worker = make_worker(settings, **overrides)
    try:
        await asyncio.wait_for(worker.main(), timeout_s)
    finally:
        await worker.close()
    return worker


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPOLISH_")}
    env.update({
        "OPSPOLISH_DATABASE_URL": settings.database_url.get_secret_value(),
        "OPSPOLISH_REDIS_URL": settings.redis_url.get_secret_value(),
        "OPSPOLISH_QUEUE_NAME": settings.queue_name,
        "OPSPOLISH_LEASE_TTL_S": str(settings.lease_ttl_s),
        "OPSPOLISH_DEDUPE_COOLDOWN_S": str(settings.dedupe_cooldown_s),
        "OPSPOLISH_JOB_TIMEOUT_S": str(settings.job_timeout_s),
        "OPSPOLISH_LOG_FORMAT": "json",
        "OPSPOLISH_JOB_MODULES": "tests.support.jobs",
        "PYTHONPATH": str(ROOT),
        **extra,
    })
    return env


class WorkerProcess:
    """A real worker process (``arq tests.support.workers.WorkerSettings``)."""

    def __init__(self, settings: Settings, *, burst: bool = False, log_path: Path | None = None,
                 settings_cls: str = "tests.support.workers.WorkerSettings", **env: str) -> None:
        args = [sys.executable, "-m", "arq", settings_cls]
        if burst:
            args.append("--burst")
        self.log_path = log_path
        if log_path is None:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=worker_env(settings, **env),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            with open(log_path, "wb") as out:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(args, cwd=ROOT, env=worker_env(settings, **env), stdout=out,
                                             stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = 60.0) -> int:
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


def log_events(procs: Iterable[WorkerProcess]) -> list[dict[str, Any]]:
    """The structured (JSON) log events of worker processes."""
    events = []
    for p in procs:
        for line in p.log().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
    return events


@pytest.fixture
def worker_processes() -> Iterator[list[WorkerProcess]]:
    procs: list[WorkerProcess] = []
    yield procs
    for p in procs:
        p.kill()
        p.proc.wait(10)


async def wait_until(predicate: Any, *, timeout_s: float = 30.0, interval_s: float = 0.05) -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)
